// AES sector encryption (FORMAT.md §1.12): AES-CBC with plain64 IVs (legacy qcow2 crypt_method 1,
// LUKS aes-cbc-plain64) and XTS-AES with plain64 tweaks (LUKS aes-xts-plain64, IEEE 1619), on whole
// 512-byte sectors of linear memory, in place. plain64(n) is n as a little-endian u64 in a
// zero-padded 16-byte block; sector numbers arrive as f64 (the TS side keeps them below 2^53).
//
// Constant time: nothing here indexes memory or branches on key or data bits. The cipher is
// bitsliced over eight blocks at a time. The batch of eight blocks is transposed into eight
// 128-bit bit planes: plane i, byte 4*row + col, bit b = bit i of state byte (row, col) of block b.
// SubBytes is the Boyar-Peralta depth-16 circuit ("A depth-16 circuit for the AES S-box", 2011:
// 128 gates forward, 127 inverse, a 63-gate middle shared by both) run on whole planes; ShiftRows
// and the row rotations of MixColumns move whole bytes of a plane: byte shuffles in the SIMD build,
// shifts and masks of two u64 halves (rows 0-1, rows 2-3) in the scalar build. Table-based AES
// (T-tables) was not an option: its key- and data-dependent loads leak through cache timing to
// other code on the machine, a browser tab included.
//
// Eight independent blocks per batch suit XTS and CBC decryption (every block is independent once
// the ciphertext is known); CBC encryption is a chain inside each sector, so it runs eight sectors
// in lockstep: block j of sectors s..s+7 form one batch. Runs shorter than eight sectors leave
// lanes idle.

const SECTOR_SIZE: usize = 512;
const BLOCKS_PER_SECTOR: usize = 32;
/** Blocks per batch, and sectors per lockstep group. */
const LANES: usize = 8;
const BATCH_SIZE: usize = 128;
/** Bytes of one round key in plane form (8 planes of 16 bytes). */
const ROUND_KEY_SIZE: usize = 128;

// Key schedule layout, in the JS arena: u32 rounds (10 or 14) at +0, then rounds + 1 round keys in
// plane form from +16; at most 16 + 15 * 128 = 1936 bytes (AES_SCHEDULE_SIZE in ts/wasm/exports.ts).

export const AES_OK: u32 = 0;
export const AES_BAD_LENGTH: u32 = 1;
export const AES_BAD_SCHEDULE: u32 = 2;

// Scratch in the module's static data, below the JS arena. Wiped before every export returns.
const BATCH = memory.data(BATCH_SIZE, 16);
const TMP_B = memory.data(BATCH_SIZE, 16);
const TMP_C = memory.data(BATCH_SIZE, 16);
const TWEAKS = memory.data(BATCH_SIZE, 16);
const SECTOR_TWEAKS = memory.data(BATCH_SIZE, 16);
/** CBC decryption: the block that chains into the next batch, and the one after. */
const CHAIN = memory.data(32, 16);
/** Key expansion: the expanded key (60 words at most) and eight u32 planes for SubWord. */
const EXPANDED = memory.data(240, 16);
const WORD_PLANES = memory.data(32, 16);
/** All-zero round key: MixColumns without AddRoundKey (scalar InvMixColumns). */
const ZERO_KEY = memory.data(ROUND_KEY_SIZE, 16);

function wipeScratch(): void {
  memory.fill(BATCH, 0, BATCH_SIZE);
  memory.fill(TMP_B, 0, BATCH_SIZE);
  memory.fill(TMP_C, 0, BATCH_SIZE);
  memory.fill(TWEAKS, 0, BATCH_SIZE);
  memory.fill(SECTOR_TWEAKS, 0, BATCH_SIZE);
  memory.fill(CHAIN, 0, 32);
}

// ---- Word-generic bit operations: T is v128 (SIMD build), u64 (scalar build) or u32 (key setup).

@inline
function bxor<T>(a: T, b: T): T {
  if (isVector<T>()) return v128.xor(a, b);
  else return a ^ b;
}

@inline
function band<T>(a: T, b: T): T {
  if (isVector<T>()) return v128.and(a, b);
  else return a & b;
}

@inline
function bshl<T>(a: T, n: i32): T {
  if (isVector<T>()) return i64x2.shl(a, n);
  else return a << (<T>n);
}

@inline
function bshr<T>(a: T, n: i32): T {
  if (isVector<T>()) return i64x2.shr_u(a, n);
  else return a >> (<T>n);
}

@inline
function bsplat<T>(x: u64): T {
  if (isVector<T>()) return i64x2.splat(x);
  else return <T>x;
}

// ---- SubBytes: Boyar-Peralta depth-16 circuit. U0 is the most significant bit (plane 7), and the
// outputs S0/W0 likewise. Names follow the paper (+ XOR, x AND). The paper's XNOR gates are XORs
// here: without its constants the forward circuit gives S(x) ^ 0x63 and the inverse one
// S^-1(x ^ 0x63) (checked for all 256 inputs), and 0x63 in every byte passes unchanged through
// ShiftRows, MixColumns and InvMixColumns (each row of their matrices sums to 1). So round keys
// 1..Nr carry an extra 0x63 in every byte (aesExpandKey) and no round spends NOTs on it.

