// The WASM L2 lookup (asm/l2.ts through WasmCore.l2Lookup) against plain-TS twins doing the same
// work on the same bytes: decode the big-endian u64 entry, classify it, decode compressed
// descriptors, check alignment and the 2^53 bound, count the contiguous run, fill a result object.
//
// One op walks a whole L2 table (8192 entries, 64 KiB clusters) the way the read engine does:
// lookup(i, min(count, 8192 - i)), i += returned run length. count 1 is what a 4 KiB or 64 KiB
// read asks, 16 a 1 MiB read, 8192 a read of the table's whole 512 MiB.
// Twins: "ts" reads each entry as two DataView getUint32s (what the library does elsewhere);
// "bigint" uses getBigUint64 and BigInt masks, kept to document why we avoid BigInt.
//
//   node bench/l2-lookup.mjs [--quick]

import Benchmark from "benchmark";
import { WasmCore } from "../build/wasm/core.js";
import { QUICK, fmt, fmtRatio, headline, median, printTable, rng32, section } from "./_common.mjs";

const CLUSTER_BITS = 16;
const CLUSTER_SIZE = 1 << CLUSTER_BITS;
const ENTRIES = CLUSTER_SIZE / 8;
const FLAGS = 1; // LOOKUP_ZERO_FLAG: a v3 image
const COUNTS = [1, 16, ENTRIES];

// asm/l2.ts constants (ts/wasm/exports.ts), repeated so the twins stand alone.
const TYPE_UNALLOCATED = 0;
const TYPE_ZERO_PLAIN = 1;
const TYPE_ZERO_ALLOC = 2;
const TYPE_NORMAL = 3;
const TYPE_COMPRESSED = 4;
const TYPE_INVALID = 255;
const INVALID_UNALIGNED = 1;
const INVALID_ZERO_IN_V2 = 2;
const INVALID_OFFSET_TOO_LARGE = 3;
const LOOKUP_ZERO_FLAG = 1;
const LOOKUP_SPLIT_COPIED = 2;
const TWO_32 = 4294967296;
const TWO_53 = 2 ** 53;

// ---- Table contents -------------------------------------------------------------------------

const COPIED = 0x80000000; // bit 63, in the high word
const COMPRESSED = 0x40000000; // bit 62

/** Entry writers over a DataView; host offsets are below 2^40 so the high word stays small. */
function putNormal(dv, i, hostOffset, copied = true) {
  dv.setUint32(i * 8, (copied ? COPIED : 0) | Math.floor(hostOffset / TWO_32));
  dv.setUint32(i * 8 + 4, hostOffset % TWO_32);
}
function putZeroPlain(dv, i) {
  dv.setUint32(i * 8, 0);
  dv.setUint32(i * 8 + 4, 1);
}
function putZeroAlloc(dv, i, hostOffset) {
  dv.setUint32(i * 8, COPIED | Math.floor(hostOffset / TWO_32));
  dv.setUint32(i * 8 + 4, (hostOffset % TWO_32) | 1);
}
function putUnallocated(dv, i) {
  dv.setUint32(i * 8, 0);
  dv.setUint32(i * 8 + 4, 0);
}
/** A compressed descriptor: byte offset and 512-byte sector count (64 KiB clusters: 22 offset bits in the high word). */
function putCompressed(dv, i, byteOffset, sectors) {
  const hiBits = 38 - CLUSTER_BITS;
  const hi = COMPRESSED | ((sectors - 1) << hiBits) | Math.floor(byteOffset / TWO_32);
  dv.setUint32(i * 8, hi >>> 0);
  dv.setUint32(i * 8 + 4, byteOffset % TWO_32);
}

/** Host allocation state while filling tables: clusters are handed out upward from 1 GiB. */
function allocator(next) {
  let host = 1 << 30;
  let compressedPos = 5 * 2 ** 32; // byte granular, well apart from the clusters
  return {
    run(n) {
      const start = host;
      host += n * CLUSTER_SIZE;
      return start;
    },
    gap() {
      host += (1 + (next() % 64)) * CLUSTER_SIZE;
    },
    compressed() {
      const bytes = 20000 + (next() % 30000); // a 64 KiB cluster deflated 1.3x..3x
      const start = compressedPos;
      compressedPos += bytes;
      return { start, sectors: Math.floor(((start % 512) + bytes - 1) / 512) + 1 };
    },
  };
}

