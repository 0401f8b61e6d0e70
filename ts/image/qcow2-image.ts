// Qcow2Image: open an image and read guest bytes through its L1/L2 map and its backing chain.
// (docs/interop/qcow2.rst "Cluster mapping"; the seed's qcow_open and qcow_aio_read_cb.)

import { Qcow2Error, Qcow2ErrorCode, hex, isQcow2Error } from "../errors.js";
import { readFully, type BlockBackend } from "../io/backend.js";
import {
  COMPRESSION_ZSTD,
  CRYPT_AES,
  CRYPT_LUKS,
  CRYPT_NONE,
  INCOMPAT_CORRUPT,
  INCOMPAT_DIRTY,
  INCOMPAT_EXTL2,
  COMPAT_LAZY_REFCOUNTS,
  AUTOCLEAR_DATA_FILE_RAW,
  MAX_BACKING_CHAIN_DEPTH,
  QCOW_MAGIC,
  QCOW2_AUTOCLEAR_MASK,
} from "../format/constants.js";
import { featureBits, featureName, readHeader, type Qcow2Header } from "../format/header.js";
import { L1Table } from "../format/l1.js";
import { ClusterMap, type Run } from "./cluster-map.js";
import { Refcounts } from "./refcounts.js";
import { formatImage, resolveCreateOptions, type CreateEncryption, type CreateOptions, type Preallocation } from "./create.js";
import { encodeHeader } from "../format/header-write.js";
import { repairDirtyImage } from "../check/check.js";
import { refuseFeatures, refuseWrites } from "./features.js";
import { MetadataClusters } from "./overlap.js";
import { readSnapshotTable } from "../format/snapshots.js";
import { findSnapshot, Snapshots, type SnapshotHost } from "./snapshots.js";
import type { DataEncryption } from "./encryption.js";
import { resolveBackend } from "../io/resolve.js";
import { writeAutoclear, writeIncompatible, writeRefcountTablePointer, writeSize, writeSizeAndL1 } from "../format/header-update.js";
import { writeBackingFile } from "../format/header-backing.js";
import type { ClusterDeflater, ClusterInflater } from "../codecs/deflate.js";
import { platform } from "../platform.js";
import { WasmCore, type WasmVariant } from "../wasm/core.js";
import {
  L2_TYPE_COMPRESSED,
  L2_TYPE_NORMAL,
  L2_TYPE_UNALLOCATED,
  L2_TYPE_ZERO_ALLOC,
  L2_TYPE_ZERO_PLAIN,
  LOOKUP_SPLIT_COPIED,
  LOOKUP_ZERO_FLAG,
} from "../wasm/exports.js";
import { RawDevice, readClipped, type Extent, type GuestDevice } from "./device.js";

/** Opens the backing file named `backingFile` by the image called `imageName`. */
export type BackingResolver = (backingFile: string, imageName: string) => Promise<BlockBackend>;

export interface OpenOptions {
  /** Default true. `false` opens for writing; backing files are always opened read-only. */
  readOnly?: boolean;
  /** "open" (default) follows the backing chain; "none" reads unallocated clusters as zeros, like qemu -u. */
  backing?: "open" | "none";
  /** Replaces the platform's way of opening backing files (Node: a path relative to the image). */
  resolveBacking?: BackingResolver;
  /** Bytes of L2 tables to cache (default 32 MiB, as qemu on Linux; never less than 16 tables). */
  l2CacheSize?: number;
  /** Bytes of refcount blocks to cache when writable (default 4 MiB; never less than 16 blocks). */
  refcountCacheSize?: number;
  /** Force the scalar or SIMD WebAssembly build. */
  wasm?: WasmVariant;
  /**
   * Open the disk as it was at this internal snapshot, read-only (qemu-img convert -l): an id or
   * name (id first), or both to match.
   */
  snapshot?: string | { id?: string; name?: string };
  /**
   * With `snapshot`: keep the image's current virtual size rather than the snapshot's, as qemu-img
   * convert -l and measure -l do (qemu swaps in the snapshot's L1 table and nothing else).
   */
  snapshotAtCurrentSize?: boolean;
  /**
   * The passphrase of an encrypted image (legacy AES or LUKS; qemu's secret). Without it an
   * encrypted image still opens, for its header facts, but its data can be neither read nor
   * written. A wrong LUKS passphrase fails the open (BAD_PASSPHRASE); a wrong legacy AES one cannot
   * be detected by the format and reads as garbage.
   */
  passphrase?: string | Uint8Array;
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
  /** Length of the image file in bytes (as of open or the last flush). */
  fileSize: number;
}

export interface ReadableOptions {
  start?: number;
  length?: number;
  /** Bytes per chunk (default 1 MiB). */
  chunkSize?: number;
}

export interface WriteZeroesOptions {
  /** Let whole clusters be deallocated rather than kept allocated and flagged zero (qemu's MAY_UNMAP). */
  mayUnmap?: boolean;
}

const DEFAULT_L2_CACHE_SIZE = 32 * 1024 * 1024;
const DEFAULT_REFCOUNT_CACHE_SIZE = 4 * 1024 * 1024;
/** Encryption works on 512-byte sectors. */
const SECTOR = 512;
/** Zero-writes and COW fills go out in pieces of at most this many bytes. */
const ZERO_CHUNK = 1 << 20;

function cryptName(method: number): "none" | "aes" | "luks" {
  return method === CRYPT_AES ? "aes" : method === CRYPT_LUKS ? "luks" : "none";
}

const EMPTY = new Uint8Array(0);

/** A whole compressed cluster waiting to be inflated into `dst`. */
interface CompressedJob {
  src: Uint8Array;
  /** Bytes of the stream to read (an upper bound, to a sector). */
  size: number;
  dst: Uint8Array;
  hostOffset: number;
  guestOffset: number;
}

export class Qcow2Image implements GuestDevice {
  readonly format = "qcow2";
  readonly backend: BlockBackend;
  readonly header: Qcow2Header;
  readonly clusterSize: number;
  readonly clusterBits: number;
  readonly readOnly: boolean;
  /** The next image down the chain, if any and if opened. */
  readonly backing: GuestDevice | undefined;
  private readonly map: ClusterMap;
  private readonly lookupFlags: number;
  private inflater: ClusterInflater | undefined;
  private deflater: ClusterDeflater | undefined;
  /** Settles when every writeCompressed issued so far has placed its clusters (call order). */
  private compressedWrites: Promise<void> = Promise.resolve();
  private readonly scratch: Uint8Array[] = [];
  /** The last cluster inflated, for reads that take a compressed cluster piece by piece. */
  private inflated: { hostOffset: number; data: Uint8Array } | undefined;
  /** Reads in flight: freed clusters are not reused while a read that may still use them runs. */
  private readonly reads = new Set<Promise<void>>();
  /** Header bits that must change before the first write have been written. */
  private writeStarted = false;
  /** Length of the image file, as of open or the last flush. */
  private fileSize: number;
  private closed = false;
  /** Set when this session found the image inconsistent and marked it corrupt: no more writes. */
  private corrupted = false;
  /** Host clusters holding metadata, built at the first in-place write. */
  private metadata: MetadataClusters | undefined;
  private snapshotTableBytes = 0;
  private snapshotsApi: Snapshots | undefined;
  /** The data path's cipher, when the image is encrypted and its passphrase was given. */
  private crypt: DataEncryption | undefined;

  private constructor(backend: BlockBackend, header: Qcow2Header, map: ClusterMap, backing: GuestDevice | undefined, fileSize: number) {
    this.backend = backend;
    this.fileSize = fileSize;
    this.header = header;
    this.clusterBits = header.clusterBits;
    this.clusterSize = 2 ** header.clusterBits;
    this.map = map;
    this.backing = backing;
    this.readOnly = map.refcounts === undefined;
    this.lookupFlags = header.version >= 3 ? LOOKUP_ZERO_FLAG : 0;
  }