@inline
function sboxCircuit<T>(p: usize, stride: usize, inverse: bool): void {
  const U0 = load<T>(p + 7 * stride);
  const U1 = load<T>(p + 6 * stride);
  const U2 = load<T>(p + 5 * stride);
  const U3 = load<T>(p + 4 * stride);
  const U4 = load<T>(p + 3 * stride);
  const U5 = load<T>(p + 2 * stride);
  const U6 = load<T>(p + 1 * stride);
  const U7 = load<T>(p);

  let T1: T, T2: T, T3: T, T4: T, T6: T, T8: T, T9: T, T10: T, T13: T, T14: T, T15: T, T16: T;
  let T17: T, T19: T, T20: T, T22: T, T23: T, T24: T, T25: T, T26: T, T27: T, D: T;
  if (!inverse) {
    // Top linear transform, forward.
    T1 = bxor<T>(U0, U3);
    T2 = bxor<T>(U0, U5);
    T3 = bxor<T>(U0, U6);
    T4 = bxor<T>(U3, U5);
    const T5 = bxor<T>(U4, U6);
    T6 = bxor<T>(T1, T5);
    const T7 = bxor<T>(U1, U2);
    T8 = bxor<T>(U7, T6);
    T9 = bxor<T>(U7, T7);
    T10 = bxor<T>(T6, T7);
    const T11 = bxor<T>(U1, U5);
    const T12 = bxor<T>(U2, U5);
    T13 = bxor<T>(T3, T4);
    T14 = bxor<T>(T6, T11);
    T15 = bxor<T>(T5, T11);
    T16 = bxor<T>(T5, T12);
    T17 = bxor<T>(T9, T16);
    const T18 = bxor<T>(U3, U7);
    T19 = bxor<T>(T7, T18);
    T20 = bxor<T>(T1, T19);
    const T21 = bxor<T>(U6, U7);
    T22 = bxor<T>(T7, T21);
    T23 = bxor<T>(T2, T22);
    T24 = bxor<T>(T2, T10);
    T25 = bxor<T>(T20, T17);
    T26 = bxor<T>(T3, T16);
    T27 = bxor<T>(T1, T12);
    D = U7;
  } else {
    // Top linear transform, inverse.
    T23 = bxor<T>(U0, U3);
    T22 = bxor<T>(U1, U3);
    T2 = bxor<T>(U0, U1);
    T1 = bxor<T>(U3, U4);
    T24 = bxor<T>(U4, U7);
    const R5 = bxor<T>(U6, U7);
    T8 = bxor<T>(U1, T23);
    T19 = bxor<T>(T22, R5);
    T9 = bxor<T>(U7, T1);
    T10 = bxor<T>(T2, T24);
    T13 = bxor<T>(T2, R5);
    T3 = bxor<T>(T1, R5);
    T25 = bxor<T>(U2, T1);
    const R13 = bxor<T>(U1, U6);
    T17 = bxor<T>(U2, T19);
    T20 = bxor<T>(T24, R13);
    T4 = bxor<T>(U4, T8);
    const R17 = bxor<T>(U2, U5);
    const R18 = bxor<T>(U5, U6);
    const R19 = bxor<T>(U2, U4);
    D = bxor<T>(U0, R17); // Y5 in the paper
    T6 = bxor<T>(T22, R17);
    T16 = bxor<T>(R13, R19);
    T27 = bxor<T>(T1, R18);
    T15 = bxor<T>(T10, T27);
    T14 = bxor<T>(T10, R18);
    T26 = bxor<T>(T3, T16);
  }

  // Shared non-linear middle (inversion in GF(2^8) in a tower representation).
  const M1 = band<T>(T13, T6);
  const M2 = band<T>(T23, T8);
  const M3 = bxor<T>(T14, M1);
  const M4 = band<T>(T19, D);
  const M5 = bxor<T>(M4, M1);
  const M6 = band<T>(T3, T16);
  const M7 = band<T>(T22, T9);
  const M8 = bxor<T>(T26, M6);
  const M9 = band<T>(T20, T17);
  const M10 = bxor<T>(M9, M6);
  const M11 = band<T>(T1, T15);
  const M12 = band<T>(T4, T27);
  const M13 = bxor<T>(M12, M11);
  const M14 = band<T>(T2, T10);
  const M15 = bxor<T>(M14, M11);
  const M16 = bxor<T>(M3, M2);
  const M17 = bxor<T>(M5, T24);
  const M18 = bxor<T>(M8, M7);
  const M19 = bxor<T>(M10, M15);
  const M20 = bxor<T>(M16, M13);
  const M21 = bxor<T>(M17, M15);
  const M22 = bxor<T>(M18, M13);
  const M23 = bxor<T>(M19, T25);
  const M24 = bxor<T>(M22, M23);
  const M25 = band<T>(M22, M20);
  const M26 = bxor<T>(M21, M25);
  const M27 = bxor<T>(M20, M21);
  const M28 = bxor<T>(M23, M25);
  const M29 = band<T>(M28, M27);
  const M30 = band<T>(M26, M24);
  const M31 = band<T>(M20, M23);
  const M32 = band<T>(M27, M31);
  const M33 = bxor<T>(M27, M25);
  const M34 = band<T>(M21, M22);
  const M35 = band<T>(M24, M34);
  const M36 = bxor<T>(M24, M25);
  const M37 = bxor<T>(M21, M29);
  const M38 = bxor<T>(M32, M33);
  const M39 = bxor<T>(M23, M30);
  const M40 = bxor<T>(M35, M36);
  const M41 = bxor<T>(M38, M40);
  const M42 = bxor<T>(M37, M39);
  const M43 = bxor<T>(M37, M38);
  const M44 = bxor<T>(M39, M40);
  const M45 = bxor<T>(M42, M41);
  const M46 = band<T>(M44, T6);
  const M47 = band<T>(M40, T8);
  const M48 = band<T>(M39, D);
  const M49 = band<T>(M43, T16);
  const M50 = band<T>(M38, T9);
  const M51 = band<T>(M37, T17);
  const M52 = band<T>(M42, T15);
  const M53 = band<T>(M45, T27);
  const M54 = band<T>(M41, T10);
  const M55 = band<T>(M44, T13);
  const M56 = band<T>(M40, T23);
  const M57 = band<T>(M39, T19);
  const M58 = band<T>(M43, T3);
  const M59 = band<T>(M38, T22);
  const M60 = band<T>(M37, T20);
  const M61 = band<T>(M42, T1);
  const M62 = band<T>(M45, T4);
  const M63 = band<T>(M41, T2);

  if (!inverse) {
    // Bottom linear transform, forward.
    const L0 = bxor<T>(M61, M62);
    const L1 = bxor<T>(M50, M56);
    const L2 = bxor<T>(M46, M48);
    const L3 = bxor<T>(M47, M55);
    const L4 = bxor<T>(M54, M58);
    const L5 = bxor<T>(M49, M61);
    const L6 = bxor<T>(M62, L5);
    const L7 = bxor<T>(M46, L3);
    const L8 = bxor<T>(M51, M59);
    const L9 = bxor<T>(M52, M53);
    const L10 = bxor<T>(M53, L4);
    const L11 = bxor<T>(M60, L2);
    const L12 = bxor<T>(M48, M51);
    const L13 = bxor<T>(M50, L0);
    const L14 = bxor<T>(M52, M61);
    const L15 = bxor<T>(M55, L1);
    const L16 = bxor<T>(M56, L0);
    const L17 = bxor<T>(M57, L1);
    const L18 = bxor<T>(M58, L8);
    const L19 = bxor<T>(M63, L4);
    const L20 = bxor<T>(L0, L1);
    const L21 = bxor<T>(L1, L7);
    const L22 = bxor<T>(L3, L12);
    const L23 = bxor<T>(L18, L2);
    const L24 = bxor<T>(L15, L9);
    const L25 = bxor<T>(L6, L10);
    const L26 = bxor<T>(L7, L9);
    const L27 = bxor<T>(L8, L10);
    const L28 = bxor<T>(L11, L14);
    const L29 = bxor<T>(L11, L17);
    store<T>(p + 7 * stride, bxor<T>(L6, L24)); // S0
    store<T>(p + 6 * stride, bxor<T>(L16, L26)); // S1
    store<T>(p + 5 * stride, bxor<T>(L19, L28)); // S2
    store<T>(p + 4 * stride, bxor<T>(L6, L21)); // S3
    store<T>(p + 3 * stride, bxor<T>(L20, L22)); // S4
    store<T>(p + 2 * stride, bxor<T>(L25, L29)); // S5
    store<T>(p + 1 * stride, bxor<T>(L13, L27)); // S6
    store<T>(p, bxor<T>(L6, L23)); // S7
  } else {
    // Bottom linear transform, inverse.
    const P0 = bxor<T>(M52, M61);
    const P1 = bxor<T>(M58, M59);
    const P2 = bxor<T>(M54, M62);
    const P3 = bxor<T>(M47, M50);
    const P4 = bxor<T>(M48, M56);
    const P5 = bxor<T>(M46, M51);
    const P6 = bxor<T>(M49, M60);
    const P7 = bxor<T>(P0, P1);
    const P8 = bxor<T>(M50, M53);
    const P9 = bxor<T>(M55, M63);
    const P10 = bxor<T>(M57, P4);
    const P11 = bxor<T>(P0, P3);
    const P12 = bxor<T>(M46, M48);
    const P13 = bxor<T>(M49, M51);
    const P14 = bxor<T>(M49, M62);
    const P15 = bxor<T>(M54, M59);
    const P16 = bxor<T>(M57, M61);
    const P17 = bxor<T>(M58, P2);
    const P18 = bxor<T>(M63, P5);
    const P19 = bxor<T>(P2, P3);
    const P20 = bxor<T>(P4, P6);
    const P22 = bxor<T>(P2, P7);
    const P23 = bxor<T>(P7, P8);
    const P24 = bxor<T>(P5, P7);
    const P25 = bxor<T>(P6, P10);
    const P26 = bxor<T>(P9, P11);
    const P27 = bxor<T>(P10, P18);
    const P28 = bxor<T>(P11, P25);
    const P29 = bxor<T>(P15, P20);
    store<T>(p + 7 * stride, bxor<T>(P13, P22)); // W0
    store<T>(p + 6 * stride, bxor<T>(P26, P29)); // W1
    store<T>(p + 5 * stride, bxor<T>(P17, P28)); // W2
    store<T>(p + 4 * stride, bxor<T>(P12, P22)); // W3
    store<T>(p + 3 * stride, bxor<T>(P23, P27)); // W4
    store<T>(p + 2 * stride, bxor<T>(P19, P24)); // W5
    store<T>(p + 1 * stride, bxor<T>(P14, P23)); // W6
    store<T>(p, bxor<T>(P9, P16)); // W7
  }
}

