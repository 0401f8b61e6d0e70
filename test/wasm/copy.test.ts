// Zero detection and copies in WASM (asm/copy.ts): the scalar and SIMD builds against each other
// and a plain-TS reference, at every alignment, on short and long buffers with sparse non-zero bytes.

import { describe, it, expect, beforeAll } from "vitest";
import { WasmCore } from "../../ts/wasm/core.js";
import { randomBytes, rng } from "../helpers/qemu.js";

const MIB = 1 << 20;
/** Guard bytes around every region: non-zero, so a scan that strays outside its range is caught. */
const GUARD = 64;
const REGION = MIB + 2 * GUARD + 64;

function refFirstNonZero(buf: Uint8Array): number {
  for (let i = 0; i < buf.length; i++) if (buf[i] !== 0) return i;
  return buf.length;
}

function allBytes(buf: Uint8Array, value: number): boolean {
  for (let i = 0; i < buf.length; i++) if (buf[i] !== value) return false;
  return true;
}

function refBlockRun(buf: Uint8Array, blockSize: number, zero: boolean): number {
  if (blockSize === 0) return 0;
  let pos = 0;
  while (pos < buf.length) {
    const n = Math.min(blockSize, buf.length - pos);
    const blockIsZero = refFirstNonZero(buf.subarray(pos, pos + n)) === n;
    if (blockIsZero !== zero) break;
    pos += n;
  }
  return pos;
}

/** One core with a reserved region; `place` puts bytes at base + align with guards around them. */
class Lane {
  readonly core: WasmCore;
  readonly base: number;
  readonly scratch: number;

  constructor(core: WasmCore) {
    this.core = core;
    this.base = core.reserve(REGION, 64);
    this.scratch = core.reserve(REGION, 64);
  }

  /** Copies `data` to 64-byte-aligned base + GUARD + align, guards set to 0xff; returns its pointer. */
  place(data: Uint8Array, align: number): number {
    const region = this.core.bytes(this.base, GUARD + align + data.length + GUARD);
    region.fill(0xff, 0, GUARD + align);
    region.set(data, GUARD + align);
    region.fill(0xff, GUARD + align + data.length);
    return this.base + GUARD + align;
  }
}

interface Answers {
  firstNonZero: number;
  isZero: number;
  blockRuns: number[];
}

const BLOCK_SIZES = [0, 1, 3, 8, 16, 17, 64, 100, 512];

function answers(lane: Lane, ptr: number, len: number, blockSizes: number[]): Answers {
  const e = lane.core.exports;
  return {
    firstNonZero: e.firstNonZero(ptr, len),
    isZero: e.isZero(ptr, len),
    blockRuns: blockSizes.flatMap((bs) => [e.blockRun(ptr, len, bs, 1), e.blockRun(ptr, len, bs, 0)]),
  };
}

function reference(data: Uint8Array, blockSizes: number[]): Answers {
  const first = refFirstNonZero(data);
  return {
    firstNonZero: first,
    isZero: first === data.length ? 1 : 0,
    blockRuns: blockSizes.flatMap((bs) => [refBlockRun(data, bs, true), refBlockRun(data, bs, false)]),
  };
}

/** Mostly-zero bytes with non-zero bytes at density `p` (values 1..255). */
function sparse(rand: () => number, length: number, p: number): Uint8Array {
  const out = new Uint8Array(length);
  for (let i = 0; i < length; i++) if (rand() < p) out[i] = 1 + Math.floor(rand() * 255);
  return out;
}