function fillContiguous(dv, next) {
  const a = allocator(next);
  const base = a.run(ENTRIES);
  for (let i = 0; i < ENTRIES; i++) putNormal(dv, i, base + i * CLUSTER_SIZE);
}

function fillFragmented(dv, next) {
  const a = allocator(next);
  for (let i = 0; i < ENTRIES; ) {
    const n = Math.min(1 + (next() % 4), ENTRIES - i);
    const base = a.run(n);
    for (let k = 0; k < n; k++) putNormal(dv, i + k, base + k * CLUSTER_SIZE);
    i += n;
    a.gap();
  }
}

function fillCompressed(dv, next) {
  const a = allocator(next);
  for (let i = 0; i < ENTRIES; i++) {
    const c = a.compressed();
    putCompressed(dv, i, c.start, c.sectors);
  }
}

/** Discarded/trimmed space: runs of unallocated, zero and preallocated-zero clusters. */
function fillZero(dv, next) {
  const a = allocator(next);
  for (let i = 0; i < ENTRIES; ) {
    const n = Math.min(1 + (next() % 64), ENTRIES - i);
    const kind = next() % 3;
    const base = kind === 2 ? a.run(n) : 0;
    for (let k = 0; k < n; k++) {
      if (kind === 0) putUnallocated(dv, i + k);
      else if (kind === 1) putZeroPlain(dv, i + k);
      else putZeroAlloc(dv, i + k, base + k * CLUSTER_SIZE);
    }
    i += n;
  }
}

/**
 * A used disk: long sequential runs (installs, copies), fragmented rewrites, a compressed region
 * (from qemu-img convert -c), zeroed and never-written areas, in segments of 16..1024 entries.
 */
function fillMixed(dv, next) {
  const a = allocator(next);
  for (let i = 0; i < ENTRIES; ) {
    const seg = Math.min(16 + (next() % 1009), ENTRIES - i);
    const kind = next() % 10;
    if (kind < 3) {
      // long runs: 64..1024 clusters each
      for (let k = 0; k < seg; ) {
        const n = Math.min(64 + (next() % 961), seg - k);
        const base = a.run(n);
        for (let j = 0; j < n; j++) putNormal(dv, i + k + j, base + j * CLUSTER_SIZE);
        k += n;
        a.gap();
      }
    } else if (kind < 6) {
      for (let k = 0; k < seg; ) {
        const n = Math.min(1 + (next() % 4), seg - k);
        const base = a.run(n);
        for (let j = 0; j < n; j++) putNormal(dv, i + k + j, base + j * CLUSTER_SIZE);
        k += n;
        a.gap();
      }
    } else if (kind < 7) {
      for (let k = 0; k < seg; k++) {
        const c = a.compressed();
        putCompressed(dv, i + k, c.start, c.sectors);
      }
    } else if (kind < 8) {
      for (let k = 0; k < seg; k++) putZeroPlain(dv, i + k);
    } else {
      for (let k = 0; k < seg; k++) putUnallocated(dv, i + k);
    }
    i += seg;
  }
}

const PATTERNS = [
  { name: "contiguous", fill: fillContiguous },
  { name: "fragmented 1-4", fill: fillFragmented },
  { name: "compressed", fill: fillCompressed },
  { name: "zero/unallocated", fill: fillZero },
  { name: "mixed", fill: fillMixed },
];

// ---- The plain-TS twin: two getUint32s per entry ----------------------------------------------

function classifyTs(hi, lo, flags) {
  if (hi & COMPRESSED) return TYPE_COMPRESSED;
  const hasOffset = (hi & 0x00ffffff) !== 0 || (lo & 0xfffffe00) !== 0;
  if (lo & 1) {
    if (!(flags & LOOKUP_ZERO_FLAG)) return TYPE_INVALID;
    return hasOffset ? TYPE_ZERO_ALLOC : TYPE_ZERO_PLAIN;
  }
  return hasOffset ? TYPE_NORMAL : TYPE_UNALLOCATED;
}

function setResult(r, type, reason, hostOffset, csize, copied) {
  r.type = type;
  r.invalidReason = reason;
  r.hostOffset = hostOffset;
  r.compressedSize = csize;
  r.copied = copied;
}

