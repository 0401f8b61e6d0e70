// Compressed whole-cluster writes: our Qcow2Image.writeCompressed against `qemu-img convert -c`,
// side by side, on the same raw source.
//
// Source: SIZE bytes (256 MiB, 64 MiB with --quick) of word-like text (fillText in _common.mjs),
// generated once and cached in bench/out; both sides read that same file, page cache warm.
//   qemu   `qemu-img convert -f raw -c -O qcow2 -o cluster_size=N src.raw out.qcow2`, wall time of
//          the process (start, create, read, compress, write, close with its flush). qemu 7.2
//          compresses in a thread pool (qcow2_co_compress, up to 4 threads) fed by convert's
//          coroutines; its CPU time is printed beside so the parallelism it got here is visible.
//   ours   Qcow2Image.create(out, {size, clusterSize}), then fs.readSync of the source in 4 MiB
//          chunks, each handed to image.writeCompressed(pos, chunk) (cluster aligned, whole
//          clusters), then close(). writeCompressed deflates on the main thread with node:zlib
//          (deflateRawSync, window 12, memLevel 9, level 6, as qemu), one cluster at a time.
//          Not Node's start-up.
// for 64 KiB and 4 KiB clusters (--quick: 64 KiB only).
//
// Rounds: 1 + N (N = 5, or 3 with --quick), qemu and ours alternating, the order swapped each
// round; the first round (warm-up) is dropped and the best of the rest is reported. Every run
// writes a fresh output (the old one removed before the clock starts). After each of our runs
// `qemu-img check` must find no errors or leaks and compressed clusters; on the last round
// `qemu-img compare -f qcow2 -F raw ours src.raw` must find them identical. Failures are printed
// and recorded as WARNING headline rows. The size of both outputs is printed: speed is not the
// whole story when one side packs compressed clusters more tightly. Outputs live on tmpfs
// (/dev/shm) when it has room, else in bench/out/scratch.
//
//   node bench/write-compressed.mjs [--quick] [--clusters=64,4]   (cluster sizes in KiB)

import { closeSync, existsSync, mkdirSync, openSync, readFileSync, readSync, renameSync, rmSync, statSync, writeSync } from "node:fs";
import path from "node:path";
import { Qcow2Image } from "../build/node.js";
import { MiB, OUT_DIR, QUICK, best, fillText, fmt, fmtRatio, headline, median, now, printTable, rng32, section, warmPageCache, qemuCheck, run, scratchDirFor, warn, warnings } from "./_common.mjs";

const KiB = 1024;
const MEASURED = QUICK ? 3 : 5;
const ROUNDS = MEASURED + 1; // the first is dropped
const SIZE = QUICK ? 64 * MiB : 256 * MiB;
const CHUNK = 4 * MiB;
const CLUSTERS = (process.argv.find((a) => a.startsWith("--clusters="))?.slice("--clusters=".length).split(",") ?? (QUICK ? ["64"] : ["64", "4"])).map(
  (k) => Number(k) * KiB,
);

/** tmpfs when it has room for both outputs at once (uncompressed size, worst case), else bench/out. */
const SCRATCH = scratchDirFor(2 * SIZE + 256 * MiB);


const sizeLabel = (s) => (s % MiB === 0 ? `${s / MiB} MiB` : `${s / KiB} KiB`);

/** The text source, made once and cached in bench/out. */
function ensureSource() {
  const file = path.join(OUT_DIR, `compress-text-${SIZE / MiB}m.raw`);
  if (existsSync(file) && statSync(file).size === SIZE) return file;
  const t0 = now();
  const tmp = `${file}.tmp`;
  const fd = openSync(tmp, "w");
  const buf = Buffer.alloc(16 * MiB);
  const next = rng32(4242);
  for (let pos = 0; pos < SIZE; pos += buf.length) {
    fillText(buf, next);
    writeSync(fd, buf, 0, Math.min(buf.length, SIZE - pos), pos);
  }
  closeSync(fd);
  renameSync(tmp, file);
  console.log(`made ${path.relative(process.cwd(), file)} in ${fmt((now() - t0) / 1000, 1)} s`);
  return file;
}

