// Runs every benchmark in its own process, then prints the headline rows as one Markdown table
// for the README. `npm run bench` builds first; `node bench/run.mjs --quick` is a reduced run
// (smaller images, short benchmark.js cases, fewer rounds) that finishes in about a minute.

import { spawnSync } from "node:child_process";
import { readFileSync, rmSync } from "node:fs";
import os from "node:os";
import path from "node:path";
import { BENCH_DIR, QUICK, fmt } from "./_common.mjs";

const SCRIPTS = ["read-sequential.mjs", "l2-lookup.mjs", "io-backend.mjs", "write.mjs", "write-compressed.mjs", "check.mjs", "convert.mjs", "qemu-bench.mjs", "startup.mjs", "crypto.mjs", "convert-encrypted.mjs"];

const started = performance.now();
const headlines = path.join(os.tmpdir(), `qcow2-wasm-bench-${process.pid}.jsonl`);
rmSync(headlines, { force: true });

const qemu = spawnSync("qemu-img", ["--version"], { encoding: "utf8" });
const facts = [
  `node ${process.version}`,
  `${os.availableParallelism()} CPUs (${os.cpus()[0]?.model.trim() ?? "unknown"})`,
  `${fmt(os.totalmem() / 2 ** 30, 0)} GiB RAM`,
  qemu.status === 0 ? qemu.stdout.split("\n")[0] : "qemu-img missing",
  `load average at start ${os.loadavg().map((x) => x.toFixed(2)).join(" ")}`,
];
console.log(`# qcow2-wasm benchmarks${QUICK ? " (quick)" : ""}\n\n${facts.join("; ")}\n`);

const failed = [];
for (const script of SCRIPTS) {
  const t0 = performance.now();
  const r = spawnSync(process.execPath, [path.join(BENCH_DIR, script), ...(QUICK ? ["--quick"] : [])], {
    stdio: "inherit",
    env: { ...process.env, QCOW2_BENCH_HEADLINES: headlines },
  });
  const seconds = (performance.now() - t0) / 1000;
  if (r.status !== 0) failed.push(`${script} (exit ${r.status ?? r.signal})`);
  console.log(`\n[${script}: ${fmt(seconds, 1)} s${r.status === 0 ? "" : `, FAILED with ${r.status ?? r.signal}`}]\n`);
}

let rows = [];
try {
  rows = readFileSync(headlines, "utf8")
    .split("\n")
    .filter(Boolean)
    .map((line) => JSON.parse(line));
} catch {
  // No script recorded anything.
}
rmSync(headlines, { force: true });

const escape = (s) => String(s).replaceAll("|", "\\|");
console.log(`## Summary${QUICK ? " (quick run: smaller inputs, shorter cases)" : ""}\n`);
console.log(`${facts.slice(0, 4).join("; ")}.`);
console.log(`Ratio = ours / baseline in speed: above 1 means ours is faster.\n`);
console.log("| Benchmark | Ours | Baseline | Ratio |");
console.log("| --- | ---: | ---: | ---: |");
for (const r of rows) console.log(`| ${escape(r.benchmark)} | ${escape(r.ours)} | ${escape(r.baseline)} | ${escape(r.ratio)} |`);
console.log(`\n(${fmt((performance.now() - started) / 1000, 1)} s in all)`);

if (failed.length > 0) {
  console.error(`\nfailed: ${failed.join(", ")}`);
  process.exit(1);
}