function l2LookupTs(dv, startIndex, count, clusterBits, flags, r) {
  if (count === 0) return 0;
  const clusterSize = 1 << clusterBits; // clusterBits <= 21
  const p = startIndex * 8;
  const hi = dv.getUint32(p);
  const lo = dv.getUint32(p + 4);
  const copied = hi >>> 31 === 1;
  const type = classifyTs(hi, lo, flags);
  if (type === TYPE_INVALID) {
    setResult(r, type, INVALID_ZERO_IN_V2, 0, 0, copied);
    return 1;
  }
  if (type === TYPE_COMPRESSED) {
    // offset bits = 62 - (clusterBits - 8); the high word holds the top (38 - clusterBits) of them.
    const hiBits = 38 - clusterBits;
    const coffset = (hi & ((1 << hiBits) - 1)) * TWO_32 + lo;
    const nbSectors = ((hi >>> hiBits) & ((1 << (clusterBits - 8)) - 1)) + 1;
    if (coffset >= TWO_53) {
      setResult(r, TYPE_INVALID, INVALID_OFFSET_TOO_LARGE, 0, 0, copied);
      return 1;
    }
    setResult(r, type, 0, coffset, nbSectors * 512 - (lo & 511), copied);
    return 1;
  }
  const hostOffset = (hi & 0x00ffffff) * TWO_32 + ((lo & 0xfffffe00) >>> 0);
  if (lo & (clusterSize - 1) & 0xfffffe00) {
    setResult(r, TYPE_INVALID, INVALID_UNALIGNED, hostOffset, 0, copied);
    return 1;
  }
  if (hi & 0x00e00000) {
    setResult(r, TYPE_INVALID, INVALID_OFFSET_TOO_LARGE, hostOffset, 0, copied);
    return 1;
  }
  setResult(r, type, 0, hostOffset, 0, copied);
  const allocated = type === TYPE_NORMAL || type === TYPE_ZERO_ALLOC;
  const splitCopied = (flags & LOOKUP_SPLIT_COPIED) !== 0;
  let expected = hostOffset + clusterSize;
  let n = 1;
  let q = p + 8;
  while (n < count) {
    const h = dv.getUint32(q);
    const l = dv.getUint32(q + 4);
    if (classifyTs(h, l, flags) !== type) break;
    if (splitCopied && h >>> 31 === 1 !== copied) break;
    if (allocated) {
      if ((h & 0x00ffffff) * TWO_32 + ((l & 0xfffffe00) >>> 0) !== expected || expected >= TWO_53) break;
      expected += clusterSize;
    }
    n++;
    q += 8;
  }
  return n;
}

// ---- The BigInt twin: getBigUint64 and BigInt masks -------------------------------------------

const B_COPIED = 1n << 63n;
const B_COMPRESSED = 1n << 62n;
const B_ZERO = 1n;
const B_OFFSET_MASK = 0x00fffffffffffe00n;
const B_TWO_53 = 1n << 53n;

function classifyBig(entry, flags) {
  if (entry & B_COMPRESSED) return TYPE_COMPRESSED;
  const off = entry & B_OFFSET_MASK;
  if (entry & B_ZERO) {
    if (!(flags & LOOKUP_ZERO_FLAG)) return TYPE_INVALID;
    return off ? TYPE_ZERO_ALLOC : TYPE_ZERO_PLAIN;
  }
  return off ? TYPE_NORMAL : TYPE_UNALLOCATED;
}

