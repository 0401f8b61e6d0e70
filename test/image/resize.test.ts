// resize(): the same guest bytes as qemu-img resize on copies of one image, clean checks, snapshots
// untouched, and shrinking refused when it would drop data unless asked.

import { copyFileSync, readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { execFileSync } from "node:child_process";
import { expect, it } from "vitest";
import { Qcow2Error, Qcow2Image } from "../../ts/node.js";
import { describeQemu, qemuImg, qemuIo, tempDir } from "../helpers/qemu.js";

function expectClean(file: string): void {
  const check = JSON.parse(qemuImg(["check", "--output=json", file])) as Record<string, number>;
  expect({ corruptions: check.corruptions ?? 0, leaks: check.leaks ?? 0, errors: check["check-errors"] }).toEqual({
    corruptions: 0,
    leaks: 0,
    errors: 0,
  });
}

function raw(dir: string, file: string, snapshot?: string): Buffer {
  const out = path.join(dir, "out.raw");
  execFileSync("qemu-img", ["convert", ...(snapshot ? ["-l", `snapshot.name=${snapshot}`] : []), "-O", "raw", file, out]);
  return readFileSync(out);
}

describeQemu("resize", () => {
  const dir = tempDir("qcow2-resize-");
  const at = (name: string) => path.join(dir, name);

  /** Resize a copy with qemu-img and one with us; both must read the same and check clean. */
  async function both(name: string, steps: Array<[size: number, shrink: boolean]>): Promise<void> {
    const ours = at(`${name}-ours.qcow2`);
    const theirs = at(`${name}-qemu.qcow2`);
    copyFileSync(at(`${name}.qcow2`), ours);
    copyFileSync(at(`${name}.qcow2`), theirs);
    for (const [size, shrink] of steps) {
      execFileSync("qemu-img", ["resize", ...(shrink ? ["--shrink"] : []), theirs, String(size)], { stdio: "ignore" });
      const image = await Qcow2Image.open(ours, { readOnly: false });
      await image.resize(size, { shrink });
      expect(image.virtualSize).toBe(size);
      await image.close();
      expectClean(ours);
      expect(JSON.parse(qemuImg(["info", "--output=json", ours]))["virtual-size"]).toBe(size);
      expect({ name, size, compare: qemuImg(["compare", ours, theirs]).trim() }).toEqual({ name, size, compare: "Images are identical." });
    }
  }

  it("grows, moving the L1 table, and shrinks and grows again like qemu-img", async () => {
    for (const [version, cs] of [["1.1", 512], ["0.10", 512], ["1.1", 65536]] as const) {
      const name = `grow-${version}-${cs}`;
      qemuImg(["create", "-f", "qcow2", "-o", `compat=${version},cluster_size=${cs}`, at(`${name}.qcow2`), "1M"]);
      qemuIo(at(`${name}.qcow2`), ["write -P 0x11 0 1M", "write -P 0x22 100000 333"]);
      // Cluster-aligned sizes: see the next test for a partial last cluster.
      await both(name, [
        [cs === 512 ? 5 << 20 : 3 * 2 ** 30, false],
        [cs === 512 ? 1536 * 512 + 512 : 12 * cs, true],
        [4 << 20, false],
        [cs === 512 ? 777 * 512 : 5 * cs, true],
      ]);
    }
  });

  it("zeros the tail of a partial last cluster when growing (qemu-img 7.2 shows the stale bytes)", async () => {
    const file = at("tail.qcow2");
    qemuImg(["create", "-f", "qcow2", file, "1M"]);
    qemuIo(file, ["write -P 0x11 0 1M"]);
    const image = await Qcow2Image.open(file, { readOnly: false });
    await image.resize(786944, { shrink: true }); // 12 clusters and 512 bytes
    await image.resize(1 << 20);
    expect((await image.read(786944, (1 << 20) - 786944)).every((b) => b === 0)).toBe(true);
    expect((await image.read(0, 786944)).every((b) => b === 0x11)).toBe(true);
    await image.close();
    expectClean(file);
  });

  it("hides a longer backing file in the grown area, as qemu does", async () => {
    qemuImg(["create", "-f", "qcow2", at("long-base.qcow2"), "8M"]);
    qemuIo(at("long-base.qcow2"), ["write -P 0x33 0 8M"]);
    qemuImg(["create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "long-base.qcow2", "-F", "qcow2", at("short.qcow2"), "2M"]);
    qemuIo(at("short.qcow2"), ["write -P 0x44 1000 5000"]);
    await both("short", [[6 << 20, false], [3 << 20, true], [10 << 20, false]]);
  });

  it("refuses to drop data without shrink, and shrinks freely what holds nothing", async () => {
    const file = at("refuse.qcow2");
    const image = await Qcow2Image.create(file, { size: 4 << 20 });
    await image.write(3 << 20, new Uint8Array(10).fill(5));
    const err = await image.resize(2 << 20).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(Qcow2Error);
    expect((err as Error).message).toMatch(/would drop data .*shrink: true/);
    expect(image.virtualSize).toBe(4 << 20);
    await image.resize(3.5 * 2 ** 20); // nothing stored past 3.5 MiB
    await expect(image.resize(1000)).rejects.toBeInstanceOf(RangeError);
    await image.close();
    expectClean(file);
  });

  it("leaves internal snapshots intact", async () => {
    const file = at("snap.qcow2");
    qemuImg(["create", "-f", "qcow2", "-o", "cluster_size=4096", file, "4M"]);
    const src = at("snap-src");
    const before = new Uint8Array(4 << 20).map((_, i) => (i * 13) & 0xff);
    writeFileSync(src, before);
    qemuIo(file, [`write -s ${src} 0 4M`]);
    qemuImg(["snapshot", "-c", "s1", file]);
    const image = await Qcow2Image.open(file, { readOnly: false });
    await image.resize(1 << 20, { shrink: true });
    await image.resize(64 << 20);
    await image.write(50 << 20, new Uint8Array(4096).fill(9));
    await image.close();
    expectClean(file);
    // qemu-img convert -l reads a snapshot at the image's current size (64 MiB here).
    const snapshot = raw(dir, file, "s1");
    expect(Buffer.compare(snapshot.subarray(0, 4 << 20), before)).toBe(0);
    expect(snapshot.subarray(4 << 20).every((b) => b === 0)).toBe(true);
    const now = raw(dir, file);
    expect(Buffer.compare(now.subarray(0, 1 << 20), before.subarray(0, 1 << 20))).toBe(0);
    expect(now.subarray(1 << 20, 50 << 20).every((b) => b === 0)).toBe(true);
  });
});
