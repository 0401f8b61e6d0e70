// Creating an image with qemu-img's layout and defaults (the seed's qcow_create2; qemu's
// qcow2_co_create): cluster 0 the header, then the refcount table, the refcount blocks and the
// L1 table, each starting on a cluster. qemu-img 7.2 makes the same bytes for these options
// (test/image/create.test.ts compares them).

import { Qcow2Error, Qcow2ErrorCode } from "../errors.js";
import type { BlockBackend } from "../io/backend.js";
import {
  COMPAT_LAZY_REFCOUNTS,
  CRYPT_AES,
  CRYPT_NONE,
  DEFAULT_CLUSTER_SIZE,
  MAX_BACKING_FILE_SIZE,
  MAX_CLUSTER_BITS,
  MIN_CLUSTER_BITS,
  QCOW_MAX_L1_SIZE,
} from "../format/constants.js";
import { encodeString } from "../format/bytes.js";
import type { Qcow2Header } from "../format/header.js";
import { encodeHeader } from "../format/header-write.js";

export type Preallocation = "off" | "metadata" | "falloc" | "full";

export interface CreateOptions {
  /** Virtual size in bytes, rounded up to a multiple of 512 as qemu-img does. */
  size: number;
  /** 3 (qemu's compat=1.1, the default) or 2 (compat=0.10). */
  version?: 2 | 3;
  /** 512 B .. 2 MiB, a power of two (default 64 KiB). */
  clusterSize?: number;
  /** 1, 2, 4, 8, 16 (default), 32 or 64; v2 only 16. */
  refcountBits?: number;
  /** v3 only: postpone refcount updates (the image is marked dirty while open). */
  lazyRefcounts?: boolean;
  /** Name of the backing file, stored as given (relative names are relative to this image). */
  backingFile?: string;
  /** Format of the backing file, stored in the header ("qcow2" or "raw"). */
  backingFormat?: string;
  /**
   * "metadata" maps every cluster; "full" also writes zeros to them; "falloc" does what "full" does
   * (no portable fallocate: the space is reserved by writing it). Not with a backing file.
   */
  preallocation?: Preallocation;
  /**
   * Encrypt the image's data: "luks" (qemu's encrypt.format=luks: aes-256-xts-plain64, PBKDF2 key
   * slots) or "aes" (the legacy qcow2 AES-128-CBC, which qemu only keeps for old images).
   */
  encryption?: CreateEncryption;
}

export interface CreateEncryption {
  format: "aes" | "luks";
  passphrase: string | Uint8Array;
  /** LUKS: "aes-128" or "aes-256" (default). */
  cipherAlg?: "aes-128" | "aes-256";
  /** LUKS: "xts" (default) or "cbc". */
  cipherMode?: "xts" | "cbc";
  /** LUKS: "plain64" only. */
  ivgenAlg?: "plain64";
  /** LUKS: PBKDF2 hash, default "sha256". */
  hashAlg?: "sha1" | "sha256" | "sha384" | "sha512";
  /** LUKS: milliseconds of PBKDF2 per key slot (qemu's encrypt.iter-time, default 2000). */
  iterTime?: number;
}

export interface ResolvedCreateOptions {
  size: number;
  version: 2 | 3;
  clusterBits: number;
  refcountOrder: number;
  lazyRefcounts: boolean;
  backingFile?: string;
  backingFormat?: string;
  preallocation: Preallocation;
  encryption?: CreateEncryption;
}

function bad(message: string): Qcow2Error {
  return new Qcow2Error(Qcow2ErrorCode.BAD_HEADER, message);
}

/** Check options as qemu-img does (its messages), and fill in its defaults. */
export function resolveCreateOptions(o: CreateOptions): ResolvedCreateOptions {
  if (!Number.isSafeInteger(o.size) || o.size < 0) throw new RangeError(`create: size ${o.size} is not a non-negative integer`);
  const size = Math.ceil(o.size / 512) * 512;
  const version = o.version ?? 3;
  if (version !== 2 && version !== 3) throw bad(`version ${String(version)} is not supported (2 or 3)`);
  const clusterSize = o.clusterSize ?? DEFAULT_CLUSTER_SIZE;
  const clusterBits = Math.log2(clusterSize);
  if (!Number.isInteger(clusterBits) || clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw bad(`Cluster size must be a power of two between 512 and 2048k (got ${clusterSize})`);
  }
  const refcountBits = o.refcountBits ?? 16;
  const refcountOrder = Math.log2(refcountBits);
  if (!Number.isInteger(refcountOrder) || refcountOrder < 0 || refcountOrder > 6) {
    throw bad(`Refcount width must be a power of two and may not exceed 64 bits (got ${refcountBits})`);
  }
  if (version === 2 && refcountBits !== 16) {
    throw bad(`Different refcount widths than 16 bits require compatibility level 1.1 or above (got ${refcountBits} with version 2)`);
  }
  const lazyRefcounts = o.lazyRefcounts ?? false;
  if (version === 2 && lazyRefcounts) {
    throw bad(`Lazy refcounts only supported with compatibility level 1.1 and above (version 3)`);
  }
  const preallocation = o.preallocation ?? "off";
  if (!["off", "metadata", "falloc", "full"].includes(preallocation)) {
    throw bad(`preallocation "${preallocation}" is not one of off, metadata, falloc, full`);
  }
  if (o.backingFile !== undefined && preallocation !== "off") {
    throw bad(`Backing file and preallocation can only be used at the same time if extended_l2 is on`);
  }
  if (o.backingFormat !== undefined && o.backingFile === undefined) {
    throw bad(`Backing format cannot be used without backing file`);
  }
  if (o.backingFile !== undefined) {
    if (o.backingFile.length === 0) throw bad(`backing file name is empty`);
    if (encodeString(o.backingFile).length > MAX_BACKING_FILE_SIZE) {
      throw bad(`backing file name is longer than ${MAX_BACKING_FILE_SIZE} bytes`);
    }
  }
  const l1Size = Math.ceil(size / (clusterSize * (clusterSize / 8)));
  if (l1Size * 8 > QCOW_MAX_L1_SIZE) {
    throw new Qcow2Error(
      Qcow2ErrorCode.LIMIT_EXCEEDED,
      `The image size is too large for file format qcow2 (try using a larger cluster size): size ${size} needs an L1 table over the ${QCOW_MAX_L1_SIZE >> 20} MiB limit with ${clusterSize}-byte clusters`,
    );
  }
  if (o.encryption !== undefined) {
    if (o.encryption.format !== "aes" && o.encryption.format !== "luks") {
      throw bad(`encryption format ${JSON.stringify(o.encryption.format)} is not "aes" or "luks"`);
    }
    if (preallocation !== "off") {
      // Preallocated clusters would hold plaintext zeros that decrypt to garbage.
      throw new Qcow2Error(Qcow2ErrorCode.NOT_SUPPORTED, `preallocation=${preallocation} with encryption is not supported`);
    }
  }
  const resolved: ResolvedCreateOptions = { size, version, clusterBits, refcountOrder, lazyRefcounts, preallocation };
  if (o.encryption !== undefined) resolved.encryption = o.encryption;
  if (o.backingFile !== undefined) resolved.backingFile = o.backingFile;
  if (o.backingFormat !== undefined) resolved.backingFormat = o.backingFormat;
  return resolved;
}

