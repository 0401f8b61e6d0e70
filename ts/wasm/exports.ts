// The typed face of asm/index.ts. Keep in step with asm/*.ts.

export interface WasmExports {
  readonly memory: WebAssembly.Memory;
  heapBase(): number;
  l2Lookup(
    slotPtr: number,
    startIndex: number,
    count: number,
    clusterBits: number,
    flags: number,
    outPtr: number,
  ): number;
  firstNonZero(ptr: number, len: number): number;
  isZero(ptr: number, len: number): number;
  blockRun(ptr: number, len: number, blockSize: number, zero: number): number;
  copyBytes(dst: number, src: number, len: number): void;
  fillBytes(dst: number, value: number, len: number): void;
  refcountGet(ptr: number, index: number, order: number): number;
  refcountSet(ptr: number, index: number, order: number, value: number): void;
  refcountFindZero(ptr: number, entries: number, order: number, start: number): number;
  refcountZeroRun(ptr: number, entries: number, order: number, start: number, max: number): number;
  checkScanL2(
    l2Ptr: number,
    start: number,
    count: number,
    clusterBits: number,
    imrt: number,
    imrtEntries: number,
    order: number,
    flags: number,
    statsPtr: number,
  ): number;
  checkAddRange(imrt: number, order: number, first: number, last: number): number;
  checkFirstDiff(a: number, b: number, start: number, len: number): number;
  checkLastNonZero(ptr: number, len: number): number;
  checkFindNonZero(imrt: number, order: number, start: number, end: number): number;
  checkCopiedScan(
    l2Ptr: number,
    start: number,
    count: number,
    clusterBits: number,
    disk: number,
    diskEntries: number,
    order: number,
    blockStatus: number,
    blockShift: number,
  ): number;
  aesExpandKey(schedule: number, key: number, keyBytes: number): number;
  aesCbcEncrypt(schedule: number, data: number, len: number, sector: number): number;
  aesCbcDecrypt(schedule: number, data: number, len: number, sector: number): number;
  aesXtsEncrypt(dataSchedule: number, tweakSchedule: number, data: number, len: number, sector: number): number;
  aesXtsDecrypt(dataSchedule: number, tweakSchedule: number, data: number, len: number, sector: number): number;
  _initialize?(): void;
}

// asm/l2.ts result record and constants.
export const L2_TYPE_UNALLOCATED = 0;
export const L2_TYPE_ZERO_PLAIN = 1;
export const L2_TYPE_ZERO_ALLOC = 2;
export const L2_TYPE_NORMAL = 3;
export const L2_TYPE_COMPRESSED = 4;
export const L2_TYPE_INVALID = 255;

export const L2_INVALID_UNALIGNED = 1;
export const L2_INVALID_ZERO_IN_V2 = 2;
export const L2_INVALID_OFFSET_TOO_LARGE = 3;

export const LOOKUP_ZERO_FLAG = 1;
export const LOOKUP_SPLIT_COPIED = 2;

export const L2_RESULT_SIZE = 32;

// asm/check.ts stats record (f64 slots) and flags.
export const CHECK_STAT_ALLOCATED = 0;
export const CHECK_STAT_FRAGMENTED = 1;
export const CHECK_STAT_COMPRESSED = 2;
export const CHECK_STAT_NEXT_CONTIGUOUS = 3;
export const CHECK_STATS_SIZE = 32;
export const SCAN_FRAG_INFO = 1;

// asm/aes.ts key schedule size (bytes, 16-aligned) and status codes.
export const AES_SCHEDULE_SIZE = 1936;
export const AES_OK = 0;
export const AES_BAD_LENGTH = 1;
export const AES_BAD_SCHEDULE = 2;
