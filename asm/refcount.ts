// Refcount blocks (docs/interop/qcow2.rst "Host cluster management"): one cluster of
// 2^refcount_order-bit big-endian entries; widths under 8 bits pack LSB-first within a byte.
// Values travel as f64 (exact below 2^53: a refcount never gets near that).

@inline
function getEntry(ptr: usize, index: u32, order: u32): u64 {
  if (order < 3) {
    const bits: u32 = 1 << order;
    const bitPos = index << order;
    const byte: u32 = load<u8>(ptr + (bitPos >> 3));
    return <u64>((byte >> (bitPos & 7)) & ((<u32>1 << bits) - 1));
  }
  if (order == 3) return <u64>load<u8>(ptr + index);
  if (order == 4) return <u64>bswap<u16>(load<u16>(ptr + (<usize>index << 1)));
  if (order == 5) return <u64>bswap<u32>(load<u32>(ptr + (<usize>index << 2)));
  return bswap<u64>(load<u64>(ptr + (<usize>index << 3)));
}

export function refcountGet(ptr: usize, index: u32, order: u32): f64 {
  return <f64>getEntry(ptr, index, order);
}

/** Store `value` (already checked against the width by the caller) at `index`. */
export function refcountSet(ptr: usize, index: u32, order: u32, value: f64): void {
  const v = <u64>value;
  if (order < 3) {
    const bits: u32 = 1 << order;
    const bitPos = index << order;
    const at = ptr + (bitPos >> 3);
    const shift = bitPos & 7;
    const mask: u32 = ((1 << bits) - 1) << shift;
    store<u8>(at, <u8>((load<u8>(at) & ~mask) | ((<u32>v << shift) & mask)));
  } else if (order == 3) store<u8>(ptr + index, <u8>v);
  else if (order == 4) store<u16>(ptr + (<usize>index << 1), bswap<u16>(<u16>v));
  else if (order == 5) store<u32>(ptr + (<usize>index << 2), bswap<u32>(<u32>v));
  else store<u64>(ptr + (<usize>index << 3), bswap<u64>(v));
}

/** First index in [start, entries) whose refcount is zero, or `entries` when none is. */
export function refcountFindZero(ptr: usize, entries: u32, order: u32, start: u32): u32 {
  for (let i = start; i < entries; i++) {
    if (getEntry(ptr, i, order) == 0) return i;
  }
  return entries;
}

/** Number of consecutive zero refcounts from `start`, at most `max`. */
export function refcountZeroRun(ptr: usize, entries: u32, order: u32, start: u32, max: u32): u32 {
  let n: u32 = 0;
  let i = start;
  while (i < entries && n < max) {
    if (order >= 3 && ((i << order) & 63) == 0 && i + (64 >> order) <= entries && n + (64 >> order) <= max) {
      if (load<u64>(ptr + ((<usize>i << order) >> 3)) == 0) {
        n += 64 >> order;
        i += 64 >> order;
        continue;
      }
    }
    if (getEntry(ptr, i, order) != 0) break;
    n++;
    i++;
  }
  return n;
}
