// The WASM L2 lookup (asm/l2.ts) against a plain-TS reference written from the spec
// (docs/interop/qcow2.rst, "Cluster mapping" and "Compressed Clusters Descriptor"), on seeded
// random tables full of long contiguous runs, breaks, every entry type and invalid entries.

import { describe, it, expect, beforeAll } from "vitest";
import { WasmCore, type WasmVariant } from "../../ts/wasm/core.js";
import {
  L2_INVALID_OFFSET_TOO_LARGE,
  L2_INVALID_UNALIGNED,
  L2_INVALID_ZERO_IN_V2,
  L2_TYPE_COMPRESSED,
  L2_TYPE_INVALID,
  L2_TYPE_NORMAL,
  L2_TYPE_UNALLOCATED,
  L2_TYPE_ZERO_ALLOC,
  L2_TYPE_ZERO_PLAIN,
  LOOKUP_SPLIT_COPIED,
  LOOKUP_ZERO_FLAG,
} from "../../ts/wasm/exports.js";
import { rng } from "../helpers/qemu.js";

const QCOW_OFLAG_COPIED = 1n << 63n;
const QCOW_OFLAG_COMPRESSED = 1n << 62n;
const QCOW_OFLAG_ZERO = 1n;
const L2E_OFFSET_MASK = 0x00fffffffffffe00n;
const MAX_JS_OFFSET = 1n << 53n;
const U64_MASK = (1n << 64n) - 1n;

interface Lookup {
  type: number;
  invalidReason: number;
  hostOffset: number;
  compressedSize: number;
  copied: boolean;
  run: number;
}

/** The lookup of one entry on its own: what any entry of a run must also classify as. */
function refEntry(entry: bigint, clusterBits: number, flags: number): Lookup {
  const copied = (entry & QCOW_OFLAG_COPIED) !== 0n;
  const out = (type: number, invalidReason = 0, hostOffset = 0n, compressedSize = 0n): Lookup => ({
    type,
    invalidReason,
    hostOffset: Number(hostOffset),
    compressedSize: Number(compressedSize),
    copied,
    run: 1,
  });
  if (entry & QCOW_OFLAG_COMPRESSED) {
    const x = BigInt(62 - (clusterBits - 8));
    const coffset = entry & ((1n << x) - 1n);
    const sectors = ((entry >> x) & ((1n << BigInt(clusterBits - 8)) - 1n)) + 1n;
    if (coffset >= MAX_JS_OFFSET) return out(L2_TYPE_INVALID, L2_INVALID_OFFSET_TOO_LARGE);
    return out(L2_TYPE_COMPRESSED, 0, coffset, sectors * 512n - (coffset & 511n));
  }
  const offset = entry & L2E_OFFSET_MASK;
  let type: number;
  if (entry & QCOW_OFLAG_ZERO) {
    if (!(flags & LOOKUP_ZERO_FLAG)) return out(L2_TYPE_INVALID, L2_INVALID_ZERO_IN_V2);
    type = offset !== 0n ? L2_TYPE_ZERO_ALLOC : L2_TYPE_ZERO_PLAIN;
  } else {
    type = offset !== 0n ? L2_TYPE_NORMAL : L2_TYPE_UNALLOCATED;
  }
  if (offset & ((1n << BigInt(clusterBits)) - 1n)) return out(L2_TYPE_INVALID, L2_INVALID_UNALIGNED, offset);
  if (offset >= MAX_JS_OFFSET) return out(L2_TYPE_INVALID, L2_INVALID_OFFSET_TOO_LARGE, offset);
  return out(type, 0, offset);
}

/**
 * The run rule: entries after the first continue the run while each, looked up alone, has the same
 * type; for normal and zero-alloc, its host cluster follows the previous one; and with
 * LOOKUP_SPLIT_COPIED, its COPIED flag equals the first one's. Invalid and compressed entries are
 * runs of one.
 */
function refLookup(table: bigint[], start: number, count: number, clusterBits: number, flags: number): Lookup {
  const first = refEntry(table[start]!, clusterBits, flags);
  if (first.type === L2_TYPE_INVALID || first.type === L2_TYPE_COMPRESSED) return first;
  const allocated = first.type === L2_TYPE_NORMAL || first.type === L2_TYPE_ZERO_ALLOC;
  const clusterSize = 1n << BigInt(clusterBits);
  let expected = BigInt(first.hostOffset) + clusterSize;
  let n = 1;
  while (n < count) {
    const entry = table[start + n]!;
    if (refEntry(entry, clusterBits, flags).type !== first.type) break;
    if (flags & LOOKUP_SPLIT_COPIED && (entry & QCOW_OFLAG_COPIED) !== 0n !== first.copied) break;
    if (allocated) {
      if ((entry & L2E_OFFSET_MASK) !== expected) break;
      expected += clusterSize;
    }
    n++;
  }
  return { ...first, run: n };
}

