// qcow2-img convert against qemu-img convert on a deterministic mixed image (1 GiB; 256 MiB with
// --quick): each 4 MiB region holds 1.5 MiB of random bytes, 1 MiB of zeros and 1.5 MiB of text.
// Both tools run as a process with the same arguments, alternating, best of several rounds; the
// outputs are compared with qemu-img compare (and checked) before any time counts.
//
//   node bench/convert.mjs [--quick]

import { spawnSync } from "node:child_process";
import { rmSync, openSync, writeSync, closeSync } from "node:fs";
import path from "node:path";
import { MiB, OUT_DIR, QUICK, best, fillText, fmt, fmtRatio, headline, now, printTable, qemuCheck, rng32, run, scratchDirFor, section, warn, buildOnce } from "./_common.mjs";

const SIZE = QUICK ? 256 * MiB : 1024 * MiB;
const ROUNDS = QUICK ? 2 : 4;
const CLI = new URL("../build/cli/main.js", import.meta.url).pathname;
const label = `${SIZE / MiB} MiB mixed`;


const raw = buildOnce(path.join(OUT_DIR, `convert-mixed-${SIZE / MiB}m.raw`), (f) => {
  const fd = openSync(f, "w");
  const next = rng32(0xc0ffee);
  const region = 4 * MiB;
  const buf = Buffer.alloc(region);
  for (let r = 0; r < SIZE / region; r++) {
    buf.fill(0);
    for (let i = 0; i < 1.5 * MiB; i += 4) buf.writeUInt32LE(next(), i);
    fillText(buf.subarray(2.5 * MiB), next);
    writeSync(fd, buf, 0, region, r * region);
  }
  closeSync(fd);
});
const qcow2 = buildOnce(path.join(OUT_DIR, `convert-mixed-${SIZE / MiB}m.qcow2`), (f) => run("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", raw, f]));
const compressed = buildOnce(path.join(OUT_DIR, `convert-mixed-${SIZE / MiB}m-c.qcow2`), (f) =>
  run("qemu-img", ["convert", "-c", "-f", "raw", "-O", "qcow2", raw, f]),
);

const scratch = scratchDirFor(4 * SIZE);
const rows = [];
const cases = [
  ["raw → qcow2", ["-f", "raw", "-O", "qcow2"], raw, "qcow2"],
  ["qcow2 → raw", ["-O", "raw"], qcow2, "raw"],
  ["qcow2 → qcow2", ["-O", "qcow2"], qcow2, "qcow2"],
  ["qcow2 → qcow2 -c", ["-O", "qcow2", "-c"], qcow2, "qcow2"],
  ["compressed → raw", ["-O", "raw"], compressed, "raw"],
];

section(`convert, ${label}: qcow2-img vs qemu-img (processes, same arguments)`);
for (const [name, args, src, outFmt] of cases) {
  const ours = path.join(scratch, "convert-ours.out");
  const theirs = path.join(scratch, "convert-qemu.out");
  const times = { ours: [], qemu: [] };
  let ok = true;
  for (let r = 0; r < ROUNDS; r++) {
    for (const side of r % 2 ? ["qemu", "ours"] : ["ours", "qemu"]) {
      const file = side === "ours" ? ours : theirs;
      rmSync(file, { force: true });
      const t = now();
      const p =
        side === "ours"
          ? spawnSync(process.execPath, [CLI, "convert", ...args, src, file], { encoding: "utf8" })
          : spawnSync("qemu-img", ["convert", ...args, src, file], { encoding: "utf8" });
      const ms = now() - t;
      if (p.status !== 0) {
        warn(`convert ${name}`, `${side} failed: ${p.stderr}`, "");
        ok = false;
        break;
      }
      times[side].push(ms);
    }
    if (!ok) break;
  }
  if (!ok) continue;
  const same = spawnSync("qemu-img", ["compare", "-f", outFmt, "-F", outFmt, ours, theirs]).status === 0;
  const checked = outFmt === "qcow2" ? qemuCheck(ours, { requireCompressed: args.includes("-c") }) : { facts: {} };
  if (!same || checked.problem) {
    warn(`convert ${name}`, `output ${same ? "" : "differs from qemu's"} ${checked.problem ?? ""}`, "");
    continue;
  }
  const sizeOf = (f) => Number(spawnSync("stat", ["-c", "%s", f], { encoding: "utf8" }).stdout);
  const o = best(times.ours);
  const q = best(times.qemu);
  rows.push([name, `${fmt(o, 0)} ms`, `${fmt(q, 0)} ms`, fmt(o / q, 2), fmtRatio(q / o), args.includes("-c") ? `${fmt(sizeOf(ours) / MiB, 1)} / ${fmt(sizeOf(theirs) / MiB, 1)} MiB` : ""]);
  headline(`convert ${label}, ${name}: qcow2-img vs qemu-img convert (time; target ≤ ${name.includes("-c") ? "0.4" : name.startsWith("compressed") ? "0.8" : "0.9"}x qemu's)`, `${fmt(o, 0)} ms`, `${fmt(q, 0)} ms`, fmtRatio(q / o));
  rmSync(ours, { force: true });
  rmSync(theirs, { force: true });
}
printTable(["case", "qcow2-img", "qemu-img", "time ratio", "speed-up", "output sizes (ours / qemu)"], rows);

