// Qcow2Image: open an image and read guest bytes through its L1/L2 map and its backing chain.
// (docs/interop/qcow2.rst "Cluster mapping"; the seed's qcow_open and qcow_aio_read_cb.)

import { Qcow2Error, Qcow2ErrorCode, hex } from "../errors.js";
import { readFully, type BlockBackend } from "../io/backend.js";
import {
  COMPRESSION_ZSTD,
  CRYPT_AES,
  CRYPT_LUKS,
  CRYPT_NONE,
  INCOMPAT_CORRUPT,
  INCOMPAT_DATA_FILE,
  INCOMPAT_DIRTY,
  INCOMPAT_EXTL2,
  QCOW2_INCOMPAT_MASK,
  COMPAT_LAZY_REFCOUNTS,
  AUTOCLEAR_DATA_FILE_RAW,
  MAX_BACKING_CHAIN_DEPTH,
  QCOW_MAGIC,
} from "../format/constants.js";
import { HEADER_PROBE_SIZE, featureBits, featureName, parseHeader, probeHeader, type Qcow2Header } from "../format/header.js";
import { L1Table } from "../format/l1.js";
import type { ClusterInflater } from "../codecs/deflate.js";
import { platform } from "../platform.js";
import { WasmCore, type WasmVariant } from "../wasm/core.js";
import {
  L2_INVALID_OFFSET_TOO_LARGE,
  L2_INVALID_UNALIGNED,
  L2_TYPE_COMPRESSED,
  L2_TYPE_INVALID,
  L2_TYPE_NORMAL,
  L2_TYPE_UNALLOCATED,
  L2_TYPE_ZERO_ALLOC,
  L2_TYPE_ZERO_PLAIN,
  LOOKUP_ZERO_FLAG,
} from "../wasm/exports.js";
import { RawDevice, readClipped, type Extent, type GuestDevice } from "./device.js";
import { TableCache } from "./table-cache.js";

/** Opens the backing file named `backingFile` by the image called `imageName`. */
export type BackingResolver = (backingFile: string, imageName: string) => Promise<BlockBackend>;

export interface OpenOptions {
  /** Only read-only opens exist until the write engine lands; `false` is refused. */
  readOnly?: boolean;
  /** "open" (default) follows the backing chain; "none" reads unallocated clusters as zeros, like qemu -u. */
  backing?: "open" | "none";
  /** Replaces the platform's way of opening backing files (Node: a path relative to the image). */
  resolveBacking?: BackingResolver;
  /** Format of the backing file when the image does not record one: qemu probes, so do we by default. */
  l2CacheSize?: number;
  /** Force the scalar or SIMD WebAssembly build. */
  wasm?: WasmVariant;
}

/** @internal */
export interface ChainState {
  depth: number;
  names: string[];
}

/** Everything the header says, in names a caller can use. */
export interface ImageInfo {
  format: "qcow2";
  name: string;
  version: 2 | 3;
  /** qemu's name for the version: "0.10" (v2) or "1.1" (v3). */
  compat: "0.10" | "1.1";
  virtualSize: number;
  clusterSize: number;
  clusterBits: number;
  refcountBits: number;
  refcountOrder: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  headerLength: number;
  compressionType: "zlib" | "zstd";
  encryption: "none" | "aes" | "luks";
  dirty: boolean;
  corrupt: boolean;
  lazyRefcounts: boolean;
  extendedL2: boolean;
  dataFileRaw: boolean;
  incompatibleFeatures: string[];
  compatibleFeatures: string[];
  autoclearFeatures: string[];
  backingFile?: string;
  backingFormat?: string;
  dataFile?: string;
  bitmaps?: { nbBitmaps: number; bitmapDirectorySize: number; bitmapDirectoryOffset: number };
  cryptoHeader?: { offset: number; length: number };
  unknownExtensions: { type: number; length: number }[];
  /** Length of the image file in bytes. */
  fileSize: number;
}

export interface ReadableOptions {
  start?: number;
  length?: number;
  /** Bytes per chunk (default 1 MiB). */
  chunkSize?: number;
}

