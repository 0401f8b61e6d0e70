// asm/check.ts against TypeScript references, in both builds: random L2 tables of every kind of
// entry counted into arrays of every refcount width, and the compare/scan helpers at every offset.

import { describe, expect, it } from "vitest";
import { WasmCore, type WasmVariant } from "../../ts/wasm/core.js";
import { rng } from "../helpers/qemu.js";

const CB = 12;
const CS = 1 << CB;
const ENTRIES = CS / 8;
const IMRT_CLUSTERS = 4096;

function getCount(bytes: Uint8Array, k: number, order: number): bigint {
  const bits = 2 ** order;
  if (bits < 8) return BigInt((bytes[(k * bits) >> 3]! >> ((k * bits) & 7)) & ((1 << bits) - 1));
  let v = 0n;
  for (let b = 0; b < bits / 8; b++) v = (v << 8n) | BigInt(bytes[k * (bits / 8) + b]!);
  return v;
}

function setCount(bytes: Uint8Array, k: number, order: number, value: bigint): void {
  const bits = 2 ** order;
  if (bits < 8) {
    const pos = k * bits;
    const mask = ((1 << bits) - 1) << (pos & 7);
    bytes[pos >> 3] = (bytes[pos >> 3]! & ~mask) | ((Number(value) << (pos & 7)) & mask);
    return;
  }
  let v = value;
  for (let b = bits / 8 - 1; b >= 0; b--) {
    bytes[k * (bits / 8) + b] = Number(v & 0xffn);
    v >>= 8n;
  }
}

/** The reference: qemu's check_refcounts_l2 fast path, stopping where the caller must step in. */
function scanReference(table: Uint8Array, imrt: Uint8Array, entries: number, order: number, stats: number[], start: number): number {
  const dv = new DataView(table.buffer, table.byteOffset);
  const max = order >= 6 ? 2n ** 64n - 1n : 2n ** BigInt(2 ** order) - 1n;
  const shift = BigInt(62 - (CB - 8));
  for (let i = start; i < ENTRIES; i++) {
    const e = dv.getBigUint64(i * 8);
    const clusters: number[] = [];
    let normal = false;
    let host = 0n;
    if (e & (1n << 62n)) {
      if (e & (1n << 63n)) return i;
      const coffset = e & ((1n << shift) - 1n);
      const sectors = ((e >> shift) & ((1n << BigInt(CB - 8)) - 1n)) + 1n;
      const end = coffset + sectors * 512n - (coffset & 511n);
      for (let k = coffset >> BigInt(CB); k <= (end - 1n) >> BigInt(CB); k++) clusters.push(Number(k));
    } else {
      if (e & 0x3f000000000001fen) return i;
      host = e & 0x00fffffffffffe00n;
      if (host === 0n) continue;
      if (host % BigInt(CS) !== 0n) return i;
      clusters.push(Number(host >> BigInt(CB)));
      normal = true;
    }
    if (clusters.some((k) => k >= entries || getCount(imrt, k, order) === max)) return i;
    for (const k of clusters) setCount(imrt, k, order, getCount(imrt, k, order) + 1n);
    stats[0]!++;
    if (normal) {
      if (stats[3] !== 0 && Number(host) !== stats[3]) stats[1]!++;
      stats[3] = Number(host) + CS;
    } else {
      stats[1]!++;
      stats[2]!++;
    }
  }
  return ENTRIES;
}

function randomTable(rand: () => number): Uint8Array {
  const t = new Uint8Array(CS);
  const dv = new DataView(t.buffer);
  let next = 10;
  for (let i = 0; i < ENTRIES; i++) {
    const r = rand();
    let e = 0n;
    if (r < 0.2) e = 0n;
    else if (r < 0.6) e = (1n << 63n) | (BigInt(next++ % 3000) << BigInt(CB));
    else if (r < 0.7) e = (BigInt(Math.floor(rand() * 3000)) << BigInt(CB)) | 1n;
    else if (r < 0.75) e = 1n;
    else if (r < 0.85) {
      const shift = BigInt(62 - (CB - 8));
      const coffset = BigInt(Math.floor(rand() * 3000 * CS));
      e = (1n << 62n) | (BigInt(Math.floor(rand() * 16)) << shift) | coffset;
    } else if (r < 0.9) e = BigInt(Math.floor(rand() * 3000)) << BigInt(CB);
    else if (r < 0.93) e = (BigInt(Math.floor(rand() * 3000)) << BigInt(CB)) | 0x200n; // unaligned
    else if (r < 0.96) e = (BigInt(Math.floor(rand() * 3000)) << BigInt(CB)) | 0x4n; // reserved bit
    else if (r < 0.98) e = BigInt(5000 + Math.floor(rand() * 100)) << BigInt(CB); // past the array
    else e = (3n << 62n) | 0x1234n; // compressed with COPIED
    dv.setBigUint64(i * 8, e);
  }
  return t;
}

