// Writing alongside qemu: into qemu's images (with internal snapshots, whose clusters must be
// copied, never written in place), and qemu-io and we taking turns on one image.

import { execFileSync } from "node:child_process";
import { readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { expect, it } from "vitest";
import { Qcow2Image } from "../../ts/node.js";
import { describeQemu, qemuImg, qemuIo, rng, tempDir } from "../helpers/qemu.js";

function pattern(seed: number, length: number): Uint8Array {
  const out = new Uint8Array(length);
  for (let i = 0; i < length; i++) out[i] = (seed * 31 + i * 7 + (i >> 10)) & 0xff;
  return out;
}

function expectClean(file: string): void {
  const check = JSON.parse(qemuImg(["check", "--output=json", file])) as Record<string, number>;
  expect({ file: path.basename(file), corruptions: check.corruptions ?? 0, leaks: check.leaks ?? 0, errors: check["check-errors"] }).toEqual({
    file: path.basename(file),
    corruptions: 0,
    leaks: 0,
    errors: 0,
  });
}

function expectSame(dir: string, file: string, model: Uint8Array, snapshot?: string): void {
  const raw = path.join(dir, "expected.raw");
  writeFileSync(raw, model);
  if (snapshot === undefined) {
    expect(qemuImg(["compare", "-f", "qcow2", "-F", "raw", file, raw])).toContain("Images are identical.");
  } else {
    const out = path.join(dir, "snapshot.raw");
    execFileSync("qemu-img", ["convert", "-l", `snapshot.name=${snapshot}`, "-O", "raw", file, out]);
    expect(Buffer.compare(readFileSync(out), model)).toBe(0);
  }
}

describeQemu("writing alongside qemu", () => {
  const dir = tempDir("qcow2-interop-");

  it("copies clusters shared with an internal snapshot before writing, leaving the snapshot intact", async () => {
    const size = 8 << 20;
    for (const clusterSize of [512, 65536]) {
      const file = path.join(dir, `snap-${clusterSize}.qcow2`);
      qemuImg(["create", "-f", "qcow2", "-o", `cluster_size=${clusterSize}`, file, String(size)]);
      const src = path.join(dir, "src");
      const before = pattern(clusterSize, size);
      writeFileSync(src, before);
      qemuIo(file, [`write -s ${src} 0 ${size - 65536}`, `write -c -s ${src} ${size - 65536} 65536`]);
      // qemu-io's -s takes the pattern file from its start, whatever the offset written.
      before.set(before.subarray(0, 65536), size - 65536);
      qemuImg(["snapshot", "-c", "s1", file]);
      const model = before.slice();
      const image = await Qcow2Image.open(file, { readOnly: false });
      const rand = rng(clusterSize);
      const jobs: Promise<void>[] = [];
      for (let i = 0; i < 120; i++) {
        const start = Math.floor(rand() * (size - 1));
        const len = Math.min(size - start, 1 + Math.floor(rand() * 3 * clusterSize));
        const kind = rand();
        if (kind < 0.7) {
          const data = pattern(1000 + i, len);
          model.set(data, start);
          jobs.push(image.write(start, data));
        } else if (kind < 0.85) {
          model.fill(0, start, start + len);
          jobs.push(image.writeZeroes(start, len, { mayUnmap: kind < 0.8 }));
        } else {
          const s = Math.ceil(start / clusterSize) * clusterSize;
          const e = Math.floor((start + len) / clusterSize) * clusterSize;
          if (e > s) model.fill(0, s, e);
          jobs.push(image.discard(start, len));
        }
        if (jobs.length >= 8) await Promise.all(jobs.splice(0));
      }
      await Promise.all(jobs);
      await image.close();
      expectClean(file);
      expectSame(dir, file, model);
      expectSame(dir, file, before, "s1");
    }
  });

  it("qemu-io and we take turns writing one image, and both read the same bytes", async () => {
    const size = 6 << 20;
    const file = path.join(dir, "turns.qcow2");
    (await Qcow2Image.create(file, { size, clusterSize: 4096 })).close();
    await new Promise((r) => setTimeout(r, 10));
    const model = new Uint8Array(size);
    const rand = rng(7);
    for (let turn = 0; turn < 12; turn++) {
      // qemu's turn
      const src = path.join(dir, "turn-src");
      const cmds: string[] = [];
      for (let k = 0; k < 6; k++) {
        const start = Math.floor(rand() * (size - 200_000));
        const len = 1 + Math.floor(rand() * 150_000);
        const data = pattern(turn * 10 + k, len);
        writeFileSync(`${src}${k}`, data);
        if (rand() < 0.8) {
          cmds.push(`write -s ${src}${k} ${start} ${len}`);
          model.set(data, start);
        } else {
          const s = Math.floor(start / 512) * 512;
          const l = Math.ceil(len / 512) * 512;
          cmds.push(`write -z ${s} ${l}`);
          model.fill(0, s, s + l);
        }
      }
      qemuIo(file, cmds);
      // our turn
      const image = await Qcow2Image.open(file, { readOnly: false });
      expect(Buffer.compare(await image.read(0, size), model)).toBe(0);
      const jobs: Promise<void>[] = [];
      for (let k = 0; k < 6; k++) {
        const start = Math.floor(rand() * (size - 200_000));
        const len = 1 + Math.floor(rand() * 150_000);
        if (rand() < 0.8) {
          const data = pattern(500 + turn * 10 + k, len);
          model.set(data, start);
          jobs.push(image.write(start, data));
        } else {
          model.fill(0, start, start + len);
          jobs.push(image.writeZeroes(start, len));
        }
      }
      await Promise.all(jobs);
      await image.close();
      expectClean(file);
      expectSame(dir, file, model);
    }
  });

  it("clears unknown autoclear bits on the first write, as qemu does", async () => {
    const file = path.join(dir, "autoclear.qcow2");
    qemuImg(["create", "-f", "qcow2", file, "1M"]);
    const bytes = readFileSync(file);
    bytes[95] = 0x20; // autoclear bit 5
    writeFileSync(file, bytes);
    const image = await Qcow2Image.open(file, { readOnly: false });
    expect(readFileSync(file)[95]).toBe(0x20); // opening alone changes nothing
    await image.write(0, new Uint8Array(512).fill(1));
    await image.close();
    expect(readFileSync(file)[95]).toBe(0);
    expectClean(file);
  });
});