const DEFAULT_L2_CACHE_SIZE = 32 * 1024 * 1024;
const MIN_L2_SLOTS = 16;

function cryptName(method: number): "none" | "aes" | "luks" {
  return method === CRYPT_AES ? "aes" : method === CRYPT_LUKS ? "luks" : "none";
}

export class Qcow2Image implements GuestDevice {
  readonly format = "qcow2";
  readonly backend: BlockBackend;
  readonly header: Qcow2Header;
  readonly clusterSize: number;
  readonly clusterBits: number;
  readonly readOnly = true;
  /** The next image down the chain, if any and if opened. */
  readonly backing: GuestDevice | undefined;
  private readonly l1: L1Table;
  private readonly core: WasmCore;
  private readonly l2Cache: TableCache;
  private readonly l2Entries: number;
  private readonly l1Span: number;
  private readonly lookupFlags: number;
  private readonly fileSize: number;
  private inflater: ClusterInflater | undefined;
  /** The last cluster inflated, for reads that take a compressed cluster piece by piece. */
  private inflated: { hostOffset: number; data: Uint8Array } | undefined;
  private closed = false;

  private constructor(
    backend: BlockBackend,
    header: Qcow2Header,
    l1: L1Table,
    core: WasmCore,
    l2CacheSize: number,
    backing: GuestDevice | undefined,
    fileSize: number,
  ) {
    this.backend = backend;
    this.header = header;
    this.clusterBits = header.clusterBits;
    this.clusterSize = 2 ** header.clusterBits;
    this.l2Entries = this.clusterSize / 8;
    this.l1Span = this.clusterSize * this.l2Entries;
    this.l1 = l1;
    this.core = core;
    this.backing = backing;
    this.fileSize = fileSize;
    this.lookupFlags = header.version >= 3 ? LOOKUP_ZERO_FLAG : 0;
    const tablesNeeded = Math.max(1, Math.ceil(header.size / this.l1Span));
    const slots = Math.max(MIN_L2_SLOTS, Math.min(tablesNeeded, Math.floor(l2CacheSize / this.clusterSize)));
    this.l2Cache = new TableCache(core, this.clusterSize, slots, {
      load: (dst, l2Offset) => readFully(backend, dst, l2Offset),
      store: () => Promise.reject(new Error("read-only image has no dirty L2 tables")),
    });
  }

  /** @internal Opens one image of a chain; `chain` says how deep and what is above it. */
  static async openAt(target: BlockBackend | string, options: OpenOptions, chain: ChainState): Promise<Qcow2Image> {
    if (options.readOnly === false) {
      throw new Qcow2Error(Qcow2ErrorCode.NOT_SUPPORTED, `open: read-write opens are not supported yet (the write engine is not built)`);
    }
    const backend = await resolveBackend(target, true);
    try {
      const fileSize = await backend.size();
      const probe = new Uint8Array(HEADER_PROBE_SIZE);
      await readFully(backend, probe, 0);
      const { clusterBits } = probeHeader(probe.subarray(0, Math.min(HEADER_PROBE_SIZE, Math.max(fileSize, 0))));
      const cluster0 = new Uint8Array(2 ** clusterBits);
      await readFully(backend, cluster0, 0);
      const header = parseHeader(cluster0);
      refuseFeatures(header, backend.name);

      const l1 = new L1Table(header.l1Size);
      await readFully(backend, l1.bytes, header.l1TableOffset);

      const backing = await openBacking(header, backend.name, options, chain);
      try {
        const core = await WasmCore.create(options.wasm);
        return new Qcow2Image(
          backend,
          header,
          l1,
          core,
          options.l2CacheSize ?? DEFAULT_L2_CACHE_SIZE,
          backing,
          fileSize,
        );
      } catch (err) {
        await backing?.close();
        throw err;
      }
    } catch (err) {
      await backend.close().catch(() => undefined);
      throw err;
    }
  }

  get name(): string {
    return this.backend.name;
  }

  get virtualSize(): number {
    return this.header.size;
  }