// What bounds the uncompressed cases: bare Node processes that only move the raw image's bytes,
// beside node -e 0 and both tools converting raw → raw. "writes only" writes the 768 MiB of data
// into a fresh file from one buffer, 1.5 MiB at a time as the conversion does; "copy loop" reads
// 2 MiB chunks on the thread pool (three ahead), skips all-zero 256 KiB blocks and writes the rest
// synchronously, the arrangement measured fastest here (reads on the main thread with writes on
// the thread pool were ~25% slower).
const COPY_LOOP = `
import fs from "node:fs";
const [mode, src, dst] = process.argv.slice(-3);
const CHUNK = 2 << 20, BLOCK = 256 << 10, zero = Buffer.alloc(BLOCK);
const fi = fs.openSync(src, "r"), fo = fs.openSync(dst, "w");
const size = fs.fstatSync(fi).size;
fs.ftruncateSync(fo, size);
if (mode === "writes") {
  const buf = Buffer.alloc(1536 << 10, 1);
  for (let pos = 0; pos < size; pos += 4 << 20) {
    fs.writeSync(fo, buf, 0, buf.length, pos);
    fs.writeSync(fo, buf, 0, buf.length, pos + (2560 << 10));
  }
} else {
  const read = (b, p) => new Promise((ok, fail) => fs.read(fi, b, 0, b.length, p, (e, n) => (e ? fail(e) : ok(n))));
  const bufs = Array.from({ length: 3 }, () => Buffer.allocUnsafe(CHUNK));
  const reads = [];
  for (let k = 0; k < 3; k++) reads.push(read(bufs[k], k * CHUNK));
  for (let i = 0, pos = 0; pos < size; i++, pos += CHUNK) {
    const buf = bufs[i % 3];
    const n = await reads[i];
    let start = -1;
    for (let b = 0; b <= n; b += BLOCK) {
      const isData = b < n && !buf.subarray(b, Math.min(n, b + BLOCK)).equals(zero.subarray(0, Math.min(BLOCK, n - b)));
      if (isData && start < 0) start = b;
      if (!isData && start >= 0) { fs.writeSync(fo, buf, start, b - start, pos + start); start = -1; }
    }
    if (pos + 3 * CHUNK < size) reads.push(read(buf, pos + 3 * CHUNK));
  }
}
fs.closeSync(fo);
`;
section(`what bounds it, ${label}: bare Node processes moving the same bytes, and both tools raw → raw`);
{
  const out = path.join(scratch, "convert-bound.out");
  const sides = [
    ["node -e 0", process.execPath, ["-e", "0"]],
    ["Node, writes only (768 MiB)", process.execPath, ["--input-type=module", "-e", COPY_LOOP, "writes", raw, out]],
    ["Node, copy loop", process.execPath, ["--input-type=module", "-e", COPY_LOOP, "copy", raw, out]],
    ["qcow2-img convert -f raw -O raw", process.execPath, [CLI, "convert", "-f", "raw", "-O", "raw", raw, out]],
    ["qemu-img convert -f raw -O raw", "qemu-img", ["convert", "-f", "raw", "-O", "raw", raw, out]],
  ];
  const times = sides.map(() => []);
  for (let r = 0; r < ROUNDS + 2; r++) {
    const order = sides.map((_, k) => k);
    for (const k of r % 2 ? order.reverse() : order) {
      rmSync(out, { force: true });
      const t = now();
      const p = spawnSync(sides[k][1], sides[k][2], { encoding: "utf8" });
      if (p.status !== 0) throw new Error(`${sides[k][0]} failed: ${p.stderr}`);
      times[k].push(now() - t);
    }
  }
  rmSync(out, { force: true });
  printTable(
    ["process", "best ms"],
    sides.map(([name], k) => [name, fmt(best(times[k]), 0)]),
  );
}
