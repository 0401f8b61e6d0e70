// Two choices the read path makes, measured with benchmark.js:
//  1. NodeFileBackend { sync: true } (fs.readSync) vs { sync: false } (FileHandle.read on the
//     libuv thread pool): 4 KiB, 64 KiB and 1 MiB reads at random aligned positions of a 256 MiB
//     file, page cache warm. fs.readSync without the backend is printed for reference.
//  2. Inflating one 64 KiB compressed cluster: NodeZlibInflater (node:zlib) vs PakoInflater, on a
//     stream made the way qemu makes them (raw deflate, 4 KiB window, memLevel 9) and followed by
//     the bytes of the next cluster, as an image read hands it over. Two prototypes of cheaper
//     node:zlib use are measured beside them (see the notes printed at the end).
//
//   node bench/io-backend.mjs [--quick]

import Benchmark from "benchmark";
import crypto from "node:crypto";
import { closeSync, existsSync, openSync, readSync, renameSync, writeSync } from "node:fs";
import path from "node:path";
import zlib from "node:zlib";
import { NodeFileBackend } from "../build/node.js";
import { PakoInflater } from "../build/codecs/deflate.js";
import { NodeZlibInflater } from "../build/codecs/node-zlib.js";
import { HandleZlibInflater, OneChunkZlibInflater } from "./_proto-inflaters.mjs";
import {
  MiB,
  OUT_DIR,
  QUICK,
  fillText,
  fmt,
  fmtOps,
  fmtRatio,
  headline,
  median,
  printTable,
  rng32,
  section,
  warmPageCache,
} from "./_common.mjs";

const MAX_TIME = QUICK ? 0.1 : 1;
const MIN_SAMPLES = QUICK ? 5 : 20;
const FILE_SIZE = 256 * MiB;
const CLUSTER = 64 * 1024;

/** Ops per second from the median sample: steadier than the mean on a shared machine. */
const medianHz = (b) => 1 / median(b.stats.sample);

/** Run benchmark.js cases (deferred ones finish asynchronously); resolves to the benchmarks by name. */
function runSuite(cases) {
  return new Promise((resolve, reject) => {
    const out = {};
    const suite = new Benchmark.Suite();
    for (const c of cases) suite.add(c.name, { maxTime: MAX_TIME, minSamples: MIN_SAMPLES, ...c.bench });
    suite
      .on("cycle", (e) => {
        if (e.target.error) reject(e.target.error);
        out[e.target.name] = e.target;
      })
      .on("complete", () => resolve(out))
      .run({ async: true });
  });
}

// ---- 1. File backend ------------------------------------------------------------------------

function ensureFile() {
  const file = path.join(OUT_DIR, "io-256m.bin");
  if (existsSync(file)) return file;
  const cipher = crypto.createCipheriv("aes-128-ctr", Buffer.alloc(16, 9), Buffer.alloc(16, 0));
  const zeros = Buffer.alloc(16 * MiB);
  const fd = openSync(`${file}.tmp`, "w");
  for (let pos = 0; pos < FILE_SIZE; pos += zeros.length) writeSync(fd, cipher.update(zeros), 0, zeros.length, pos);
  closeSync(fd);
  renameSync(`${file}.tmp`, file);
  return file;
}

const file = ensureFile();
warmPageCache(file);
console.log(`# Node file backend and inflaters${QUICK ? " (quick)" : ""}`);
console.log(`${path.relative(process.cwd(), file)}: ${FILE_SIZE / MiB} MiB, page cache warm; node ${process.version}`);

const syncBackend = await NodeFileBackend.open(file, { sync: true });
const asyncBackend = await NodeFileBackend.open(file, { sync: false });
const rawFd = openSync(file, "r");

const ioRows = [];
const ioHeadlines = [];
for (const size of [4096, 64 * 1024, 1 * MiB]) {
  // Each op is a batch of reads, awaited one after another as the read engine does.
  const batch = size >= MiB ? 8 : 64;
  const next = rng32(size);
  const slots = FILE_SIZE / size;
  const positions = Array.from({ length: 4096 }, () => (next() % slots) * size);
  const dst = new Uint8Array(size);
  let k = 0;
  let sink = 0;
  const backendCase = (name, backend) => ({
    name,
    bench: {
      defer: true,
      fn: async (deferred) => {
        for (let i = 0; i < batch; i++) {
          sink += await backend.read(dst, positions[k++ & 4095]);
        }
        deferred.resolve();
      },
    },
  });
  const r = await runSuite([
    backendCase("sync: true", syncBackend),
    backendCase("sync: false", asyncBackend),
    {
      name: "fs.readSync",
      bench: {
        fn: () => {
          for (let i = 0; i < batch; i++) sink += readSync(rawFd, dst, 0, size, positions[k++ & 4095]);
        },
      },
    },
  ]);
  if (sink === 0) throw new Error("nothing read");
  const readsPerSec = (name) => medianHz(r[name]) * batch;
  const us = (name) => 1e6 / readsPerSec(name);
  const mibs = (name) => (readsPerSec(name) * size) / MiB;
  const label = size >= MiB ? `${size / MiB} MiB` : `${size / 1024} KiB`;
  ioRows.push([
    label,
    `${fmt(us("sync: true"), 1)} µs`,
    `${fmt(us("sync: false"), 1)} µs`,
    `${fmt(us("fs.readSync"), 1)} µs`,
    fmt(mibs("sync: true"), 0),
    fmt(mibs("sync: false"), 0),
    fmtRatio(readsPerSec("sync: true") / readsPerSec("sync: false")),
    fmtRatio(readsPerSec("sync: true") / readsPerSec("fs.readSync")),
    `±${fmt(Math.max(...Object.values(r).map((b) => b.stats.rme)), 1)}%`,
  ]);
  ioHeadlines.push([label, us("sync: true"), us("sync: false"), readsPerSec("sync: true") / readsPerSec("sync: false")]);
}
await syncBackend.close();
await asyncBackend.close();
closeSync(rawFd);

