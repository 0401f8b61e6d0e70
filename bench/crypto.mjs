// Sector encryption throughput (ts/codecs/aes-wasm.ts, ts/codecs/node-crypto.ts): one call over a
// 16 MiB run (32768 sectors, numbered from 2^32 - 1000 so runs cross 2^32), in place, for
// AES-128-CBC-plain64 (legacy qcow2 AES) and AES-256-XTS-plain64 (qemu's LUKS default).
//
// Implementations: WASM scalar and SIMD builds (bitsliced, constant-time), node:crypto as
// registered for Node (batched: see node-crypto.ts), node:crypto with one OpenSSL object per
// sector (the plain way, as a baseline), and @noble/ciphers (pure JS: CBC per sector, XTS composed
// from ECB), the test oracle. Every implementation's ciphertext is checked against the others
// first. Figures are MiB/s, best of several rounds; ratios are against WASM SIMD.
//
//   node bench/crypto.mjs [--quick]

import { cbc, ecb } from "@noble/ciphers/aes.js";
import { WasmSectorCipher } from "../build/codecs/aes-wasm.js";
import { NodeSectorCipher } from "../build/codecs/node-crypto.js";
import { QUICK, MiB, best, fmt, fmtRatio, headline, now, printTable, rng32, section, warn } from "./_common.mjs";

const SIZE = 16 * MiB;
const FIRST_SECTOR = 2 ** 32 - 1000;
const ROUNDS = QUICK ? 2 : 5;
const SLOW_ROUNDS = 1;

const ALGORITHMS = [
  ["aes-128-cbc-plain64", "CBC-128", 16],
  ["aes-256-xts-plain64", "XTS-256", 64],
];

function plain64(sector) {
  const iv = new Uint8Array(16);
  new DataView(iv.buffer).setUint32(0, sector >>> 0, true);
  new DataView(iv.buffer).setUint32(4, Math.floor(sector / 2 ** 32), true);
  return iv;
}

/** @noble/ciphers as a SectorCipher: what a pure-JS library gives without our work. */
class NobleSectorCipher {
  constructor(algorithm, key) {
    this.xts = algorithm.includes("xts");
    this.key = key;
    this.n = this.xts ? key.length / 2 : key.length;
  }
  encrypt(buf, first) {
    this.run(buf, first, true);
  }
  decrypt(buf, first) {
    this.run(buf, first, false);
  }
  run(buf, first, encrypt) {
    const tweaks = new Uint8Array(512);
    for (let at = 0, s = first; at < buf.length; at += 512, s++) {
      const sector = buf.subarray(at, at + 512);
      if (!this.xts) {
        const c = cbc(this.key, plain64(s), { disablePadding: true });
        buf.set(encrypt ? c.encrypt(sector) : c.decrypt(sector), at);
        continue;
      }
      // noble's ciphers are single-use objects: two per sector, as for CBC.
      const t = ecb(this.key.subarray(this.n), { disablePadding: true }).encrypt(plain64(s));
      for (let j = 0; j < 512; j += 16) {
        tweaks.set(t, j);
        const carry = t[15] >> 7;
        for (let i = 15; i > 0; i--) t[i] = ((t[i] << 1) | (t[i - 1] >> 7)) & 0xff;
        t[0] = ((t[0] << 1) & 0xff) ^ (carry * 0x87);
      }
      for (let i = 0; i < 512; i++) sector[i] ^= tweaks[i];
      const data = ecb(this.key.subarray(0, this.n), { disablePadding: true });
      const y = encrypt ? data.encrypt(sector) : data.decrypt(sector);
      for (let i = 0; i < 512; i++) buf[at + i] = y[i] ^ tweaks[i];
    }
  }
}

const next = rng32(0xae5);
const plain = new Uint8Array(SIZE);
{
  const words = new Uint32Array(plain.buffer);
  for (let i = 0; i < words.length; i++) words[i] = next();
}
const key = new Uint8Array(64);
for (let i = 0; i < key.length; i++) key[i] = next() & 0xff;

