// The qcow2 header and its extensions (docs/interop/qcow2.rst, "Header" and "Header extensions").
// Parsing validates every field against qemu's limits before anything is sized from it.

import { Qcow2Error, Qcow2ErrorCode, hex } from "../errors.js";
import { readFully, type BlockBackend } from "../io/backend.js";
import { decodeCString, decodeString, getU64, getU64Big, view } from "./bytes.js";
import {
  COMPRESSION_ZLIB,
  COMPRESSION_ZSTD,
  CRYPT_LUKS,
  EXT_BACKING_FORMAT,
  EXT_BITMAPS,
  EXT_CRYPTO_HEADER,
  EXT_DATA_FILE,
  EXT_END,
  EXT_FEATURE_TABLE,
  INCOMPAT_COMPRESSION,
  KNOWN_FEATURE_NAMES,
  MAX_BACKING_FILE_SIZE,
  MAX_BACKING_FORMAT_SIZE,
  MAX_CLUSTER_BITS,
  MIN_CLUSTER_BITS,
  QCOW2_MAX_BITMAPS,
  QCOW2_MAX_BITMAP_DIRECTORY_SIZE,
  QCOW_MAGIC,
  QCOW_MAX_L1_SIZE,
  QCOW_MAX_REFTABLE_SIZE,
  QCOW_MAX_SNAPSHOTS,
  V2_HEADER_LENGTH,
  V3_MIN_HEADER_LENGTH,
} from "./constants.js";

/** Bytes that hold every fixed header field of both versions; read this much before the rest. */
export const HEADER_PROBE_SIZE = 512;

export interface FeatureName {
  /** 0 incompatible, 1 compatible, 2 autoclear. */
  type: number;
  bit: number;
  name: string;
}

export interface BitmapsExtension {
  nbBitmaps: number;
  bitmapDirectorySize: number;
  bitmapDirectoryOffset: number;
}

export interface CryptoHeaderExtension {
  offset: number;
  length: number;
}

export interface UnknownExtension {
  type: number;
  data: Uint8Array;
}

export interface HeaderExtensions {
  backingFormat?: string;
  featureNames: FeatureName[];
  bitmaps?: BitmapsExtension;
  cryptoHeader?: CryptoHeaderExtension;
  dataFile?: string;
  /** Extensions this library does not interpret, kept byte for byte for header rewrites. */
  unknown: UnknownExtension[];
  /** Extension types in the order they appear, so a rewrite can keep it. */
  order: number[];
}

export interface Qcow2Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  /** Virtual disk size in bytes. */
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
  /** Header bytes past the fields this library knows (from 112 to header_length), kept verbatim. */
  unknownHeaderFields: Uint8Array;
  extensions: HeaderExtensions;
  backingFile?: string;
  /**
   * Check mode only: tables whose offset is past 2^53 (qemu reads zeros there; nothing is
   * stored so far out). The number fields then hold 0; these hold the offsets as stored.
   */
  farTables?: { l1Table?: bigint; refcountTable?: bigint; snapshots?: bigint };
}

function bad(message: string): Qcow2Error {
  return new Qcow2Error(Qcow2ErrorCode.BAD_HEADER, message);
}

/** A u64 field in hex for messages, exact even where the number form is Infinity (at or past 2^53). */
function u64Hex(dv: DataView, pos: number): string {
  return hex(getU64Big(dv, pos));
}

function checkTableOffset(
  field: string,
  dv: DataView,
  pos: number,
  offset: number,
  tableBytes: number,
  clusterSize: number,
): void {
  if (!Number.isFinite(offset)) throw bad(`${field} ${u64Hex(dv, pos)} is at or past 2^53`);
  if (offset % clusterSize !== 0) {
    throw bad(`${field} ${hex(offset)} is not aligned to the cluster size ${clusterSize}`);
  }
  // Reads of the table must stay addressable as JS numbers (qemu's bound is INT64_MAX).
  if (offset + tableBytes > Number.MAX_SAFE_INTEGER) {
    throw bad(`${field} ${hex(offset)} + ${tableBytes} bytes of table ends past 2^53`);
  }
}

/** qemu refuses requests past this (BDRV_MAX_LENGTH). */
const BDRV_MAX_LENGTH = 2n ** 63n - 2n ** 30n;

/**
 * Check mode: a table past 2^53 is accepted when qemu would accept it (aligned, and reads of it
 * stay below BDRV_MAX_LENGTH); returns its offset as stored, or undefined when it is near.
 */
