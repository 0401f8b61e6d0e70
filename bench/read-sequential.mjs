// Sequential whole-disk reads: our Qcow2Image against `qemu-img convert -O raw`, side by side.
//
// For each image (fully allocated pseudo-random data; compressed text), every round runs each of
// these once, the order rotated from round to round:
//   qemu     `qemu-img convert -O raw img out.raw` as a child process (out.raw removed before each run)
//   read     open, image.read(pos, buf) over the whole guest disk into one reused buffer, close
//   convert  the same, plus fs.writeSync of every chunk to an output file (like-for-like with qemu)
//   sparse   convert, but 64 KiB blocks that are all zero are not written (qemu's -S default does this)
// at 1, 4 and 16 MiB chunks; for the compressed image also reads with the prototype inflaters of
// bench/_proto-inflaters.mjs. The first round warms everything and is dropped; best of the rest.
// Our converted output is checked byte for byte against qemu-img's.
// Outputs go to tmpfs (/dev/shm) so neither side is timed against disk writeback. qemu's time
// includes starting its process (a few ms); ours includes open and close, not Node's start-up.
//
//   node bench/read-sequential.mjs [--quick]

import { spawnSync } from "node:child_process";
import crypto from "node:crypto";
import {
  closeSync,
  existsSync,
  ftruncateSync,
  openSync,
  readSync,
  renameSync,
  rmSync,
  statSync,
  writeSync,
} from "node:fs";
import path from "node:path";
import { Qcow2Image, registerPlatform } from "../build/node.js";
import { NodeZlibInflater } from "../build/codecs/node-zlib.js";
import { HandleZlibInflater, OneChunkZlibInflater } from "./_proto-inflaters.mjs";
import {
  GiB,
  MiB,
  OUT_DIR,
  QUICK,
  SCRATCH_DIR,
  best,
  fillText,
  fmt,
  fmtRatio,
  headline,
  median,
  now,
  printTable,
  rng32,
  section,
  warmPageCache,
} from "./_common.mjs";

const ROUNDS = QUICK ? 3 : 6; // the first is dropped
const CHUNKS = [1 * MiB, 4 * MiB, 16 * MiB];
const SPARSE_BLOCK = 64 * 1024;

