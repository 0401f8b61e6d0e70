// Changing the backing file name and its format (docs/interop/qcow2.rst "Header": backing_file_offset,
// backing_file_size; "Header extensions": Backing file format name) as qemu's
// qcow2_change_backing_file does it: cluster 0 is rebuilt from the header with the new name and
// extension, written whole in one write and flushed. The in-memory header changes only once the
// write is durable. v2 images carry the backing format extension too (qemu writes it there).

import { Qcow2Error, Qcow2ErrorCode } from "../errors.js";
import type { BlockBackend } from "../io/backend.js";
import { encodeString } from "./bytes.js";
import { AUTOCLEAR_DATA_FILE_RAW, EXT_BACKING_FORMAT, MAX_BACKING_FILE_SIZE, MAX_BACKING_FORMAT_SIZE } from "./constants.js";
import type { Qcow2Header } from "./header.js";
import { encodeHeader } from "./header-write.js";

/**
 * Point `h` at `backingFile` (undefined: no backing file) with format `backingFormat` (undefined:
 * no backing-format extension). Throws LIMIT_EXCEEDED when the name is longer than qemu accepts or
 * the header would not fit in cluster 0, NOT_SUPPORTED for a backing file on an image whose
 * external data file must stay a valid raw image.
 */
export async function writeBackingFile(
  backend: BlockBackend,
  h: Qcow2Header,
  clusterSize: number,
  backingFile: string | undefined,
  backingFormat: string | undefined,
): Promise<void> {
  if (backingFormat !== undefined && backingFile === undefined) {
    throw new TypeError(`writeBackingFile: backing format "${backingFormat}" given without a backing file`);
  }
  const nameBytes = backingFile === undefined ? 0 : encodeString(backingFile).length;
  if (nameBytes > MAX_BACKING_FILE_SIZE) {
    throw new Qcow2Error(Qcow2ErrorCode.LIMIT_EXCEEDED, `backing file name of ${nameBytes} bytes exceeds the ${MAX_BACKING_FILE_SIZE}-byte limit`);
  }
  if (backingFormat !== undefined && encodeString(backingFormat).length > MAX_BACKING_FORMAT_SIZE) {
    throw new Qcow2Error(Qcow2ErrorCode.LIMIT_EXCEEDED, `backing format "${backingFormat}" exceeds the ${MAX_BACKING_FORMAT_SIZE}-byte limit`);
  }
  if (backingFile !== undefined && (h.autoclearFeatures & BigInt(AUTOCLEAR_DATA_FILE_RAW)) !== 0n) {
    throw new Qcow2Error(Qcow2ErrorCode.NOT_SUPPORTED, `a backing file cannot be added to an image with data_file_raw set`);
  }
  const next: Qcow2Header = { ...h, extensions: { ...h.extensions } };
  if (backingFile === undefined || nameBytes === 0) delete next.backingFile;
  else next.backingFile = backingFile;
  if (backingFormat === undefined) delete next.extensions.backingFormat;
  else next.extensions.backingFormat = backingFormat;
  const bytes = encodeHeader(next, clusterSize);
  // qemu writes the whole cluster: whatever followed the old name is cleared.
  const cluster = new Uint8Array(clusterSize);
  cluster.set(bytes);
  await backend.write(cluster, 0);
  await backend.flush();

  h.backingFile = next.backingFile;
  if (next.backingFile === undefined) delete h.backingFile;
  h.backingFileSize = next.backingFile === undefined ? 0 : nameBytes;
  h.backingFileOffset = next.backingFile === undefined ? 0 : bytes.length - nameBytes;
  h.extensions.backingFormat = next.extensions.backingFormat;
  if (next.extensions.backingFormat === undefined) delete h.extensions.backingFormat;
  const order = h.extensions.order.filter((t) => t !== EXT_BACKING_FORMAT);
  if (next.extensions.backingFormat !== undefined) order.unshift(EXT_BACKING_FORMAT);
  h.extensions.order = order;
}
