// Writes: our Qcow2Image against `qemu-img bench -w`, side by side, on identical fresh images.
//
// Each case is one exact qemu-img bench command line and the same requests through our library:
// COUNT writes of SIZE bytes, DEPTH in flight, request i at (i * STEP) mod virtual size, every
// byte 0x5a (qemu's --pattern; both sides write the same bytes, see "compare" below).
//   seq      allocating sequential writes, 64 KiB and 1 MiB, over the whole of a fresh image
//   rewrite  4 KiB "random" rewrites in place, on a copy of a preallocation=full image: qemu-img
//            bench has no random mode, so STEP is an odd multiple of 4 KiB near 0.618 x the disk:
//            i * STEP mod size visits every 4 KiB block once, in an order with no locality
//   cow      allocating 4 KiB writes, one per 64 KiB cluster of a fresh image (STEP = cluster):
//            every write allocates a cluster and fills its other 60 KiB (the partial-cluster path)
//   seq4k    4 KiB sequential writes into a fresh image: one allocation per 16 writes, the
//            other 15 rewrite the cluster in place (what `dd bs=4k` in a guest does)
// each at depth 1 and 16.
//
// Timing. qemu: wall time of the `qemu-img bench` process, so it includes starting the process,
// opening the image and the flush qemu makes when it closes it (its own "Run completed in" stops
// before that flush; it is printed beside). Ours: open, the writes (Promise.all over DEPTH
// workers taking request indexes in order, as qemu issues them), flush, close; not Node's start.
// qemu's fixed cost (process start, open, one write, close) is measured and printed.
//
// Cache mode: `-t writeback` (qemu-img bench's default, given explicitly). The Node backend
// writes with plain pwrite through the page cache and fdatasync()s on flush; writeback is qemu's
// same arrangement (no O_DIRECT, page cache, fdatasync when it flushes at close). `-t none`
// (O_DIRECT) would bypass the page cache that we go through, and `-n` (Linux native AIO) needs
// O_DIRECT; so neither is used. qemu's default AIO backend (a thread pool) is kept. On tmpfs
// fdatasync costs nothing, so the flushes (about 6 per run on each side, strace says) are not
// what is compared here; on a disk they would be.
//
// Rounds: every case runs 1 + N rounds (N = 5, or 3 with --quick), qemu and ours alternating and
// the order swapped each round; the first round (warm-up) is dropped and the best of the rest is
// reported. Every run gets a fresh image (qemu-img create, or a copy of the preallocated one),
// made before the clock starts. After each of our runs `qemu-img check` must find no errors
// and no leaks; on the last round `qemu-img compare` must find our image and qemu's identical.
// Failures are printed and recorded as WARNING headline rows. Images live on tmpfs (/dev/shm)
// when it has room, else in bench/out/scratch.
//
//   node bench/write.mjs [--quick] [--only=seq,rewrite,cow,seq4k]

import { copyFileSync, mkdirSync, rmSync } from "node:fs";
import path from "node:path";
import { Qcow2Image } from "../build/node.js";
import { GiB, MiB, OUT_DIR, QUICK, best, fmt, fmtOps, fmtRatio, headline, median, now, printTable, section, qemuCheck, run, scratchDirFor, warn, warnings } from "./_common.mjs";

const KiB = 1024;
const MEASURED = QUICK ? 3 : 5;
const ROUNDS = MEASURED + 1; // the first is dropped
const PATTERN = 0x5a;
const CLUSTER = 64 * KiB; // qemu-img create's default, as is v3 (compat=1.1)
const DISK = QUICK ? 128 * MiB : 1 * GiB;
const REWRITES = QUICK ? 20_000 : 100_000;
const SEQ4K_BYTES = QUICK ? 32 * MiB : 256 * MiB;
const DEPTHS = [1, 16];
const ONLY = process.argv.find((a) => a.startsWith("--only="))?.slice("--only=".length).split(",");

/** tmpfs when it has room for three images at once (ours, qemu's, the preallocated base), else bench/out. */
const SCRATCH = scratchDirFor(3 * DISK + 256 * MiB);


const sizeLabel = (s) => (s % GiB === 0 ? `${s / GiB} GiB` : s % MiB === 0 ? `${s / MiB} MiB` : `${s / KiB} KiB`);
const sizeArg = (s) => `${s / KiB}K`;

function createImage(file) {
  rmSync(file, { force: true });
  run("qemu-img", ["create", "-q", "-f", "qcow2", file, String(DISK)]);
}