function l2LookupBig(dv, startIndex, count, clusterBits, flags, r) {
  if (count === 0) return 0;
  const clusterSize = 1n << BigInt(clusterBits);
  const first = dv.getBigUint64(startIndex * 8);
  const copied = (first & B_COPIED) !== 0n;
  const type = classifyBig(first, flags);
  if (type === TYPE_INVALID) {
    setResult(r, type, INVALID_ZERO_IN_V2, 0, 0, copied);
    return 1;
  }
  if (type === TYPE_COMPRESSED) {
    const offsetBits = 62n - (BigInt(clusterBits) - 8n);
    const coffset = first & ((1n << offsetBits) - 1n);
    const nbSectors = ((first >> offsetBits) & ((1n << (BigInt(clusterBits) - 8n)) - 1n)) + 1n;
    if (coffset >= B_TWO_53) {
      setResult(r, TYPE_INVALID, INVALID_OFFSET_TOO_LARGE, 0, 0, copied);
      return 1;
    }
    setResult(r, type, 0, Number(coffset), Number(nbSectors * 512n - (coffset & 511n)), copied);
    return 1;
  }
  const hostOffset = first & B_OFFSET_MASK;
  if (hostOffset & (clusterSize - 1n)) {
    setResult(r, TYPE_INVALID, INVALID_UNALIGNED, Number(hostOffset), 0, copied);
    return 1;
  }
  if (hostOffset >= B_TWO_53) {
    setResult(r, TYPE_INVALID, INVALID_OFFSET_TOO_LARGE, Number(hostOffset), 0, copied);
    return 1;
  }
  setResult(r, type, 0, Number(hostOffset), 0, copied);
  const allocated = type === TYPE_NORMAL || type === TYPE_ZERO_ALLOC;
  const splitCopied = (flags & LOOKUP_SPLIT_COPIED) !== 0;
  let expected = hostOffset + clusterSize;
  let n = 1;
  let q = startIndex * 8 + 8;
  while (n < count) {
    const entry = dv.getBigUint64(q);
    if (classifyBig(entry, flags) !== type) break;
    if (splitCopied && ((entry & B_COPIED) !== 0n) !== copied) break;
    if (allocated) {
      if ((entry & B_OFFSET_MASK) !== expected || expected >= B_TWO_53) break;
      expected += clusterSize;
    }
    n++;
    q += 8;
  }
  return n;
}

// ---- Setup ----------------------------------------------------------------------------------

const cores = { simd: await WasmCore.create("simd"), scalar: await WasmCore.create("scalar") };
const slots = {};
for (const [v, core] of Object.entries(cores)) slots[v] = PATTERNS.map(() => core.reserve(CLUSTER_SIZE, 64));

for (const [p, pattern] of PATTERNS.entries()) {
  const table = new Uint8Array(CLUSTER_SIZE);
  pattern.fill(new DataView(table.buffer), rng32(100 + p));
  for (const [v, core] of Object.entries(cores)) core.bytes(slots[v][p], CLUSTER_SIZE).set(table);
}
// The twins read the very same bytes: a DataView over the SIMD core's slot (memory no longer grows).
const views = PATTERNS.map((_, p) => {
  const u8 = cores.simd.bytes(slots.simd[p], CLUSTER_SIZE);
  return new DataView(u8.buffer, u8.byteOffset, CLUSTER_SIZE);
});

// One walk function per implementation, each its own function literal: a shared walker would
// make its call site polymorphic (V8 shares feedback between closures of one literal) and let
// the JIT's choices for one implementation leak into another's numbers.
const newResult = () => ({ type: 0, invalidReason: 0, hostOffset: 0.5, compressedSize: 0.5, copied: false });

function walkWasmSimd(slot, count) {
  const core = cores.simd;
  const r = core.result;
  let acc = 0;
  for (let i = 0; i < ENTRIES; ) {
    const n = core.l2Lookup(slot, i, Math.min(count, ENTRIES - i), CLUSTER_BITS, FLAGS);
    acc += r.type + r.hostOffset;
    i += n;
  }
  return acc;
}

function walkWasmScalar(slot, count) {
  const core = cores.scalar;
  const r = core.result;
  let acc = 0;
  for (let i = 0; i < ENTRIES; ) {
    const n = core.l2Lookup(slot, i, Math.min(count, ENTRIES - i), CLUSTER_BITS, FLAGS);
    acc += r.type + r.hostOffset;
    i += n;
  }
  return acc;
}

const rTs = newResult();
function walkTs(dv, count) {
  const r = rTs;
  let acc = 0;
  for (let i = 0; i < ENTRIES; ) {
    const n = l2LookupTs(dv, i, Math.min(count, ENTRIES - i), CLUSTER_BITS, FLAGS, r);
    acc += r.type + r.hostOffset;
    i += n;
  }
  return acc;
}

const rBig = newResult();
function walkBig(dv, count) {
  const r = rBig;
  let acc = 0;
  for (let i = 0; i < ENTRIES; ) {
    const n = l2LookupBig(dv, i, Math.min(count, ENTRIES - i), CLUSTER_BITS, FLAGS, r);
    acc += r.type + r.hostOffset;
    i += n;
  }
  return acc;
}