section("NodeFileBackend.read at random aligned positions (per read, median sample)");
printTable(
  ["read size", "sync: true", "sync: false", "fs.readSync", "sync MiB/s", "async MiB/s", "sync/async", "backend/readSync"],
  ioRows.map((row) => row.slice(0, 8)),
);
console.log(`\nratio > 1: the first is faster. max rme per size: ${ioRows.map((r) => `${r[0]} ${r[8]}`).join(", ")}`);
for (const [label, s, a, ratio] of ioHeadlines) {
  headline(`NodeFileBackend ${label} random read: sync: true vs sync: false`, `${fmt(s, 1)} µs`, `${fmt(a, 1)} µs`, fmtRatio(ratio));
}

// ---- 2. Inflating a compressed cluster ------------------------------------------------------

/** A cluster as qemu compresses it (qcow2_co_compress: raw deflate, window 12, memLevel 9). */
function compressedCluster(data, trailer) {
  const stream = zlib.deflateRawSync(data, { windowBits: 12, memLevel: 9 });
  // An image read takes whole 512-byte sectors, so the next cluster's first bytes come along.
  const padded = Math.ceil((stream.length + 1) / 512) * 512;
  const src = new Uint8Array(padded);
  src.set(stream);
  src.set(trailer.subarray(0, padded - stream.length), stream.length);
  return { src, streamLength: stream.length };
}

const textCluster = new Uint8Array(CLUSTER);
fillText(textCluster, rng32(77));
// Mostly zeros with a few kilobytes of text: a filesystem metadata or half-filled cluster.
const sparseCluster = new Uint8Array(CLUSTER);
{
  const piece = new Uint8Array(6000);
  fillText(piece, rng32(78));
  sparseCluster.set(piece, 0);
  sparseCluster.set(piece.subarray(0, 2000), 40000);
}
const trailer = compressedCluster(textCluster, new Uint8Array(512)).src;

const inflaters = [
  ["node:zlib (NodeZlibInflater)", new NodeZlibInflater()],
  ["pako (PakoInflater)", new PakoInflater()],
  ["proto: zlib, chunkSize 64 KiB", new OneChunkZlibInflater()],
  ["proto: zlib handle into dst", new HandleZlibInflater()],
];

const zRows = [];
const zHeadlines = [];
for (const [dataName, data] of [
  ["text", textCluster],
  ["mostly zero", sparseCluster],
]) {
  const { src, streamLength } = compressedCluster(data, trailer);
  const dst = new Uint8Array(CLUSTER);
  for (const [name, inf] of inflaters) {
    dst.fill(0xee);
    if (!inf.inflate(src, dst) || Buffer.compare(dst, data) !== 0) throw new Error(`${name} does not inflate the ${dataName} cluster`);
  }
  const r = await runSuite(inflaters.map(([name, inf]) => ({ name, bench: { fn: () => inf.inflate(src, dst) } })));
  const hz = (name) => medianHz(r[name]);
  const base = hz("pako (PakoInflater)");
  for (const [name] of inflaters) {
    zRows.push([
      `${dataName} (${fmt(CLUSTER / streamLength, 1)}:1)`,
      name,
      fmtOps(hz(name)),
      `${fmt(1e6 / hz(name), 1)} µs`,
      fmt((hz(name) * CLUSTER) / MiB, 0),
      fmtRatio(hz(name) / base),
      `±${fmt(r[name].stats.rme, 1)}%`,
    ]);
  }
  zHeadlines.push([dataName, hz("node:zlib (NodeZlibInflater)"), base, hz("proto: zlib handle into dst")]);
}

section("Inflate one 64 KiB cluster (median sample)");
printTable(["cluster", "inflater", "ops/s", "per cluster", "MiB/s out", "vs pako", "rme"], zRows);
console.log(
  `\nratio > 1: faster than PakoInflater. The "proto:" rows are not library code: they measure` +
    `\nnode:zlib with one output chunk per cluster, and one native zlib handle reused, inflating into dst.`,
);
for (const [dataName, zhz, phz, reusedHz] of zHeadlines) {
  headline(`Inflate a 64 KiB ${dataName} cluster: NodeZlibInflater vs PakoInflater`, `${fmt(1e6 / zhz, 1)} µs`, `${fmt(1e6 / phz, 1)} µs`, fmtRatio(zhz / phz));
  headline(
    `Inflate a 64 KiB ${dataName} cluster: node:zlib handle reused, into dst (prototype) vs NodeZlibInflater`,
    `${fmt(1e6 / reusedHz, 1)} µs`,
    `${fmt(1e6 / zhz, 1)} µs`,
    fmtRatio(reusedHz / zhz),
  );
}