  /** @internal Opens one image of a chain; `chain` says how deep and what is above it. */
  static async openAt(target: BlockBackend | string, options: OpenOptions, chain: ChainState): Promise<Qcow2Image> {
    const readOnly = options.readOnly ?? true;
    const backend = await resolveBackend(target, readOnly);
    try {
      if (!readOnly && backend.readOnly) {
        throw new Qcow2Error(Qcow2ErrorCode.READ_ONLY, `${backend.name}: cannot open read-write: the backend is read-only`);
      }
      const fileSize = await backend.size();
      let header = await readHeader(backend, fileSize);
      const clusterBits = header.clusterBits;
      refuseFeatures(header, backend.name);
      if (!readOnly) {
        refuseWrites(header, backend.name);
        // Lazy refcounts after an unclean shutdown: refcounts may be stale. Rebuild, as qemu does.
        if (header.incompatibleFeatures & BigInt(INCOMPAT_DIRTY)) await repairDirtyImage(backend, header, { wasm: options.wasm });
      }

      if (options.snapshot !== undefined) {
        if (!readOnly) throw new TypeError("open: a snapshot can only be opened read-only");
        header = await snapshotView(backend, header, options.snapshot, options.snapshotAtCurrentSize ?? false);
      }
      const l1 = new L1Table(header.l1Size);
      await readFully(backend, l1.bytes, header.l1TableOffset);

      const backing = await openBacking(
        header.backingFile,
        header.extensions.backingFormat,
        backend.name,
        { ...options, readOnly: true },
        chain,
      );
      try {
        const core = await WasmCore.create(options.wasm);
        const refcounts = readOnly
          ? undefined
          : await Refcounts.open({
              backend,
              core,
              clusterBits,
              refcountOrder: header.refcountOrder,
              tableOffset: header.refcountTableOffset,
              tableClusters: header.refcountTableClusters,
              cacheSize: options.refcountCacheSize ?? DEFAULT_REFCOUNT_CACHE_SIZE,
              writeTablePointer: (tableOffset, tableClusters) =>
                writeRefcountTablePointer(backend, header, tableOffset, tableClusters),
            });
        const map = new ClusterMap({
          name: backend.name,
          backend,
          core,
          clusterBits,
          version: header.version,
          l1,
          l1TableOffset: header.l1TableOffset,
          l2CacheSize: options.l2CacheSize ?? DEFAULT_L2_CACHE_SIZE,
          ...(refcounts ? { refcounts } : {}),
        });
        const image = new Qcow2Image(backend, header, map, backing, fileSize);
        if (header.cryptMethod !== CRYPT_NONE && options.passphrase !== undefined) {
          // Loaded only for encrypted images: opening a plain one loads no cipher code.
          image.crypt = await (await import("./encryption.js")).openEncryption(backend, header, options.passphrase);
        }
        return image;
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

  /**
   * Create an image (qemu-img's layout and defaults: v3, 64 KiB clusters, 16-bit refcounts) and
   * return it open for writing. `size` may be left out when a backing file gives it.
   */
  static async create(
    target: BlockBackend | string,
    options: Omit<CreateOptions, "size"> & { size?: number } & Omit<OpenOptions, "readOnly">,
  ): Promise<Qcow2Image> {
    let size = options.size;
    if (size === undefined) {
      if (options.backingFile === undefined) throw new TypeError("create: size is required without a backing file");
      size = await backingSize(options.backingFile, typeof target === "string" ? target : target.name, options);
    }
    const resolved = resolveCreateOptions({ ...options, size });
    const backend = await resolveBackend(target, false, true);
    try {
      await formatImage(backend, resolved);
    } catch (err) {
      await backend.close().catch(() => undefined);
      throw err;
    }
    const encryption = resolved.encryption;
    const image = await Qcow2Image.open(backend, {
      ...options,
      readOnly: false,
      ...(encryption?.format === "aes" ? { passphrase: encryption.passphrase } : {}),
    });
    try {
      if (encryption?.format === "luks") await image.setUpLuks(encryption);
      if (resolved.preallocation !== "off") await image.preallocate(resolved.preallocation);
    } catch (err) {
      await image.close().catch(() => undefined);
      throw err;
    }
    return image;
  }

  /**
   * Make a fresh image LUKS-encrypted (qemu's qcow2_set_up_encryption): the LUKS area in newly
   * allocated clusters, then one header write naming it and switching crypt_method to 2.
   */
  private async setUpLuks(o: CreateEncryption): Promise<void> {
    const env = { crypto: await platform.createLuksCrypto(), createSectorCipher: platform.createSectorCipher };
    const { createLuks } = await import("../format/luks.js");
    const created = await createLuks(
      {
        passphrase: o.passphrase,
        ...(o.cipherAlg !== undefined ? { cipherAlg: o.cipherAlg } : {}),
        ...(o.cipherMode !== undefined ? { cipherMode: o.cipherMode } : {}),
        ...(o.ivgenAlg !== undefined ? { ivgenAlg: o.ivgenAlg } : {}),
        ...(o.hashAlg !== undefined ? { hashAlg: o.hashAlg } : {}),
        ...(o.iterTime !== undefined ? { iterTime: o.iterTime } : {}),
      },
      env,
    );
    const cs = this.clusterSize;
    try {
      await this.map.lock.run(async () => {
        const clusters = Math.ceil(created.area.length / cs);
        const offset = await this.map.refcounts!.allocate(clusters);
        await this.map.writeBack(() => this.drainReads());
        const padded = new Uint8Array(clusters * cs);
        padded.set(created.area);
        await this.backend.write(padded, offset);
        await this.backend.flush();
        const next: Qcow2Header = {
          ...this.header,
          cryptMethod: CRYPT_LUKS,
          extensions: { ...this.header.extensions, cryptoHeader: { offset, length: created.area.length } },
        };
        await this.backend.write(encodeHeader(next, cs), 0);
        await this.backend.flush();
        this.header.cryptMethod = CRYPT_LUKS;
        this.header.extensions.cryptoHeader = { offset, length: created.area.length };
      });
      this.crypt = { format: "luks", cipher: await platform.createSectorCipher(created.key.algorithm, created.key.masterKey), sectorsBy: "host" };
    } finally {
      created.key.masterKey.fill(0);
    }
  }

  /** Map every cluster of the disk to a host cluster (and for "full"/"falloc" write it), as qemu's preallocation does. */
  private async preallocate(mode: Exclude<Preallocation, "off">): Promise<void> {
    const cs = this.clusterSize;
    const clusters = Math.ceil(this.header.size / cs);
    const perTable = this.map.l2Entries;
    let end = 0;
    await this.map.lock.run(async () => {
      await this.beginWrite();
      for (let first = 0; first < clusters; first += perTable) {
        const count = Math.min(perTable, clusters - first);
        const l2Offset = await this.map.writableL2(first / perTable);
        const hostOffset = await this.map.refcounts!.allocate(count);
        await this.map.setEntries(l2Offset, 0, count, hostOffset, true, false);
        if (mode !== "metadata") {
          for (let pos = 0; pos < count * cs; pos += ZERO_CHUNK) {
            await this.backend.write(new Uint8Array(Math.min(ZERO_CHUNK, count * cs - pos)), hostOffset + pos);
          }
        }
        end = Math.max(end, hostOffset + count * cs);
      }
    });
    // The mapped clusters must exist in the file (qemu extends it, sparse, for "metadata").
    if (end > (await this.backend.size())) await this.backend.truncate(end);
    await this.flush();
  }

  /** Open a qcow2 image from a backend, or from a path where the platform has files (qcow2-wasm/node). */
  static async open(target: BlockBackend | string, options: OpenOptions = {}): Promise<Qcow2Image> {
    return Qcow2Image.openAt(target, options, { depth: 0, names: [] });
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  /** Flush (when writable), then close the image and its backing chain. */
  async close(): Promise<void> {
    if (this.closed) return;
    try {
      if (!this.readOnly) {
        await this.flush();
        if (this.isDirty) {
          // A clean close: every refcount on disk, then the dirty bit cleared.
          await this.map.lock.run(() => this.map.writeBack(() => this.drainReads()));
          await writeIncompatible(this.backend, this.header, this.header.incompatibleFeatures & ~BigInt(INCOMPAT_DIRTY));
        }
      }
    } finally {
      this.closed = true;
      this.crypt?.cipher.destroy();
      try {
        await this.backing?.close();
      } finally {
        await this.backend.close();
      }
    }
  }

  private live(op: string): void {
    if (this.closed) throw new Qcow2Error(Qcow2ErrorCode.CLOSED, `${this.name}: ${op} after close`);
  }

  private writable(op: string): void {
    this.live(op);
    if (this.readOnly) throw new Qcow2Error(Qcow2ErrorCode.READ_ONLY, `${this.name}: ${op}: the image is open read-only`);
    if (this.corrupted) {
      throw new Qcow2Error(Qcow2ErrorCode.CORRUPT, `${this.name}: ${op}: the image was marked corrupt; repair it with check`);
    }
  }

  /**
   * An inconsistency was found in a writable image: set the corrupt bit (as qemu does) so nothing
   * writes to it until it is repaired, and refuse further writes in this session.
   */
  private async markCorrupt(): Promise<void> {
    if (this.readOnly || this.corrupted) return;
    this.corrupted = true;
    await writeIncompatible(this.backend, this.header, this.header.incompatibleFeatures | BigInt(INCOMPAT_CORRUPT));
  }

  /** Run an operation; metadata found corrupt on a writable image marks it corrupt first. */
  private async guarded<T>(fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (err) {
      if (isQcow2Error(err, Qcow2ErrorCode.CORRUPT) && !this.readOnly && !this.corrupted) {
        await this.markCorrupt().catch(() => undefined);
      }
      throw err;
    }
  }

  /** The metadata that in-place guest writes must never touch (built once, then kept current). */
  private async metadataClusters(): Promise<MetadataClusters> {
    if (this.metadata) return this.metadata;
    const cs = this.clusterSize;
    const meta = new MetadataClusters(cs);
    const l1 = this.map.l1;
    for (let i = 0; i < l1.size; i++) meta.add(l1.l2Offset(i), "active L2 table");
    const refcounts = this.map.refcounts!;
    for (let ti = 0; ti < refcounts.tableEntries; ti++) meta.add(refcounts.blockOffset(ti), "refcount block");
    l1.onChange = (oldOffset, newOffset) => {
      meta.remove(oldOffset);
      meta.add(newOffset, "active L2 table");
    };
    refcounts.onBlockChange = (oldOffset, newOffset) => {
      meta.remove(oldOffset);
      meta.add(newOffset, "refcount block");
    };
    this.snapshotTableBytes = this.header.nbSnapshots * 40;
    if (this.header.nbSnapshots > 0) {
      const table = await readSnapshotTable(this.backend, this.header.snapshotsOffset, this.header.nbSnapshots).catch(() => undefined);
      if (table) {
        this.snapshotTableBytes = table.tableBytes;
        for (const sn of table.entries) {
          for (let pos = 0; pos < sn.l1Size * 8; pos += cs) meta.add(sn.l1TableOffset + pos, "inactive L1 table");
        }
      }
    }
    this.metadata = meta;
    return meta;
  }

  /** qemu's pre-write overlap check for a write of guest data in place. */
  private async refuseMetadataOverlap(hostOffset: number, length: number): Promise<void> {
    const meta = await this.metadataClusters();
    const refcounts = this.map.refcounts!;
    const what = meta.overlap(hostOffset, length, [
      { what: "active L1 table", start: this.map.l1TableOffset, length: this.map.l1.size * 8 },
      { what: "refcount table", start: refcounts.tableOffset, length: refcounts.tableClusters * this.clusterSize },
      { what: "snapshot table", start: this.header.snapshotsOffset, length: this.snapshotTableBytes },
    ]);
    if (what === undefined) return;
    await this.markCorrupt();
    throw new Qcow2Error(
      Qcow2ErrorCode.CORRUPT,
      `${this.name}: preventing a guest write at host offset ${hex(hostOffset)} (+${length}): it overlaps the ${what}; the image is now marked corrupt`,
    );
  }

  /** Internal snapshots: list, create, apply, delete, rename, and VM state. */
  get snapshots(): Snapshots {
    this.live("snapshots");
    this.snapshotsApi ??= new Snapshots(this.snapshotHost());
    return this.snapshotsApi;
  }

  private snapshotHost(): SnapshotHost {
    return {
      name: this.name,
      backend: this.backend,
      header: this.header,
      map: this.map,
      clusterSize: this.clusterSize,
      writable: (op) => this.writable(op),
      exclusive: async (fn) => {
        const claim = this.map.inflight.claim(0, Infinity);
        try {
          await claim.ready;
          return await this.guarded(() =>
            this.map.lock.run(async () => {
              await this.beginWrite();
              return fn();
            }),
          );
        } finally {
          claim.release();
        }
      },
      writeBack: () => this.map.writeBack(() => this.drainReads()),
      growL1: (l1Size) => this.growL1(l1Size, this.header.size),
      resize: (size) => this.resize(size, { shrink: true }),
      l1Replaced: () => {
        this.metadata = undefined;
      },
      readBeyond: (dst, guestOffset) => this.readInto(dst, guestOffset),
      writeBeyond: (guestOffset, data) => this.guarded(() => this.owning(guestOffset, data.length, () => this.writeOwned(guestOffset, data))),
      discardBeyond: (guestOffset, length) =>
        this.guarded(() => this.owning(guestOffset, length, () => this.forEachTable(guestOffset, length, (g, n) => this.discardSegment(g, n)))),
    };
  }

  /** Read `length` guest bytes, or fill `dst`, from `guestOffset`. */
  async read(guestOffset: number, lengthOrDst: number | Uint8Array): Promise<Uint8Array> {
    this.live("read");
    const dst = typeof lengthOrDst === "number" ? new Uint8Array(lengthOrDst) : lengthOrDst;
    if (typeof lengthOrDst === "number" && (!Number.isSafeInteger(lengthOrDst) || lengthOrDst < 0)) {
      throw new RangeError(`read: length ${lengthOrDst} is not a non-negative integer`);
    }
    this.checkGuestRange("read", guestOffset, dst.length);
    const job = this.readOnly ? this.readInto(dst, guestOffset) : this.guarded(() => this.readInto(dst, guestOffset));
    this.reads.add(job);
    try {
      await job;
    } finally {
      this.reads.delete(job);
    }
    return dst;
  }

  private checkGuestRange(op: string, guestOffset: number, length: number): void {
    if (!Number.isSafeInteger(guestOffset) || guestOffset < 0) {
      throw new RangeError(`${op}: guest offset ${guestOffset} is not a non-negative integer`);
    }
    if (!Number.isSafeInteger(length) || length < 0) {
      throw new RangeError(`${op}: length ${length} is not a non-negative integer`);
    }
    if (guestOffset + length > this.header.size) {
      throw new RangeError(`${op}: range ${guestOffset}+${length} ends past the virtual size ${this.header.size}`);
    }
  }

  /** GuestDevice: fill `dst` from `guestOffset` (range already checked). */
  async readInto(dst: Uint8Array, guestOffset: number): Promise<void> {
    if (this.header.cryptMethod !== CRYPT_NONE && (guestOffset % SECTOR !== 0 || dst.length % SECTOR !== 0)) {
      return this.readUnaligned(dst, guestOffset);
    }
    // Whole compressed clusters are gathered and inflated together (over several threads where
    // the platform can); the rest is read as it comes.
    const compressed: CompressedJob[] = [];
    await this.readRuns(dst, guestOffset, compressed);
    if (compressed.length === 0) return;
    await this.readCompressedStreams(compressed);
    this.inflater ??= await platform.createInflater();
    const inflater = this.inflater;
    const ok = inflater.inflateMany
      ? await inflater.inflateMany(compressed)
      : compressed.map((j) => inflater.inflate(j.src, j.dst));
    const bad = ok.indexOf(false);
    if (bad >= 0) {
      const j = compressed[bad]!;
      throw this.badCompressed(j.hostOffset, j.src.length, j.guestOffset);
    }
  }

  /**
   * Encrypted data decrypts in whole sectors: a partial sector at either end is read through a
   * sector-sized buffer, the rest straight into `dst`.
   */
  private async readUnaligned(dst: Uint8Array, guestOffset: number): Promise<void> {
    const end = guestOffset + dst.length;
    for (let pos = guestOffset; pos < end; ) {
      const sectorStart = Math.floor(pos / SECTOR) * SECTOR;
      if (pos === sectorStart && end - pos >= SECTOR) {
        const n = Math.floor((end - pos) / SECTOR) * SECTOR;
        await this.readInto(dst.subarray(pos - guestOffset, pos - guestOffset + n), pos);
        pos += n;
      } else {
        const sector = new Uint8Array(SECTOR);
        await this.readInto(sector, sectorStart);
        const n = Math.min(end, sectorStart + SECTOR) - pos;
        dst.set(sector.subarray(pos - sectorStart, pos - sectorStart + n), pos - guestOffset);
        pos += n;
      }
    }
  }

  /** The sector number a cipher is given for data at `guestOffset` stored at `hostOffset`. */
  private sectorOf(guestOffset: number, hostOffset: number): number {
    return (this.crypt!.sectorsBy === "guest" ? guestOffset : hostOffset) / SECTOR;
  }

  /** Guest data as it goes to the file: a ciphertext copy when the image is encrypted. */
  private sealed(data: Uint8Array, guestOffset: number, hostOffset: number): Uint8Array {
    if (!this.crypt) return data;
    const out = new Uint8Array(data.length);
    this.crypt.cipher.encrypt(data, this.sectorOf(guestOffset, hostOffset), out);
    return out;
  }

  /** Fill each job's `src`, one backend read for streams that lie together in the file. */
  private async readCompressedStreams(jobs: CompressedJob[]): Promise<void> {
    let i = 0;
    while (i < jobs.length) {
      const start = jobs[i]!.hostOffset;
      let end = start + jobs[i]!.size;
      let j = i + 1;
      // Streams are written back to back; allow a small gap, never more than 4 MiB per read.
      while (j < jobs.length) {
        const next = jobs[j]!;
        if (next.hostOffset < start || next.hostOffset > end + 4096) break;
        const nextEnd = Math.max(end, next.hostOffset + next.size);
        if (nextEnd - start > 4 * 1024 * 1024) break;
        end = nextEnd;
        j++;
      }
      const buf = new Uint8Array(end - start);
      await readFully(this.backend, buf, start);
      for (let k = i; k < j; k++) {
        const job = jobs[k]!;
        job.src = buf.subarray(job.hostOffset - start, job.hostOffset - start + job.size);
      }
      i = j;
    }
  }

  private async readRuns(dst: Uint8Array, guestOffset: number, compressed: CompressedJob[]): Promise<void> {
    const len = dst.length;
    let pos = 0;
    while (pos < len) {
      const g = guestOffset + pos;
      const run = await this.map.lookup(g, len - pos, this.lookupFlags);
      const part = dst.subarray(pos, pos + run.bytes);
      switch (run.type) {
        case L2_TYPE_NORMAL:
          this.assertReadable(g);
          await readFully(this.backend, part, run.hostOffset + run.inCluster);
          if (this.crypt) this.crypt.cipher.decrypt(part, this.sectorOf(g, run.hostOffset + run.inCluster));
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
          if (this.header.cryptMethod !== CRYPT_NONE) {
            throw new Qcow2Error(Qcow2ErrorCode.NOT_SUPPORTED, `${this.name}: guest offset ${g} is a compressed cluster in an encrypted image`);
          }
          if (run.inCluster === 0 && part.length === this.clusterSize) {
            // Read later, together with its neighbours in the file.
            compressed.push({ src: EMPTY, size: run.compressedSize, dst: part, hostOffset: run.hostOffset, guestOffset: g });
          } else {
            await this.readCompressed(part, run.hostOffset, run.compressedSize, run.inCluster, g);
          }
          break;
      }
      pos += run.bytes;
    }
  }

  private assertReadable(guestOffset: number): void {
    if (this.header.cryptMethod !== CRYPT_NONE && !this.crypt) {
      throw new Qcow2Error(
        Qcow2ErrorCode.ENCRYPTED,
        `${this.name}: guest offset ${guestOffset} is encrypted (${cryptName(this.header.cryptMethod)}); open the image with its passphrase`,
      );
    }
  }

  private async readUnallocated(dst: Uint8Array, guestOffset: number): Promise<void> {
    if (this.backing) await readClipped(this.backing, dst, guestOffset);
    else dst.fill(0);
  }

  private badCompressed(hostOffset: number, compressedSize: number, clusterGuestOffset: number): Qcow2Error {
    return new Qcow2Error(
      Qcow2ErrorCode.BAD_COMPRESSED_DATA,
      `${this.name}: compressed cluster at host offset ${hex(hostOffset)} (guest offset ${clusterGuestOffset}, ${compressedSize} bytes) does not inflate to ${this.clusterSize} bytes`,
    );
  }

  private async readCompressed(
    dst: Uint8Array,
    hostOffset: number,
    compressedSize: number,
    inCluster: number,
    guestOffset: number,
  ): Promise<void> {
    const cs = this.clusterSize;
    const cached = this.inflated;
    if (cached && cached.hostOffset === hostOffset) {
      dst.set(cached.data.subarray(inCluster, inCluster + dst.length));
      return;
    }
    // The size field is an upper bound that may run past the end of the file: past it reads zeros.
    const src = new Uint8Array(compressedSize);
    await readFully(this.backend, src, hostOffset);
    const whole = inCluster === 0 && dst.length === cs;
    const out = whole ? dst : new Uint8Array(cs);
    this.inflater ??= await platform.createInflater();
    if (!this.inflater.inflate(src, out)) throw this.badCompressed(hostOffset, compressedSize, guestOffset - inCluster);
    if (!whole) {
      this.inflated = { hostOffset, data: out };
      dst.set(out.subarray(inCluster, inCluster + dst.length));
    }
  }

  // ---- Writing -------------------------------------------------------------------------------

  /**
   * Write `data` at `guestOffset`. Many requests may be in flight at once; requests that overlap
   * take effect in the order they were issued.
   */
  async write(guestOffset: number, data: Uint8Array): Promise<void> {
    this.writable("write");
    this.checkGuestRange("write", guestOffset, data.length);
    await this.guarded(() => this.owning(guestOffset, data.length, () => this.writeOwned(guestOffset, data)));
  }

  /** Run `fn` once the guest clusters under [guestOffset, +length) are this request's alone. */
  private async owning(guestOffset: number, length: number, fn: () => Promise<void>): Promise<void> {
    const cs = this.clusterSize;
    const claim = this.map.inflight.claim(Math.floor(guestOffset / cs), Math.ceil((guestOffset + length) / cs));
    try {
      await claim.ready;
      await fn();
    } finally {
      claim.release();
    }
  }

  private writeOwned(guestOffset: number, data: Uint8Array): Promise<void> {
    if (this.header.cryptMethod !== CRYPT_NONE) {
      if (!this.crypt) {
        throw new Qcow2Error(
          Qcow2ErrorCode.ENCRYPTED,
          `${this.name}: writing at guest offset ${guestOffset} needs the image's passphrase (${cryptName(this.header.cryptMethod)} encryption)`,
        );
      }
      if (guestOffset % SECTOR !== 0 || data.length % SECTOR !== 0) return this.writeUnaligned(guestOffset, data);
    }
    return this.forEachTable(guestOffset, data.length, (g, n) => this.writeSegment(g, data.subarray(g - guestOffset, g - guestOffset + n)));
  }

  /** Encrypted data goes out in whole sectors: a partial one is read, merged and written whole. */
  private async writeUnaligned(guestOffset: number, data: Uint8Array): Promise<void> {
    const end = guestOffset + data.length;
    for (let pos = guestOffset; pos < end; ) {
      const sectorStart = Math.floor(pos / SECTOR) * SECTOR;
      if (pos === sectorStart && end - pos >= SECTOR) {
        const n = Math.floor((end - pos) / SECTOR) * SECTOR;
        await this.writeOwned(pos, data.subarray(pos - guestOffset, pos - guestOffset + n));
        pos += n;
      } else {
        const sector = new Uint8Array(SECTOR);
        await this.readInto(sector, sectorStart);
        const n = Math.min(end, sectorStart + SECTOR) - pos;
        sector.set(data.subarray(pos - guestOffset, pos - guestOffset + n), pos - sectorStart);
        await this.writeOwned(sectorStart, sector);
        pos += n;
      }
    }
  }

  /**
   * Make a range read as zeros. Whole clusters take the v3 zero flag (or, in v2, are deallocated
   * when nothing shows through from a backing file); partial clusters are written with zeros.
   */
  async writeZeroes(guestOffset: number, length: number, options: WriteZeroesOptions = {}): Promise<void> {
    this.writable("writeZeroes");
    this.checkGuestRange("writeZeroes", guestOffset, length);
    await this.guarded(() => this.owning(guestOffset, length, () => this.zeroOwned(guestOffset, length, options.mayUnmap ?? false)));
  }

  /** writeZeroes for clusters the caller owns: partial clusters written, whole ones flagged. */
  private async zeroOwned(guestOffset: number, length: number, mayUnmap: boolean): Promise<void> {
    const cs = this.clusterSize;
    const end = guestOffset + length;
    const alignedStart = Math.min(end, Math.ceil(guestOffset / cs) * cs);
    const alignedEnd = Math.max(alignedStart, Math.floor(end / cs) * cs);
    if (alignedStart > guestOffset) await this.writeOwned(guestOffset, new Uint8Array(alignedStart - guestOffset));
    if (alignedEnd > alignedStart) {
      await this.forEachTable(alignedStart, alignedEnd - alignedStart, (g, n) => this.zeroSegment(g, n, mayUnmap));
    }
    if (end > alignedEnd) await this.writeOwned(alignedEnd, new Uint8Array(end - alignedEnd));
  }

  /**
   * Tell the image a range is no longer needed. Whole clusters inside it are released: v3 makes
   * them read as zeros, v2 deallocates them (a backing file shows through, as in qemu).
   */
  async discard(guestOffset: number, length: number): Promise<void> {
    this.writable("discard");
    this.checkGuestRange("discard", guestOffset, length);
    const cs = this.clusterSize;
    const start = Math.ceil(guestOffset / cs) * cs;
    const end = Math.floor((guestOffset + length) / cs) * cs;
    if (end <= start) return;
    await this.guarded(() => this.owning(start, end - start, () => this.forEachTable(start, end - start, (g, n) => this.discardSegment(g, n))));
  }

  /**
   * Change the virtual size. Growing makes the new range read as zeros (even where a longer
   * backing file would show through); shrinking releases every cluster past the new end and
   * refuses, unless `shrink` is set, when that would drop data.
   */
  async resize(newSize: number, options: { shrink?: boolean } = {}): Promise<void> {
    this.writable("resize");
    if (!Number.isSafeInteger(newSize) || newSize < 0 || newSize % 512 !== 0) {
      throw new RangeError(`resize: size ${newSize} is not a non-negative multiple of 512`);
    }
    const oldSize = this.header.size;
    if (newSize === oldSize) return;
    if (this.header.nbSnapshots > 0 && this.header.version < 3) {
      // qemu: a v2 snapshot does not record its disk size, so the image cannot change under it.
      throw new Qcow2Error(Qcow2ErrorCode.NOT_SUPPORTED, `${this.name}: Can't resize a v2 image which has snapshots`);
    }
    const cs = this.clusterSize;
    const span = this.map.l1Span;
    // No request may be in flight over the range that appears or disappears.
    const claim = this.map.inflight.claim(Math.floor(Math.min(oldSize, newSize) / cs), Infinity);
    try {
      await claim.ready;
      if (newSize < oldSize) {
        if (!options.shrink && (await this.allocatedBeyond(newSize))) {
          throw new Qcow2Error(
            Qcow2ErrorCode.NOT_SUPPORTED,
            `${this.name}: shrinking to ${newSize} would drop data stored past it; pass { shrink: true } (qemu-img resize --shrink)`,
          );
        }
        await this.map.lock.run(async () => {
          await this.beginWrite();
          await this.dropBeyond(Math.ceil(newSize / cs) * cs);
          await this.map.writeBack(() => this.drainReads());
          await writeSize(this.backend, this.header, newSize);
        });
        return;
      }
      const l1Needed = Math.ceil(newSize / span);
      await this.map.lock.run(async () => {
        await this.beginWrite();
        if (l1Needed > this.map.l1.size) await this.growL1(l1Needed, newSize);
        else await writeSize(this.backend, this.header, newSize);
      });
      // The bytes that become visible must read as zeros: the tail of a partial last cluster, and
      // whatever a backing file longer than the old size holds there.
      const backingEnd = this.backing ? Math.min(newSize, this.backing.virtualSize) : 0;
      const zeroEnd = Math.max(Math.min(newSize, Math.ceil(oldSize / cs) * cs), backingEnd);
      if (zeroEnd > oldSize) await this.zeroOwned(oldSize, zeroEnd - oldSize, false);
      await this.flush();
    } finally {
      claim.release();
    }
  }

  private async allocatedBeyond(guestOffset: number): Promise<boolean> {
    for (let g = guestOffset; g < this.header.size; ) {
      const run = await this.map.lookup(g, this.header.size - g, this.lookupFlags);
      if (run.type !== L2_TYPE_UNALLOCATED && run.type !== L2_TYPE_ZERO_PLAIN) return true;
      g += run.bytes;
    }
    return false;
  }

  /** Release every cluster from guest offset `from` (cluster aligned) on, and the L2 tables wholly past it. Under lock. */
  private async dropBeyond(from: number): Promise<void> {
    const cs = this.clusterSize;
    const span = this.map.l1Span;
    for (let l1Index = Math.floor(from / span); l1Index < this.map.l1.size; l1Index++) {
      const l2Offset = this.map.l2TableOffset(l1Index);
      if (l2Offset === 0) continue;
      const tableStart = l1Index * span;
      const start = Math.max(from, tableStart);
      // Every path from the active L1 to these clusters goes away, shared table or not.
      for (let g = start; g < tableStart + span; ) {
        const run = await this.map.lookup(g, tableStart + span - g, this.lookupFlags);
        const clusters = Math.ceil(run.bytes / cs);
        this.map.release(run, clusters);
        g += run.bytes;
      }
      if (start === tableStart) {
        this.map.l1.set(l1Index, 0, false);
        this.map.refcounts!.releaseLater(l2Offset / cs, 1);
      } else {
        const writable = await this.map.writableL2(l1Index);
        const first = (start - tableStart) / cs;
        await this.map.setEntries(writable, first, this.map.l2Entries - first, 0, false, false);
      }
    }
  }

  /**
   * Move the L1 table to a larger one: everything pending is written first, then the new table,
   * then the header (size, l1_size and l1_table_offset in one write), and only then is the old
   * table released. Under lock.
   */
  private async growL1(l1Size: number, newSize: number): Promise<void> {
    const cs = this.clusterSize;
    await this.map.writeBack(() => this.drainReads());
    const old = this.map.l1;
    const oldOffset = this.map.l1TableOffset;
    const oldClusters = Math.ceil((old.size * 8) / cs);
    const grown = old.grown(l1Size);
    const offset = await this.map.refcounts!.allocate(Math.ceil((l1Size * 8) / cs));
    await this.map.writeBack(() => this.drainReads());
    await this.backend.write(grown.bytes, offset);
    await this.backend.flush();
    await writeSizeAndL1(this.backend, this.header, newSize, l1Size, offset);
    this.map.l1 = grown;
    this.map.l1TableOffset = offset;
    if (oldOffset !== 0 && oldClusters > 0) this.map.refcounts!.releaseLater(oldOffset / cs, oldClusters);
    await this.map.writeBack(() => this.drainReads());
  }

  /**
   * Write whole clusters compressed (raw deflate, as qemu-img convert -c and qemu-io write -c do).
   * A cluster that does not shrink is written normally. `guestOffset` and the length must be
   * cluster aligned, except that the disk's last cluster may be short.
   */
  async writeCompressed(guestOffset: number, data: Uint8Array): Promise<void> {
    this.writable("writeCompressed");
    this.checkGuestRange("writeCompressed", guestOffset, data.length);
    if (this.header.cryptMethod !== CRYPT_NONE) {
      // As qemu: compressed clusters are never encrypted, so an encrypted image takes none.
      throw new Qcow2Error(Qcow2ErrorCode.NOT_SUPPORTED, `${this.name}: compressed writes to an encrypted image are not supported`);
    }
    const cs = this.clusterSize;
    const end = guestOffset + data.length;
    if (guestOffset % cs !== 0 || (end % cs !== 0 && end !== this.header.size)) {
      throw new RangeError(`writeCompressed: range ${guestOffset}+${data.length} is not made of whole ${cs}-byte clusters`);
    }
    // Calls deflate side by side but place their clusters in the file in the order they were made.
    const previous = this.compressedWrites;
    let placed!: () => void;
    const mine = new Promise<void>((resolve) => (placed = resolve));
    this.compressedWrites = previous.then(() => mine);
    try {
      await this.guarded(() => this.owning(guestOffset, data.length, async () => {
        this.deflater ??= await platform.createDeflater();
        const deflater = this.deflater;
        // Batches of clusters deflate together off the main thread where the platform can; the
        // next batch deflates while this one is written.
        const batch = deflater.deflateMany || deflater.deflateAsync ? 32 * cs : cs;
        const deflateBatch = (start: number): Promise<Array<Uint8Array | undefined>> => {
          const clusters: Uint8Array[] = [];
          for (let pos = start; pos < Math.min(data.length, start + batch); pos += cs) {
            let cluster = data.subarray(pos, pos + cs);
            if (cluster.length < cs) {
              // The disk's short last cluster: compressed clusters are always whole, zero padded.
              const padded = new Uint8Array(cs);
              padded.set(cluster);
              cluster = padded;
            }
            clusters.push(cluster);
          }
          // qemu's rule: the stream must fit in cluster_size - 1 bytes.
          if (deflater.deflateMany) return deflater.deflateMany(clusters, cs);
          if (deflater.deflateAsync) return Promise.all(clusters.map((c) => deflater.deflateAsync!(c, cs)));
          return Promise.resolve(clusters.map((c) => deflater.deflate(c, cs)));
        };
        let next = deflateBatch(0);
        for (let start = 0; start < data.length; start += batch) {
          const packed = await next;
          if (start + batch < data.length) {
            next = deflateBatch(start + batch);
            next.catch(() => undefined); // awaited on the next round
          }
          if (start === 0) await previous;
          for (let k = 0; k < packed.length; k++) {
            const pos = start + k * cs;
            const p = packed[k];
            if (!p) await this.writeOwned(guestOffset + pos, data.subarray(pos, pos + cs));
            else await this.writeCompressedCluster(guestOffset + pos, p);
          }
        }
      }));
    } finally {
      placed();
    }
  }

  private async writeCompressedCluster(guestOffset: number, packed: Uint8Array): Promise<void> {
    const cs = this.clusterSize;
    const { hostOffset, old } = await this.map.lock.run(async () => {
      await this.beginWrite();
      const before = await this.map.lookup(guestOffset, cs, this.lookupFlags);
      return { hostOffset: await this.map.refcounts!.allocateBytes(packed.length), old: before };
    });
    await this.backend.write(packed, hostOffset);
    await this.map.lock.run(async () => {
      if (hostOffset + packed.length > 2 ** (62 - (this.clusterBits - 8))) {
        throw new Qcow2Error(Qcow2ErrorCode.LIMIT_EXCEEDED, `${this.name}: compressed data at ${hex(hostOffset)} is past what a ${cs}-byte-cluster descriptor can address`);
      }
      const l2Offset = await this.map.writableL2(Math.floor(guestOffset / this.map.l1Span));
      // Descriptor: offset in the low (62 - (cluster_bits - 8)) bits, 512-byte sectors - 1 above.
      const x = BigInt(62 - (this.clusterBits - 8));
      const sectors = Math.floor((hostOffset + packed.length - 1) / 512) - Math.floor(hostOffset / 512) + 1;
      const descriptor = BigInt(hostOffset) | (BigInt(sectors - 1) << x);
      await this.map.setCompressedEntry(l2Offset, old.l2Index, Number(descriptor >> 32n), Number(descriptor & 0xffffffffn));
      this.map.release(old, 1);
    });
  }

  /** Make every completed write durable. */
  async flush(): Promise<void> {
    this.live("flush");
    if (this.readOnly) return;
    await this.map.lock.run(() => this.map.writeBack(() => this.drainReads(), this.isDirty));
    this.fileSize = await this.backend.size();
  }

  /** The dirty bit is set: refcount writes may be postponed. */
  private get isDirty(): boolean {
    return (this.header.incompatibleFeatures & BigInt(INCOMPAT_DIRTY)) !== 0n;
  }

  private async drainReads(): Promise<void> {
    await Promise.allSettled([...this.reads]);
  }

  /** Run `fn` for each piece of [guestOffset, +length) that lies inside one L2 table, in order. */
  private async forEachTable(guestOffset: number, length: number, fn: (g: number, n: number) => Promise<void>): Promise<void> {
    const span = this.map.l1Span;
    for (let g = guestOffset; g < guestOffset + length; ) {
      const n = Math.min(guestOffset + length - g, span - (g % span));
      await fn(g, n);
      g += n;
    }
  }

  /** Header changes due before the first write: clear unknown autoclear bits (qemu does). Under lock. */
  private async beginWrite(): Promise<void> {
    if (this.writeStarted) return;
    const h = this.header;
    if (h.version >= 3 && (h.autoclearFeatures & ~BigInt(QCOW2_AUTOCLEAR_MASK)) !== 0n) {
      await writeAutoclear(this.backend, h, h.autoclearFeatures & BigInt(QCOW2_AUTOCLEAR_MASK));
    }
    if (this.lazyRefcounts) {
      // From here refcount blocks may lag behind the tables until a clean close.
      await writeIncompatible(this.backend, h, h.incompatibleFeatures | BigInt(INCOMPAT_DIRTY));
    }
    this.writeStarted = true;
  }

  /** v3 lazy refcounts: refcount writes wait for close, with the image marked dirty meanwhile. */
  private get lazyRefcounts(): boolean {
    return (this.header.compatibleFeatures & BigInt(COMPAT_LAZY_REFCOUNTS)) !== 0n && this.header.version >= 3;
  }

  /** Write inside one L2 table; the caller owns the clusters. */
  private async writeSegment(guestOffset: number, src: Uint8Array): Promise<void> {
    const plan = await this.map.lock.run(() => this.planWrite(guestOffset, src.length));
    const io: Promise<void>[] = [];
    for (const piece of plan.inPlace) {
      const bytes = src.subarray(piece.srcStart, piece.srcStart + piece.bytes);
      io.push(this.backend.write(this.sealed(bytes, guestOffset + piece.srcStart, piece.hostOffset), piece.hostOffset));
    }
    for (const group of plan.groups) io.push(this.writeGroup(group, guestOffset, src));
    if (io.length === 1) await io[0];
    else await settleAll(io);
    // Rewrites in place change no metadata: no second trip through the lock (+24..36% IOPS).
    if (plan.groups.length > 0) await this.map.lock.run(() => this.commitWrite(plan));
  }

  /**
   * Decide where each part of a write inside one L2 table goes: clusters the image owns alone
   * (normal, COPIED) are written in place; every other run is given newly allocated clusters, one
   * contiguous allocation per stretch of such runs. Under lock.
   */
  private async planWrite(guestOffset: number, length: number): Promise<WritePlan> {
    await this.beginWrite();
    const cs = this.clusterSize;
    const l1Index = Math.floor(guestOffset / this.map.l1Span);
    const l2Offset = await this.map.writableL2(l1Index);
    const plan: WritePlan = { l1Index, l2Offset, inPlace: [], groups: [] };
    let group: AllocGroup | undefined;
    for (let pos = 0; pos < length; ) {
      const run = await this.map.lookup(guestOffset + pos, length - pos, this.lookupFlags | LOOKUP_SPLIT_COPIED);
      if (run.type === L2_TYPE_NORMAL && run.copied) {
        plan.inPlace.push({ srcStart: pos, bytes: run.bytes, hostOffset: run.hostOffset + run.inCluster });
        group = undefined;
      } else {
        const clusters = Math.ceil((run.inCluster + run.bytes) / cs);
        if (!group) {
          group = {
            firstCluster: Math.floor((guestOffset + pos) / cs),
            l2Index: run.l2Index,
            clusters: 0,
            srcStart: pos,
            srcEnd: pos,
            hostOffset: 0,
            old: [],
          };
          plan.groups.push(group);
        }
        group.clusters += clusters;
        group.srcEnd = pos + run.bytes;
        group.old.push({ run, clusters });
      }
      pos += run.bytes;
    }
    for (const p of plan.inPlace) await this.refuseMetadataOverlap(p.hostOffset, p.bytes);
    for (const g of plan.groups) g.hostOffset = await this.map.refcounts!.allocate(g.clusters);
    return plan;
  }

  /** Write one allocation group's data, filling partial clusters from what they read as now. */
  private async writeGroup(group: AllocGroup, guestOffset: number, src: Uint8Array): Promise<void> {
    const cs = this.clusterSize;
    const groupStart = group.firstCluster * cs;
    const groupBytes = group.clusters * cs;
    const head = guestOffset + group.srcStart - groupStart;
    const tail = groupStart + groupBytes - (guestOffset + group.srcEnd);
    const data = src.subarray(group.srcStart, group.srcEnd);
    if (head === 0 && tail === 0) {
      await this.backend.write(this.sealed(data, groupStart, group.hostOffset), group.hostOffset);
      return;
    }
    // The mapping is unchanged until commit and nobody else writes these clusters: reading them
    // now gives what the cluster held before (backing file, zeros, compressed or shared data).
    if (groupBytes <= 2 * cs) {
      // Every byte of the buffer is overwritten below (old contents, then the new data).
      const scratch = this.takeScratch();
      try {
        const buf = scratch.subarray(0, groupBytes);
        if (head > 0) await this.readInto(buf.subarray(0, head), groupStart);
        if (tail > 0) await this.readInto(buf.subarray(groupBytes - tail), groupStart + groupBytes - tail);
        buf.set(data, head);
        await this.backend.write(this.sealed(buf, groupStart, group.hostOffset), group.hostOffset);
      } finally {
        this.giveScratch(scratch);
      }
      return;
    }
    // Longer groups: merge only the partial first and last clusters; the middle goes out as is.
    const scratch = this.takeScratch();
    try {
      const jobs: Promise<void>[] = [];
      let middleStart = 0;
      if (head > 0) {
        const first = scratch.subarray(0, cs);
        await this.readInto(first.subarray(0, head), groupStart);
        first.set(data.subarray(0, cs - head), head);
        jobs.push(this.backend.write(this.sealed(first, groupStart, group.hostOffset), group.hostOffset));
        middleStart = cs - head;
      }
      let middleEnd = data.length;
      if (tail > 0) {
        const last = scratch.subarray(cs, 2 * cs);
        await this.readInto(last.subarray(cs - tail), groupStart + groupBytes - tail);
        last.set(data.subarray(data.length - (cs - tail)), 0);
        jobs.push(this.backend.write(this.sealed(last, groupStart + groupBytes - cs, group.hostOffset + groupBytes - cs), group.hostOffset + groupBytes - cs));
        middleEnd = data.length - (cs - tail);
      }
      if (middleEnd > middleStart) {
        const middle = data.subarray(middleStart, middleEnd);
        jobs.push(this.backend.write(this.sealed(middle, groupStart + head + middleStart, group.hostOffset + head + middleStart), group.hostOffset + head + middleStart));
      }
      await settleAll(jobs);
    } finally {
      this.giveScratch(scratch);
    }
  }

  /** A two-cluster buffer for COW merges (a fresh one costs 3.5..18 µs per write, bench/write.mjs). */
  private takeScratch(): Uint8Array {
    return this.scratch.pop() ?? new Uint8Array(2 * this.clusterSize);
  }

  private giveScratch(buffer: Uint8Array): void {
    // Keep at most ~8 MiB of them.
    if ((this.scratch.length + 1) * buffer.length <= 8 << 20 || this.scratch.length === 0) this.scratch.push(buffer);
  }

  /** Point the L2 entries at the written clusters and queue the release of what they replaced. Under lock. */
  private async commitWrite(plan: WritePlan): Promise<void> {
    const l2Offset = await this.map.writableL2(plan.l1Index);
    for (const group of plan.groups) {
      await this.map.setEntries(l2Offset, group.l2Index, group.clusters, group.hostOffset, true, false);
      for (const old of group.old) this.map.release(old.run, old.clusters);
    }
  }

  private async zeroSegment(guestOffset: number, length: number, mayUnmap: boolean): Promise<void> {
    const cs = this.clusterSize;
    const v3 = this.header.version >= 3;
    let writeZeros = false;
    await this.map.lock.run(async () => {
      await this.beginWrite();
      const l1Index = Math.floor(guestOffset / this.map.l1Span);
      // Nothing is mapped and nothing shows through: it already reads as zeros.
      if (this.map.l2TableOffset(l1Index) === 0 && !this.backing) return;
      if (!v3) {
        // v2 has no zero flag: deallocate when that reads as zeros, else write zeros below.
        if (this.backing || !mayUnmap) {
          writeZeros = true;
          return;
        }
      }
      const l2Offset = await this.map.writableL2(l1Index);
      for (let pos = 0; pos < length; ) {
        const run = await this.map.lookup(guestOffset + pos, length - pos, this.lookupFlags | LOOKUP_SPLIT_COPIED);
        const clusters = run.bytes / cs;
        const owned = (run.type === L2_TYPE_NORMAL || run.type === L2_TYPE_ZERO_ALLOC) && run.copied;
        if (!v3) {
          await this.map.setEntries(l2Offset, run.l2Index, clusters, 0, false, false);
          this.map.release(run, clusters);
        } else if (owned && !mayUnmap) {
          // Keep the allocation, flag it zero (qemu's ZERO_ALLOC).
          await this.map.setEntries(l2Offset, run.l2Index, clusters, run.hostOffset, true, true);
        } else if (run.type !== L2_TYPE_ZERO_PLAIN) {
          await this.map.setEntries(l2Offset, run.l2Index, clusters, 0, false, true);
          this.map.release(run, clusters);
        }
        pos += run.bytes;
      }
    });
    if (writeZeros) {
      for (let pos = 0; pos < length; pos += ZERO_CHUNK) {
        await this.writeOwned(guestOffset + pos, new Uint8Array(Math.min(ZERO_CHUNK, length - pos)));
      }
    }
  }

  private async discardSegment(guestOffset: number, length: number): Promise<void> {
    const cs = this.clusterSize;
    const v3 = this.header.version >= 3;
    await this.map.lock.run(async () => {
      const l1Index = Math.floor(guestOffset / this.map.l1Span);
      // No table: nothing to release; only a v3 image over a backing file must still hide it.
      if (this.map.l2TableOffset(l1Index) === 0 && !(v3 && this.backing)) return;
      await this.beginWrite();
      let l2Offset = 0;
      for (let pos = 0; pos < length; ) {
        const run = await this.map.lookup(guestOffset + pos, length - pos, this.lookupFlags);
        const clusters = run.bytes / cs;
        const allocated = run.type === L2_TYPE_NORMAL || run.type === L2_TYPE_ZERO_ALLOC || run.type === L2_TYPE_COMPRESSED;
        // qemu: allocated clusters, or any cluster over a backing file, become zero (v3) or
        // unallocated (v2); unallocated clusters with nothing below stay as they are.
        if ((allocated || this.backing) && !(v3 && run.type === L2_TYPE_ZERO_PLAIN) && !(!v3 && run.type === L2_TYPE_UNALLOCATED)) {
          l2Offset ||= await this.map.writableL2(l1Index);
          await this.map.setEntries(l2Offset, run.l2Index, clusters, 0, false, v3);
          this.map.release(run, clusters);
        }
        pos += run.bytes;
      }
    });
  }

  /** The mapping in this image alone of the run at `guestOffset`, as an extent at depth 0. */
  private async localStatus(guestOffset: number, maxLength: number): Promise<Extent> {
    const run = await this.map.lookup(guestOffset, maxLength, this.lookupFlags);
    const extent: Extent = { start: guestOffset, length: run.bytes, kind: "unallocated", depth: 0 };
    switch (run.type) {
      case L2_TYPE_NORMAL:
        extent.kind = "data";
        extent.hostOffset = run.hostOffset + run.inCluster;
        break;
      case L2_TYPE_ZERO_ALLOC:
        extent.kind = "zero";
        extent.hostOffset = run.hostOffset + run.inCluster;
        break;
      case L2_TYPE_ZERO_PLAIN:
        extent.kind = "zero";
        break;
      case L2_TYPE_COMPRESSED:
        extent.kind = "compressed";
        extent.hostOffset = run.hostOffset;
        break;
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

  // ---- Backing file name and emptying (qemu-img rebase and commit) ---------------------------

  /**
   * Point the header at another backing file, or at none (`backingFile` undefined or ""), with
   * `backingFormat` in the backing-format extension (qemu's qcow2_change_backing_file: cluster 0
   * rebuilt and written in one write, then flushed). Guest data is not touched, and the backing
   * device this image has open stays the one it was opened with: reopen to read through the new one.
   */
  async setBackingFile(backingFile: string | undefined, backingFormat?: string): Promise<void> {
    this.writable("setBackingFile");
    await this.flush();
    await this.map.lock.run(async () => {
      await this.beginWrite();
      await writeBackingFile(this.backend, this.header, this.clusterSize, backingFile || undefined, backingFormat);
    });
  }

  /**
   * Deallocate every guest cluster and L2 table of the active L1, so that the whole disk reads from
   * the backing file (or as zeros without one): qemu's bdrv_make_empty, which qemu-img commit runs
   * on the image it committed. Clusters that snapshots still use stay allocated.
   */
  async makeEmpty(): Promise<void> {
    this.writable("makeEmpty");
    await this.guarded(async () => {
      const claim = this.map.inflight.claim(0, Infinity);
      try {
        await claim.ready;
        await this.map.lock.run(async () => {
          await this.beginWrite();
          await this.dropBeyond(0);
          await this.map.writeBack(() => this.drainReads());
          // As qemu's make_completely_empty shrinks the file: cut it after the last cluster in use.
          const cs = this.clusterSize;
          const fileSize = await this.backend.size();
          let last = Math.ceil(fileSize / cs) - 1;
          while (last > 0 && (await this.map.refcounts!.get(last)) === 0) last--;
          if ((last + 1) * cs < fileSize) await this.backend.truncate((last + 1) * cs);
        });
      } finally {
        claim.release();
      }
    });
    await this.flush();
  }

  // ---- end of rebase and commit helpers --------------------------------------------------------

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

interface AllocGroup {
  /** First guest cluster index of the group. */
  firstCluster: number;
  l2Index: number;
  clusters: number;
  /** The part of the request's data that falls in the group. */
  srcStart: number;
  srcEnd: number;
  /** Where the allocator put the group. */
  hostOffset: number;
  /** The runs the group replaces, to be released at commit. */
  old: Array<{ run: Run; clusters: number }>;
}

interface WritePlan {
  l1Index: number;
  l2Offset: number;
  inPlace: Array<{ srcStart: number; bytes: number; hostOffset: number }>;
  groups: AllocGroup[];
}

/** Await every job; reject with the first failure only after all have settled (no stray writes). */
async function settleAll(jobs: Promise<void>[]): Promise<void> {
  const results = await Promise.allSettled(jobs);
  const failed = results.find((r): r is PromiseRejectedResult => r.status === "rejected");
  if (failed) throw failed.reason;
}

function mergeable(a: Extent, b: Extent): boolean {
  if (a.kind !== b.kind || a.depth !== b.depth || a.kind === "compressed") return false;
  if (a.hostOffset === undefined || b.hostOffset === undefined) return a.hostOffset === b.hostOffset;
  return a.hostOffset + a.length === b.hostOffset;
}

/** The header of `backend` as seen at an internal snapshot: its size, and its L1 table in place of the active one. */
async function snapshotView(
  backend: BlockBackend,
  header: Qcow2Header,
  which: string | { id?: string; name?: string },
  atCurrentSize: boolean,
): Promise<Qcow2Header> {
  const table = await readSnapshotTable(backend, header.snapshotsOffset, header.nbSnapshots);
  const index = findSnapshot(table.entries, which);
  if (index < 0) {
    const what = typeof which === "string" ? `'${which}'` : JSON.stringify(which);
    throw new Qcow2Error(Qcow2ErrorCode.NOT_FOUND, `${backend.name}: no snapshot with id or name ${what}`);
  }
  const sn = table.entries[index]!;
  const cs = 2 ** header.clusterBits;
  if (sn.l1TableOffset % cs !== 0 || sn.l1Size * 8 > 32 * 1024 * 1024 || (sn.l1Size > 0 && sn.l1TableOffset === 0)) {
    throw new Qcow2Error(Qcow2ErrorCode.CORRUPT, `${backend.name}: snapshot '${sn.name}': L1 table at ${hex(sn.l1TableOffset)} (${sn.l1Size} entries) is invalid`);
  }
  const size = atCurrentSize ? header.size : (sn.diskSize ?? header.size);
  const span = cs * (cs / 8);
  // (Past a shorter L1 table everything reads as unallocated, as in qemu.)
  if (!atCurrentSize && sn.l1Size < Math.ceil(size / span)) {
    throw new Qcow2Error(Qcow2ErrorCode.CORRUPT, `${backend.name}: snapshot '${sn.name}': L1 table of ${sn.l1Size} entries cannot map a ${size}-byte disk`);
  }
  return { ...header, size, l1Size: sn.l1Size, l1TableOffset: sn.l1TableOffset };
}

/** The virtual size of the backing file `backingFile` named by an image called `imageName`. */
async function backingSize(backingFile: string, imageName: string, options: OpenOptions & { backingFormat?: string }): Promise<number> {
  const device = await openBacking(backingFile, options.backingFormat, imageName, { ...options, readOnly: true }, { depth: 0, names: [] });
  try {
    return device!.virtualSize;
  } finally {
    await device!.close();
  }
}

async function openBacking(
  backingFile: string | undefined,
  backingFormat: string | undefined,
  imageName: string,
  options: OpenOptions,
  chain: ChainState,
): Promise<GuestDevice | undefined> {
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
  let format = backingFormat;
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
