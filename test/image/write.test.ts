// Randomized differential test of the write engine: mixed writes, compressed writes, zero-writes and discards,
// unaligned and cross-cluster, up to 32 in flight with overlaps, against a plain in-memory model.
// Afterwards every byte matches the model, qemu-img check finds nothing, and qemu-img compare
// says the image equals the model's raw file. Fixed seeds; QCOW2_LONG=1 runs 10x the operations.

import { execFileSync } from "node:child_process";
import { readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { expect, it } from "vitest";
import { Qcow2Image } from "../../ts/node.js";
import { describeQemu, qemuImg, rng, tempDir } from "../helpers/qemu.js";

const LONG = !!process.env.QCOW2_LONG;

interface Config {
  version: 2 | 3;
  clusterSize: number;
  refcountBits: number;
  backing: boolean;
  lazy: boolean;
}

function configs(): Config[] {
  const out: Config[] = [];
  for (const version of [3, 2] as const) {
    for (const clusterSize of [512, 4096, 65536, 2 << 20]) {
      for (const refcountBits of version === 2 ? [16] : [1, 16, 64]) {
        for (const backing of [false, true]) {
          for (const lazy of version === 2 ? [false] : [false, true]) {
            out.push({ version, clusterSize, refcountBits, backing, lazy });
          }
        }
      }
    }
  }
  return out;
}

function label(c: Config): string {
  return `v${c.version} c${c.clusterSize} r${c.refcountBits}${c.backing ? " backing" : ""}${c.lazy ? " lazy" : ""}`;
}

function fill(rand: () => number, length: number): Uint8Array {
  const out = new Uint8Array(length);
  const seed = (rand() * 0xffffffff) >>> 0;
  for (let i = 0; i < length; i++) out[i] = (seed + i * 131 + (i >> 9) * 7) & 0xff;
  return out;
}

function firstDifference(a: Uint8Array, b: Uint8Array): number {
  for (let i = 0; i < Math.max(a.length, b.length); i++) if (a[i] !== b[i]) return i;
  return -1;
}

async function runWorkload(dir: string, c: Config, seed: number): Promise<void> {
  const size = c.clusterSize >= 2 << 20 ? 32 << 20 : c.clusterSize === 512 ? 3 << 20 : 12 << 20;
  const name = `w-${c.version}-${c.clusterSize}-${c.refcountBits}-${c.backing ? 1 : 0}${c.lazy ? 1 : 0}`;
  const file = path.join(dir, `${name}.qcow2`);
  const model = new Uint8Array(size);
  let backingData = new Uint8Array(size);
  if (c.backing) {
    // A qcow2 base shorter than the overlay, with data qemu wrote.
    const base = path.join(dir, `${name}-base.qcow2`);
    qemuImg(["create", "-f", "qcow2", "-o", `cluster_size=${Math.min(c.clusterSize, 65536)}`, base, String(size / 2)]);
    const src = path.join(dir, `${name}-src`);
    writeFileSync(src, fill(rng(seed ^ 0x5151), size / 2));
    execFileSync("qemu-io", ["-c", `write -s ${src} 0 ${size / 2 - 4096}`, base]);
    backingData = new Uint8Array(size);
    backingData.set(readFileSync(src).subarray(0, size / 2 - 4096));
    model.set(backingData);
  }
  const image = await Qcow2Image.create(file, {
    size,
    version: c.version,
    clusterSize: c.clusterSize,
    refcountBits: c.refcountBits,
    lazyRefcounts: c.lazy,
    ...(c.backing ? { backingFile: `${name}-base.qcow2`, backingFormat: "qcow2" } : {}),
  });
  const rand = rng(seed);
  const cs = c.clusterSize;
  const ops = (LONG ? 10 : 1) * (c.clusterSize === 512 ? 260 : c.clusterSize >= 2 << 20 ? 120 : 200);
  let pending: Promise<void>[] = [];
  for (let i = 0; i < ops; i++) {
    const r = rand();
    const big = rand() < 0.1;
    const length = Math.max(1, Math.floor(rand() * (big ? Math.min(Math.max(40 * cs, 300 * 512), 6 << 20) : 3 * cs)) + (rand() < 0.3 ? 0 : Math.floor(rand() * 700)));
    const start = Math.min(size - 1, Math.floor(rand() * size));
    const len = Math.min(length, size - start);
    if (r < 0.56) {
      const data = fill(rand, len);
      model.set(data, start);
      pending.push(image.write(start, data));
    } else if (r < 0.64) {
      // Whole clusters, compressed: compressible data, or random data that is stored plainly.
      const first = Math.floor(start / cs) * cs;
      const bytes = Math.min(size - first, Math.max(cs, Math.floor(len / cs) * cs));
      const data = rand() < 0.7 ? fill(rand, bytes).map((b, i) => (i % 64 < 48 ? 0x41 : b)) : fill(rand, bytes).map((b, i) => (b * (i + 7) * 2654435761) >>> 24);
      model.set(data, first);
      pending.push(image.writeCompressed(first, data));
    } else if (r < 0.82) {
      model.fill(0, start, start + len);
      pending.push(image.writeZeroes(start, len, { mayUnmap: rand() < 0.5 }));
    } else {
      const s = Math.ceil(start / cs) * cs;
      const e = Math.floor((start + len) / cs) * cs;
      if (e > s) {
        if (c.version >= 3) model.fill(0, s, e);
        else model.set(backingData.subarray(s, e), s);
      }
      pending.push(image.discard(start, len));
    }
    if (pending.length >= 1 + Math.floor(rand() * 32)) {
      await Promise.all(pending);
      pending = [];
      if (rand() < 0.1) await image.flush();
    }
  }
  await Promise.all(pending);
  expect(firstDifference(await image.read(0, size), model)).toBe(-1);
  await image.close();

  await using reopened = await Qcow2Image.open(file);
  expect(firstDifference(await reopened.read(0, size), model)).toBe(-1);
  const check = JSON.parse(qemuImg(["check", "--output=json", file])) as Record<string, number>;
  expect({ corruptions: check.corruptions ?? 0, leaks: check.leaks ?? 0, "check-errors": check["check-errors"] }).toEqual({
    corruptions: 0,
    leaks: 0,
    "check-errors": 0,
  });
  const raw = path.join(dir, `${name}.raw`);
  writeFileSync(raw, model);
  expect(qemuImg(["compare", "-f", "qcow2", "-F", "raw", file, raw])).toContain("Images are identical.");
}

describeQemu("randomized writes against a model", () => {
  const dir = tempDir("qcow2-write-");
  for (const [i, c] of configs().entries()) {
    it(label(c), async () => {
      await runWorkload(dir, c, 1000 + i);
    }, 120_000);
  }
});

it("does not pack a compressed cluster into a host cluster freed and reused since the last one", async () => {
  const { MemoryBackend } = await import("../../ts/index.js");
  const cs = 65536;
  const backend = new MemoryBackend();
  const image = await Qcow2Image.create(backend, { size: 16 * cs, clusterSize: cs });
  const text = new Uint8Array(cs).map((_, i) => 65 + (i % 7));
  await image.writeCompressed(0, text); // packed into a fresh host cluster, room left after it
  await image.write(0, new Uint8Array(cs).fill(1)); // replaces it: the host cluster is released
  await image.flush(); // ...and free from here on
  const other = new Uint8Array(cs).fill(2);
  await image.write(5 * cs, other); // may take the freed host cluster
  const more = new Uint8Array(cs).map((_, i) => 97 + (i % 5));
  await image.writeCompressed(9 * cs, more);
  expect(Buffer.compare(await image.read(5 * cs, cs), other)).toBe(0);
  expect(Buffer.compare(await image.read(9 * cs, cs), more)).toBe(0);
  await image.close();
  await using again = await Qcow2Image.open(new MemoryBackend(backend.bytes().slice(), { readOnly: true }));
  expect(Buffer.compare(await again.read(5 * cs, cs), other)).toBe(0);
  expect(Buffer.compare(await again.read(9 * cs, cs), more)).toBe(0);
});
