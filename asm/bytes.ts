// Big-endian loads and stores: qcow2 stores every integer big-endian, WebAssembly is little-endian.

@inline
export function loadBE64(ptr: usize): u64 {
  return bswap<u64>(load<u64>(ptr));
}

@inline
export function storeBE64(ptr: usize, value: u64): void {
  store<u64>(ptr, bswap<u64>(value));
}

@inline
export function loadBE32(ptr: usize): u32 {
  return bswap<u32>(load<u32>(ptr));
}

@inline
export function storeBE32(ptr: usize, value: u32): void {
  store<u32>(ptr, bswap<u32>(value));
}

/** First byte of the JS-owned arena: everything below belongs to the module's static data. */
export function heapBase(): usize {
  return (__heap_base + 15) & ~(<usize>15);
}
