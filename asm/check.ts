// The hot loops of `check` (qemu's qcow2_check_refcounts): counting the references an L2 table
// makes into the expected-refcount array, and comparing that array with on-disk refcount blocks.
//
// The expected-refcount array has the image's own refcount width and layout, so one cluster of it
// is byte for byte the refcount block a rebuild writes. Regular entries never leave WebAssembly;
// anything that needs a diagnostic, a repair or a bigger array stops the scan at that entry and
// the caller handles it, then resumes after it. The caller therefore sees every problem in table
// order, which keeps the report identical to qemu's and independent of how the work is split.

// Stats record (f64 slots) shared with the caller.
const STAT_ALLOCATED = 0;
const STAT_FRAGMENTED = 1;
const STAT_COMPRESSED = 2;
/** Host offset the next normal cluster must have to count as contiguous; 0 at a table's start. */
const STAT_NEXT_CONTIGUOUS = 3;

/** Count allocated / fragmented / compressed clusters (active L1 only, as qemu). */
export const SCAN_FRAG_INFO: u32 = 1;

// L2 entry bits (docs/interop/qcow2.rst "Cluster mapping").
const OFLAG_COPIED: u64 = 1 << 63;
const OFLAG_COMPRESSED: u64 = 1 << 62;
const OFLAG_ZERO: u64 = 1;
const L2E_OFFSET_MASK: u64 = 0x00fffffffffffe00;

@inline
function getCount(ptr: usize, index: u64, order: u32): u64 {
  if (order < 3) {
    const bitPos = index << order;
    const byte: u32 = load<u8>(ptr + <usize>(bitPos >> 3));
    return <u64>((byte >> <u32>(bitPos & 7)) & ((<u32>1 << (<u32>1 << order)) - 1));
  }
  if (order == 3) return <u64>load<u8>(ptr + <usize>index);
  if (order == 4) return <u64>bswap<u16>(load<u16>(ptr + (<usize>index << 1)));
  if (order == 5) return <u64>bswap<u32>(load<u32>(ptr + (<usize>index << 2)));
  return bswap<u64>(load<u64>(ptr + (<usize>index << 3)));
}

@inline
function setCount(ptr: usize, index: u64, order: u32, v: u64): void {
  if (order < 3) {
    const bitPos = index << order;
    const at = ptr + <usize>(bitPos >> 3);
    const shift = <u32>(bitPos & 7);
    const mask: u32 = ((<u32>1 << (<u32>1 << order)) - 1) << shift;
    store<u8>(at, <u8>((load<u8>(at) & ~mask) | ((<u32>v << shift) & mask)));
  } else if (order == 3) store<u8>(ptr + <usize>index, <u8>v);
  else if (order == 4) store<u16>(ptr + (<usize>index << 1), bswap<u16>(<u16>v));
  else if (order == 5) store<u32>(ptr + (<usize>index << 2), bswap<u32>(<u32>v));
  else store<u64>(ptr + (<usize>index << 3), bswap<u64>(v));
}

@inline
function maxCount(order: u32): u64 {
  return order >= 6 ? <u64>-1 : ((<u64>1 << (<u64>1 << order)) - 1);
}

/** True when every cluster in [first, last] is inside the array and below the maximum. */
@inline
function canAdd(imrt: usize, entries: u64, order: u32, first: u64, last: u64): bool {
  if (last >= entries) return false;
  const max = maxCount(order);
  for (let k = first; k <= last; k++) {
    if (getCount(imrt, k, order) == max) return false;
  }
  return true;
}

@inline
function addOne(imrt: usize, order: u32, first: u64, last: u64): void {
  for (let k = first; k <= last; k++) setCount(imrt, k, order, getCount(imrt, k, order) + 1);
}

/**
 * Count the references of L2 entries [start, count) of the big-endian table at `l2Ptr`. Returns
 * the index of the first entry that needs the caller (reserved bits, COPIED on a compressed
 * entry, an unaligned offset, a cluster past the array or at the maximum count), or `count`.
 * Entries before the returned index have been fully counted.
 */