function u64(rand: () => number): bigint {
  return (BigInt((rand() * 2 ** 32) >>> 0) << 32n) | BigInt((rand() * 2 ** 32) >>> 0);
}

function pick<T>(rand: () => number, items: readonly T[]): T {
  return items[Math.floor(rand() * items.length)]!;
}

/**
 * `length` entries made of segments: contiguous normal and zero-alloc runs (some ending just past
 * 2^53, some with a COPIED flip or a gap inside), zero-plain and unallocated runs with junk in the
 * bits the lookup must ignore, compressed descriptors, unaligned offsets and random garbage.
 */
function makeTable(rand: () => number, length: number, clusterBits: number): bigint[] {
  const clusterSize = 1n << BigInt(clusterBits);
  const maxClusters = 1n << BigInt(56 - clusterBits);
  const table: bigint[] = [];
  const runLength = (): number => (rand() < 0.2 ? 1 : 1 + Math.floor(rand() * 40));
  const copiedBit = (): bigint => (rand() < 0.7 ? QCOW_OFLAG_COPIED : 0n);
  const reservedJunk = (): bigint => (rand() < 0.3 ? BigInt(Math.floor(rand() * 256)) << 1n : 0n);
  while (table.length < length) {
    const kind = rand();
    if (kind < 0.45) {
      // A contiguous allocated run, possibly crossing 2^53, with an occasional break inside.
      const zero = rand() < 0.3 ? QCOW_OFLAG_ZERO : 0n;
      const n = runLength();
      let cluster: bigint;
      const where = rand();
      if (where < 0.15) cluster = (MAX_JS_OFFSET >> BigInt(clusterBits)) - BigInt(Math.floor(rand() * n));
      else if (where < 0.2) cluster = (u64(rand) % maxClusters) | 1n;
      else cluster = 1n + BigInt(Math.floor(rand() * 2 ** 30)) % (maxClusters - 64n);
      let copied = copiedBit();
      for (let i = 0; i < n; i++) {
        const r = rand();
        if (r < 0.03) copied ^= QCOW_OFLAG_COPIED;
        else if (r < 0.05) cluster += 2n;
        else if (r < 0.06) cluster -= 2n;
        table.push(copied | ((cluster * clusterSize) & L2E_OFFSET_MASK) | zero | reservedJunk());
        cluster++;
      }
    } else if (kind < 0.6) {
      // Zero-plain (bit 0, no offset) or unallocated, with junk in bits the lookup ignores.
      const zero = rand() < 0.5 ? QCOW_OFLAG_ZERO : 0n;
      const n = runLength();
      const copied = copiedBit();
      for (let i = 0; i < n; i++) {
        const flip = rand() < 0.05 ? QCOW_OFLAG_COPIED : 0n;
        const high = rand() < 0.1 ? BigInt(Math.floor(rand() * 64)) << 56n : 0n;
        table.push((copied ^ flip) | high | zero | reservedJunk());
      }
    } else if (kind < 0.8) {
      // Compressed descriptors, some with offsets at or past 2^53, some also with bit 0 set.
      const n = 1 + Math.floor(rand() * 4);
      for (let i = 0; i < n; i++) {
        let bits = u64(rand) & ((1n << 62n) - 1n);
        if (rand() < 0.7) {
          const x = BigInt(62 - (clusterBits - 8));
          const coffset = BigInt(Math.floor(rand() * 2 ** 40));
          bits = (bits & ~((1n << x) - 1n)) | coffset;
        }
        table.push((rand() < 0.1 ? QCOW_OFLAG_COPIED : 0n) | QCOW_OFLAG_COMPRESSED | bits);
      }
    } else if (kind < 0.9) {
      // Allocated entries that are not cluster aligned (impossible with 512-byte clusters).
      const cluster = 1n + BigInt(Math.floor(rand() * 2 ** 20));
      const misalign = clusterBits > 9 ? BigInt(1 + Math.floor(rand() * ((1 << (clusterBits - 9)) - 1))) * 512n : 0n;
      table.push(copiedBit() | (rand() < 0.3 ? QCOW_OFLAG_ZERO : 0n) | (cluster * clusterSize + misalign));
    } else {
      table.push(u64(rand));
    }
  }
  return table.slice(0, length);
}