function callsPerWalk(slot, count) {
  let calls = 0;
  for (let i = 0; i < ENTRIES; calls++) i += cores.simd.l2Lookup(slot, i, Math.min(count, ENTRIES - i), CLUSTER_BITS, FLAGS);
  return calls;
}

// Same work: every start index and count gives the same run and result in all four.
{
  const keys = ["type", "invalidReason", "hostOffset", "compressedSize", "copied"];
  const rt = newResult();
  const rb = newResult();
  let checked = 0;
  for (const [p, pattern] of PATTERNS.entries()) {
    for (const count of [1, 2, 16, 100, ENTRIES]) {
      for (let i = 0; i < ENTRIES; i++) {
        const c = Math.min(count, ENTRIES - i);
        const ns = cores.simd.l2Lookup(slots.simd[p], i, c, CLUSTER_BITS, FLAGS);
        const want = JSON.stringify([ns, ...keys.map((k) => cores.simd.result[k])]);
        const nc = cores.scalar.l2Lookup(slots.scalar[p], i, c, CLUSTER_BITS, FLAGS);
        const got = [
          JSON.stringify([nc, ...keys.map((k) => cores.scalar.result[k])]),
          JSON.stringify([l2LookupTs(views[p], i, c, CLUSTER_BITS, FLAGS, rt), ...keys.map((k) => rt[k])]),
          JSON.stringify([l2LookupBig(views[p], i, c, CLUSTER_BITS, FLAGS, rb), ...keys.map((k) => rb[k])]),
        ];
        for (const [j, g] of got.entries()) {
          if (g !== want) {
            throw new Error(`${pattern.name} index ${i} count ${c}: ${["scalar", "ts", "bigint"][j]} gives ${g}, wasm simd ${want}`);
          }
        }
        checked++;
      }
    }
  }
  console.log(`# L2 lookup: WASM vs plain TS${QUICK ? " (quick)" : ""}`);
  console.log(`all four agree on ${checked} lookups (5 tables x 5 counts x ${ENTRIES} start indexes)`);
}

// ---- The façade's cost ------------------------------------------------------------------------

// WasmCore.l2Lookup re-derives its views through u8() after every call, which reads
// `memory.buffer` (a getter that costs more than the lookup itself). This twin calls the same
// export and fills the same result object, but notices growth the cheap way: a typed array over
// a detached buffer has length 0. It is a prototype of a fix, not library code.
function directLookup(core) {
  const ex = core.exports;
  const outPtr = core.reserve(32);
  let u32 = new Uint32Array(ex.memory.buffer);
  let f64 = new Float64Array(ex.memory.buffer);
  const r = newResult();
  const w = outPtr >>> 2;
  const d = (outPtr + 8) >>> 3;
  return {
    result: r,
    lookup(slot, startIndex, count, clusterBits, flags) {
      const n = ex.l2Lookup(slot, startIndex, count, clusterBits, flags, outPtr);
      if (u32.length === 0) {
        u32 = new Uint32Array(ex.memory.buffer);
        f64 = new Float64Array(ex.memory.buffer);
      }
      r.type = u32[w];
      r.invalidReason = u32[w + 1];
      r.hostOffset = f64[d];
      r.compressedSize = f64[d + 1];
      r.copied = u32[w + 6] !== 0;
      return n;
    },
  };
}
const direct = directLookup(cores.simd);

// ---- Run ------------------------------------------------------------------------------------

const MAX_TIME = QUICK ? 0.1 : 0.4;
const RUN_PATTERNS = QUICK ? PATTERNS.filter((p) => p.name === "mixed") : PATTERNS;
let sink = 0;
const rows = [];
const headlines = [];
/** Ops per second from the median sample: steadier than the mean on a shared machine. */
const medianHz = (b) => 1 / median(b.stats.sample);