function run(cmd, args) {
  const r = spawnSync(cmd, args, { encoding: "utf8" });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(" ")} failed (${r.status}): ${r.stderr}`);
  return r.stdout;
}

/** Write `size` bytes produced by `fill(buf)` per 16 MiB to `file`. */
function writeRaw(file, size, fill) {
  const fd = openSync(file, "w");
  const buf = Buffer.alloc(16 * MiB);
  for (let pos = 0; pos < size; pos += buf.length) {
    const n = Math.min(buf.length, size - pos);
    fill(buf);
    writeSync(fd, buf, 0, n, pos);
  }
  closeSync(fd);
}

/** Build (once, cached in bench/out) a qcow2 image from generated raw data. */
function ensureImage(name, size, kind) {
  const img = path.join(OUT_DIR, name);
  if (existsSync(img)) return img;
  const t0 = now();
  const raw = path.join(SCRATCH_DIR, `${name}.raw`);
  if (kind === "random") {
    // AES-CTR keystream: deterministic, incompressible, gigabytes per second.
    const cipher = crypto.createCipheriv("aes-128-ctr", Buffer.alloc(16, 7), Buffer.alloc(16, 0));
    const zeros = Buffer.alloc(16 * MiB);
    writeRaw(raw, size, (buf) => cipher.update(zeros).copy(buf));
  } else {
    const next = rng32(2024);
    writeRaw(raw, size, (buf) => fillText(buf, next));
  }
  const tmp = `${img}.tmp`;
  run("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", ...(kind === "text" ? ["-c"] : []), raw, tmp]);
  rmSync(raw, { force: true });
  renameSync(tmp, img);
  console.log(`made ${path.relative(process.cwd(), img)} in ${fmt((now() - t0) / 1000, 1)} s`);
  return img;
}

function describeImage(img) {
  const info = JSON.parse(run("qemu-img", ["info", "--output=json", img]));
  const map = JSON.parse(run("qemu-img", ["map", "--output=json", img]));
  const dataBytes = map.filter((e) => e.data && !e.zero).reduce((s, e) => s + e.length, 0);
  return {
    virtualSize: info["virtual-size"],
    fileSize: statSync(img).size,
    clusterSize: info["cluster-size"],
    allocatedFraction: dataBytes / info["virtual-size"],
  };
}

function qemuConvert(img, out) {
  rmSync(out, { force: true });
  const t0 = now();
  run("qemu-img", ["convert", "-f", "qcow2", "-O", "raw", img, out]);
  return now() - t0;
}

async function ourRead(img, chunk, createInflater) {
  if (createInflater) registerPlatform({ createInflater });
  const t0 = now();
  const image = await Qcow2Image.open(img);
  const size = image.virtualSize;
  const buf = new Uint8Array(chunk);
  let check = 0;
  for (let pos = 0; pos < size; pos += chunk) {
    const n = Math.min(chunk, size - pos);
    await image.read(pos, n === chunk ? buf : buf.subarray(0, n));
    check ^= buf[n - 1];
  }
  await image.close();
  const ms = now() - t0;
  if (createInflater) registerPlatform({ createInflater: () => new NodeZlibInflater() });
  if (check === 256) throw new Error("unreachable");
  return ms;
}

const zeroBlock = Buffer.alloc(SPARSE_BLOCK);

/** Write `buf` at `pos`, skipping SPARSE_BLOCK-sized blocks that are all zero; nonzero blocks coalesce. */
function writeSparse(fd, buf, pos) {
  const b = Buffer.from(buf.buffer, buf.byteOffset, buf.length);
  let runStart = -1;
  for (let off = 0; off < b.length; off += SPARSE_BLOCK) {
    const end = Math.min(off + SPARSE_BLOCK, b.length);
    const zero = b.compare(zeroBlock, 0, end - off, off, end) === 0;
    if (!zero && runStart < 0) runStart = off;
    if (zero && runStart >= 0) {
      writeAll(fd, b, runStart, off, pos);
      runStart = -1;
    }
  }
  if (runStart >= 0) writeAll(fd, b, runStart, b.length, pos);
}

function writeAll(fd, b, start, end, pos) {
  while (start < end) start += writeSync(fd, b, start, end - start, pos + start);
}

async function ourConvert(img, out, chunk, sparse) {
  rmSync(out, { force: true });
  const t0 = now();
  const image = await Qcow2Image.open(img);
  const size = image.virtualSize;
  const fd = openSync(out, "w");
  const buf = new Uint8Array(chunk);
  for (let pos = 0; pos < size; pos += chunk) {
    const n = Math.min(chunk, size - pos);
    const part = n === chunk ? buf : buf.subarray(0, n);
    await image.read(pos, part);
    if (sparse) writeSparse(fd, part, pos);
    else writeAll(fd, part, 0, n, pos);
  }
  if (sparse) ftruncateSync(fd, size);
  closeSync(fd);
  await image.close();
  return now() - t0;
}

function sameContents(a, b) {
  if (statSync(a).size !== statSync(b).size) return false;
  const fa = openSync(a, "r");
  const fb = openSync(b, "r");
  const ba = Buffer.allocUnsafe(16 * MiB);
  const bb = Buffer.allocUnsafe(16 * MiB);
  try {
    for (let pos = 0; ; pos += ba.length) {
      const na = readSync(fa, ba, 0, ba.length, pos);
      const nb = readSync(fb, bb, 0, bb.length, pos);
      if (na !== nb) return false;
      if (na === 0) return true;
      if (ba.compare(bb, 0, nb, 0, na) !== 0) return false;
    }
  } finally {
    closeSync(fa);
    closeSync(fb);
  }
}

const label = (c) => `${c / MiB} MiB`;

async function measure(title, img, { compressed = false } = {}) {
  const facts = describeImage(img);
  section(title);
  console.log(
    `${path.relative(process.cwd(), img)}: virtual ${facts.virtualSize / MiB} MiB, file ${fmt(facts.fileSize / MiB, 1)} MiB, ` +
      `cluster ${facts.clusterSize / 1024} KiB, ${fmt(facts.allocatedFraction * 100, 1)}% of the guest is data`,
  );
  warmPageCache(img);
  const qemuOut = path.join(SCRATCH_DIR, "qemu-out.raw");
  const ourOut = path.join(SCRATCH_DIR, "ours-out.raw");

  const variants = [{ key: "qemu", name: "qemu-img convert -O raw", fn: () => qemuConvert(img, qemuOut) }];
  for (const c of CHUNKS) variants.push({ key: `read:${c}`, name: `ours read, ${label(c)} chunks`, fn: () => ourRead(img, c) });
  for (const c of CHUNKS) {
    variants.push({ key: `convert:${c}`, name: `ours convert, ${label(c)} chunks`, fn: () => ourConvert(img, ourOut, c, false) });
  }
  for (const c of CHUNKS) {
    variants.push({ key: `sparse:${c}`, name: `ours convert sparse, ${label(c)} chunks`, fn: () => ourConvert(img, ourOut, c, true) });
  }

  if (compressed) {
    // What the suggested NodeZlibInflater changes would buy here (bench/_proto-inflaters.mjs).
    const c = 1 * MiB;
    variants.push({ key: "proto:chunk", name: `ours read, ${label(c)}, proto inflater: chunkSize`, fn: () => ourRead(img, c, () => new OneChunkZlibInflater()) });
    variants.push({ key: "proto:handle", name: `ours read, ${label(c)}, proto inflater: reused handle`, fn: () => ourRead(img, c, () => new HandleZlibInflater()) });
  }

  const times = new Map(variants.map((v) => [v.key, []]));
  for (let round = 0; round < ROUNDS; round++) {
    // Rotate the order each round so no variant always follows the same one.
    for (let k = 0; k < variants.length; k++) {
      const v = variants[(k + round) % variants.length];
      const ms = await v.fn();
      if (round > 0) times.get(v.key).push(ms);
    }
  }
  const identical = sameContents(qemuOut, ourOut);
  rmSync(qemuOut, { force: true });
  rmSync(ourOut, { force: true });
  if (!identical) throw new Error(`${img}: our converted output differs from qemu-img's`);

  const mibs = (ms) => facts.virtualSize / MiB / (ms / 1000);
  const qemuBest = best(times.get("qemu"));
  const rows = variants.map((v) => {
    const t = times.get(v.key);
    return [
      v.name,
      fmt(best(t), 0),
      fmt(median(t), 0),
      fmt(mibs(best(t)), 0),
      v.key === "qemu" ? "1.00x" : fmtRatio(qemuBest / best(t)),
    ];
  });
  printTable(["variant", "best ms", "median ms", "MiB/s (best)", "ours/qemu"], rows);
  console.log(`\nbest of ${ROUNDS - 1} runs each (first round dropped); ratio > 1 means ours is faster; outputs identical: yes`);

  const pick = (kind) => {
    let bestKey;
    for (const c of CHUNKS) {
      const k = `${kind}:${c}`;
      if (!bestKey || best(times.get(k)) < best(times.get(bestKey))) bestKey = k;
    }
    return { key: bestKey, chunk: Number(bestKey.split(":")[1]), ms: best(times.get(bestKey)) };
  };
  const qemuCell = `${fmt(mibs(qemuBest), 0)} MiB/s`;
  for (const [kind, what] of [
    ["read", "read only"],
    ["convert", "to raw file"],
    ["sparse", "to raw file, zero-skipping"],
  ]) {
    const p = pick(kind);
    headline(
      `${title}: ${what} (ours ${label(p.chunk)} chunks) vs qemu-img convert -O raw`,
      `${fmt(mibs(p.ms), 0)} MiB/s`,
      qemuCell,
      fmtRatio(qemuBest / p.ms),
    );
  }
  if (compressed) {
    const lib = best(times.get(`read:${MiB}`));
    const proto = best(times.get("proto:handle"));
    headline(
      `${title}: read only, 1 MiB chunks, prototype inflater (reused zlib handle) vs NodeZlibInflater`,
      `${fmt(mibs(proto), 0)} MiB/s`,
      `${fmt(mibs(lib), 0)} MiB/s`,
      fmtRatio(lib / proto),
    );
  }
  const fixed = qemuFixedCost();
  console.log(
    `qemu-img's fixed cost (process start, open, create the output; converting a 1 MiB image): ${fmt(fixed, 1)} ms, ` +
      `${fmt((100 * fixed) / qemuBest, 1)}% of its best time here`,
  );
}