/** CPU time (ms) of this process's waited-for children, from /proc/self/stat; undefined off Linux. */
function childCpu() {
  try {
    const stat = readFileSync("/proc/self/stat", "utf8");
    const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    // Fields 16 and 17 (cutime, cstime) of proc(5), counted from field 3 here; clock ticks (100 Hz).
    return { user: Number(f[13]) * 10, sys: Number(f[14]) * 10 };
  } catch {
    return undefined;
  }
}

function qemuArgs(src, out, cs) {
  return ["convert", "-f", "raw", "-c", "-O", "qcow2", "-o", `cluster_size=${cs}`, src, out];
}

function qemuRun(src, out, cs) {
  rmSync(out, { force: true });
  const c0 = childCpu();
  const t0 = now();
  run("qemu-img", qemuArgs(src, out, cs));
  const wall = now() - t0;
  const c1 = childCpu();
  return { wall, user: c1 ? c1.user - c0.user : NaN, sys: c1 ? c1.sys - c0.sys : NaN };
}

async function ourRun(src, out, cs) {
  rmSync(out, { force: true });
  const buf = new Uint8Array(CHUNK);
  const cpu0 = process.cpuUsage();
  const t0 = now();
  const image = await Qcow2Image.create(out, { size: SIZE, clusterSize: cs });
  const fd = openSync(src, "r");
  let inWrite = 0;
  try {
    for (let pos = 0; pos < SIZE; ) {
      const n = readSync(fd, buf, 0, Math.min(CHUNK, SIZE - pos), pos);
      if (n <= 0) throw new Error(`${src}: short read at ${pos}`);
      const w0 = now();
      await image.writeCompressed(pos, n === CHUNK ? buf : buf.subarray(0, n));
      inWrite += now() - w0;
      pos += n;
    }
  } finally {
    closeSync(fd);
  }
  const c0 = now();
  await image.close();
  const end = now();
  const cpu = process.cpuUsage(cpu0);
  return { wall: end - t0, inWrite, close: end - c0, user: cpu.user / 1000, sys: cpu.system / 1000 };
}


/** qemu's cost whatever the work: start, create, convert -c of a 1 MiB source, close. */
function qemuFixedCost(cs) {
  const src = path.join(SCRATCH, "compress-tiny.raw");
  const out = path.join(SCRATCH, "compress-tiny.qcow2");
  const fd = openSync(src, "w");
  const buf = Buffer.alloc(MiB);
  fillText(buf, rng32(1));
  writeSync(fd, buf);
  closeSync(fd);
  const times = [];
  for (let i = 0; i < 6; i++) times.push(qemuRun(src, out, cs).wall);
  rmSync(src, { force: true });
  rmSync(out, { force: true });
  return best(times.slice(1));
}

async function measure(src, cs) {
  const ourFile = path.join(SCRATCH, "compress-ours.qcow2");
  const qemuFile = path.join(SCRATCH, "compress-qemu.qcow2");
  const q = [];
  const o = [];
  const bad = [];
  let ourFacts;
  for (let round = 0; round < ROUNDS; round++) {
    const order = round % 2 === 0 ? ["qemu", "ours"] : ["ours", "qemu"];
    for (const side of order) {
      if (side === "qemu") {
        const r = qemuRun(src, qemuFile, cs);
        if (round > 0) q.push(r);
      } else {
        const r = await ourRun(src, ourFile, cs);
        if (round > 0) o.push(r);
        const c = qemuCheck(ourFile, { requireCompressed: true });
        if (c.problem) bad.push(`round ${round}: ${c.problem}`);
        ourFacts = c.facts;
      }
    }
  }
  const cmp = run("qemu-img", ["compare", "-q", "-f", "qcow2", "-F", "raw", ourFile, src], { allowFail: true });
  const qemuFacts = qemuCheck(qemuFile, { requireCompressed: true }).facts;
  const sizes = { ours: statSync(ourFile).size, qemu: statSync(qemuFile).size };
  rmSync(ourFile, { force: true });
  rmSync(qemuFile, { force: true });
  return { q, o, bad, identical: cmp.status === 0, compareOut: (cmp.stdout + cmp.stderr).trim() || `exit ${cmp.status}`, ourFacts, qemuFacts, sizes };
}