describe("zero detection and copies, scalar and simd against a reference", () => {
  let lanes: Lane[];
  beforeAll(async () => {
    lanes = [new Lane(await WasmCore.create("scalar")), new Lane(await WasmCore.create("simd"))];
    expect(lanes.map((l) => l.core.variant)).toEqual(["scalar", "simd"]);
  });

  function checkAll(data: Uint8Array, align: number, label: string, blockSizes = BLOCK_SIZES): void {
    const want = reference(data, blockSizes);
    for (const lane of lanes) {
      const ptr = lane.place(data, align);
      const got = answers(lane, ptr, data.length, blockSizes);
      if (JSON.stringify(got) !== JSON.stringify(want)) {
        expect(got, `${lane.core.variant}: ${label}, align ${align}, length ${data.length}`).toEqual(want);
      }
    }
  }

  it("firstNonZero finds a single non-zero byte at every position, alignment and length 0..300", () => {
    let calls = 0;
    for (const lane of lanes) {
      const e = lane.core.exports;
      for (let align = 0; align < 16; align++) {
        for (let len = 0; len <= 300; len++) {
          const ptr = lane.place(new Uint8Array(len), align);
          const u8 = lane.core.bytes(ptr, len);
          const none = e.firstNonZero(ptr, len);
          if (none !== len) expect(none, `${lane.core.variant}: all zero, align ${align}, length ${len}`).toBe(len);
          for (let p = 0; p < len; p++) {
            u8[p] = 0x80 >> (p & 7) || 1;
            const got = e.firstNonZero(ptr, len);
            if (got !== p) expect(got, `${lane.core.variant}: align ${align}, length ${len}, byte at ${p}`).toBe(p);
            u8[p] = 0;
            calls++;
          }
        }
      }
    }
    expect(calls).toBeGreaterThan(1_000_000);
  });

  it("agree on random sparse buffers at every alignment, length 0..300", () => {
    const rand = rng(42);
    for (let align = 0; align < 16; align++) {
      for (let len = 0; len <= 300; len++) {
        // Densities from "one byte in the whole buffer" to "most bytes", plus all zero.
        const p = [0, 1 / 1000, 1 / 200, 1 / 40, 1 / 8, 1 / 2][(align + len) % 6]!;
        checkAll(sparse(rand, len, p), align, `density ${p}`);
      }
    }
  });

  it("agree on zero and non-zero blocks laid out block by block", () => {
    const rand = rng(43);
    for (let i = 0; i < 400; i++) {
      const blockSize = [1, 8, 16, 64, 100, 512][i % 6]!;
      const blocks = 1 + Math.floor(rand() * 12);
      const len = blocks * blockSize - Math.floor(rand() * blockSize);
      const data = new Uint8Array(len);
      for (let b = 0; b < blocks; b++) {
        if (rand() < 0.5) continue;
        const start = b * blockSize;
        const at = start + Math.floor(rand() * blockSize);
        if (at < len) data[at] = 1 + Math.floor(rand() * 255);
      }
      checkAll(data, i % 16, `blocks of ${blockSize}`, [blockSize, blockSize * 2, 0]);
    }
  });

  it("agree on 1 MiB buffers: all zero, one byte near either end or the middle, sparse", () => {
    const rand = rng(44);
    const cases: [string, Uint8Array][] = [];
    cases.push(["all zero", new Uint8Array(MIB)]);
    for (const at of [0, 7, 63, 64, MIB / 2 - 1, MIB / 2 + 13, MIB - 65, MIB - 9, MIB - 1]) {
      const d = new Uint8Array(MIB);
      d[at] = 0x01;
      cases.push([`one byte at ${at}`, d]);
    }
    cases.push(["sparse", sparse(rand, MIB, 1 / 100_000)]);
    const big = [4096, 65536, 65537, MIB];
    for (const [label, data] of cases) {
      for (const align of [0, 1, 8, 13]) checkAll(data, align, label, big);
    }
  });

  it("isZero of an empty range is 1; blockRun of an empty range or block size 0 is 0", () => {
    for (const lane of lanes) {
      const e = lane.core.exports;
      const ptr = lane.place(new Uint8Array(8).fill(5), 0);
      expect(e.isZero(ptr, 0)).toBe(1);
      expect(e.firstNonZero(ptr, 0)).toBe(0);
      expect(e.blockRun(ptr, 0, 512, 1)).toBe(0);
      expect(e.blockRun(ptr, 0, 512, 0)).toBe(0);
      expect(e.blockRun(ptr, 8, 0, 0)).toBe(0);
      expect(e.blockRun(ptr, 8, 0, 1)).toBe(0);
    }
  });

  it("copyBytes copies exactly, including overlapping ranges in both directions", () => {
    const rand = rng(45);
    for (const lane of lanes) {
      const e = lane.core.exports;
      for (let i = 0; i < 270; i++) {
        const len = i < 260 ? i : Math.floor(rand() * MIB);
        const src = randomBytes(rand, len + 32);
        const srcPtr = lane.place(src, i % 16);
        // Disjoint: the scratch region, with sentinels around the destination.
        const dstAlign = (i * 7) % 16;
        lane.core.bytes(lane.scratch, len + 64).fill(0xa5);
        e.copyBytes(lane.scratch + 16 + dstAlign, srcPtr, len);
        const out = lane.core.bytes(lane.scratch, len + 64);
        expect(Buffer.from(out.subarray(16 + dstAlign, 16 + dstAlign + len)).equals(src.subarray(0, len))).toBe(true);
        expect(allBytes(out.subarray(0, 16 + dstAlign), 0xa5)).toBe(true);
        expect(allBytes(out.subarray(16 + dstAlign + len), 0xa5)).toBe(true);
        // Overlapping, forward and backward (memmove semantics).
        const shift = 1 + (i % 31);
        for (const [to, from] of [
          [shift, 0],
          [0, shift],
        ] as const) {
          const ptr = lane.place(src, 0);
          const n = Math.max(0, len - shift);
          const want = src.slice().copyWithin(to, from, from + n);
          e.copyBytes(ptr + to, ptr + from, n);
          const got = lane.core.bytes(ptr, src.length);
          expect(Buffer.from(got).equals(want), `${lane.core.variant}: overlap ${from}->${to}, ${n} bytes`).toBe(true);
        }
      }
    }
  });

  it("fillBytes fills exactly the range with the value", () => {
    const rand = rng(46);
    for (const lane of lanes) {
      const e = lane.core.exports;
      for (let i = 0; i < 320; i++) {
        const len = i < 300 ? i : Math.floor(rand() * MIB);
        const value = i % 256;
        const align = i % 16;
        lane.core.bytes(lane.scratch, len + 64).fill(value ^ 0x5a);
        e.fillBytes(lane.scratch + 16 + align, value, len);
        const out = lane.core.bytes(lane.scratch, len + 64);
        expect(allBytes(out.subarray(16 + align, 16 + align + len), value), `length ${len}`).toBe(true);
        expect(allBytes(out.subarray(0, 16 + align), value ^ 0x5a)).toBe(true);
        expect(allBytes(out.subarray(16 + align + len), value ^ 0x5a)).toBe(true);
      }
    }
  });
});
