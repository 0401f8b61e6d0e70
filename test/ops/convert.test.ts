// convert() against qemu-img convert on qemu-made images: the output reads the same as the source
// (qemu-img compare), qcow2 outputs check clean, and what is allocated in a qcow2 output is what
// qemu-img convert allocates for the same source and options.

import { spawnSync } from "node:child_process";
import { readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { expect, it } from "vitest";
import { convert, type ConvertOptions } from "../../ts/ops/convert.js";
import { openDevice } from "../../ts/cli/open.js";
import "../../ts/node.js";
import { describeQemu, qemuImg, qemuIo, allocationLayout, tempDir } from "../helpers/qemu.js";

function compare(a: string, b: string, fa = "qcow2", fb = "qcow2"): number | null {
  return spawnSync("qemu-img", ["compare", "-f", fa, "-F", fb, a, b]).status;
}

/** Which guest ranges are allocated data, zero or unallocated: the layout, not where. */

describeQemu("convert", () => {
  const dir = tempDir("qcow2-convert-");
  const at = (name: string) => path.join(dir, name);

  // Sources: data, zero clusters, a discarded hole, a compressed cluster, a partly zero cluster.
  const src = at("src.qcow2");
  qemuImg(["create", "-f", "qcow2", src, "24M"]);
  qemuIo(src, ["write -P 0x11 0 1M", "write -z 1M 128k", "write -P 0x22 3M 100k", "write -c -P 0x33 5M 64k", "write -P 0 6M 64k", "write -P 0x44 8200k 4k"]);
  const srcV2 = at("src-v2.qcow2");
  qemuImg(["create", "-f", "qcow2", "-o", "compat=0.10,cluster_size=512", srcV2, "3M"]);
  qemuIo(srcV2, ["write -P 0x55 0 40k", "write -P 0x66 2M 1k"]);
  const base = at("base.qcow2");
  qemuImg(["create", "-f", "qcow2", base, "24M"]);
  qemuIo(base, ["write -P 0x77 0 4M", "write -P 0x78 10M 1M"]);
  const top = at("top.qcow2");
  qemuImg(["create", "-f", "qcow2", "-b", base, "-F", "qcow2", top]);
  qemuIo(top, ["write -P 0x79 1M 1M", "write -z 2M 64k"]);
  const raw = at("src.raw");
  const rawBytes = Buffer.alloc(6 << 20);
  rawBytes.fill(0x5a, 0, 1 << 20);
  rawBytes.fill(0x5b, 3 << 20, (3 << 20) + 4096);
  writeFileSync(raw, rawBytes);

  async function ours(sources: string[], target: string, options: ConvertOptions): Promise<void> {
    const devices = await Promise.all(sources.map((s) => openDevice(s, undefined)));
    try {
      await convert(devices, target, options);
    } finally {
      for (const d of devices) await d.close();
    }
  }

  const cases: Array<{ name: string; sources: string[]; options: ConvertOptions; qemu: string[] }> = [
    { name: "qcow2 to raw", sources: [src], options: { format: "raw" }, qemu: ["-O", "raw"] },
    { name: "qcow2 to qcow2", sources: [src], options: { format: "qcow2" }, qemu: ["-O", "qcow2"] },
    { name: "qcow2 to qcow2, -S 0", sources: [src], options: { format: "qcow2", sparseSize: 0 }, qemu: ["-O", "qcow2", "-S", "0"] },
    { name: "qcow2 to qcow2 -c", sources: [src], options: { format: "qcow2", compress: true }, qemu: ["-O", "qcow2", "-c"] },
    { name: "v2 512 B clusters to qcow2 4 KiB", sources: [srcV2], options: { format: "qcow2", create: { clusterSize: 4096 } }, qemu: ["-O", "qcow2", "-o", "cluster_size=4096"] },
    { name: "chain flattened to qcow2", sources: [top], options: { format: "qcow2" }, qemu: ["-O", "qcow2"] },
    { name: "raw to qcow2", sources: [raw], options: { format: "qcow2" }, qemu: ["-f", "raw", "-O", "qcow2"] },
    { name: "two sources concatenated", sources: [srcV2, src], options: { format: "qcow2" }, qemu: ["-O", "qcow2"] },
  ];

  for (const c of cases) {
    it(c.name, async () => {
      const mine = at(`${c.name.replaceAll(/\W+/g, "-")}.ours`);
      const theirs = at(`${c.name.replaceAll(/\W+/g, "-")}.qemu`);
      await ours(c.sources, mine, c.options);
      qemuImg(["convert", ...c.qemu, ...c.sources, theirs]);
      const fmt = c.options.format;
      expect(compare(mine, theirs, fmt, fmt)).toBe(0);
      if (c.sources.length === 1) expect(compare(mine, c.sources[0]!, fmt, c.sources[0]!.endsWith(".raw") ? "raw" : "qcow2")).toBe(0);
      if (fmt === "qcow2") {
        expect(spawnSync("qemu-img", ["check", mine]).status).toBe(0);
        expect(allocationLayout(mine)).toEqual(allocationLayout(theirs));
        const info = (f: string) => JSON.parse(qemuImg(["check", "--output=json", f])) as Record<string, number>;
        expect(info(mine)["compressed-clusters"] ?? 0).toBe(info(theirs)["compressed-clusters"] ?? 0);
      } else {
        expect(readFileSync(mine).equals(readFileSync(theirs))).toBe(true);
      }
    });
  }

  it("-B keeps the backing file and copies only what the top image maps", async () => {
    const mine = at("rebased.ours");
    const theirs = at("rebased.qemu");
    await ours([top], mine, { format: "qcow2", create: { backingFile: base, backingFormat: "qcow2" }, topOnly: true });
    qemuImg(["convert", "-O", "qcow2", "-B", base, "-F", "qcow2", top, theirs]);
    expect(compare(mine, top)).toBe(0);
    expect(allocationLayout(mine)).toEqual(allocationLayout(theirs));
    expect(spawnSync("qemu-img", ["check", mine]).status).toBe(0);
  });

  it("-c with many chunks in flight places the clusters in guest order: two runs give the same file", async () => {
    const big = at("big.raw");
    const bytes = Buffer.alloc(40 << 20);
    let x = 12345;
    for (let i = 0; i < bytes.length; i += 4096) {
      // Mixed 4 KiB blocks: text-like, random, zero.
      x = (x * 1103515245 + 12345) >>> 0;
      const kind = x % 3;
      for (let k = 0; k < 4096 && kind !== 2; k++) bytes[i + k] = kind === 0 ? 97 + ((k * 7 + (x >>> 8)) % 23) : (x = (x * 1103515245 + 12345) >>> 0) >>> 24;
    }
    writeFileSync(big, bytes);
    const first = at("big-1.qcow2");
    const second = at("big-2.qcow2");
    await ours([big], first, { format: "qcow2", compress: true });
    await ours([big], second, { format: "qcow2", compress: true });
    expect(compare(first, big, "qcow2", "raw")).toBe(0);
    expect(spawnSync("qemu-img", ["check", first]).status).toBe(0);
    expect(readFileSync(first).equals(readFileSync(second))).toBe(true);
    // And back: the compressed image (inflated by the worker pool) reads as the raw file.
    const back = at("big-back.raw");
    await ours([first], back, { format: "raw" });
    expect(readFileSync(back).equals(bytes)).toBe(true);
  });

  it("a read that fails part way fails the conversion (no hang, nothing left running)", async () => {
    const [device] = await Promise.all([openDevice(src, undefined)]);
    const failing = Object.create(device) as typeof device;
    let reads = 0;
    failing.readInto = async (dst, offset) => {
      if (++reads === 4) throw new Error("injected read failure");
      return device.readInto(dst, offset);
    };
    try {
      await expect(convert([failing], at("failing.raw"), { format: "raw", bufferSize: 1 << 20 })).rejects.toThrow("injected read failure");
      reads = 0;
      await expect(convert([failing], at("failing.qcow2"), { format: "qcow2", compress: true, bufferSize: 1 << 20 })).rejects.toThrow(
        "injected read failure",
      );
    } finally {
      await device.close();
    }
  });

  it("-n writes into an existing qcow2 image that qemu made", async () => {
    const target = at("existing.qcow2");
    qemuImg(["create", "-f", "qcow2", target, "24M"]);
    qemuIo(target, ["write -P 0xee 0 24M"]);
    await ours([src], target, { format: "qcow2", existing: true });
    expect(compare(target, src)).toBe(0);
    expect(spawnSync("qemu-img", ["check", target]).status).toBe(0);
  });
});