const qemuVersion = run("qemu-img", ["--version"]).stdout.split("\n")[0];
console.log(`# Compressed writes vs qemu-img convert -c${QUICK ? " (quick)" : ""}`);
console.log(
  `${qemuVersion}; node ${process.version}; outputs in ${SCRATCH}; ${sizeLabel(SIZE)} of text, ` +
    `${sizeLabel(CHUNK)} per writeCompressed call; best of ${MEASURED} after a dropped warm-up round`,
);
const src = ensureSource();
warmPageCache(src);

for (const cs of CLUSTERS) {
  section(`${sizeLabel(SIZE)} of text compressed into a fresh image, ${sizeLabel(cs)} clusters`);
  const fixed = qemuFixedCost(cs);
  const r = await measure(src, cs);
  const qBest = best(r.q.map((x) => x.wall));
  const oBest = best(r.o.map((x) => x.wall));
  const qFast = r.q.find((x) => x.wall === qBest);
  const oFast = r.o.find((x) => x.wall === oBest);
  const mibs = (ms) => SIZE / MiB / (ms / 1000);
  const file = (bytes) => `${fmt(bytes / MiB, 1)} MiB`;
  const cpu = (x) => `${fmt(x.user, 0)} / ${fmt(x.sys, 0)} (${fmt((100 * (x.user + x.sys)) / x.wall, 0)}%)`;
  const compressed = (f) => (f ? `${f["compressed-clusters"]}/${f["total-clusters"]}` : "?");
  console.log(`  qemu-img ${qemuArgs("SRC", "OUT", cs).join(" ")}`);
  printTable(
    ["side", "best ms", "median ms", "MiB/s (best)", "user / sys CPU ms (of wall)", "output file", "compressed clusters"],
    [
      ["qemu-img convert -c", fmt(qBest, 0), fmt(median(r.q.map((x) => x.wall)), 0), fmt(mibs(qBest), 1), cpu(qFast), file(r.sizes.qemu), compressed(r.qemuFacts)],
      ["ours writeCompressed", fmt(oBest, 0), fmt(median(r.o.map((x) => x.wall)), 0), fmt(mibs(oBest), 1), cpu(oFast), file(r.sizes.ours), compressed(r.ourFacts)],
    ],
  );
  console.log(
    `\nours/qemu ${fmtRatio(qBest / oBest)} (> 1: ours is faster). Ours, best run: ${fmt(oFast.inWrite, 0)} ms in writeCompressed, ` +
      `${fmt(oFast.close, 0)} ms in close, the rest create and reading the source. qemu's fixed cost (start, create, ` +
      `convert -c of 1 MiB): ${fmt(fixed, 1)} ms. check ok ${r.o.length + 1 - r.bad.length}/${r.o.length + 1}; ` +
      `qemu-img compare with the source: ${r.identical ? "identical" : "DIFFERENT"}.`,
  );
  if (r.sizes.ours > 1.1 * r.sizes.qemu) {
    console.log(
      `NOTE: our output is ${fmtRatio(r.sizes.ours / r.sizes.qemu)} the size of qemu's for the same data ` +
        `(${file(r.sizes.ours)} vs ${file(r.sizes.qemu)}; the source is ${file(SIZE)}).`,
    );
  }
  const name =
    `Compressed write, ${sizeLabel(SIZE)} text, ${sizeLabel(cs)} clusters: writeCompressed, ${sizeLabel(CHUNK)}/call (main thread, ` +
    `node:zlib, cluster by cluster) vs qemu-img convert -c (up to 4 compression threads); cells: MiB/s (output file size)`;
  headline(name, `${fmt(mibs(oBest), 0)} MiB/s (${file(r.sizes.ours)})`, `${fmt(mibs(qBest), 0)} MiB/s (${file(r.sizes.qemu)})`, fmtRatio(qBest / oBest));
  for (const b of r.bad) warn(`${name}: qemu-img check of our image failed`, b, "clean");
  if (!r.identical) warn(`${name}: our image differs from the source (qemu-img compare)`, r.compareOut.slice(0, 200), "identical");
}

if (warnings.length) {
  console.log(`\n${warnings.length} warning(s):`);
  for (const w of warnings) console.log(`  ${w}`);
}
