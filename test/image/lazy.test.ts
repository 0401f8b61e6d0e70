// Lazy refcounts: the dirty bit is set before refcounts are allowed to lag, cleared on a clean
// close, and a dirty image (ours or qemu's, cut off mid-write) has its refcounts rebuilt when
// opened read-write, after which qemu-img check finds it clean and no guest byte has changed.

import { spawnSync } from "node:child_process";
import { readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { expect, it } from "vitest";
import { MemoryBackend, Qcow2Image } from "../../ts/node.js";
import { describeQemu, qemuImg, tempDir } from "../helpers/qemu.js";

function check(file: string): { status: number | null; result: Record<string, number> } {
  const r = spawnSync("qemu-img", ["check", "--output=json", file], { encoding: "utf8" });
  return { status: r.status, result: JSON.parse(r.stdout) as Record<string, number> };
}

function dirtyFlag(file: string): boolean {
  return (JSON.parse(qemuImg(["info", "--output=json", file])) as { "dirty-flag": boolean })["dirty-flag"];
}

describeQemu("lazy refcounts", () => {
  const dir = tempDir("qcow2-lazy-");

  it("rebuilds the refcounts of an image qemu left dirty, keeping every byte", async () => {
    const file = path.join(dir, "qemu-dirty.qcow2");
    qemuImg(["create", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4096", file, "8M"]);
    // qemu-io's abort: qemu dies right after its writes, before any clean close.
    spawnSync("qemu-io", ["-c", "write -P 0xaa 0 64k", "-c", "write -P 0xbb 1M 300k", "-c", "write -z 1040k 8k", "-c", "abort", file]);
    expect(dirtyFlag(file)).toBe(true);
    const before = check(file);
    expect(before.result.corruptions ?? 0).toBeGreaterThan(0);

    await using ro = await Qcow2Image.open(file);
    const expected = await ro.read(0, 8 << 20);
    expect(expected[0]).toBe(0xaa);
    expect(expected[1 << 20]).toBe(0xbb);

    const image = await Qcow2Image.open(file, { readOnly: false });
    expect(image.info().dirty).toBe(false);
    await image.close();
    expect(dirtyFlag(file)).toBe(false);
    const after = check(file);
    expect({ status: after.status, corruptions: after.result.corruptions ?? 0, leaks: after.result.leaks ?? 0 }).toEqual({
      status: 0,
      corruptions: 0,
      leaks: 0,
    });
    await using again = await Qcow2Image.open(file);
    expect(Buffer.compare(await again.read(0, 8 << 20), expected)).toBe(0);
  });

  it("marks the image dirty while writing and clean after close", async () => {
    const file = path.join(dir, "ours.qcow2");
    const image = await Qcow2Image.create(file, { size: 8 << 20, clusterSize: 4096, lazyRefcounts: true });
    expect(dirtyFlag(file)).toBe(false);
    await image.write(12345, new Uint8Array(200_000).fill(3));
    await image.flush();
    expect(dirtyFlag(file)).toBe(true);
    await image.close();
    expect(dirtyFlag(file)).toBe(false);
    const { status } = check(file);
    expect(status).toBe(0);
  });

  it("an image we abandon after flush() reopens with every flushed byte and clean refcounts", async () => {
    const backend = new MemoryBackend();
    const image = await Qcow2Image.create(backend, { size: 8 << 20, clusterSize: 512, lazyRefcounts: true });
    const model = new Uint8Array(8 << 20);
    for (let i = 0; i < 40; i++) {
      const start = (i * 197_003) % (8 << 20) - 100_000;
      const at = Math.max(0, start);
      const data = new Uint8Array(90_000).fill(i + 1);
      model.set(data, at);
      await image.write(at, data);
      if (i % 7 === 6) await image.discard(at, 50_000).then(() => model.fill(0, Math.ceil(at / 512) * 512, Math.floor((at + 50_000) / 512) * 512));
    }
    await image.flush();
    // No close: the process "dies" here with refcounts possibly lagging.
    const file = path.join(dir, "abandoned.qcow2");
    writeFileSync(file, backend.bytes());
    expect(dirtyFlag(file)).toBe(true);
    const reopened = await Qcow2Image.open(file, { readOnly: false });
    expect(Buffer.compare(await reopened.read(0, 8 << 20), model)).toBe(0);
    await reopened.close();
    const { status, result } = check(file);
    expect({ status, corruptions: result.corruptions ?? 0, leaks: result.leaks ?? 0 }).toEqual({ status: 0, corruptions: 0, leaks: 0 });
    expect(readFileSync(file)[79]! & 1).toBe(0);
  });
});