function runSuite(p, count) {
  const slotS = slots.simd[p];
  const slotC = slots.scalar[p];
  const dv = views[p];
  const calls = callsPerWalk(slotS, count);
  const withScalar = PATTERNS[p].name === "mixed";
  const results = {};
  const suite = new Benchmark.Suite();
  const opts = { maxTime: MAX_TIME, minSamples: 5 };
  suite.add("wasm", () => (sink += walkWasmSimd(slotS, count)), opts);
  if (withScalar) suite.add("wasm scalar", () => (sink += walkWasmScalar(slotC, count)), opts);
  suite
    .add("wasm direct", () => (sink += walkDirect(slotS, count)), opts)
    .add("ts", () => (sink += walkTs(dv, count)), opts)
    .add("ts bigint", () => (sink += walkBig(dv, count)), opts)
    .on("cycle", (e) => {
      if (e.target.error) throw e.target.error;
      results[e.target.name] = e.target;
    })
    .run();
  const hz = (k) => medianHz(results[k]);
  const nsPerCall = (k) => 1e9 / (hz(k) * calls);
  rows.push([
    PATTERNS[p].name,
    String(count),
    String(calls),
    fmt(nsPerCall("wasm"), 1),
    withScalar ? fmt(nsPerCall("wasm scalar"), 1) : "-",
    fmt(nsPerCall("wasm direct"), 1),
    fmt(nsPerCall("ts"), 1),
    fmt(nsPerCall("ts bigint"), 1),
    fmtRatio(hz("wasm") / hz("ts")),
    withScalar ? fmtRatio(hz("wasm scalar") / hz("ts")) : "-",
    fmtRatio(hz("wasm direct") / hz("ts")),
    fmtRatio(hz("ts") / hz("ts bigint")),
    `±${fmt(Math.max(...Object.values(results).map((b) => b.stats.rme)), 1)}%`,
  ]);
  return { hz, nsPerCall, calls };
}

function walkDirect(slot, count) {
  const r = direct.result;
  let acc = 0;
  for (let i = 0; i < ENTRIES; ) {
    const n = direct.lookup(slot, i, Math.min(count, ENTRIES - i), CLUSTER_BITS, FLAGS);
    acc += r.type + r.hostOffset;
    i += n;
  }
  return acc;
}

for (const pattern of RUN_PATTERNS) {
  const p = PATTERNS.indexOf(pattern);
  for (const count of COUNTS) {
    const r = runSuite(p, count);
    if (pattern.name === "mixed") headlines.push({ count, ...r });
  }
}

section("Walking one 8192-entry L2 table: ns per lookup call (median sample)");
printTable(
  [
    "table",
    "count",
    "calls",
    "wasm",
    "wasm scalar",
    "wasm direct",
    "ts",
    "ts bigint",
    "wasm/ts",
    "scalar/ts",
    "direct/ts",
    "ts/bigint",
    "max rme",
  ],
  rows,
);
console.log(
  `\nwasm = WasmCore.l2Lookup (SIMD build; "wasm scalar" the scalar build); wasm direct = the same export` +
    `\nwithout the per-call memory.buffer read (prototype); ts / ts bigint = the plain-TS twins.` +
    `\nratio > 1: the first is faster. benchmark.js maxTime ${MAX_TIME} s per case. sink ${sink > 0 ? "ok" : sink}`,
);

for (const h of headlines) {
  headline(
    `L2 lookup, mixed table, count ${h.count} (${h.calls} calls/table): WasmCore.l2Lookup vs plain TS`,
    `${fmt(h.nsPerCall("wasm"), 1)} ns/call`,
    `${fmt(h.nsPerCall("ts"), 1)} ns/call`,
    fmtRatio(h.hz("wasm") / h.hz("ts")),
  );
}
const h1 = headlines.find((h) => h.count === 1);
headline(
  `L2 lookup, mixed table, count 1: WASM export called directly (prototype) vs WasmCore.l2Lookup`,
  `${fmt(h1.nsPerCall("wasm direct"), 1)} ns/call`,
  `${fmt(h1.nsPerCall("wasm"), 1)} ns/call`,
  fmtRatio(h1.hz("wasm direct") / h1.hz("wasm")),
);
const h16 = headlines.find((h) => h.count === 16);
headline(
  `L2 lookup, mixed table, count 16: plain TS (getUint32 pairs) vs BigInt TS`,
  `${fmt(h16.nsPerCall("ts"), 1)} ns/call`,
  `${fmt(h16.nsPerCall("ts bigint"), 1)} ns/call`,
  fmtRatio(h16.hz("ts") / h16.hz("ts bigint")),
);