let tinyImg;
/** Best time of `qemu-img convert -O raw` on a 1 MiB image: what qemu pays whatever the size. */
function qemuFixedCost() {
  if (!tinyImg) {
    tinyImg = path.join(SCRATCH_DIR, "tiny.qcow2");
    run("qemu-img", ["create", "-q", "-f", "qcow2", tinyImg, "1M"]);
    run("qemu-io", ["-f", "qcow2", "-c", "write -P 0x5a 0 1M", tinyImg]);
  }
  const out = path.join(SCRATCH_DIR, "tiny.raw");
  const times = [];
  for (let i = 0; i < 6; i++) times.push(qemuConvert(tinyImg, out));
  rmSync(out, { force: true });
  return best(times.slice(1));
}

const randomSize = QUICK ? 128 * MiB : 1 * GiB;
const textSize = QUICK ? 32 * MiB : 256 * MiB;
const sizeName = (s) => (s >= GiB ? `${s / GiB}g` : `${s / MiB}m`);

console.log(`# Sequential read vs qemu-img${QUICK ? " (quick)" : ""}`);
console.log(`qemu-img: ${run("qemu-img", ["--version"]).split("\n")[0]}; node ${process.version}; scratch ${SCRATCH_DIR}`);
const randomImg = ensureImage(`seq-random-${sizeName(randomSize)}.qcow2`, randomSize, "random");
const textImg = ensureImage(`seq-text-${sizeName(textSize)}-compressed.qcow2`, textSize, "text");
const sizeLabel = (s) => (s >= GiB ? `${s / GiB} GiB` : `${s / MiB} MiB`);
await measure(`${sizeLabel(randomSize)} random data, allocated`, randomImg);
await measure(`${sizeLabel(textSize)} text, compressed`, textImg, { compressed: true });
if (tinyImg) rmSync(tinyImg, { force: true });