export function checkScanL2(
  l2Ptr: usize,
  start: u32,
  count: u32,
  clusterBits: u32,
  imrt: usize,
  imrtEntries: f64,
  order: u32,
  flags: u32,
  statsPtr: usize,
): u32 {
  const entries = <u64>imrtEntries;
  const clusterMask: u64 = (<u64>1 << clusterBits) - 1;
  const csizeShift: u64 = 62 - (<u64>clusterBits - 8);
  const csizeMask: u64 = (<u64>1 << (<u64>clusterBits - 8)) - 1;
  const coffsetMask: u64 = (<u64>1 << csizeShift) - 1;
  const frag = (flags & SCAN_FRAG_INFO) != 0;
  let allocated = load<f64>(statsPtr + (STAT_ALLOCATED << 3));
  let fragmented = load<f64>(statsPtr + (STAT_FRAGMENTED << 3));
  let compressed = load<f64>(statsPtr + (STAT_COMPRESSED << 3));
  let next = <u64>load<f64>(statsPtr + (STAT_NEXT_CONTIGUOUS << 3));
  let i = start;
  for (; i < count; i++) {
    const p = l2Ptr + (<usize>i << 3);
    if (load<u64>(p) == 0) continue; // unallocated: most of a sparse table
    // Big-endian halves: 32-bit swaps are cheap in WASM, a 64-bit one is not.
    const hi = bswap<u32>(load<u32>(p));
    const lo = bswap<u32>(load<u32>(p + 4));
    if (hi & 0x40000000) {
      if (hi & 0x80000000) break;
      const e = (<u64>hi << 32) | <u64>lo;
      const coffset = e & coffsetMask;
      const sectors = ((e >> csizeShift) & csizeMask) + 1;
      const csize = sectors * 512 - (coffset & 511);
      const first = coffset >> clusterBits;
      const last = (coffset + csize - 1) >> clusterBits;
      if (!canAdd(imrt, entries, order, first, last)) break;
      addOne(imrt, order, first, last);
      if (frag) {
        allocated++;
        compressed++;
        fragmented++;
      }
      continue;
    }
    if ((hi & 0x3f000000) | (lo & 0x1fe)) break; // reserved bits
    const hostOffset = (<u64>(hi & 0x00ffffff) << 32) | <u64>(lo & 0xfffffe00);
    if (hostOffset == 0) continue; // unallocated or zero without a cluster
    if (hostOffset & clusterMask) break;
    const k = hostOffset >> clusterBits;
    if (k >= entries) break;
    if (order == 4) {
      // 16-bit refcounts, qemu's default: the common case, without the generic width dispatch.
      const at = imrt + (<usize>k << 1);
      const v = bswap<u16>(load<u16>(at));
      if (v == 0xffff) break;
      store<u16>(at, bswap<u16>(v + 1));
    } else {
      if (getCount(imrt, k, order) == maxCount(order)) break;
      setCount(imrt, k, order, getCount(imrt, k, order) + 1);
    }
    if (frag) {
      allocated++;
      if (next != 0 && hostOffset != next) fragmented++;
      next = hostOffset + clusterMask + 1;
    }
  }
  store<f64>(statsPtr + (STAT_ALLOCATED << 3), allocated);
  store<f64>(statsPtr + (STAT_FRAGMENTED << 3), fragmented);
  store<f64>(statsPtr + (STAT_COMPRESSED << 3), compressed);
  store<f64>(statsPtr + (STAT_NEXT_CONTIGUOUS << 3), <f64>next);
  return i;
}

/** Add one to every cluster in [first, last]; returns the first that is at its maximum (not
 *  changed, nor any after it), or last + 1 when all were added. The caller keeps last < entries. */
export function checkAddRange(imrt: usize, order: u32, first: f64, last: f64): f64 {
  const max = maxCount(order);
  const l = <u64>last;
  for (let k = <u64>first; k <= l; k++) {
    const v = getCount(imrt, k, order);
    if (v == max) return <f64>k;
    setCount(imrt, k, order, v + 1);
  }
  return last + 1;
}

/** First byte index in [start, len) where a and b differ, or len. */
export function checkFirstDiff(a: usize, b: usize, start: u32, len: u32): u32 {
  let i = start;
  while (i < len && ((a + i) & 7) != 0) {
    if (load<u8>(a + i) != load<u8>(b + i)) return i;
    i++;
  }
  if (ASC_FEATURE_SIMD) {
    while (i + 16 <= len) {
      const x = v128.xor(v128.load(a + i), v128.load(b + i));
      if (v128.any_true(x)) break;
      i += 16;
    }
  }
  while (i + 8 <= len) {
    if (load<u64>(a + i) != load<u64>(b + i)) break;
    i += 8;
  }
  while (i < len) {
    if (load<u8>(a + i) != load<u8>(b + i)) return i;
    i++;
  }
  return len;
}

/** One past the last non-zero byte in [0, len), or 0 when all are zero. */
export function checkLastNonZero(ptr: usize, len: u32): u32 {
  let i = len;
  while (i >= 8 && load<u64>(ptr + i - 8) == 0) i -= 8;
  while (i > 0 && load<u8>(ptr + i - 1) == 0) i--;
  return i;
}

/** First cluster index in [start, end) whose count is non-zero, or end. */
export function checkFindNonZero(imrt: usize, order: u32, start: f64, end: f64): f64 {
  let k = <u64>start;
  const e = <u64>end;
  // Whole zero words first: 64 bits of counts at a time.
  while (k < e) {
    const bitPos = k << order;
    if ((bitPos & 63) == 0 && k + (<u64>64 >> order) <= e && load<u64>(imrt + <usize>(bitPos >> 3)) == 0) {
      k += <u64>64 >> order;
      continue;
    }
    if (getCount(imrt, k, order) != 0) return <f64>k;
    k++;
  }
  return end;
}

/**
 * Check QCOW_OFLAG_COPIED of L2 entries [start, count) against on-disk refcounts (`disk`, the
 * same layout as a run of refcount blocks). Returns the first normal or preallocated-zero entry
 * whose flag disagrees with (refcount == 1), or whose refcount lies past `diskEntries`; `count`
 * when none does. Entries in blocks marked non-zero in `blockStatus` (unreadable refcounts) are
 * skipped, as qemu skips clusters whose refcount it cannot get.
 */
export function checkCopiedScan(
  l2Ptr: usize,
  start: u32,
  count: u32,
  clusterBits: u32,
  disk: usize,
  diskEntries: f64,
  order: u32,
  blockStatus: usize,
  blockShift: u32,
): u32 {
  const entries = <u64>diskEntries;
  let i = start;
  for (; i < count; i++) {
    const e = bswap<u64>(load<u64>(l2Ptr + (<usize>i << 3)));
    if (e & OFLAG_COMPRESSED) continue;
    const hostOffset = e & L2E_OFFSET_MASK;
    if (hostOffset == 0) continue;
    const k = hostOffset >> clusterBits;
    if (k >= entries) break;
    if (load<u8>(blockStatus + <usize>(k >> blockShift)) != 0) continue;
    const copied = (e & OFLAG_COPIED) != 0;
    if ((getCount(disk, k, order) == 1) != copied) break;
  }
  return i;
}