  /** Open a qcow2 image from a backend, or from a path where the platform has files (qcow2-wasm/node). */
  static async open(target: BlockBackend | string, options: OpenOptions = {}): Promise<Qcow2Image> {
    return Qcow2Image.openAt(target, options, { depth: 0, names: [] });
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  /** Close the image and its backing chain. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    try {
      await this.backing?.close();
    } finally {
      await this.backend.close();
    }
  }

  private live(op: string): void {
    if (this.closed) throw new Qcow2Error(Qcow2ErrorCode.CLOSED, `${this.name}: ${op} after close`);
  }

  /** Read `length` guest bytes, or fill `dst`, from `guestOffset`. */
  async read(guestOffset: number, lengthOrDst: number | Uint8Array): Promise<Uint8Array> {
    this.live("read");
    const dst = typeof lengthOrDst === "number" ? new Uint8Array(lengthOrDst) : lengthOrDst;
    if (typeof lengthOrDst === "number" && (!Number.isSafeInteger(lengthOrDst) || lengthOrDst < 0)) {
      throw new RangeError(`read: length ${lengthOrDst} is not a non-negative integer`);
    }
    this.checkGuestRange("read", guestOffset, dst.length);
    await this.readInto(dst, guestOffset);
    return dst;
  }

  private checkGuestRange(op: string, guestOffset: number, length: number): void {
    if (!Number.isSafeInteger(guestOffset) || guestOffset < 0) {
      throw new RangeError(`${op}: guest offset ${guestOffset} is not a non-negative integer`);
    }
    if (guestOffset + length > this.header.size) {
      throw new RangeError(`${op}: range ${guestOffset}+${length} ends past the virtual size ${this.header.size}`);
    }
  }

  /** GuestDevice: fill `dst` from `guestOffset` (range already checked). */
  async readInto(dst: Uint8Array, guestOffset: number): Promise<void> {
    const cs = this.clusterSize;
    const len = dst.length;
    let pos = 0;
    while (pos < len) {
      const g = guestOffset + pos;
      const l1Index = Math.floor(g / this.l1Span);
      const inTable = g - l1Index * this.l1Span;
      const l2Index = Math.floor(inTable / cs);
      const inCluster = inTable - l2Index * cs;
      const maxBytes = Math.min(len - pos, this.l1Span - inTable);
      const l2Offset = this.l2TableOffset(l1Index);
      if (l2Offset === 0) {
        await this.readUnallocated(dst.subarray(pos, pos + maxBytes), g);
        pos += maxBytes;
        continue;
      }
      let slot = this.l2Cache.peek(l2Offset);
      if (slot < 0) slot = await this.l2Cache.get(l2Offset);
      const n = this.core.l2Lookup(slot, l2Index, Math.ceil((inCluster + maxBytes) / cs), this.clusterBits, this.lookupFlags);
      const r = this.core.result;
      const bytes = Math.min(maxBytes, n * cs - inCluster);
      const part = dst.subarray(pos, pos + bytes);
      switch (r.type) {
        case L2_TYPE_NORMAL:
          this.assertReadable(g);
          // The lookup bounds the run's first cluster below 2^53, not the end of the run.
          if (r.hostOffset + inCluster + bytes > Number.MAX_SAFE_INTEGER) {
            throw this.invalidEntry(l1Index, l2Offset, l2Index, L2_INVALID_OFFSET_TOO_LARGE, r.hostOffset);
          }
          await readFully(this.backend, part, r.hostOffset + inCluster);
          break;
        case L2_TYPE_ZERO_PLAIN:
        case L2_TYPE_ZERO_ALLOC:
          part.fill(0);
          break;
        case L2_TYPE_UNALLOCATED:
          await this.readUnallocated(part, g);
          break;
        case L2_TYPE_COMPRESSED:
          this.assertReadable(g);
          await this.readCompressed(part, r.hostOffset, r.compressedSize, inCluster, g);
          break;
        default:
          throw this.invalidEntry(l1Index, l2Offset, l2Index, r.invalidReason, r.hostOffset);
      }
      pos += bytes;
    }
  }

  private assertReadable(guestOffset: number): void {
    if (this.header.cryptMethod !== CRYPT_NONE) {
      throw new Qcow2Error(
        Qcow2ErrorCode.ENCRYPTED,
        `${this.name}: guest offset ${guestOffset} is encrypted (${cryptName(this.header.cryptMethod)}); encrypted images cannot be read yet`,
      );
    }
  }

  private invalidEntry(l1Index: number, l2Offset: number, l2Index: number, reason: number, hostOffset: number): Qcow2Error {
    const where = `L2 table ${hex(l2Offset)} (L1 index ${l1Index}), entry ${l2Index}`;
    const why =
      reason === L2_INVALID_UNALIGNED
        ? `cluster offset ${hex(hostOffset)} is not aligned to the cluster size ${this.clusterSize}`
        : reason === L2_INVALID_OFFSET_TOO_LARGE
          ? `host offset${hostOffset > 0 ? ` ${hex(hostOffset)}` : ""} (with the bytes it maps) reaches 2^53`
          : `zero flag set in a version ${this.header.version} image (only v3 has zero clusters)`;
    return new Qcow2Error(Qcow2ErrorCode.CORRUPT, `${this.name}: ${where}: ${why}`);
  }

  /** Offset of the L2 table for `l1Index`, 0 when unallocated; throws CORRUPT on a bad L1 entry. */
  private l2TableOffset(l1Index: number): number {
    const offset = this.l1.l2Offset(l1Index);
    if (offset !== 0 && offset % this.clusterSize !== 0) {
      throw new Qcow2Error(
        Qcow2ErrorCode.CORRUPT,
        `${this.name}: L2 table offset ${hex(offset)} at L1 index ${l1Index} is not aligned to the cluster size ${this.clusterSize}`,
      );
    }
    // The whole table must be addressable: a table at 2^53 - cluster_size would end past 2^53.
    if (offset + this.clusterSize > Number.MAX_SAFE_INTEGER) {
      throw new Qcow2Error(
        Qcow2ErrorCode.CORRUPT,
        `${this.name}: L2 table offset ${hex(offset)} at L1 index ${l1Index} ends past 2^53`,
      );
    }
    return offset;
  }

  private async readUnallocated(dst: Uint8Array, guestOffset: number): Promise<void> {
    if (this.backing) await readClipped(this.backing, dst, guestOffset);
    else dst.fill(0);
  }

  private async readCompressed(
    dst: Uint8Array,
    hostOffset: number,
    compressedSize: number,
    inCluster: number,
    guestOffset: number,
  ): Promise<void> {
    const cs = this.clusterSize;
    if (this.header.compressionType === COMPRESSION_ZSTD) {
      throw new Qcow2Error(Qcow2ErrorCode.NOT_SUPPORTED, `${this.name}: zstd compressed clusters are not supported yet`);
    }
    const cached = this.inflated;
    if (cached && cached.hostOffset === hostOffset) {
      dst.set(cached.data.subarray(inCluster, inCluster + dst.length));
      return;
    }
    // The size field is an upper bound that may run past the end of the file: read what is there.
    const available = Math.max(0, Math.min(compressedSize, this.fileSize - hostOffset));
    const src = new Uint8Array(available);
    await readFully(this.backend, src, hostOffset);
    const whole = inCluster === 0 && dst.length === cs;
    const out = whole ? dst : new Uint8Array(cs);
    this.inflater ??= platform.createInflater();
    if (!this.inflater.inflate(src, out)) {
      throw new Qcow2Error(
        Qcow2ErrorCode.BAD_COMPRESSED_DATA,
        `${this.name}: compressed cluster at host offset ${hex(hostOffset)} (guest offset ${guestOffset - inCluster}, ${compressedSize} bytes) does not inflate to ${cs} bytes`,
      );
    }
    if (!whole) {
      this.inflated = { hostOffset, data: out };
      dst.set(out.subarray(inCluster, inCluster + dst.length));
    }
  }

  /** The mapping in this image alone of the run at `guestOffset`, as an extent at depth 0. */
  private async localStatus(guestOffset: number, maxLength: number): Promise<Extent> {
    const cs = this.clusterSize;
    const l1Index = Math.floor(guestOffset / this.l1Span);
    const inTable = guestOffset - l1Index * this.l1Span;
    const l2Index = Math.floor(inTable / cs);
    const inCluster = inTable - l2Index * cs;
    const maxBytes = Math.min(maxLength, this.l1Span - inTable);
    const l2Offset = this.l2TableOffset(l1Index);
    if (l2Offset === 0) return { start: guestOffset, length: maxBytes, kind: "unallocated", depth: 0 };
    let slot = this.l2Cache.peek(l2Offset);
    if (slot < 0) slot = await this.l2Cache.get(l2Offset);
    const n = this.core.l2Lookup(slot, l2Index, Math.ceil((inCluster + maxBytes) / cs), this.clusterBits, this.lookupFlags);
    const r = this.core.result;
    const length = Math.min(maxBytes, n * cs - inCluster);
    const extent: Extent = { start: guestOffset, length, kind: "unallocated", depth: 0 };
    switch (r.type) {
      case L2_TYPE_NORMAL:
        extent.kind = "data";
        extent.hostOffset = r.hostOffset + inCluster;
        break;
      case L2_TYPE_ZERO_ALLOC:
        extent.kind = "zero";
        extent.hostOffset = r.hostOffset + inCluster;
        break;
      case L2_TYPE_ZERO_PLAIN:
        extent.kind = "zero";
        break;
      case L2_TYPE_COMPRESSED:
        extent.kind = "compressed";
        extent.hostOffset = r.hostOffset;
        break;
      case L2_TYPE_UNALLOCATED:
        break;
      case L2_TYPE_INVALID:
      default:
        throw this.invalidEntry(l1Index, l2Offset, l2Index, r.invalidReason, r.hostOffset);
    }
    return extent;
  }

  /**
   * GuestDevice: where the run at `guestOffset` (at most `maxLength` bytes) comes from, following
   * the backing chain as qemu-img map does.
   */
  async blockStatus(guestOffset: number, maxLength: number): Promise<Extent> {
    const local = await this.localStatus(guestOffset, maxLength);
    if (local.kind !== "unallocated" || !this.backing) return local;
    // Past the backing file's end the overlay itself reads as zero (depth stays here).
    if (guestOffset >= this.backing.virtualSize) return local;
    const below = await this.backing.blockStatus(guestOffset, Math.min(local.length, this.backing.virtualSize - guestOffset));
    below.depth += 1;
    return below;
  }

  /** Whether the range at `guestOffset` is allocated in this image itself (data, zero or compressed). */
  async isAllocated(guestOffset: number, length: number): Promise<{ allocated: boolean; length: number }> {
    this.live("isAllocated");
    this.checkGuestRange("isAllocated", guestOffset, length);
    const e = await this.localStatus(guestOffset, length);
    return { allocated: e.kind !== "unallocated", length: e.length };
  }

  /**
   * The guest range as extents, adjacent ones with the same kind, depth and contiguous host
   * offsets merged (compressed clusters stay one extent each).
   */
  async *extents(options: { start?: number; length?: number } = {}): AsyncGenerator<Extent> {
    this.live("extents");
    const start = options.start ?? 0;
    const end = options.length === undefined ? this.header.size : start + options.length;
    this.checkGuestRange("extents", start, end - start);
    let pending: Extent | undefined;
    for (let pos = start; pos < end; ) {
      const e = await this.blockStatus(pos, end - pos);
      pos += e.length;
      if (pending && mergeable(pending, e)) {
        pending.length += e.length;
        continue;
      }
      if (pending) yield pending;
      pending = e;
    }
    if (pending) yield pending;
  }

  /** Guest bytes as a stream of chunks (1 MiB by default). */
  readable(options: ReadableOptions = {}): ReadableStream<Uint8Array> {
    this.live("readable");
    const start = options.start ?? 0;
    const end = options.length === undefined ? this.header.size : start + options.length;
    this.checkGuestRange("readable", start, end - start);
    const chunkSize = options.chunkSize ?? 1 << 20;
    if (!Number.isSafeInteger(chunkSize) || chunkSize <= 0) throw new RangeError(`readable: chunkSize ${chunkSize} is not a positive integer`);
    let pos = start;
    return new ReadableStream<Uint8Array>(
      {
        pull: async (controller) => {
          if (pos >= end) {
            controller.close();
            return;
          }
          const n = Math.min(chunkSize, end - pos);
          const chunk = await this.read(pos, n);
          pos += n;
          controller.enqueue(chunk);
        },
      },
      { highWaterMark: 2 },
    );
  }

  /** Header facts. */
  info(): ImageInfo {
    const h = this.header;
    const names = (type: 0 | 1 | 2, mask: bigint): string[] =>
      featureBits(mask).map((bit) => featureName(h, type, bit) ?? `unknown bit ${bit}`);
    const info: ImageInfo = {
      format: "qcow2",
      name: this.name,
      version: h.version,
      compat: h.version === 2 ? "0.10" : "1.1",
      virtualSize: h.size,
      clusterSize: this.clusterSize,
      clusterBits: h.clusterBits,
      refcountBits: 2 ** h.refcountOrder,
      refcountOrder: h.refcountOrder,
      l1Size: h.l1Size,
      l1TableOffset: h.l1TableOffset,
      refcountTableOffset: h.refcountTableOffset,
      refcountTableClusters: h.refcountTableClusters,
      nbSnapshots: h.nbSnapshots,
      snapshotsOffset: h.snapshotsOffset,
      headerLength: h.headerLength,
      compressionType: h.compressionType === COMPRESSION_ZSTD ? "zstd" : "zlib",
      encryption: cryptName(h.cryptMethod),
      dirty: (h.incompatibleFeatures & BigInt(INCOMPAT_DIRTY)) !== 0n,
      corrupt: (h.incompatibleFeatures & BigInt(INCOMPAT_CORRUPT)) !== 0n,
      lazyRefcounts: (h.compatibleFeatures & BigInt(COMPAT_LAZY_REFCOUNTS)) !== 0n,
      extendedL2: (h.incompatibleFeatures & BigInt(INCOMPAT_EXTL2)) !== 0n,
      dataFileRaw: (h.autoclearFeatures & BigInt(AUTOCLEAR_DATA_FILE_RAW)) !== 0n,
      incompatibleFeatures: names(0, h.incompatibleFeatures),
      compatibleFeatures: names(1, h.compatibleFeatures),
      autoclearFeatures: names(2, h.autoclearFeatures),
      unknownExtensions: h.extensions.unknown.map((e) => ({ type: e.type, length: e.data.length })),
      fileSize: this.fileSize,
    };
    if (h.backingFile !== undefined) info.backingFile = h.backingFile;
    if (h.extensions.backingFormat !== undefined) info.backingFormat = h.extensions.backingFormat;
    if (h.extensions.dataFile !== undefined) info.dataFile = h.extensions.dataFile;
    if (h.extensions.bitmaps) info.bitmaps = { ...h.extensions.bitmaps };
    if (h.extensions.cryptoHeader) info.cryptoHeader = { ...h.extensions.cryptoHeader };
    return info;
  }

  /** Open images from the top down: this one first (depth 0). */
  chain(): GuestDevice[] {
    const out: GuestDevice[] = [];
    for (let d: GuestDevice | undefined = this; d; d = d instanceof Qcow2Image ? d.backing : undefined) out.push(d);
    return out;
  }
}

function mergeable(a: Extent, b: Extent): boolean {
  if (a.kind !== b.kind || a.depth !== b.depth || a.kind === "compressed") return false;
  if (a.hostOffset === undefined || b.hostOffset === undefined) return a.hostOffset === b.hostOffset;
  return a.hostOffset + a.length === b.hostOffset;
}

function refuseFeatures(header: Qcow2Header, name: string): void {
  const incompat = header.incompatibleFeatures;
  const unknown = incompat & ~BigInt(QCOW2_INCOMPAT_MASK);
  if (unknown !== 0n) {
    const described = featureBits(unknown).map((bit) => {
      const own = header.extensions.featureNames.find((f) => f.type === 0 && f.bit === bit);
      return own ? `"${own.name}" (bit ${bit})` : `bit ${bit}`;
    });
    throw new Qcow2Error(
      Qcow2ErrorCode.UNKNOWN_FEATURE,
      `${name}: unsupported incompatible feature(s) ${described.join(", ")} (mask ${hex(unknown)})`,
    );
  }
  const notYet: Array<[number, string]> = [
    [INCOMPAT_DATA_FILE, "external data file"],
    [INCOMPAT_EXTL2, "extended L2 entries"],
  ];
  for (const [bit, feature] of notYet) {
    if (incompat & BigInt(bit)) {
      throw new Qcow2Error(Qcow2ErrorCode.NOT_SUPPORTED, `${name}: the "${feature}" feature is not supported yet`);
    }
  }
  if (header.compressionType === COMPRESSION_ZSTD) {
    throw new Qcow2Error(Qcow2ErrorCode.NOT_SUPPORTED, `${name}: compression type zstd is not supported yet`);
  }
}

async function resolveBackend(target: BlockBackend | string, readOnly: boolean): Promise<BlockBackend> {
  if (typeof target !== "string") return target;
  if (!platform.openFile) {
    throw new TypeError(
      `open: a path ("${target}") needs a file system; import from "qcow2-wasm/node", or pass a BlockBackend`,
    );
  }
  return platform.openFile(target, { readOnly });
}

async function openBacking(
  header: Qcow2Header,
  imageName: string,
  options: OpenOptions,
  chain: ChainState,
): Promise<GuestDevice | undefined> {
  const backingFile = header.backingFile;
  if (backingFile === undefined || options.backing === "none") return undefined;
  const names = [...chain.names, imageName];
  if (chain.depth + 1 > MAX_BACKING_CHAIN_DEPTH) {
    throw new Qcow2Error(
      Qcow2ErrorCode.BAD_BACKING,
      `${imageName}: backing chain is deeper than ${MAX_BACKING_CHAIN_DEPTH} images`,
    );
  }
  const resolve: BackingResolver | undefined =
    options.resolveBacking ??
    (platform.openFile
      ? (file, from) => platform.openFile!(platform.resolveBackingPath ? platform.resolveBackingPath(file, from) : file, { readOnly: true })
      : undefined);
  if (!resolve) {
    throw new Qcow2Error(
      Qcow2ErrorCode.BAD_BACKING,
      `${imageName}: has backing file "${backingFile}" but no resolveBacking option was given to open it`,
    );
  }
  let backend: BlockBackend;
  try {
    backend = await resolve(backingFile, imageName);
  } catch (cause) {
    if (cause instanceof Qcow2Error && cause.code === Qcow2ErrorCode.BAD_BACKING) throw cause;
    throw new Qcow2Error(Qcow2ErrorCode.BAD_BACKING, `${imageName}: cannot open backing file "${backingFile}"`, { cause });
  }
  if (names.includes(backend.name)) {
    await backend.close();
    throw new Qcow2Error(
      Qcow2ErrorCode.BAD_BACKING,
      `${imageName}: backing chain loops: ${[...names, backend.name].join(" -> ")}`,
    );
  }
  let format = header.extensions.backingFormat;
  if (format === undefined) {
    const magic = new Uint8Array(4);
    await readFully(backend, magic, 0);
    format = new DataView(magic.buffer).getUint32(0) === QCOW_MAGIC ? "qcow2" : "raw";
  }
  if (format === "raw") return RawDevice.open(backend);
  if (format === "qcow2") {
    try {
      return await Qcow2Image.openAt(backend, options, { depth: chain.depth + 1, names });
    } catch (cause) {
      if (cause instanceof Qcow2Error && cause.code === Qcow2ErrorCode.BAD_BACKING) throw cause;
      throw new Qcow2Error(Qcow2ErrorCode.BAD_BACKING, `${imageName}: backing file "${backingFile}": ${(cause as Error).message}`, { cause });
    }
  }
  await backend.close();
  throw new Qcow2Error(Qcow2ErrorCode.NOT_SUPPORTED, `${imageName}: backing file format "${format}" is not supported (qcow2 or raw)`);
}