function subBytes<T>(p: usize, stride: usize): void {
  sboxCircuit<T>(p, stride, false);
}

function invSubBytes<T>(p: usize, stride: usize): void {
  sboxCircuit<T>(p, stride, true);
}

function subBytesBatch(): void {
  if (ASC_FEATURE_SIMD) {
    subBytes<v128>(BATCH, 16);
  } else {
    subBytes<u64>(BATCH, 16);
    subBytes<u64>(BATCH + 8, 16);
  }
}

function invSubBytesBatch(): void {
  if (ASC_FEATURE_SIMD) {
    invSubBytes<v128>(BATCH, 16);
  } else {
    invSubBytes<u64>(BATCH, 16);
    invSubBytes<u64>(BATCH + 8, 16);
  }
}

// ---- Linear layers. Plane byte q = 4 * row + col. ShiftRows: (row, col) <- (row, col + row);
// InvShiftRows: (row, col) <- (row, col - row). rot1: (row, col) <- (row + 1, col), i.e. byte
// q <- q + 4 (mod 16); rot2: q <- q + 8.
//
// MixColumns per plane, with b = a ^ rot1(a): out = xtime(b) ^ rot1(a) ^ rot2(b), where xtime
// moves across planes (x^8 = x^4 + x^3 + x + 1): bit 0 <- 7, 1 <- 0^7, 2 <- 1, 3 <- 2^7, 4 <- 3^7,
// 5 <- 4, 6 <- 5, 7 <- 6. InvMixColumns(a) = MixColumns(a ^ 4 * (a ^ rot2(a))), because
// {0e,0b,0d,09} = {02,03,01,01} * {05,00,04,00} as polynomials mod x^4 + 1.

