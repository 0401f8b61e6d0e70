// Cluster copy and zero detection over regions of linear memory (COW fills, sparse conversion).
// The SIMD build compares 16 bytes at a time; the scalar build 8. Both give the same answers.

/** Offset of the first non-zero byte in [ptr, ptr + len), or len when all are zero. */
export function firstNonZero(ptr: usize, len: usize): usize {
  let i: usize = 0;
  // Reach 8-byte alignment so the wide loads below are aligned.
  while (i < len && ((ptr + i) & 7) != 0) {
    if (load<u8>(ptr + i) != 0) return i;
    i++;
  }
  if (ASC_FEATURE_SIMD) {
    while (i + 64 <= len) {
      const p = ptr + i;
      const any = v128.or(
        v128.or(v128.load(p), v128.load(p, 16)),
        v128.or(v128.load(p, 32), v128.load(p, 48)),
      );
      if (v128.any_true(any)) break;
      i += 64;
    }
  } else {
    while (i + 32 <= len) {
      const p = ptr + i;
      if ((load<u64>(p) | load<u64>(p, 8) | load<u64>(p, 16) | load<u64>(p, 24)) != 0) break;
      i += 32;
    }
  }
  while (i + 8 <= len) {
    if (load<u64>(ptr + i) != 0) break;
    i += 8;
  }
  while (i < len) {
    if (load<u8>(ptr + i) != 0) return i;
    i++;
  }
  return len;
}

/** 1 when every byte of [ptr, ptr + len) is zero. */
export function isZero(ptr: usize, len: usize): u32 {
  return firstNonZero(ptr, len) == len ? 1 : 0;
}

/**
 * Length of the leading run of `blockSize` blocks in [ptr, ptr + len) that are all zero
 * (when `zero` is 1) or each contain a non-zero byte (when `zero` is 0). The last block may be short.
 */
export function blockRun(ptr: usize, len: usize, blockSize: usize, zero: u32): usize {
  if (blockSize == 0) return 0;
  let pos: usize = 0;
  while (pos < len) {
    const n = min(blockSize, len - pos);
    const blockIsZero = firstNonZero(ptr + pos, n) == n;
    if (blockIsZero != (zero != 0)) break;
    pos += n;
  }
  return pos;
}

export function copyBytes(dst: usize, src: usize, len: usize): void {
  memory.copy(dst, src, len);
}

export function fillBytes(dst: usize, value: u8, len: usize): void {
  memory.fill(dst, value, len);
}
