// Crash safety (DESIGN.md §4): a workload that allocates L2 tables and refcount blocks and grows
// the refcount table is cut at every write index, with the unflushed writes dropped or a random
// subset of them kept (alternating by index; both at every index with QCOW2_LONG=1). Every time,
// the image reopens, qemu-img check finds no corruption (leaks are allowed), and every byte
// flushed and not touched since reads back.

import { spawnSync } from "node:child_process";
import { writeFileSync } from "node:fs";
import path from "node:path";
import { expect, it } from "vitest";
import { MemoryBackend, Qcow2Image } from "../../ts/node.js";
import { CrashBackend } from "../helpers/crash-backend.js";
import { describeQemu, rng, tempDir } from "../helpers/qemu.js";

const SIZE = 4 << 20;
const CLUSTER = 512;
const STEPS = 20;
const LONG = !!process.env.QCOW2_LONG;

/** A fresh image with 512-byte clusters and 64-bit refcounts: a block covers 32 KiB, the table 2 MiB. */
async function freshImage(): Promise<Uint8Array> {
  const backend = new MemoryBackend();
  const image = await Qcow2Image.create(backend, { size: SIZE, clusterSize: CLUSTER, refcountBits: 64 });
  await image.close();
  return backend.bytes().slice();
}

/** What the workload has done so far; kept up to date as it runs, so it survives a crash. */
interface Progress {
  model: Uint8Array;
  /** Guest contents as of the last flush() that completed. */
  flushed: Uint8Array;
  /** Bytes that requests issued after that flush may have changed. */
  touched: Uint8Array;
}

function newProgress(): Progress {
  return { model: new Uint8Array(SIZE), flushed: new Uint8Array(SIZE), touched: new Uint8Array(SIZE) };
}

/** The workload, with a fixed seed: every run issues the same requests in the same order. */
async function workload(image: Qcow2Image, p: Progress): Promise<void> {
  const r = rng(4242);
  const flush = async (): Promise<void> => {
    await image.flush();
    p.flushed = p.model.slice();
    p.touched.fill(0);
  };
  for (let step = 0; step < STEPS; step++) {
    const batch: Promise<void>[] = [];
    for (let k = 0; k < 4; k++) {
      // Mostly forward through the disk, so tables and blocks keep being allocated.
      const start = Math.floor(((step * 4 + k) / (STEPS * 4)) * (SIZE - 70_000) + r() * 20_000);
      const len = 1 + Math.floor(r() * 80_000);
      const x = r();
      p.touched.fill(1, start, start + len);
      if (x < 0.75) {
        const data = new Uint8Array(len).fill(((step * 4 + k) % 251) + 1);
        p.model.set(data, start);
        batch.push(image.write(start, data));
      } else if (x < 0.9) {
        p.model.fill(0, start, start + len);
        batch.push(image.writeZeroes(start, len, { mayUnmap: x < 0.85 }));
      } else {
        const s = Math.ceil(start / CLUSTER) * CLUSTER;
        const e = Math.floor((start + len) / CLUSTER) * CLUSTER;
        if (e > s) p.model.fill(0, s, e);
        batch.push(image.discard(start, len));
      }
    }
    const results = await Promise.allSettled(batch);
    const failed = results.find((x): x is PromiseRejectedResult => x.status === "rejected");
    if (failed) throw failed.reason;
    if (step % 3 === 2) await flush();
  }
  await flush();
}

/** qemu-img check's JSON (it exits 2 on corruption and 3 on leaks, so read its output either way). */
function checkImage(dir: string, disk: Uint8Array): Record<string, number> {
  const file = path.join(dir, "crash.qcow2");
  writeFileSync(file, disk);
  const r = spawnSync("qemu-img", ["check", "--output=json", file], { encoding: "utf8" });
  if (r.status !== 0 && r.status !== 2 && r.status !== 3) throw new Error(`qemu-img check failed (${r.status}): ${r.stderr}`);
  return JSON.parse(r.stdout) as Record<string, number>;
}

describeQemu("crash at every write", () => {
  const dir = tempDir("qcow2-crash-");

  it("the workload itself is sound, and grows the refcount table", async () => {
    const backend = new MemoryBackend((await freshImage()).slice());
    const image = await Qcow2Image.open(backend, { readOnly: false });
    const progress = newProgress();
    await workload(image, progress);
    expect(image.header.refcountTableClusters).toBeGreaterThan(1);
    await image.close();
    const check = checkImage(dir, backend.bytes());
    expect({ corruptions: check.corruptions ?? 0, leaks: check.leaks ?? 0 }).toEqual({ corruptions: 0, leaks: 0 });
    await using reopened = await Qcow2Image.open(new MemoryBackend(backend.bytes(), { readOnly: true }));
    expect(Buffer.compare(await reopened.read(0, SIZE), progress.model)).toBe(0);
  });

  it("every crash point leaves no corruption and every flushed byte", async () => {
    const initial = await freshImage();
    const counter = new CrashBackend(initial, Number.MAX_SAFE_INTEGER);
    await workload(await Qcow2Image.open(counter, { readOnly: false }), newProgress());
    const total = counter.writeCount;
    expect(total).toBeGreaterThan(150);
    const pick = rng(99);
    for (let crashAt = 1; crashAt <= total; crashAt++) {
      const backend = new CrashBackend(initial, crashAt);
      const progress = newProgress();
      // The crash: the workload fails and the image is abandoned, as a power cut would leave it.
      await workload(await Qcow2Image.open(backend, { readOnly: false }), progress).catch(() => undefined);
      expect(backend.hasCrashed).toBe(true);
      // Each index is cut both ways under QCOW2_LONG=1; by default the two ways alternate.
      for (const keep of LONG ? [0, 0.5] : [crashAt % 2 === 0 ? 0 : 0.5]) {
        const disk = backend.afterCrash(pick, keep);
        const check = checkImage(dir, disk);
        expect({ crashAt, keep, corruptions: check.corruptions ?? 0, errors: check["check-errors"] }).toEqual({
          crashAt,
          keep,
          corruptions: 0,
          errors: 0,
        });
        await using reopened = await Qcow2Image.open(new MemoryBackend(disk, { readOnly: true }));
        const data = await reopened.read(0, SIZE);
        let lost = -1;
        for (let i = 0; i < SIZE; i++) {
          if (!progress.touched[i] && data[i] !== progress.flushed[i]) {
            lost = i;
            break;
          }
        }
        expect({ crashAt, keep, lost }).toEqual({ crashAt, keep, lost: -1 });
      }
    }
  }, 900_000);
});
