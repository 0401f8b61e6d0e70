// Big-endian field access on byte arrays. u64 values are read as two u32 halves (no BigInt on hot
// paths); callers that need all 64 bits (feature masks) use the bigint form.

export function view(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/** A u64 as a JS number; values at or above 2^53 come back as Infinity so range checks reject them. */
export function getU64(dv: DataView, pos: number): number {
  const hi = dv.getUint32(pos);
  const lo = dv.getUint32(pos + 4);
  if (hi >= 0x200000) return Infinity;
  return hi * 0x100000000 + lo;
}

export function getU64Big(dv: DataView, pos: number): bigint {
  return dv.getBigUint64(pos);
}

export function setU64(dv: DataView, pos: number, value: number): void {
  dv.setUint32(pos, Math.floor(value / 0x100000000));
  dv.setUint32(pos + 4, value >>> 0);
}

const utf8 = new TextDecoder("utf-8", { fatal: false });
const utf8Encoder = new TextEncoder();

export function decodeString(bytes: Uint8Array): string {
  return utf8.decode(bytes);
}

export function encodeString(text: string): Uint8Array {
  return utf8Encoder.encode(text);
}

/** The bytes up to the first NUL (feature-name table entries are zero padded). */
export function decodeCString(bytes: Uint8Array): string {
  const end = bytes.indexOf(0);
  return utf8.decode(end < 0 ? bytes : bytes.subarray(0, end));
}