// -- SIMD build: one v128 per plane, the row moves are byte shuffles, the eight planes stay in
// registers through a round's linear layer.

@inline
function shiftRowsV(s: v128): v128 {
  return i8x16.shuffle(s, s, 0, 1, 2, 3, 5, 6, 7, 4, 10, 11, 8, 9, 15, 12, 13, 14);
}

/** rot1(ShiftRows(s)) in one shuffle. */
@inline
function shiftRowsRot1V(s: v128): v128 {
  return i8x16.shuffle(s, s, 5, 6, 7, 4, 10, 11, 8, 9, 15, 12, 13, 14, 0, 1, 2, 3);
}

@inline
function invShiftRowsV(s: v128): v128 {
  return i8x16.shuffle(s, s, 0, 1, 2, 3, 7, 4, 5, 6, 10, 11, 8, 9, 13, 14, 15, 12);
}

@inline
function rot1V(s: v128): v128 {
  return i8x16.shuffle(s, s, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3);
}

@inline
function rot2V(s: v128): v128 {
  return i8x16.shuffle(s, s, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
}

@inline
function mixOutV(x: v128, r: v128, b: v128, key: usize, at: usize): void {
  const out = v128.xor(v128.xor(x, r), rot2V(b));
  v128.store(BATCH + at, key ? v128.xor(out, v128.load(key + at)) : out);
}

/** MixColumns of planes a (with r = rot1(a)) into BATCH, then ^ key unless key is 0. */
@inline
function mixColumnsV(
  a0: v128, a1: v128, a2: v128, a3: v128, a4: v128, a5: v128, a6: v128, a7: v128,
  r0: v128, r1: v128, r2: v128, r3: v128, r4: v128, r5: v128, r6: v128, r7: v128,
  key: usize,
): void {
  const b0 = v128.xor(a0, r0);
  const b1 = v128.xor(a1, r1);
  const b2 = v128.xor(a2, r2);
  const b3 = v128.xor(a3, r3);
  const b4 = v128.xor(a4, r4);
  const b5 = v128.xor(a5, r5);
  const b6 = v128.xor(a6, r6);
  const b7 = v128.xor(a7, r7);
  mixOutV(b7, r0, b0, key, 0);
  mixOutV(v128.xor(b0, b7), r1, b1, key, 16);
  mixOutV(b1, r2, b2, key, 32);
  mixOutV(v128.xor(b2, b7), r3, b3, key, 48);
  mixOutV(v128.xor(b3, b7), r4, b4, key, 64);
  mixOutV(b4, r5, b5, key, 80);
  mixOutV(b5, r6, b6, key, 96);
  mixOutV(b6, r7, b7, key, 112);
}

function shiftMixAddKeyV(key: usize): void {
  const s0 = v128.load(BATCH);
  const s1 = v128.load(BATCH, 16);
  const s2 = v128.load(BATCH, 32);
  const s3 = v128.load(BATCH, 48);
  const s4 = v128.load(BATCH, 64);
  const s5 = v128.load(BATCH, 80);
  const s6 = v128.load(BATCH, 96);
  const s7 = v128.load(BATCH, 112);
  mixColumnsV(
    shiftRowsV(s0), shiftRowsV(s1), shiftRowsV(s2), shiftRowsV(s3),
    shiftRowsV(s4), shiftRowsV(s5), shiftRowsV(s6), shiftRowsV(s7),
    shiftRowsRot1V(s0), shiftRowsRot1V(s1), shiftRowsRot1V(s2), shiftRowsRot1V(s3),
    shiftRowsRot1V(s4), shiftRowsRot1V(s5), shiftRowsRot1V(s6), shiftRowsRot1V(s7),
    key,
  );
}

function invShiftAddKeyInvMixV(key: usize): void {
  const a0 = v128.xor(invShiftRowsV(v128.load(BATCH)), v128.load(key));
  const a1 = v128.xor(invShiftRowsV(v128.load(BATCH, 16)), v128.load(key, 16));
  const a2 = v128.xor(invShiftRowsV(v128.load(BATCH, 32)), v128.load(key, 32));
  const a3 = v128.xor(invShiftRowsV(v128.load(BATCH, 48)), v128.load(key, 48));
  const a4 = v128.xor(invShiftRowsV(v128.load(BATCH, 64)), v128.load(key, 64));
  const a5 = v128.xor(invShiftRowsV(v128.load(BATCH, 80)), v128.load(key, 80));
  const a6 = v128.xor(invShiftRowsV(v128.load(BATCH, 96)), v128.load(key, 96));
  const a7 = v128.xor(invShiftRowsV(v128.load(BATCH, 112)), v128.load(key, 112));
  // e = a ^ rot2(a); u = a ^ 4 * e, 4 * e being xtime twice: 0 <- 6, 1 <- 6^7, 2 <- 0^7, 3 <- 1^6,
  // 4 <- 2^6^7, 5 <- 3^7, 6 <- 4, 7 <- 5.
  const e0 = v128.xor(a0, rot2V(a0));
  const e1 = v128.xor(a1, rot2V(a1));
  const e2 = v128.xor(a2, rot2V(a2));
  const e3 = v128.xor(a3, rot2V(a3));
  const e4 = v128.xor(a4, rot2V(a4));
  const e5 = v128.xor(a5, rot2V(a5));
  const e6 = v128.xor(a6, rot2V(a6));
  const e7 = v128.xor(a7, rot2V(a7));
  const e67 = v128.xor(e6, e7);
  const u0 = v128.xor(a0, e6);
  const u1 = v128.xor(a1, e67);
  const u2 = v128.xor(a2, v128.xor(e0, e7));
  const u3 = v128.xor(a3, v128.xor(e1, e6));
  const u4 = v128.xor(a4, v128.xor(e2, e67));
  const u5 = v128.xor(a5, v128.xor(e3, e7));
  const u6 = v128.xor(a6, e4);
  const u7 = v128.xor(a7, e5);
  mixColumnsV(
    u0, u1, u2, u3, u4, u5, u6, u7,
    rot1V(u0), rot1V(u1), rot1V(u2), rot1V(u3), rot1V(u4), rot1V(u5), rot1V(u6), rot1V(u7),
    0,
  );
}

// -- Scalar build: a plane is two u64 halves, lo = rows 0-1 and hi = rows 2-3. Row moves inside a
// half are shifts and masks; rot1 is a 128-bit rotation by 32 bits, rot2 swaps the halves. The
// cross-plane steps go through TMP_B/TMP_C and run on each half separately.

@inline
function shiftRowsLo(lo: u64): u64 {
  return (lo & 0x00000000ffffffff) | ((lo >> 8) & 0x00ffffff00000000) | ((lo << 24) & 0xff00000000000000);
}

@inline
function shiftRowsHi(hi: u64): u64 {
  return (
    ((hi >> 16) & 0x000000000000ffff) |
    ((hi << 16) & 0x00000000ffff0000) |
    ((hi >> 24) & 0x000000ff00000000) |
    ((hi << 8) & 0xffffff0000000000)
  );
}

@inline
function invShiftRowsLo(lo: u64): u64 {
  return (lo & 0x00000000ffffffff) | ((lo >> 24) & 0x000000ff00000000) | ((lo << 8) & 0xffffff0000000000);
}

@inline
function invShiftRowsHi(hi: u64): u64 {
  return (
    ((hi >> 16) & 0x000000000000ffff) |
    ((hi << 16) & 0x00000000ffff0000) |
    ((hi >> 8) & 0x00ffffff00000000) |
    ((hi << 24) & 0xff00000000000000)
  );
}

/** out = xtime(b) ^ c ^ key on one half, with b in TMP_B and c = rot1(a) ^ rot2(b) in TMP_C. */
@inline
function mixCombineHalf(off: usize, key: usize): void {
  const b0 = load<u64>(TMP_B + off);
  const b1 = load<u64>(TMP_B + off + 16);
  const b2 = load<u64>(TMP_B + off + 32);
  const b3 = load<u64>(TMP_B + off + 48);
  const b4 = load<u64>(TMP_B + off + 64);
  const b5 = load<u64>(TMP_B + off + 80);
  const b6 = load<u64>(TMP_B + off + 96);
  const b7 = load<u64>(TMP_B + off + 112);
  const c = TMP_C + off;
  const k = key + off;
  const o = BATCH + off;
  store<u64>(o, b7 ^ load<u64>(c) ^ load<u64>(k));
  store<u64>(o + 16, b0 ^ b7 ^ load<u64>(c + 16) ^ load<u64>(k + 16));
  store<u64>(o + 32, b1 ^ load<u64>(c + 32) ^ load<u64>(k + 32));
  store<u64>(o + 48, b2 ^ b7 ^ load<u64>(c + 48) ^ load<u64>(k + 48));
  store<u64>(o + 64, b3 ^ b7 ^ load<u64>(c + 64) ^ load<u64>(k + 64));
  store<u64>(o + 80, b4 ^ load<u64>(c + 80) ^ load<u64>(k + 80));
  store<u64>(o + 96, b5 ^ load<u64>(c + 96) ^ load<u64>(k + 96));
  store<u64>(o + 112, b6 ^ load<u64>(c + 112) ^ load<u64>(k + 112));
}

/** MixColumns of the planes in BATCH, then ^ key. */
function mixColumnsAddKeyScalar(key: usize): void {
  for (let i: usize = 0; i < 128; i += 16) {
    const lo = load<u64>(BATCH + i);
    const hi = load<u64>(BATCH + i + 8);
    const rlo = (lo >> 32) | (hi << 32);
    const rhi = (hi >> 32) | (lo << 32);
    const blo = lo ^ rlo;
    const bhi = hi ^ rhi;
    store<u64>(TMP_B + i, blo);
    store<u64>(TMP_B + i + 8, bhi);
    store<u64>(TMP_C + i, rlo ^ bhi);
    store<u64>(TMP_C + i + 8, rhi ^ blo);
  }
  mixCombineHalf(0, key);
  mixCombineHalf(8, key);
}

/** a ^= 4 * e on one half, with a in BATCH and e = a ^ rot2(a) in TMP_B. */
@inline
function invMixPreHalf(off: usize): void {
  const e0 = load<u64>(TMP_B + off);
  const e1 = load<u64>(TMP_B + off + 16);
  const e2 = load<u64>(TMP_B + off + 32);
  const e3 = load<u64>(TMP_B + off + 48);
  const e4 = load<u64>(TMP_B + off + 64);
  const e5 = load<u64>(TMP_B + off + 80);
  const e6 = load<u64>(TMP_B + off + 96);
  const e7 = load<u64>(TMP_B + off + 112);
  const o = BATCH + off;
  store<u64>(o, load<u64>(o) ^ e6);
  store<u64>(o + 16, load<u64>(o + 16) ^ e6 ^ e7);
  store<u64>(o + 32, load<u64>(o + 32) ^ e0 ^ e7);
  store<u64>(o + 48, load<u64>(o + 48) ^ e1 ^ e6);
  store<u64>(o + 64, load<u64>(o + 64) ^ e2 ^ e6 ^ e7);
  store<u64>(o + 80, load<u64>(o + 80) ^ e3 ^ e7);
  store<u64>(o + 96, load<u64>(o + 96) ^ e4);
  store<u64>(o + 112, load<u64>(o + 112) ^ e5);
}

// -- Round tails, either build.

/** ShiftRows, MixColumns, AddRoundKey: the tail of a middle encryption round. */
function shiftMixAddKey(key: usize): void {
  if (ASC_FEATURE_SIMD) {
    shiftMixAddKeyV(key);
  } else {
    for (let i: usize = 0; i < 128; i += 16) {
      store<u64>(BATCH + i, shiftRowsLo(load<u64>(BATCH + i)));
      store<u64>(BATCH + i + 8, shiftRowsHi(load<u64>(BATCH + i + 8)));
    }
    mixColumnsAddKeyScalar(key);
  }
}

/** InvShiftRows, AddRoundKey, InvMixColumns: the tail of a middle decryption round. */
function invShiftAddKeyInvMix(key: usize): void {
  if (ASC_FEATURE_SIMD) {
    invShiftAddKeyInvMixV(key);
  } else {
    for (let i: usize = 0; i < 128; i += 16) {
      const lo = invShiftRowsLo(load<u64>(BATCH + i)) ^ load<u64>(key + i);
      const hi = invShiftRowsHi(load<u64>(BATCH + i + 8)) ^ load<u64>(key + i + 8);
      store<u64>(BATCH + i, lo);
      store<u64>(BATCH + i + 8, hi);
      // rot2 swaps the halves: e = a ^ rot2(a) is lo ^ hi in both.
      store<u64>(TMP_B + i, lo ^ hi);
      store<u64>(TMP_B + i + 8, lo ^ hi);
    }
    invMixPreHalf(0);
    invMixPreHalf(8);
    mixColumnsAddKeyScalar(ZERO_KEY);
  }
}

/** ShiftRows, AddRoundKey: the tail of the last encryption round. */
function shiftAddKey(key: usize): void {
  for (let i: usize = 0; i < 128; i += 16) {
    if (ASC_FEATURE_SIMD) {
      v128.store(BATCH + i, v128.xor(shiftRowsV(v128.load(BATCH + i)), v128.load(key + i)));
    } else {
      store<u64>(BATCH + i, shiftRowsLo(load<u64>(BATCH + i)) ^ load<u64>(key + i));
      store<u64>(BATCH + i + 8, shiftRowsHi(load<u64>(BATCH + i + 8)) ^ load<u64>(key + i + 8));
    }
  }
}

/** InvShiftRows, AddRoundKey: the tail of the last decryption round. */
function invShiftAddKey(key: usize): void {
  for (let i: usize = 0; i < 128; i += 16) {
    if (ASC_FEATURE_SIMD) {
      v128.store(BATCH + i, v128.xor(invShiftRowsV(v128.load(BATCH + i)), v128.load(key + i)));
    } else {
      store<u64>(BATCH + i, invShiftRowsLo(load<u64>(BATCH + i)) ^ load<u64>(key + i));
      store<u64>(BATCH + i + 8, invShiftRowsHi(load<u64>(BATCH + i + 8)) ^ load<u64>(key + i + 8));
    }
  }
}

function addKey(key: usize): void {
  for (let i: usize = 0; i < 128; i += 16) {
    if (ASC_FEATURE_SIMD) {
      v128.store(BATCH + i, v128.xor(v128.load(BATCH + i), v128.load(key + i)));
    } else {
      store<u64>(BATCH + i, load<u64>(BATCH + i) ^ load<u64>(key + i));
      store<u64>(BATCH + i + 8, load<u64>(BATCH + i + 8) ^ load<u64>(key + i + 8));
    }
  }
}

// ---- Between eight blocks and eight planes. Both directions are the same involution: a 4x4 byte
// transpose inside each block (input byte 4 * col + row -> plane byte 4 * row + col), then an
// 8x8 bit transpose across the eight words at every byte position. The two commute.

@inline
function swapMove<T>(a: usize, b: usize, shift: i32, mask: u64): void {
  const x = load<T>(a);
  const y = load<T>(b);
  const t = band<T>(bxor<T>(bshr<T>(x, shift), y), bsplat<T>(mask));
  store<T>(b, bxor<T>(y, t));
  store<T>(a, bxor<T>(x, bshl<T>(t, shift)));
}

@inline
function bitTranspose<T>(p: usize): void {
  for (let k: usize = 0; k < 8; k += 2) swapMove<T>(p + k * 16, p + k * 16 + 16, 1, 0x5555555555555555);
  for (let k: usize = 0; k < 8; k += 4) {
    swapMove<T>(p + k * 16, p + k * 16 + 32, 2, 0x3333333333333333);
    swapMove<T>(p + k * 16 + 16, p + k * 16 + 48, 2, 0x3333333333333333);
  }
  for (let k: usize = 0; k < 4; k++) swapMove<T>(p + k * 16, p + k * 16 + 64, 4, 0x0f0f0f0f0f0f0f0f);
}

function transposeBatch(): void {
  if (ASC_FEATURE_SIMD) {
    for (let i: usize = 0; i < 128; i += 16) {
      const v = v128.load(BATCH + i);
      v128.store(BATCH + i, i8x16.shuffle(v, v, 0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
    }
    bitTranspose<v128>(BATCH);
  } else {
    for (let i: usize = 0; i < 128; i += 16) {
      const p = BATCH + i;
      const w0 = load<u32>(p);
      const w1 = load<u32>(p + 4);
      const w2 = load<u32>(p + 8);
      const w3 = load<u32>(p + 12);
      const t0 = (w0 & 0x00ff00ff) | ((w1 << 8) & 0xff00ff00);
      const t1 = ((w0 >> 8) & 0x00ff00ff) | (w1 & 0xff00ff00);
      const t2 = (w2 & 0x00ff00ff) | ((w3 << 8) & 0xff00ff00);
      const t3 = ((w2 >> 8) & 0x00ff00ff) | (w3 & 0xff00ff00);
      store<u32>(p, (t0 & 0xffff) | (t2 << 16));
      store<u32>(p + 4, (t1 & 0xffff) | (t3 << 16));
      store<u32>(p + 8, (t0 >> 16) | (t2 & 0xffff0000));
      store<u32>(p + 12, (t1 >> 16) | (t3 & 0xffff0000));
    }
    bitTranspose<u64>(BATCH);
    bitTranspose<u64>(BATCH + 8);
  }
}

// ---- Whole-batch cipher: the eight blocks in BATCH, in place.

function encryptBatch(schedule: usize): void {
  const rounds = <usize>load<u32>(schedule);
  const keys = schedule + 16;
  transposeBatch();
  addKey(keys);
  for (let r: usize = 1; r < rounds; r++) {
    subBytesBatch();
    shiftMixAddKey(keys + r * ROUND_KEY_SIZE);
  }
  subBytesBatch();
  shiftAddKey(keys + rounds * ROUND_KEY_SIZE);
  transposeBatch();
}

function decryptBatch(schedule: usize): void {
  const rounds = <usize>load<u32>(schedule);
  const keys = schedule + 16;
  transposeBatch();
  addKey(keys + rounds * ROUND_KEY_SIZE);
  for (let r = rounds - 1; r > 0; r--) {
    invSubBytesBatch();
    invShiftAddKeyInvMix(keys + r * ROUND_KEY_SIZE);
  }
  invSubBytesBatch();
  invShiftAddKey(keys);
  transposeBatch();
}

// ---- Key schedule (FIPS-197 §5.2), SubWord through the same circuit.

function subWord(w: u32): u32 {
  for (let i: usize = 0; i < 8; i++) store<u32>(WORD_PLANES + i * 4, (w >> (<u32>i)) & 0x01010101);
  subBytes<u32>(WORD_PLANES, 4);
  let out: u32 = 0;
  for (let i: usize = 0; i < 8; i++) out |= (load<u32>(WORD_PLANES + i * 4) & 0x01010101) << (<u32>i);
  // The circuit leaves out the S-box's constant (see sboxCircuit).
  return out ^ 0x63636363;
}

/**
 * Expand a 16- or 32-byte AES key at `key` into the schedule at `schedule` (SCHEDULE_SIZE bytes).
 * Returns the number of rounds, or 0 for another key length.
 */
export function aesExpandKey(schedule: usize, key: usize, keyBytes: u32): u32 {
  if (keyBytes != 16 && keyBytes != 32) return 0;
  const nk = <usize>(keyBytes >> 2);
  const rounds = nk + 6;
  const words: usize = 4 * (rounds + 1);
  memory.copy(EXPANDED, key, keyBytes);
  let rcon: u32 = 1;
  for (let i = nk; i < words; i++) {
    // Words are little-endian: byte 0 of the word is its low byte, so RotWord is a right rotation.
    let t = load<u32>(EXPANDED + (i - 1) * 4);
    if (i % nk == 0) {
      t = subWord(rotr<u32>(t, 8)) ^ rcon;
      rcon = ((rcon << 1) ^ ((rcon >> 7) * 0x11b)) & 0xff;
    } else if (nk > 6 && i % nk == 4) {
      t = subWord(t);
    }
    store<u32>(EXPANDED + i * 4, load<u32>(EXPANDED + (i - nk) * 4) ^ t);
  }
  store<u32>(schedule, <u32>rounds);
  store<u32>(schedule + 4, 0);
  store<u64>(schedule + 8, 0);
  for (let r: usize = 0; r <= rounds; r++) {
    // Eight copies of the round key, transposed: each plane byte becomes 0x00 or 0xff. Keys after
    // the first also carry the S-box constant the circuit leaves out (see sboxCircuit).
    const fold: u64 = r > 0 ? 0x6363636363636363 : 0;
    for (let k: usize = 0; k < LANES; k++) {
      store<u64>(BATCH + k * 16, load<u64>(EXPANDED + r * 16) ^ fold);
      store<u64>(BATCH + k * 16 + 8, load<u64>(EXPANDED + r * 16 + 8) ^ fold);
    }
    transposeBatch();
    memory.copy(schedule + 16 + r * ROUND_KEY_SIZE, BATCH, ROUND_KEY_SIZE);
  }
  memory.fill(EXPANDED, 0, 240);
  memory.fill(WORD_PLANES, 0, 32);
  wipeScratch();
  return <u32>rounds;
}

@inline
function scheduleOk(schedule: usize): bool {
  const rounds = load<u32>(schedule);
  return rounds == 10 || rounds == 14;
}

@inline
function xorBlock(dst: usize, a: usize, b: usize): void {
  if (ASC_FEATURE_SIMD) {
    v128.store(dst, v128.xor(v128.load(a), v128.load(b)));
  } else {
    store<u64>(dst, load<u64>(a) ^ load<u64>(b));
    store<u64>(dst + 8, load<u64>(a + 8) ^ load<u64>(b + 8));
  }
}

// ---- CBC with plain64 IVs.

/** Encrypt `len` bytes (whole sectors) at `data` in place; the first sector is number `sector`. */
export function aesCbcEncrypt(schedule: usize, data: usize, len: usize, sector: f64): u32 {
  if (len % SECTOR_SIZE != 0) return AES_BAD_LENGTH;
  if (!scheduleOk(schedule)) return AES_BAD_SCHEDULE;
  const sectors = len / SECTOR_SIZE;
  const first = <u64>sector;
  for (let g: usize = 0; g < sectors; g += LANES) {
    const n = min(LANES, sectors - g);
    const base = data + g * SECTOR_SIZE;
    for (let j: usize = 0; j < BLOCKS_PER_SECTOR; j++) {
      for (let k: usize = 0; k < LANES; k++) {
        const dst = BATCH + k * 16;
        if (k < n) {
          const src = base + k * SECTOR_SIZE + j * 16;
          if (j == 0) {
            store<u64>(dst, load<u64>(src) ^ (first + <u64>(g + k)));
            store<u64>(dst + 8, load<u64>(src + 8));
          } else {
            xorBlock(dst, src, src - 16);
          }
        } else {
          store<u64>(dst, 0);
          store<u64>(dst + 8, 0);
        }
      }
      encryptBatch(schedule);
      for (let k: usize = 0; k < n; k++) memory.copy(base + k * SECTOR_SIZE + j * 16, BATCH + k * 16, 16);
    }
  }
  wipeScratch();
  return AES_OK;
}

/** Decrypt `len` bytes (whole sectors) at `data` in place; the first sector is number `sector`. */
export function aesCbcDecrypt(schedule: usize, data: usize, len: usize, sector: f64): u32 {
  if (len % SECTOR_SIZE != 0) return AES_BAD_LENGTH;
  if (!scheduleOk(schedule)) return AES_BAD_SCHEDULE;
  const sectors = len / SECTOR_SIZE;
  const first = <u64>sector;
  for (let s: usize = 0; s < sectors; s++) {
    const base = data + s * SECTOR_SIZE;
    store<u64>(CHAIN, first + <u64>s);
    store<u64>(CHAIN + 8, 0);
    for (let j: usize = 0; j < BLOCKS_PER_SECTOR; j += LANES) {
      const blocks = base + j * 16;
      memory.copy(BATCH, blocks, BATCH_SIZE);
      memory.copy(CHAIN + 16, blocks + BATCH_SIZE - 16, 16);
      decryptBatch(schedule);
      // Last to first, so each block's predecessor is still ciphertext when it is read.
      for (let m: usize = LANES - 1; m > 0; m--) xorBlock(blocks + m * 16, BATCH + m * 16, blocks + (m - 1) * 16);
      xorBlock(blocks, BATCH, CHAIN);
      memory.copy(CHAIN, CHAIN + 16, 16);
    }
  }
  wipeScratch();
  return AES_OK;
}

// ---- XTS (IEEE 1619) with plain64 tweaks: T0 = E_k2(plain64(n)), T_{j+1} = T_j * alpha in
// GF(2^128) (little-endian, x^128 = x^7 + x^2 + x + 1), C_j = E_k1(P_j ^ T_j) ^ T_j.

function xts(dataSchedule: usize, tweakSchedule: usize, data: usize, len: usize, sector: f64, decrypt: bool): u32 {
  if (len % SECTOR_SIZE != 0) return AES_BAD_LENGTH;
  if (!scheduleOk(dataSchedule) || !scheduleOk(tweakSchedule)) return AES_BAD_SCHEDULE;
  const sectors = len / SECTOR_SIZE;
  const first = <u64>sector;
  for (let g: usize = 0; g < sectors; g += LANES) {
    // The first tweaks of eight sectors in one batch.
    for (let k: usize = 0; k < LANES; k++) {
      store<u64>(BATCH + k * 16, first + <u64>(g + k));
      store<u64>(BATCH + k * 16 + 8, 0);
    }
    encryptBatch(tweakSchedule);
    memory.copy(SECTOR_TWEAKS, BATCH, BATCH_SIZE);
    const n = min(LANES, sectors - g);
    for (let k: usize = 0; k < n; k++) {
      let lo = load<u64>(SECTOR_TWEAKS + k * 16);
      let hi = load<u64>(SECTOR_TWEAKS + k * 16 + 8);
      const base = data + (g + k) * SECTOR_SIZE;
      for (let j: usize = 0; j < BLOCKS_PER_SECTOR; j += LANES) {
        const blocks = base + j * 16;
        for (let m: usize = 0; m < LANES; m++) {
          const t = TWEAKS + m * 16;
          store<u64>(t, lo);
          store<u64>(t + 8, hi);
          xorBlock(BATCH + m * 16, blocks + m * 16, t);
          const carry = hi >> 63;
          hi = (hi << 1) | (lo >> 63);
          lo = (lo << 1) ^ (0x87 & (0 - carry));
        }
        if (decrypt) decryptBatch(dataSchedule);
        else encryptBatch(dataSchedule);
        for (let m: usize = 0; m < LANES; m++) xorBlock(blocks + m * 16, BATCH + m * 16, TWEAKS + m * 16);
      }
    }
  }
  wipeScratch();
  return AES_OK;
}

/** XTS-encrypt `len` bytes (whole sectors) at `data` in place; the first sector is number `sector`. */
export function aesXtsEncrypt(dataSchedule: usize, tweakSchedule: usize, data: usize, len: usize, sector: f64): u32 {
  return xts(dataSchedule, tweakSchedule, data, len, sector, false);
}

/** XTS-decrypt `len` bytes (whole sectors) at `data` in place; the first sector is number `sector`. */
export function aesXtsDecrypt(dataSchedule: usize, tweakSchedule: usize, data: usize, len: usize, sector: f64): u32 {
  return xts(dataSchedule, tweakSchedule, data, len, sector, true);
}
