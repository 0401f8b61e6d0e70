// L2 table lookup (docs/interop/qcow2.rst, "Cluster mapping" and "Compressed Clusters Descriptor").
// An L2 table is one cluster of big-endian u64 entries, held in a slot of the JS-owned L2 cache.
// The lookup classifies one entry and counts how many following entries continue the same run,
// so that one backend request can serve a long guest range. It never traps on bad data: an entry
// the format forbids comes back as TYPE_INVALID with a reason for the TS side to report.

import { loadBE64 } from "./bytes";

export const TYPE_UNALLOCATED: u32 = 0;
export const TYPE_ZERO_PLAIN: u32 = 1;
export const TYPE_ZERO_ALLOC: u32 = 2;
export const TYPE_NORMAL: u32 = 3;
export const TYPE_COMPRESSED: u32 = 4;
export const TYPE_INVALID: u32 = 255;

export const INVALID_UNALIGNED: u32 = 1;
export const INVALID_ZERO_IN_V2: u32 = 2;
export const INVALID_OFFSET_TOO_LARGE: u32 = 3;

/** Lookup flag: the image is v3, so bit 0 means "reads as zero". */
export const LOOKUP_ZERO_FLAG: u32 = 1;
/** Lookup flag: a run also ends where QCOW_OFLAG_COPIED changes (used by writers). */
export const LOOKUP_SPLIT_COPIED: u32 = 2;

const QCOW_OFLAG_COPIED: u64 = 1 << 63;
const QCOW_OFLAG_COMPRESSED: u64 = 1 << 62;
const QCOW_OFLAG_ZERO: u64 = 1;
const L2E_OFFSET_MASK: u64 = 0x00fffffffffffe00;
// Host offsets travel to JS as f64: anything at or past 2^53 would lose bits.
const MAX_JS_OFFSET: u64 = 1 << 53;

// Result record written at outPtr (read by ts/wasm/core.ts; keep the two in step):
//   +0  u32 type          +4  u32 invalid reason
//   +8  f64 host offset   (normal / zero-alloc: cluster start; compressed: byte offset of the stream)
//   +16 f64 compressed size in bytes (upper bound to read; only for TYPE_COMPRESSED)
//   +24 u32 COPIED flag of the first entry
export const RESULT_SIZE: u32 = 32;

@inline
function classify(entry: u64, flags: u32): u32 {
  if (entry & QCOW_OFLAG_COMPRESSED) return TYPE_COMPRESSED;
  const hostOffset = entry & L2E_OFFSET_MASK;
  if (entry & QCOW_OFLAG_ZERO) {
    if (!(flags & LOOKUP_ZERO_FLAG)) return TYPE_INVALID;
    return hostOffset ? TYPE_ZERO_ALLOC : TYPE_ZERO_PLAIN;
  }
  return hostOffset ? TYPE_NORMAL : TYPE_UNALLOCATED;
}

function writeResult(outPtr: usize, type: u32, reason: u32, hostOffset: u64, csize: u64, copied: u32): void {
  store<u32>(outPtr, type, 0);
  store<u32>(outPtr, reason, 4);
  store<f64>(outPtr, <f64>hostOffset, 8);
  store<f64>(outPtr, <f64>csize, 16);
  store<u32>(outPtr, copied, 24);
}

/**
 * Classify entry `startIndex` of the L2 table at `slotPtr` and return how many entries, from it and
 * at most `count`, form one run: same type, and for allocated types host clusters that follow each
 * other. Compressed entries are always runs of one.
 */
export function l2Lookup(
  slotPtr: usize,
  startIndex: u32,
  count: u32,
  clusterBits: u32,
  flags: u32,
  outPtr: usize,
): u32 {
  if (count == 0) return 0;
  const clusterSize: u64 = (<u64>1) << clusterBits;
  const first = loadBE64(slotPtr + ((<usize>startIndex) << 3));
  const copied: u32 = first & QCOW_OFLAG_COPIED ? 1 : 0;
  const type = classify(first, flags);

  if (type == TYPE_INVALID) {
    writeResult(outPtr, type, INVALID_ZERO_IN_V2, 0, 0, copied);
    return 1;
  }
  if (type == TYPE_COMPRESSED) {
    const offsetBits: u64 = 62 - (<u64>clusterBits - 8);
    const coffset = first & (((<u64>1) << offsetBits) - 1);
    const sectorMask: u64 = ((<u64>1) << (<u64>clusterBits - 8)) - 1;
    const nbSectors = ((first >> offsetBits) & sectorMask) + 1;
    if (coffset >= MAX_JS_OFFSET) {
      writeResult(outPtr, TYPE_INVALID, INVALID_OFFSET_TOO_LARGE, 0, 0, copied);
      return 1;
    }
    writeResult(outPtr, type, 0, coffset, nbSectors * 512 - (coffset & 511), copied);
    return 1;
  }

  const hostOffset = first & L2E_OFFSET_MASK;
  if (hostOffset & (clusterSize - 1)) {
    writeResult(outPtr, TYPE_INVALID, INVALID_UNALIGNED, hostOffset, 0, copied);
    return 1;
  }
  if (hostOffset >= MAX_JS_OFFSET) {
    writeResult(outPtr, TYPE_INVALID, INVALID_OFFSET_TOO_LARGE, hostOffset, 0, copied);
    return 1;
  }
  writeResult(outPtr, type, 0, hostOffset, 0, copied);

  const allocated = type == TYPE_NORMAL || type == TYPE_ZERO_ALLOC;
  const splitCopied = (flags & LOOKUP_SPLIT_COPIED) != 0;
  let expected = hostOffset + clusterSize;
  let n: u32 = 1;
  let ptr = slotPtr + ((<usize>(startIndex + 1)) << 3);
  while (n < count) {
    const entry = loadBE64(ptr);
    if (classify(entry, flags) != type) break;
    if (splitCopied && (entry & QCOW_OFLAG_COPIED ? 1 : 0) != copied) break;
    if (allocated) {
      // A run must not carry a host offset past 2^53 to JS; that entry is reported on its own.
      if ((entry & L2E_OFFSET_MASK) != expected || expected >= MAX_JS_OFFSET) break;
      expected += clusterSize;
    }
    n++;
    ptr += 8;
  }
  return n;
}