function farTableOffset(field: string, dv: DataView, pos: number, tableBytes: number, clusterSize: number): bigint | undefined {
  const value = getU64Big(dv, pos);
  if (value < 2n ** 53n) return undefined;
  if (value % BigInt(clusterSize) !== 0n) throw bad(`${field} ${hex(value)} is not aligned to the cluster size ${clusterSize}`);
  if (value + BigInt(tableBytes) > BDRV_MAX_LENGTH) throw bad(`${field} ${hex(value)} + ${tableBytes} bytes of table ends past 2^63 - 2^30`);
  return value;
}

/**
 * The offset of a table with no entries: qemu only requires it aligned and at most INT64_MAX.
 * Nothing is read there; an offset past 2^53 is kept as 0.
 */
function unusedTableOffset(field: string, dv: DataView, pos: number, clusterSize: number): number {
  const value = getU64Big(dv, pos);
  if (value > 0x7fffffffffffffffn || value % BigInt(clusterSize) !== 0n) {
    throw bad(`${field} ${hex(value)} is not a cluster-aligned offset below 2^63`);
  }
  return value < 2n ** 53n ? Number(value) : 0;
}

/** Validate the magic, version and cluster size from the first bytes; returns cluster_bits. */
export function probeHeader(first: Uint8Array): { version: 2 | 3; clusterBits: number } {
  if (first.length < V2_HEADER_LENGTH) {
    throw new Qcow2Error(
      Qcow2ErrorCode.BAD_HEADER,
      `file is ${first.length} bytes, shorter than the ${V2_HEADER_LENGTH}-byte qcow2 header`,
    );
  }
  const dv = view(first);
  const magic = dv.getUint32(0);
  if (magic !== QCOW_MAGIC) {
    throw new Qcow2Error(Qcow2ErrorCode.BAD_MAGIC, `magic ${hex(magic)} is not qcow2's ${hex(QCOW_MAGIC)}`);
  }
  const version = dv.getUint32(4);
  if (version !== 2 && version !== 3) {
    throw new Qcow2Error(Qcow2ErrorCode.UNSUPPORTED_VERSION, `version ${version} is not supported (2 or 3)`);
  }
  const clusterBits = dv.getUint32(20);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw bad(`cluster_bits ${clusterBits} is outside ${MIN_CLUSTER_BITS}..${MAX_CLUSTER_BITS} (512 B..2 MiB)`);
  }
  return { version, clusterBits };
}

/** Parse and validate the header, its extensions and the backing file name from cluster 0. */
export interface ParseHeaderOptions {
  /**
   * Open for `check`, as qemu's BDRV_O_CHECK: an image without a refcount table, or with tables
   * placed at offset 0, is accepted so that check can report on it.
   */
  check?: boolean;
}