const IMPLEMENTATIONS = [
  ["WASM scalar", (a, k) => WasmSectorCipher.create(a, k, { variant: "scalar" }), ROUNDS],
  ["WASM SIMD", (a, k) => WasmSectorCipher.create(a, k, { variant: "simd" }), ROUNDS],
  ["node:crypto (batched, the ./node default)", async (a, k) => new NodeSectorCipher(a, k), ROUNDS],
  ["node:crypto, one object per sector", async (a, k) => new NodeSectorCipher(a, k, { strategy: "per-sector" }), ROUNDS],
  ["@noble/ciphers (pure JS)", async (a, k) => new NobleSectorCipher(a, k), SLOW_ROUNDS],
];

/** MiB/s of `fn` over the buffer, best of `rounds` after one warm-up call. */
function throughput(fn, rounds) {
  fn();
  const ms = [];
  for (let r = 0; r < rounds; r++) {
    const t = now();
    fn();
    ms.push(now() - t);
  }
  return SIZE / MiB / (best(ms) / 1000);
}

section(`sector encryption, one call over ${SIZE / MiB} MiB (MiB/s; ratio to WASM SIMD)`);
const results = new Map(); // name -> { "CBC-128 encrypt": MiB/s, ... }
const columns = [];
for (const [algorithm, label, keyBytes] of ALGORITHMS) {
  const k = key.subarray(0, keyBytes);
  let reference;
  for (const [name, make, rounds] of IMPLEMENTATIONS) {
    const cipher = await make(algorithm, k);
    const buf = plain.slice();
    cipher.encrypt(buf, FIRST_SECTOR);
    if (reference === undefined) reference = buf.slice();
    else if (Buffer.compare(buf, reference) !== 0) {
      warn(`crypto ${name} ${label}`, "ciphertext differs from WASM scalar", "n/a");
      continue;
    }
    cipher.decrypt(buf, FIRST_SECTOR);
    if (Buffer.compare(buf, plain) !== 0) {
      warn(`crypto ${name} ${label}`, "decryption does not give the plaintext back", "n/a");
      continue;
    }
    const row = results.get(name) ?? {};
    row[`${label} encrypt`] = throughput(() => cipher.encrypt(buf, FIRST_SECTOR), rounds);
    row[`${label} decrypt`] = throughput(() => cipher.decrypt(buf, FIRST_SECTOR), rounds);
    results.set(name, row);
    cipher.destroy?.();
  }
  columns.push(`${label} encrypt`, `${label} decrypt`);
}

const simd = results.get("WASM SIMD") ?? {};
const cell = (row, c) => (row[c] === undefined ? "n/a" : `${fmt(row[c], 0)} (${fmtRatio(row[c] / simd[c])})`);
printTable(
  ["implementation", ...columns],
  IMPLEMENTATIONS.map(([name]) => [name, ...columns.map((c) => cell(results.get(name) ?? {}, c))]),
);

const nodeBatched = results.get("node:crypto (batched, the ./node default)") ?? {};
const nodePerSector = results.get("node:crypto, one object per sector") ?? {};
const noble = results.get("@noble/ciphers (pure JS)") ?? {};
const mibs = (x) => (x === undefined ? "n/a" : `${fmt(x, 0)} MiB/s`);
for (const c of columns) {
  headline(`sector cipher ${c}: WASM SIMD vs @noble/ciphers`, mibs(simd[c]), mibs(noble[c]), fmtRatio(simd[c] / noble[c]));
}
for (const c of columns) {
  headline(
    `sector cipher ${c}: node:crypto batched vs one OpenSSL object per sector`,
    mibs(nodeBatched[c]),
    mibs(nodePerSector[c]),
    fmtRatio(nodeBatched[c] / nodePerSector[c]),
  );
}
