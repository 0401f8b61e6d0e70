// Shared by the bench/*.mjs scripts: flags, the cache directory, formatting, seeded data, and the
// headline rows that bench/run.mjs collects into one Markdown table.

import { spawnSync } from "node:child_process";
import { appendFileSync, existsSync, mkdirSync, openSync, readSync, closeSync, renameSync, rmSync, statfsSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

export const BENCH_DIR = path.dirname(fileURLToPath(import.meta.url));
/** Cached inputs (git-ignored). */
export const OUT_DIR = path.join(BENCH_DIR, "out");
mkdirSync(OUT_DIR, { recursive: true });

/** Scratch for converted outputs: tmpfs when there is one, so disk writeback is not what we time. */
export const SCRATCH_DIR = (() => {
  try {
    const dir = "/dev/shm/qcow2-wasm-bench";
    mkdirSync(dir, { recursive: true });
    return dir;
  } catch {
    const dir = path.join(OUT_DIR, "scratch");
    mkdirSync(dir, { recursive: true });
    return dir;
  }
})();

/** tmpfs when it has `need` bytes free, else bench/out/scratch. */
export function scratchDirFor(need) {
  try {
    const dir = "/dev/shm/qcow2-wasm-bench";
    mkdirSync(dir, { recursive: true });
    const s = statfsSync(dir);
    if (s.bavail * s.bsize >= need) return dir;
  } catch {
    // No /dev/shm.
  }
  const dir = path.join(OUT_DIR, "scratch");
  mkdirSync(dir, { recursive: true });
  return dir;
}

/** Run a command; throw with its stderr when it fails (unless allowFail). */
export function run(cmd, args, { allowFail = false } = {}) {
  const r = spawnSync(cmd, args, { encoding: "utf8" });
  if (r.status !== 0 && !allowFail) throw new Error(`${cmd} ${args.join(" ")} failed (${r.status}): ${r.stderr}`);
  return r;
}

export const QUICK = process.argv.includes("--quick");

export const MiB = 1024 * 1024;
export const GiB = 1024 * MiB;

/** Deterministic pseudo-random generator (mulberry32), returns uint32. */
export function rng32(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  };
}

/**
 * Fill `buf` with word-like text from a fixed vocabulary (Zipf-ish word choice): compresses about
 * 3:1 with deflate, never has an all-zero sector. `next` is an rng32.
 */
export function fillText(buf, next) {
  const vocab = textVocabulary();
  let i = 0;
  while (i < buf.length) {
    const r = next();
    // Squaring a uniform index skews toward the front of the vocabulary.
    const u = (r & 0xffff) / 0x10000;
    const word = vocab[Math.floor(u * u * vocab.length)];
    for (let k = 0; k < word.length && i < buf.length; k++) buf[i++] = word[k];
    if (i < buf.length) buf[i++] = (r >>> 16) % 13 === 0 ? 10 : 32;
  }
}

let vocabulary;
function textVocabulary() {
  if (vocabulary) return vocabulary;
  const next = rng32(12345);
  vocabulary = [];
  for (let w = 0; w < 2048; w++) {
    const len = 2 + (next() % 9);
    const word = new Uint8Array(len);
    for (let k = 0; k < len; k++) word[k] = 97 + (next() % 26);
    vocabulary.push(word);
  }
  return vocabulary;
}

/** Read a file once so that the page cache holds it. */
export function warmPageCache(file) {
  const fd = openSync(file, "r");
  const buf = Buffer.allocUnsafe(16 * MiB);
  let pos = 0;
  for (;;) {
    const n = readSync(fd, buf, 0, buf.length, pos);
    if (n <= 0) break;
    pos += n;
  }
  closeSync(fd);
}

export function now() {
  return performance.now();
}

export function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

export function best(xs) {
  return Math.min(...xs);
}

export function fmt(x, digits = 1) {
  return x.toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

export function fmtOps(x) {
  if (x >= 1e6) return `${fmt(x / 1e6, 2)} M`;
  if (x >= 1e3) return `${fmt(x / 1e3, 1)} k`;
  return fmt(x, 0);
}

export function fmtRatio(r) {
  return `${r.toFixed(2)}x`;
}

/** Print rows as an aligned plain-text table. */
export function printTable(header, rows) {
  const all = [header, ...rows].map((r) => r.map(String));
  const widths = header.map((_, c) => Math.max(...all.map((r) => r[c].length)));
  const line = (r) => r.map((cell, c) => (c === 0 ? cell.padEnd(widths[c]) : cell.padStart(widths[c]))).join("  ");
  console.log(line(all[0]));
  console.log(widths.map((w) => "-".repeat(w)).join("  "));
  for (const r of all.slice(1)) console.log(line(r));
}

/**
 * Record a headline row for bench/run.mjs (a JSON line in $QCOW2_BENCH_HEADLINES when set).
 * `ratio` is ours/baseline in the direction where > 1 means we are faster.
 */
export function headline(benchmark, ours, baseline, ratio) {
  const file = process.env.QCOW2_BENCH_HEADLINES;
  if (file) appendFileSync(file, JSON.stringify({ benchmark, ours, baseline, ratio }) + "\n");
}

export function section(title) {
  console.log(`\n## ${title}\n`);
}

/**
 * `qemu-img check --output=json` of an image we wrote: { problem, facts }, problem undefined when
 * it is clean (and, with requireCompressed, holds compressed clusters).
 */
export function qemuCheck(file, { requireCompressed = false } = {}) {
  const r = run("qemu-img", ["check", "--output=json", file], { allowFail: true });
  let facts;
  try {
    facts = JSON.parse(r.stdout);
  } catch {
    return { problem: `exit ${r.status}: ${r.stderr.trim() || r.stdout.trim()}` };
  }
  const problems = ["check-errors", "corruptions", "leaks"].filter((k) => facts[k]).map((k) => `${k} ${facts[k]}`);
  if (requireCompressed && !(facts["compressed-clusters"] > 0)) problems.push("no compressed clusters");
  if (r.status !== 0 || problems.length) {
    return { problem: `exit ${r.status}${problems.length ? `: ${problems.join(", ")}` : ""} ${r.stderr.trim()}`.trim(), facts };
  }
  return { facts };
}

/** Benchmarks whose result could not be trusted; each is also a WARNING headline row. */
export const warnings = [];

export function warn(benchmark, ours, baseline) {
  console.log(`WARNING: ${benchmark}: ${ours}`);
  warnings.push(benchmark);
  headline(`WARNING: ${benchmark}`, ours, baseline, "n/a");
}

/** `file` made once by `make(tmpPath)` and kept (bench/out caches inputs between runs). */
export function buildOnce(file, make) {
  if (existsSync(file)) return file;
  const tmp = `${file}.tmp`;
  rmSync(tmp, { force: true });
  make(tmp);
  renameSync(tmp, file);
  return file;
}