for (const variant of ["scalar", "simd"] as WasmVariant[]) {
  describe(`asm/check.ts (${variant})`, async () => {
    const core = await WasmCore.create(variant);
    const x = core.exports;
    const l2 = core.reserve(CS, 8);
    const statsPtr = core.reserve(32, 8);
    const imrtPtr = core.reserve(IMRT_CLUSTERS * 8, 8);
    const other = core.reserve(IMRT_CLUSTERS * 8, 8);

    it("checkScanL2 counts and stops exactly where the reference does, for every refcount width", () => {
      const rand = rng(42);
      for (let round = 0; round < 60; round++) {
        const order = round % 7;
        const table = randomTable(rand);
        const imrt = new Uint8Array(IMRT_CLUSTERS * 8);
        // Some counts start at the maximum so the overflow stop is exercised.
        for (let k = 0; k < IMRT_CLUSTERS; k += 97) setCount(imrt, k, order, order >= 6 ? 2n ** 64n - 1n : 2n ** BigInt(2 ** order) - 1n);
        core.u8().set(table, l2);
        core.u8().set(imrt, imrtPtr);
        new Float64Array(core.u8().buffer, statsPtr, 4).fill(0);
        const stats = [0, 0, 0, 0];
        let i = 0;
        for (;;) {
          const j = scanReference(table, imrt, IMRT_CLUSTERS, order, stats, i);
          i = x.checkScanL2(l2, i, ENTRIES, CB, imrtPtr, IMRT_CLUSTERS, order, 1, statsPtr);
          expect(i).toBe(j);
          if (i >= ENTRIES) break;
          // Skip the entry in both, as the caller would after handling it.
          new DataView(table.buffer).setBigUint64(i * 8, 0n);
          core.dataView().setBigUint64(l2 + i * 8, 0n);
          i++;
        }
        expect(Buffer.from(core.bytes(imrtPtr, IMRT_CLUSTERS * 8)).equals(Buffer.from(imrt)), `order ${order}`).toBe(true);
        expect(Array.from(new Float64Array(core.u8().buffer, statsPtr, 4))).toEqual(stats);
      }
    });

    it("checkFirstDiff, checkLastNonZero and checkFindNonZero agree with a byte loop at every offset", () => {
      const rand = rng(7);
      const n = 300;
      for (let round = 0; round < 200; round++) {
        const a = new Uint8Array(n);
        const b = new Uint8Array(n);
        const at = Math.floor(rand() * n);
        if (rand() < 0.8) b[at] = 1 + Math.floor(rand() * 255);
        const start = Math.floor(rand() * n);
        core.u8().set(a, imrtPtr);
        core.u8().set(b, other);
        let diff = n;
        for (let k = start; k < n; k++) if (a[k] !== b[k]) { diff = k; break; }
        expect(x.checkFirstDiff(imrtPtr, other, start, n)).toBe(diff);
        const len = Math.floor(rand() * n);
        let last = 0;
        for (let k = len - 1; k >= 0; k--) if (b[k] !== 0) { last = k + 1; break; }
        expect(x.checkLastNonZero(other, len)).toBe(last);
        const order = Math.floor(rand() * 7);
        const total = Math.floor((n * 8) / 2 ** order);
        const from = Math.floor(rand() * total);
        let found = total;
        for (let k = from; k < total; k++) if (getCount(b, k, order) !== 0n) { found = k; break; }
        expect(x.checkFindNonZero(other, order, from, total)).toBe(found);
      }
    });

    it("checkCopiedScan stops at the first COPIED flag that disagrees with refcount == 1", () => {
      const rand = rng(9);
      for (let round = 0; round < 30; round++) {
        const order = 4;
        const table = new Uint8Array(CS);
        const dv = new DataView(table.buffer);
        const disk = new Uint8Array(IMRT_CLUSTERS * 2);
        for (let k = 0; k < IMRT_CLUSTERS; k++) setCount(disk, k, order, BigInt(rand() < 0.9 ? 1 : Math.floor(rand() * 3)));
        let expected = ENTRIES;
        for (let i = 0; i < ENTRIES; i++) {
          const k = 1 + Math.floor(rand() * (IMRT_CLUSTERS - 1));
          const one = getCount(disk, k, order) === 1n;
          const copied = rand() < 0.998 ? one : !one;
          if (copied !== one && expected === ENTRIES) expected = i;
          dv.setBigUint64(i * 8, (copied ? 1n << 63n : 0n) | (BigInt(k) << BigInt(CB)));
        }
        core.u8().set(table, l2);
        core.u8().set(disk, imrtPtr);
        const status = core.reserve(64, 8);
        core.u8().fill(0, status, status + 64);
        expect(x.checkCopiedScan(l2, 0, ENTRIES, CB, imrtPtr, IMRT_CLUSTERS, order, status, CB + 3 - order)).toBe(expected);
      }
    });
  });
}