export function parseHeader(cluster0: Uint8Array, options: ParseHeaderOptions = {}): Qcow2Header {
  const forCheck = options.check ?? false;
  const far: { l1Table?: bigint | undefined; refcountTable?: bigint | undefined; snapshots?: bigint | undefined } = {};
  const { version, clusterBits } = probeHeader(cluster0);
  const clusterSize = 2 ** clusterBits;
  if (cluster0.length < clusterSize) {
    throw new RangeError(`parseHeader: needs all of cluster 0 (${clusterSize} bytes), got ${cluster0.length}`);
  }
  const dv = view(cluster0);
  const backingFileOffset = getU64(dv, 8);
  const backingFileSize = dv.getUint32(16);
  const size = getU64(dv, 24);
  const cryptMethod = dv.getUint32(32);
  const l1Size = dv.getUint32(36);
  let l1TableOffset = getU64(dv, 40);
  let refcountTableOffset = getU64(dv, 48);
  const refcountTableClusters = dv.getUint32(56);
  const nbSnapshots = dv.getUint32(60);
  let snapshotsOffset = getU64(dv, 64);

  let incompatibleFeatures = 0n;
  let compatibleFeatures = 0n;
  let autoclearFeatures = 0n;
  let refcountOrder = 4;
  let headerLength = V2_HEADER_LENGTH;
  let compressionType = COMPRESSION_ZLIB;
  let unknownHeaderFields: Uint8Array = new Uint8Array(0);

  if (version === 3) {
    incompatibleFeatures = getU64Big(dv, 72);
    compatibleFeatures = getU64Big(dv, 80);
    autoclearFeatures = getU64Big(dv, 88);
    refcountOrder = dv.getUint32(96);
    headerLength = dv.getUint32(100);
    if (headerLength < V3_MIN_HEADER_LENGTH) {
      throw bad(`header_length ${headerLength} is shorter than the v3 minimum of ${V3_MIN_HEADER_LENGTH}`);
    }
    if (headerLength > clusterSize) {
      throw bad(`header_length ${headerLength} exceeds the cluster size ${clusterSize}`);
    }
    // The spec asks for a multiple of 8; qemu does not enforce it, and neither do we.
    if (headerLength > 104) compressionType = cluster0[104]!;
    if (headerLength > 112) unknownHeaderFields = cluster0.slice(112, headerLength);
  }

  if (refcountOrder > 6) {
    throw bad(`refcount_order ${refcountOrder} exceeds 6 (refcounts are at most 64 bits wide)`);
  }
  if (!Number.isFinite(size)) {
    throw new Qcow2Error(Qcow2ErrorCode.LIMIT_EXCEEDED, `size ${u64Hex(dv, 24)} is at or past 2^53 bytes, beyond what this library addresses`);
  }
  if (cryptMethod > CRYPT_LUKS) throw bad(`crypt_method ${cryptMethod} is unknown (0 none, 1 AES, 2 LUKS)`);

  // Compression type and its incompatible bit must agree (qemu's validate_compression_type).
  if (compressionType !== COMPRESSION_ZLIB && compressionType !== COMPRESSION_ZSTD) {
    throw bad(`compression_type ${compressionType} is unknown (0 deflate, 1 zstd)`);
  }
  const compressionBit = (incompatibleFeatures & BigInt(INCOMPAT_COMPRESSION)) !== 0n;
  if (compressionType === COMPRESSION_ZLIB && compressionBit) {
    throw bad(`the compression type feature bit is set but compression_type is 0 (deflate)`);
  }
  if (compressionType !== COMPRESSION_ZLIB && !compressionBit) {
    throw bad(`compression_type ${compressionType} needs the compression type feature bit, which is clear`);
  }

  // Table sizes against qemu's limits, before anything is allocated from them.
  const l2Bits = clusterBits - 3;
  if (l1Size * 8 > QCOW_MAX_L1_SIZE) {
    throw new Qcow2Error(
      Qcow2ErrorCode.LIMIT_EXCEEDED,
      `l1_size ${l1Size} (${l1Size * 8} bytes) exceeds the ${QCOW_MAX_L1_SIZE / 1048576} MiB limit`,
    );
  }
  const bytesPerL1Entry = 2 ** (clusterBits + l2Bits);
  const l1Needed = Math.ceil(size / bytesPerL1Entry);
  if (l1Size < l1Needed) {
    throw bad(`l1_size ${l1Size} is too small for size ${size} (needs ${l1Needed} entries)`);
  }
  if (l1Size === 0) l1TableOffset = unusedTableOffset("l1_table_offset", dv, 40, clusterSize);
  else if (forCheck && (far.l1Table = farTableOffset("l1_table_offset", dv, 40, l1Size * 8, clusterSize)) !== undefined) l1TableOffset = 0;
  else checkTableOffset("l1_table_offset", dv, 40, l1TableOffset, l1Size * 8, clusterSize);
  if (!forCheck && l1Size > 0 && l1TableOffset === 0) throw bad(`l1_table_offset is 0 (inside the header) with l1_size ${l1Size}`);

  if (refcountTableClusters * clusterSize > QCOW_MAX_REFTABLE_SIZE) {
    throw new Qcow2Error(
      Qcow2ErrorCode.LIMIT_EXCEEDED,
      `refcount_table_clusters ${refcountTableClusters} (${refcountTableClusters * clusterSize} bytes) exceeds the ${QCOW_MAX_REFTABLE_SIZE / 1048576} MiB limit`,
    );
  }
  // qemu: "Image does not contain a reference count table" (only `check` opens such images).
  if (!forCheck && refcountTableClusters === 0) throw bad(`refcount_table_clusters is 0 (no refcount table)`);
  if (forCheck && (far.refcountTable = farTableOffset("refcount_table_offset", dv, 48, refcountTableClusters * clusterSize, clusterSize)) !== undefined) {
    refcountTableOffset = 0;
  } else checkTableOffset("refcount_table_offset", dv, 48, refcountTableOffset, refcountTableClusters * clusterSize, clusterSize);
  if (!forCheck && refcountTableOffset === 0) throw bad(`refcount_table_offset is 0 (inside the header)`);

  if (nbSnapshots > QCOW_MAX_SNAPSHOTS) {
    throw new Qcow2Error(
      Qcow2ErrorCode.LIMIT_EXCEEDED,
      `nb_snapshots ${nbSnapshots} exceeds the limit of ${QCOW_MAX_SNAPSHOTS}`,
    );
  }
  // 40 bytes is the fixed part of a snapshot table entry (qemu's QCowSnapshotHeader).
  if (nbSnapshots === 0) snapshotsOffset = unusedTableOffset("snapshots_offset", dv, 64, clusterSize);
  else if (forCheck && (far.snapshots = farTableOffset("snapshots_offset", dv, 64, nbSnapshots * 40, clusterSize)) !== undefined) snapshotsOffset = 0;
  else checkTableOffset("snapshots_offset", dv, 64, snapshotsOffset, nbSnapshots * 40, clusterSize);
  if (!forCheck && nbSnapshots > 0 && snapshotsOffset === 0) {
    throw bad(`snapshots_offset is 0 (inside the header) with nb_snapshots ${nbSnapshots}`);
  }

  // Backing file name: inside cluster 0, after the extensions.
  if (backingFileOffset !== 0) {
    if (backingFileSize > MAX_BACKING_FILE_SIZE) {
      throw bad(`backing_file_size ${backingFileSize} exceeds ${MAX_BACKING_FILE_SIZE} bytes`);
    }
    // qemu does not mind a name overlapping the header; it must lie within cluster 0 here.
    if (backingFileOffset + backingFileSize > clusterSize) {
      throw bad(`backing file name at ${u64Hex(dv, 8)} (+${backingFileSize}) is not inside cluster 0`);
    }
  }
  // Extensions end where the backing file name starts (none at all when it starts in the header).
  const extensionsEnd = backingFileOffset !== 0 ? Math.max(backingFileOffset, headerLength) : clusterSize;
  const extensions = parseExtensions(cluster0, headerLength, extensionsEnd, clusterSize, cryptMethod);
  const backingFile =
    backingFileOffset !== 0 && backingFileSize > 0
      ? decodeString(cluster0.subarray(backingFileOffset, backingFileOffset + backingFileSize))
      : undefined;

  const header: Qcow2Header = {
    version,
    backingFileOffset,
    backingFileSize,
    clusterBits,
    size,
    cryptMethod,
    l1Size,
    l1TableOffset,
    refcountTableOffset,
    refcountTableClusters,
    nbSnapshots,
    snapshotsOffset,
    incompatibleFeatures,
    compatibleFeatures,
    autoclearFeatures,
    refcountOrder,
    headerLength,
    compressionType,
    unknownHeaderFields,
    extensions,
  };
  if (backingFile !== undefined) header.backingFile = backingFile;
  const farTables = Object.fromEntries(Object.entries(far).filter(([, v]) => v !== undefined));
  if (Object.keys(farTables).length > 0) header.farTables = farTables;
  return header;
}

