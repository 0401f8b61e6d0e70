// qcow2 constants and qemu's limits (docs/interop/qcow2.rst; qemu block/qcow2.h). Each limit says why.

export const QCOW_MAGIC = 0x514649fb; // "QFI\xfb"

export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;
export const DEFAULT_CLUSTER_SIZE = 65536;

export const V2_HEADER_LENGTH = 72;
export const V3_MIN_HEADER_LENGTH = 104;
/** What qemu writes for v3: the 104-byte header plus the compression type byte and padding. */
export const V3_HEADER_LENGTH = 112;

/** qemu refuses active L1 tables over 32 MiB: caps the memory an image can make us allocate. */
export const QCOW_MAX_L1_SIZE = 32 * 1024 * 1024;
/** qemu refuses refcount tables over 8 MiB, for the same reason. */
export const QCOW_MAX_REFTABLE_SIZE = 8 * 1024 * 1024;
export const QCOW_MAX_SNAPSHOTS = 65536;
/** Whole snapshot table: 1 KiB per snapshot at most. */
export const QCOW_MAX_SNAPSHOTS_SIZE = 1024 * QCOW_MAX_SNAPSHOTS;
/** qemu's backing file name buffer is 1024 bytes with its NUL. */
export const MAX_BACKING_FILE_SIZE = 1023;
/** qemu keeps the backing format in a 16-byte buffer with its NUL. */
export const MAX_BACKING_FORMAT_SIZE = 15;
/** Host offsets are 56 bits wide in every table. */
export const QCOW_MAX_CLUSTER_OFFSET = 2 ** 56 - 1;
export const QCOW2_MAX_BITMAPS = 65535;
export const QCOW2_MAX_BITMAP_DIRECTORY_SIZE = 1024 * QCOW2_MAX_BITMAPS;
/** Backing chains deeper than this are refused: guards against loops through renamed copies. */
export const MAX_BACKING_CHAIN_DEPTH = 64;
export const QCOW2_COMPRESSED_SECTOR_SIZE = 512;

export const QCOW_OFLAG_COPIED_HI = 0x80000000; // bit 63, in the high 32-bit word
export const QCOW_OFLAG_COMPRESSED_HI = 0x40000000; // bit 62
/** Bits 9..55 of an L1 or L2 entry, as high and low 32-bit masks. */
export const L1E_OFFSET_MASK_HI = 0x00ffffff;
export const L1E_OFFSET_MASK_LO = 0xfffffe00;

// Feature bits (block/qcow2.h).
export const INCOMPAT_DIRTY = 1 << 0;
export const INCOMPAT_CORRUPT = 1 << 1;
export const INCOMPAT_DATA_FILE = 1 << 2;
export const INCOMPAT_COMPRESSION = 1 << 3;
export const INCOMPAT_EXTL2 = 1 << 4;
export const QCOW2_INCOMPAT_MASK = 0x1f;

export const COMPAT_LAZY_REFCOUNTS = 1 << 0;
export const QCOW2_COMPAT_FEAT_MASK = 0x1;

export const AUTOCLEAR_BITMAPS = 1 << 0;
export const AUTOCLEAR_DATA_FILE_RAW = 1 << 1;
export const QCOW2_AUTOCLEAR_MASK = 0x3;

export const CRYPT_NONE = 0;
export const CRYPT_AES = 1;
export const CRYPT_LUKS = 2;

export const COMPRESSION_ZLIB = 0;
export const COMPRESSION_ZSTD = 1;

// Header extension types.
export const EXT_END = 0x00000000;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_TABLE = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_CRYPTO_HEADER = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;

/** The names qemu writes in its feature-name table, by [type, bit]. */
export const KNOWN_FEATURE_NAMES: ReadonlyArray<readonly [type: 0 | 1 | 2, bit: number, name: string]> = [
  [0, 0, "dirty bit"],
  [0, 1, "corrupt bit"],
  [0, 2, "external data file"],
  [0, 3, "compression type"],
  [0, 4, "extended L2 entries"],
  [1, 0, "lazy refcounts"],
  [2, 0, "bitmaps"],
  [2, 1, "raw external data"],
];