/**
 * Write an empty image's header, refcount table, refcount blocks and L1 table to `backend`
 * (which should be empty). Metadata preallocation is the caller's next step, through the engine.
 */
export async function formatImage(backend: BlockBackend, o: ResolvedCreateOptions): Promise<void> {
  const cs = 2 ** o.clusterBits;
  const l1Size = Math.ceil(o.size / (cs * (cs / 8)));
  const l1Clusters = Math.ceil((l1Size * 8) / cs);
  const perBlock = (cs * 8) >> o.refcountOrder;
  // Grow the table and the blocks until they describe themselves, the header and the L1 table.
  let tableClusters = 1;
  let blocks = 1;
  for (;;) {
    const used = 1 + tableClusters + blocks + l1Clusters;
    const needBlocks = Math.ceil(used / perBlock);
    const needTable = Math.ceil((needBlocks * 8) / cs);
    if (needBlocks === blocks && needTable === tableClusters) break;
    blocks = Math.max(blocks, needBlocks);
    tableClusters = Math.max(tableClusters, needTable);
  }
  const tableOffset = cs;
  const blocksOffset = tableOffset + tableClusters * cs;
  const l1Offset = l1Size > 0 ? blocksOffset + blocks * cs : 0;
  const used = 1 + tableClusters + blocks + (l1Size > 0 ? l1Clusters : 0);

  const header: Qcow2Header = {
    version: o.version,
    backingFileOffset: 0,
    backingFileSize: 0,
    clusterBits: o.clusterBits,
    size: o.size,
    // LUKS is switched on once its key slots are written (Qcow2Image.create); AES needs nothing more.
    cryptMethod: o.encryption?.format === "aes" ? CRYPT_AES : CRYPT_NONE,
    l1Size,
    l1TableOffset: l1Offset,
    refcountTableOffset: tableOffset,
    refcountTableClusters: tableClusters,
    nbSnapshots: 0,
    snapshotsOffset: 0,
    incompatibleFeatures: 0n,
    compatibleFeatures: o.lazyRefcounts ? BigInt(COMPAT_LAZY_REFCOUNTS) : 0n,
    autoclearFeatures: 0n,
    refcountOrder: o.refcountOrder,
    headerLength: o.version === 2 ? 72 : 112,
    compressionType: 0,
    unknownHeaderFields: new Uint8Array(0),
    extensions: { featureNames: [], unknown: [], order: [] },
  };
  if (o.backingFile !== undefined) header.backingFile = o.backingFile;
  if (o.backingFormat !== undefined) header.extensions.backingFormat = o.backingFormat;

  const table = new Uint8Array(tableClusters * cs);
  const tdv = new DataView(table.buffer);
  for (let b = 0; b < blocks; b++) {
    const offset = blocksOffset + b * cs;
    tdv.setUint32(b * 8, Math.floor(offset / 0x100000000));
    tdv.setUint32(b * 8 + 4, offset >>> 0);
  }
  const refBlocks = new Uint8Array(blocks * cs);
  setRefcountsToOne(refBlocks, o.refcountOrder, used);

  await backend.truncate(0);
  await backend.write(encodeHeader(header, cs), 0);
  await backend.write(table, tableOffset);
  await backend.write(refBlocks, blocksOffset);
  // Like qemu-img, the file ends right after the L1 entries (or with the last refcount block).
  if (l1Size > 0) await backend.write(new Uint8Array(l1Size * 8), l1Offset);
  else await backend.truncate(blocksOffset + blocks * cs);
  await backend.flush();
}

/** Set refcount 1 for clusters 0..count-1 in consecutive blocks of any width (LSB-first under 8 bits). */
function setRefcountsToOne(blocks: Uint8Array, order: number, count: number): void {
  const bits = 2 ** order;
  for (let c = 0; c < count; c++) {
    const bitPos = c * bits;
    if (bits < 8) blocks[bitPos >> 3]! |= 1 << (bitPos & 7);
    else blocks[(bitPos >> 3) + bits / 8 - 1] = 1;
  }
}