function badExt(message: string): Qcow2Error {
  return new Qcow2Error(Qcow2ErrorCode.BAD_EXTENSION, message);
}

function extName(type: number): string {
  switch (type) {
    case EXT_END:
      return "end marker";
    case EXT_BACKING_FORMAT:
      return "backing format";
    case EXT_FEATURE_TABLE:
      return "feature name table";
    case EXT_BITMAPS:
      return "bitmaps";
    case EXT_CRYPTO_HEADER:
      return "full disk encryption header pointer";
    case EXT_DATA_FILE:
      return "external data file name";
    default:
      return hex(type);
  }
}

function parseExtensions(
  cluster0: Uint8Array,
  start: number,
  end: number,
  clusterSize: number,
  cryptMethod: number,
): HeaderExtensions {
  const dv = view(cluster0);
  const result: HeaderExtensions = { featureNames: [], unknown: [], order: [] };
  const seen = new Set<number>();
  let pos = start;
  // A v2 image may have no extension area at all (the backing name right at 72). Otherwise, like
  // qemu, every extension header must fit: 1..7 bytes left before `end` is "too large" there too.
  while (pos < end) {
    if (end - pos < 8) {
      throw badExt(`header extension at ${hex(pos)} does not fit in the ${end - pos} bytes before ${hex(end)}`);
    }
    const type = dv.getUint32(pos);
    const length = dv.getUint32(pos + 4);
    const dataStart = pos + 8;
    // Checked before the end marker, as qemu does: an end marker with a length past the area is refused.
    if (length > end - dataStart) {
      throw badExt(
        `header extension ${extName(type)} at ${hex(pos)} has length ${length}, past the end of its area at ${hex(end)}`,
      );
    }
    if (type === EXT_END) return result;
    if (seen.has(type)) throw badExt(`header extension ${extName(type)} appears twice (at ${hex(pos)})`);
    seen.add(type);
    result.order.push(type);
    const data = cluster0.subarray(dataStart, dataStart + length);
    const edv = view(data);
    switch (type) {
      case EXT_BACKING_FORMAT:
        if (length > MAX_BACKING_FORMAT_SIZE) {
          throw badExt(`backing format extension length ${length} exceeds ${MAX_BACKING_FORMAT_SIZE} bytes`);
        }
        result.backingFormat = decodeString(data);
        break;
      case EXT_FEATURE_TABLE:
        for (let i = 0; i + 48 <= length; i += 48) {
          result.featureNames.push({
            type: data[i]!,
            bit: data[i + 1]!,
            name: decodeCString(data.subarray(i + 2, i + 48)),
          });
        }
        break;
      case EXT_BITMAPS: {
        if (length !== 24) throw badExt(`bitmaps extension length ${length} is not 24`);
        const nbBitmaps = edv.getUint32(0);
        const reserved = edv.getUint32(4);
        const bitmapDirectorySize = getU64(edv, 8);
        const bitmapDirectoryOffset = getU64(edv, 16);
        if (reserved !== 0) throw badExt(`bitmaps extension reserved field is ${hex(reserved)}, not 0`);
        if (nbBitmaps === 0) throw badExt(`bitmaps extension has nb_bitmaps 0`);
        if (nbBitmaps > QCOW2_MAX_BITMAPS) {
          throw new Qcow2Error(
            Qcow2ErrorCode.LIMIT_EXCEEDED,
            `bitmaps extension nb_bitmaps ${nbBitmaps} exceeds ${QCOW2_MAX_BITMAPS}`,
          );
        }
        if (bitmapDirectorySize > QCOW2_MAX_BITMAP_DIRECTORY_SIZE) {
          throw new Qcow2Error(
            Qcow2ErrorCode.LIMIT_EXCEEDED,
            `bitmap_directory_size ${getU64Big(edv, 8)} exceeds ${QCOW2_MAX_BITMAP_DIRECTORY_SIZE}`,
          );
        }
        if (!Number.isFinite(bitmapDirectoryOffset) || bitmapDirectoryOffset % clusterSize !== 0) {
          throw badExt(`bitmap_directory_offset ${u64Hex(edv, 16)} is not cluster aligned`);
        }
        result.bitmaps = { nbBitmaps, bitmapDirectorySize, bitmapDirectoryOffset };
        break;
      }
      case EXT_CRYPTO_HEADER: {
        if (length !== 16) throw badExt(`encryption header pointer extension length ${length} is not 16`);
        if (cryptMethod !== CRYPT_LUKS) {
          throw badExt(`encryption header pointer extension present with crypt_method ${cryptMethod} (only LUKS uses it)`);
        }
        const offset = getU64(edv, 0);
        const cryptoLength = getU64(edv, 8);
        if (!Number.isFinite(offset) || offset % clusterSize !== 0) {
          throw badExt(`encryption header offset ${u64Hex(edv, 0)} is not cluster aligned`);
        }
        if (!Number.isFinite(cryptoLength)) throw badExt(`encryption header length ${u64Hex(edv, 8)} is at or past 2^53`);
        result.cryptoHeader = { offset, length: cryptoLength };
        break;
      }
      case EXT_DATA_FILE:
        result.dataFile = decodeString(data);
        break;
      default:
        result.unknown.push({ type, data: data.slice() });
    }
    pos = dataStart + Math.ceil(length / 8) * 8;
  }
  return result;
}

