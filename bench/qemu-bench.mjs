// `qcow2-img bench` against `qemu-img bench`: the same command line, run as a process by each tool
// on the same qcow2 image (every cluster allocated with data; 512 MiB, 128 MiB with --quick),
// depth 64:
//   read 4k scattered   4 KiB reads, step an odd multiple of 4 KiB near 0.618 x the disk, so the
//                       requests visit 4 KiB blocks all over the image with no locality
//   write 4k scattered  the same as writes (--pattern=0x5a), in place, on a fresh copy each run
//   read 64k sequential 64 KiB reads from the start, wrapping at the end
//   read 4k raw         the 4 KiB scattered reads on a raw copy (-f raw), for the I/O floor
// Each reports its own "Run completed in X seconds": the requests only, from the first sent to
// the last completed, not the process start nor opening the image; those times are compared.
// Rounds alternate which tool goes first; the best of each is kept. The image is in the page
// cache (read once beforehand), so the host I/O path is memory; written copies live on tmpfs when
// there is room. After the write case, qemu-img compare must find the copy each tool wrote
// identical, and qemu-img check ours clean; otherwise the row is a WARNING.
//
//   node bench/qemu-bench.mjs [--quick]

import { copyFileSync, rmSync } from "node:fs";
import path from "node:path";
import { MiB, OUT_DIR, QUICK, best, buildOnce, fmt, fmtOps, fmtRatio, headline, printTable, qemuCheck, run, scratchDirFor, section, warmPageCache, warn } from "./_common.mjs";

const KiB = 1024;
const DISK = QUICK ? 128 * MiB : 512 * MiB;
const ROUNDS = QUICK ? 2 : 4;
const DEPTH = 64;
const CLI = new URL("../build/cli/main.js", import.meta.url).pathname;

const image = buildOnce(path.join(OUT_DIR, `qemu-bench-${DISK / MiB}m.qcow2`), (f) => {
  run("qemu-img", ["create", "-q", "-f", "qcow2", f, String(DISK)]);
  run("qemu-io", ["-c", `write -P 0x33 0 ${DISK}`, f]);
});
const raw = buildOnce(path.join(OUT_DIR, `qemu-bench-${DISK / MiB}m.raw`), (f) => run("qemu-img", ["convert", "-O", "raw", image, f]));
warmPageCache(image);
warmPageCache(raw);
const scratch = scratchDirFor(3 * DISK);

/** An odd multiple of 4 KiB near 0.618 of the disk: i * step mod disk visits every 4 KiB block once. */
function scatterStep() {
  let k = Math.floor((DISK / (4 * KiB)) * 0.6180339887);
  if (k % 2 === 0) k += 1;
  return k * 4 * KiB;
}

const cases = [
  { name: "read 4 KiB scattered", file: image, args: ["-c", QUICK ? "50000" : "200000", "-s", "4k", "-S", String(scatterStep())] },
  { name: "write 4 KiB scattered", file: image, write: true, args: ["-w", "--pattern=0x5a", "-c", QUICK ? "50000" : "150000", "-s", "4k", "-S", String(scatterStep())] },
  { name: "read 64 KiB sequential", file: image, args: ["-c", QUICK ? "5000" : "20000", "-s", "64k"] },
  { name: "read 4 KiB scattered, raw", file: raw, raw: true, args: ["-f", "raw", "-c", QUICK ? "50000" : "200000", "-s", "4k", "-S", String(scatterStep())] },
];

/** One run: the tool's own time for the requests, in ms. */
function once(side, c, file) {
  const args = ["bench", "-d", String(DEPTH), ...c.args, file];
  const r = side === "ours" ? run(process.execPath, [CLI, ...args]) : run("qemu-img", args);
  const m = /^Run completed in ([\d.]+) seconds\.$/m.exec(r.stdout);
  if (!m) throw new Error(`${side} bench: unexpected output: ${r.stdout}`);
  return { ms: Number(m[1]) * 1000, first: r.stdout.split("\n")[0] };
}

section(`bench, depth ${DEPTH}, ${DISK / MiB} MiB image (every cluster allocated): qcow2-img bench vs qemu-img bench`);
const rows = [];
for (const c of cases) {
  const files = { ours: path.join(scratch, `qemu-bench-ours${c.raw ? ".raw" : ".qcow2"}`), qemu: path.join(scratch, `qemu-bench-qemu${c.raw ? ".raw" : ".qcow2"}`) };
  const times = { ours: [], qemu: [] };
  let firstLines;
  for (let round = 0; round < ROUNDS; round++) {
    for (const side of round % 2 ? ["qemu", "ours"] : ["ours", "qemu"]) {
      // Writes change the image: every write run gets a fresh copy, made before the clock starts.
      const file = c.write ? files[side] : c.file;
      if (c.write) copyFileSync(c.file, file);
      const r = once(side, c, file);
      times[side].push(r.ms);
      firstLines ??= {};
      firstLines[side] = r.first;
    }
  }
  if (firstLines.ours !== firstLines.qemu) {
    warn(`bench ${c.name}`, `reports differ: "${firstLines.ours}" vs "${firstLines.qemu}"`, "");
    continue;
  }
  if (c.write) {
    const same = run("qemu-img", ["compare", "-q", "-f", "qcow2", "-F", "qcow2", files.ours, files.qemu], { allowFail: true }).status === 0;
    const checked = qemuCheck(files.ours);
    for (const f of Object.values(files)) rmSync(f, { force: true });
    if (!same || checked.problem) {
      warn(`bench ${c.name}`, `our image ${same ? "" : "differs from qemu's"} ${checked.problem ?? ""}`, "");
      continue;
    }
  }
  const count = Number(c.args[c.args.indexOf("-c") + 1]);
  const o = best(times.ours);
  const q = best(times.qemu);
  rows.push([c.name, String(count), `${fmt(o, 0)} ms`, `${fmt(q, 0)} ms`, fmtOps((count * 1000) / o), fmtOps((count * 1000) / q), fmtRatio(q / o)]);
  headline(`bench ${c.name}, ${count} requests, depth ${DEPTH}, ${DISK / MiB} MiB ${c.raw ? "raw" : "qcow2"}: qcow2-img vs qemu-img bench (run time)`, `${fmt(o, 0)} ms`, `${fmt(q, 0)} ms`, fmtRatio(q / o));
}
printTable(["case", "requests", "qcow2-img", "qemu-img", "ours IOPS", "qemu IOPS", "speed ratio"], rows);
console.log("\nspeed ratio = qemu's time / ours: above 1 means qcow2-img bench finished the same requests sooner.");