const ALL_FLAGS = [0, LOOKUP_ZERO_FLAG, LOOKUP_SPLIT_COPIED, LOOKUP_ZERO_FLAG | LOOKUP_SPLIT_COPIED];
const VARIANTS: WasmVariant[] = ["scalar", "simd"];

/** One core and a reserved region of it; `load` writes a table there as big-endian u64 entries. */
class Harness {
  readonly core: WasmCore;
  readonly ptr: number;
  static readonly MAX_ENTRIES = 512;

  constructor(core: WasmCore) {
    this.core = core;
    this.ptr = core.reserve(Harness.MAX_ENTRIES * 8, 64);
  }

  load(table: bigint[]): void {
    const bytes = this.core.bytes(this.ptr, Harness.MAX_ENTRIES * 8);
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    bytes.fill(0);
    table.forEach((e, i) => view.setBigUint64(i * 8, e & U64_MASK));
  }

  lookup(start: number, count: number, clusterBits: number, flags: number): Lookup {
    const run = this.core.l2Lookup(this.ptr, start, count, clusterBits, flags);
    return { ...this.core.result, run };
  }
}

function describeEntry(e: bigint): string {
  return "0x" + e.toString(16).padStart(16, "0");
}

for (const variant of VARIANTS) {
  describe(`l2Lookup (${variant})`, () => {
    let h: Harness;
    beforeAll(async () => {
      h = new Harness(await WasmCore.create(variant));
    });

    function check(table: bigint[], start: number, count: number, clusterBits: number, flags: number): void {
      h.load(table);
      const got = h.lookup(start, count, clusterBits, flags);
      const want = refLookup(table, start, count, clusterBits, flags);
      expect(got, `entry ${describeEntry(table[start]!)} bits ${clusterBits} flags ${flags}`).toEqual(want);
    }

    it("count 0 returns 0", () => {
      h.load([0x50000n]);
      expect(h.lookup(0, 0, 16, LOOKUP_ZERO_FLAG).run).toBe(0);
    });

    it("classifies each entry type", () => {
      const cb = 16;
      const c = (n: number): bigint => BigInt(n) << 16n;
      const cases: [bigint, number, Partial<Lookup>][] = [
        [0n, LOOKUP_ZERO_FLAG, { type: L2_TYPE_UNALLOCATED, hostOffset: 0 }],
        [QCOW_OFLAG_COPIED | c(5), 0, { type: L2_TYPE_NORMAL, hostOffset: 5 * 65536, copied: true }],
        [c(5) | 1n, LOOKUP_ZERO_FLAG, { type: L2_TYPE_ZERO_ALLOC, hostOffset: 5 * 65536, copied: false }],
        [1n, LOOKUP_ZERO_FLAG, { type: L2_TYPE_ZERO_PLAIN }],
        [1n, 0, { type: L2_TYPE_INVALID, invalidReason: L2_INVALID_ZERO_IN_V2 }],
        [c(5) | 0x200n, 0, { type: L2_TYPE_INVALID, invalidReason: L2_INVALID_UNALIGNED, hostOffset: 5 * 65536 + 512 }],
        [1n << 53n, 0, { type: L2_TYPE_INVALID, invalidReason: L2_INVALID_OFFSET_TOO_LARGE }],
        [(1n << 53n) - (1n << 16n), 0, { type: L2_TYPE_NORMAL, hostOffset: 2 ** 53 - 65536 }],
        // Compressed, 64 KiB clusters: x = 54, offset 0x12345, 3 + 1 sectors.
        [QCOW_OFLAG_COMPRESSED | (3n << 54n) | 0x12345n, 0, {
          type: L2_TYPE_COMPRESSED,
          hostOffset: 0x12345,
          compressedSize: 4 * 512 - (0x12345 & 511),
        }],
        [QCOW_OFLAG_COMPRESSED | 1n, 0, { type: L2_TYPE_COMPRESSED, hostOffset: 1, compressedSize: 511 }],
      ];
      for (const [entry, flags, want] of cases) {
        h.load([entry]);
        expect(h.lookup(0, 1, cb, flags), describeEntry(entry)).toMatchObject({ ...want, run: 1 });
        check([entry], 0, 1, cb, flags);
      }
    });

    it("a run stops at the count, at a gap, at a type change and (with SPLIT_COPIED) at a COPIED change", () => {
      const cb = 12;
      const n = (cluster: number, copied = true): bigint => (copied ? QCOW_OFLAG_COPIED : 0n) | (BigInt(cluster) << 12n);
      const table = [n(10), n(11), n(12, false), n(13), n(15), n(16) | 1n, n(17) | 1n, 0n, 0n];
      h.load(table);
      expect(h.lookup(0, 9, cb, LOOKUP_ZERO_FLAG).run).toBe(4);
      expect(h.lookup(0, 3, cb, LOOKUP_ZERO_FLAG).run).toBe(3);
      expect(h.lookup(0, 9, cb, LOOKUP_ZERO_FLAG | LOOKUP_SPLIT_COPIED).run).toBe(2);
      expect(h.lookup(5, 9 - 5, cb, LOOKUP_ZERO_FLAG)).toMatchObject({ type: L2_TYPE_ZERO_ALLOC, run: 2 });
      expect(h.lookup(7, 2, cb, 0)).toMatchObject({ type: L2_TYPE_UNALLOCATED, run: 2 });
    });

    it("a contiguous run never reaches a host offset at or past 2^53", () => {
      const cb = 16;
      const last = (1n << 53n) - (1n << 16n);
      const table = [last - (1n << 16n), last, last + (1n << 16n), last + (2n << 16n)];
      h.load(table);
      const r = h.lookup(0, 4, cb, 0);
      expect(r).toMatchObject({ type: L2_TYPE_NORMAL, hostOffset: Number(last - (1n << 16n)), run: 2 });
      expect(h.lookup(2, 2, cb, 0)).toMatchObject({ type: L2_TYPE_INVALID, invalidReason: L2_INVALID_OFFSET_TOO_LARGE });
    });

    it("matches the reference on random tables (cluster bits 9..21, every flag combination)", () => {
      let cases = 0;
      for (let clusterBits = 9; clusterBits <= 21; clusterBits++) {
        // Small tables: the whole L2 table would be clusterSize / 8 entries.
        const length = Math.min(Harness.MAX_ENTRIES, (1 << clusterBits) / 8);
        for (let seed = 0; seed < 3; seed++) {
          const rand = rng(1000 * clusterBits + seed);
          const table = makeTable(rand, length, clusterBits);
          h.load(table);
          for (const flags of ALL_FLAGS) {
            for (let start = 0; start < length; start++) {
              const count = rand() < 0.5 ? length - start : 1 + Math.floor(rand() * (length - start));
              const got = h.lookup(start, count, clusterBits, flags);
              const want = refLookup(table, start, count, clusterBits, flags);
              if (JSON.stringify(got) !== JSON.stringify(want)) {
                expect(got, `bits ${clusterBits} seed ${seed} flags ${flags} start ${start} count ${count}: ` +
                  table.slice(start, start + 4).map(describeEntry).join(" ")).toEqual(want);
              }
              cases++;
            }
          }
        }
      }
      expect(cases).toBeGreaterThan(10_000);
    });

    it("the random tables cover every type, reason and long runs", () => {
      const seen = new Set<string>();
      let longest = 0;
      for (let clusterBits = 9; clusterBits <= 21; clusterBits++) {
        const length = Math.min(Harness.MAX_ENTRIES, (1 << clusterBits) / 8);
        for (let seed = 0; seed < 3; seed++) {
          const table = makeTable(rng(1000 * clusterBits + seed), length, clusterBits);
          for (const flags of ALL_FLAGS) {
            for (let start = 0; start < length; start++) {
              const r = refLookup(table, start, length - start, clusterBits, flags);
              seen.add(`${r.type}/${r.invalidReason}`);
              longest = Math.max(longest, r.run);
            }
          }
        }
      }
      for (const type of [L2_TYPE_UNALLOCATED, L2_TYPE_ZERO_PLAIN, L2_TYPE_ZERO_ALLOC, L2_TYPE_NORMAL, L2_TYPE_COMPRESSED]) {
        expect(seen, `type ${type}`).toContain(`${type}/0`);
      }
      for (const reason of [L2_INVALID_UNALIGNED, L2_INVALID_ZERO_IN_V2, L2_INVALID_OFFSET_TOO_LARGE]) {
        expect(seen, `reason ${reason}`).toContain(`${L2_TYPE_INVALID}/${reason}`);
      }
      expect(longest).toBeGreaterThanOrEqual(30);
    });
  });
}