let preallocated;
/** A fully allocated image (every cluster written, L2 entries COPIED), made once; runs use copies. */
function preallocatedBase() {
  if (preallocated) return preallocated;
  preallocated = path.join(SCRATCH, "write-base-full.qcow2");
  rmSync(preallocated, { force: true });
  run("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "preallocation=full", preallocated, String(DISK)]);
  return preallocated;
}

/** An odd multiple of 4 KiB near 0.618 of the disk: i * step mod disk visits every 4 KiB block once. */
function scatterStep() {
  const blocks = DISK / (4 * KiB);
  let k = Math.floor(blocks * 0.6180339887);
  if (k % 2 === 0) k += 1;
  return k * 4 * KiB;
}

function qemuArgs(c, file) {
  return [
    "bench", "-w", "-f", "qcow2", "-t", "writeback",
    "-c", String(c.count), "-d", String(c.depth), "-s", sizeArg(c.size), "-S", sizeArg(c.step),
    `--pattern=0x${PATTERN.toString(16)}`, file,
  ];
}

/** One qemu-img bench run: wall ms (process) and its own "Run completed in" ms. */
function qemuRun(c, file) {
  const args = qemuArgs(c, file);
  const t0 = now();
  const r = run("qemu-img", args);
  const wall = now() - t0;
  const m = /Run completed in ([\d.]+) seconds/.exec(r.stdout);
  if (!m) throw new Error(`qemu-img bench: unexpected output: ${r.stdout}`);
  return { wall, inner: Number(m[1]) * 1000 };
}

/** The same requests through Qcow2Image: open, writes at depth, flush, close. */
async function ourRun(c, file) {
  const bufs = Array.from({ length: c.depth }, () => new Uint8Array(c.size).fill(PATTERN));
  const cpu0 = process.cpuUsage();
  const t0 = now();
  const image = await Qcow2Image.open(file, { readOnly: false });
  let next = 0;
  const worker = async (buf) => {
    for (;;) {
      const i = next++;
      if (i >= c.count) return;
      await image.write((i * c.step) % DISK, buf);
    }
  };
  await Promise.all(bufs.map(worker));
  const written = now();
  await image.flush();
  await image.close();
  const end = now();
  const cpu = process.cpuUsage(cpu0);
  return { wall: end - t0, writes: written - t0, flushClose: end - written, user: cpu.user / 1000, sys: cpu.system / 1000 };
}


async function measure(c) {
  const ourFile = path.join(SCRATCH, "write-ours.qcow2");
  const qemuFile = path.join(SCRATCH, "write-qemu.qcow2");
  const fresh = (file) => {
    if (c.base === "full") copyFileSync(preallocatedBase(), file);
    else createImage(file);
  };
  const q = [];
  const o = [];
  const bad = [];
  for (let round = 0; round < ROUNDS; round++) {
    const order = round % 2 === 0 ? ["qemu", "ours"] : ["ours", "qemu"];
    for (const side of order) {
      if (side === "qemu") {
        fresh(qemuFile);
        const r = qemuRun(c, qemuFile);
        if (round > 0) q.push(r);
      } else {
        fresh(ourFile);
        const r = await ourRun(c, ourFile);
        if (round > 0) o.push(r);
        const problem = qemuCheck(ourFile).problem;
        if (problem) bad.push(`round ${round}: ${problem}`);
      }
    }
  }
  const cmp = run("qemu-img", ["compare", "-q", "-f", "qcow2", "-F", "qcow2", ourFile, qemuFile], { allowFail: true });
  rmSync(ourFile, { force: true });
  rmSync(qemuFile, { force: true });
  return { q, o, bad, identical: cmp.status === 0, compareOut: (cmp.stdout + cmp.stderr).trim() };
}

function cases(kind) {
  const c = [];
  if (kind === "seq") {
    for (const size of [64 * KiB, 1 * MiB]) {
      for (const depth of DEPTHS) c.push({ size, depth, step: size, count: DISK / size, base: "fresh" });
    }
  } else if (kind === "rewrite") {
    for (const depth of DEPTHS) c.push({ size: 4 * KiB, depth, step: scatterStep(), count: REWRITES, base: "full" });
  } else if (kind === "cow") {
    for (const depth of DEPTHS) c.push({ size: 4 * KiB, depth, step: CLUSTER, count: DISK / CLUSTER, base: "fresh" });
  } else if (kind === "seq4k") {
    for (const depth of DEPTHS) c.push({ size: 4 * KiB, depth, step: 4 * KiB, count: SEQ4K_BYTES / (4 * KiB), base: "fresh" });
  }
  return c;
}

const GROUPS = [
  {
    kind: "seq",
    title: `Allocating sequential writes, fresh ${sizeLabel(DISK)} image, then flush`,
    unit: "MiB/s",
    name: (c) => `Write, allocating sequential: ${sizeLabel(c.size)} x ${c.count}, depth ${c.depth}, fresh ${sizeLabel(DISK)} image, + flush; vs qemu-img bench -w`,
  },
  {
    kind: "rewrite",
    title: `4 KiB scattered rewrites in place, ${sizeLabel(DISK)} preallocation=full image`,
    unit: "IOPS",
    name: (c) => `Write, 4 KiB rewrites in place, strided (step ${sizeLabel(c.step)}): ${c.count}, depth ${c.depth}, fully allocated ${sizeLabel(DISK)} image, + flush; vs qemu-img bench -w`,
  },
  {
    kind: "cow",
    title: `Allocating 4 KiB writes, one per 64 KiB cluster (partial-cluster fill), fresh ${sizeLabel(DISK)} image`,
    unit: "IOPS",
    name: (c) => `Write, allocating 4 KiB, one per 64 KiB cluster (60 KiB COW fill): ${c.count}, depth ${c.depth}, fresh image, + flush; vs qemu-img bench -w`,
  },
  {
    kind: "seq4k",
    title: `4 KiB sequential writes, first ${sizeLabel(SEQ4K_BYTES)} of a fresh ${sizeLabel(DISK)} image`,
    unit: "IOPS",
    name: (c) => `Write, 4 KiB sequential (1 allocation per 16 writes): ${c.count}, depth ${c.depth}, fresh image, + flush; vs qemu-img bench -w`,
  },
];

const qemuVersion = run("qemu-img", ["--version"]).stdout.split("\n")[0];
console.log(`# Writes vs qemu-img bench${QUICK ? " (quick)" : ""}`);
console.log(
  `${qemuVersion}; node ${process.version}; images in ${SCRATCH}; ${sizeLabel(DISK)} virtual, ${CLUSTER / KiB} KiB clusters, v3; ` +
    `best of ${MEASURED} after a dropped warm-up round`,
);

/** qemu's cost whatever the work: start, open, one 4 KiB write, close (with its flush). */
function qemuFixedCost() {
  const file = path.join(SCRATCH, "write-fixed.qcow2");
  const times = [];
  for (let i = 0; i < 6; i++) {
    createImage(file);
    times.push(qemuRun({ count: 1, depth: 1, size: 4 * KiB, step: 4 * KiB }, file).wall);
  }
  rmSync(file, { force: true });
  return best(times.slice(1));
}
const fixed = qemuFixedCost();
console.log(`qemu-img bench fixed cost (process start, open, one 4 KiB write, close): ${fmt(fixed, 1)} ms`);

for (const g of GROUPS) {
  if (ONLY && !ONLY.includes(g.kind)) continue;
  section(g.title);
  const rows = [];
  for (const c of cases(g.kind)) {
    const r = await measure(c);
    const qBest = best(r.q.map((x) => x.wall));
    const oBest = best(r.o.map((x) => x.wall));
    const bytes = c.count * c.size;
    const speed = (ms) => (g.unit === "IOPS" ? c.count / (ms / 1000) : bytes / MiB / (ms / 1000));
    const show = (ms) => (g.unit === "IOPS" ? `${fmtOps(speed(ms))} IOPS` : `${fmt(speed(ms), 0)} MiB/s`);
    const oFast = r.o.find((x) => x.wall === oBest);
    rows.push([
      `${sizeLabel(c.size)} x ${c.count}, depth ${c.depth}, step ${sizeLabel(c.step)}`,
      fmt(qBest, 0),
      fmt(best(r.q.map((x) => x.inner)), 0),
      fmt(oBest, 0),
      `${fmt(oFast.writes, 0)} + ${fmt(oFast.flushClose, 0)}`,
      `${fmt(oFast.user, 0)} / ${fmt(oFast.sys, 0)}`,
      fmt(median(r.o.map((x) => x.wall)), 0),
      show(qBest),
      show(oBest),
      fmtRatio(qBest / oBest),
      `${r.o.length + 1 - r.bad.length}/${r.o.length + 1}`,
      r.identical ? "yes" : "NO",
    ]);
    console.log(`  qemu-img ${qemuArgs(c, "FILE").join(" ")}`);
    const name = g.name(c);
    headline(name, show(oBest), show(qBest), fmtRatio(qBest / oBest));
    for (const b of r.bad) warn(`${name}: qemu-img check of our image failed`, b, "clean");
    if (!r.identical) warn(`${name}: our image differs from qemu's (qemu-img compare)`, r.compareOut.slice(0, 200), "identical");
  }
  console.log();
  printTable(
    [
      "case",
      "qemu ms",
      "qemu run ms",
      "ours ms",
      "ours writes+flush/close",
      "ours user/sys CPU ms",
      "ours median",
      "qemu",
      "ours",
      "ours/qemu",
      "check ok",
      "same as qemu",
    ],
    rows,
  );
  console.log(
    `\nqemu ms: wall time of the process (start, open, requests, close with flush), best of ${MEASURED}; qemu run ms: its own ` +
      `"Run completed in" (requests only); ours ms: open + writes + flush + close, with the CPU time of that ` +
      `best run (sys is mostly the kernel copying into tmpfs pages, which qemu pays too). Ratio > 1 means ours is faster.`,
  );
}

if (preallocated) rmSync(preallocated, { force: true });
console.log(`\nqemu's fixed cost ${fmt(fixed, 1)} ms is included in every qemu time above.`);
if (warnings.length) {
  console.log(`\n${warnings.length} warning(s):`);
  for (const w of warnings) console.log(`  ${w}`);
}
