// qcow2-wasm core: runs anywhere WebAssembly does. Node extras are in "qcow2-wasm/node".
export { Qcow2Error, Qcow2ErrorCode, isQcow2Error } from "./errors.js";
export type { BlockBackend } from "./io/backend.js";
export { readFully } from "./io/backend.js";
export { MemoryBackend, type MemoryBackendOptions } from "./io/memory.js";
export { BlobBackend } from "./io/blob.js";
export {
  Qcow2Image,
  type OpenOptions,
  type ImageInfo,
  type BackingResolver,
  type ReadableOptions,
  type WriteZeroesOptions,
} from "./image/qcow2-image.js";
export { Snapshots, type SnapshotInfo, type CreateSnapshotOptions } from "./image/snapshots.js";
export { RawDevice, type Extent, type ExtentKind, type GuestDevice } from "./image/device.js";
export type { CreateOptions, Preallocation } from "./image/create.js";
export { parseHeader, probeHeader, type Qcow2Header, type HeaderExtensions } from "./format/header.js";
export { compileWasm, preferredVariant, type WasmVariant } from "./wasm/core.js";
export { registerPlatform, type Platform } from "./platform.js";
export type { ClusterInflater } from "./codecs/deflate.js";
export { map, mapEntries, toMapEntry, formatMapJson, type MapEntry, type MapOptions } from "./ops/map.js";
export { imageInfo, formatInfoHuman, sizeToStr, type QemuImageInfo, type InfoOptions } from "./ops/info.js";
export {
  checkImage,
  checkExitCode,
  checkToQemuJson,
  formatCheckJson,
  formatCheckHuman,
  type CheckOptions,
  type CheckReport,
  type CheckCounts,
  type RepairMode,
} from "./check/check.js";
export { convert, type ConvertOptions } from "./ops/convert.js";
export { amend, AmendError, type AmendOptions, type AmendEncryptOptions } from "./ops/amend.js";
export { rebase, copyForRebase, RebaseError, type RebaseOptions, type RebaseCopyOptions, type RebaseStage } from "./ops/rebase.js";
export { commit, type CommitOptions } from "./ops/commit.js";