/** The name of a feature bit: from the image's own table first, then qemu's names. */
export function featureName(header: Qcow2Header, type: 0 | 1 | 2, bit: number): string | undefined {
  const own = header.extensions.featureNames.find((f) => f.type === type && f.bit === bit);
  if (own) return own.name;
  return KNOWN_FEATURE_NAMES.find(([t, b]) => t === type && b === bit)?.[2];
}

/** Bits set in a feature mask, lowest first. */
export function featureBits(mask: bigint): number[] {
  const bits: number[] = [];
  for (let bit = 0; mask >> BigInt(bit) !== 0n; bit++) {
    if ((mask >> BigInt(bit)) & 1n) bits.push(bit);
  }
  return bits;
}

/** Read and parse the header of the image in `backend` (probe first, then the whole cluster). */
export async function readHeader(backend: BlockBackend, fileSize?: number, options: ParseHeaderOptions = {}): Promise<Qcow2Header> {
  const size = fileSize ?? (await backend.size());
  const probe = new Uint8Array(HEADER_PROBE_SIZE);
  await readFully(backend, probe, 0);
  const { clusterBits } = probeHeader(probe.subarray(0, Math.min(HEADER_PROBE_SIZE, Math.max(size, 0))));
  const cluster0 = new Uint8Array(2 ** clusterBits);
  await readFully(backend, cluster0, 0);
  return parseHeader(cluster0, options);
}
