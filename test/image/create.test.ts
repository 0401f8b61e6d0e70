// create(): the same bytes as qemu-img create for the same options, images qemu-img checks clean
// and describes with the facts we asked for, and qemu's refusals for bad combinations.

import { readFileSync } from "node:fs";
import path from "node:path";
import { expect, it } from "vitest";
import { MemoryBackend, Qcow2Error, Qcow2Image, type CreateOptions } from "../../ts/node.js";
import { describeQemu, qemuImg, tempDir } from "../helpers/qemu.js";

type Case = [label: string, ours: Partial<CreateOptions>, qemuArgs: string[], size: string | undefined, identical: boolean];

const cases: Case[] = [
  ["defaults 1G", { size: 2 ** 30 }, [], "1G", true],
  ["v2", { size: 64 << 20, version: 2 }, ["-o", "compat=0.10"], "64M", true],
  ["512 B clusters", { size: 100 << 20, clusterSize: 512 }, ["-o", "cluster_size=512"], "100M", true],
  ["4 KiB, 1-bit refcounts", { size: 10 * 2 ** 30, clusterSize: 4096, refcountBits: 1 }, ["-o", "cluster_size=4096,refcount_bits=1"], "10G", true],
  ["2 MiB clusters, 1 PiB", { size: 2 ** 50, clusterSize: 2 << 20 }, ["-o", "cluster_size=2M"], "1P", true],
  ["64-bit refcounts", { size: 5 * 2 ** 30, refcountBits: 64 }, ["-o", "refcount_bits=64"], "5G", true],
  ["8-bit refcounts, 8 KiB", { size: 3 * 2 ** 30, refcountBits: 8, clusterSize: 8192 }, ["-o", "refcount_bits=8,cluster_size=8k"], "3G", true],
  ["lazy refcounts", { size: 64 << 20, lazyRefcounts: true }, ["-o", "lazy_refcounts=on"], "64M", true],
  ["size 0", { size: 0 }, [], "0", true],
  ["size rounded up to 512", { size: 1000 }, [], "1000", true],
  ["backing file and format", { backingFile: "base.qcow2", backingFormat: "qcow2" }, ["-b", "base.qcow2", "-F", "qcow2"], undefined, true],
  ["v2 with raw backing", { version: 2, size: 32 << 20, backingFile: "base.raw", backingFormat: "raw" }, ["-o", "compat=0.10", "-b", "base.raw", "-F", "raw"], "32M", true],
  ["preallocation=metadata", { size: 8 << 20, preallocation: "metadata" }, ["-o", "preallocation=metadata"], "8M", true],
  ["preallocation=metadata, 4 KiB", { size: 40 << 20, clusterSize: 4096, preallocation: "metadata" }, ["-o", "preallocation=metadata,cluster_size=4k"], "40M", false],
  // qemu grows the refcount structure ahead for these; the layouts differ, both check clean.
  ["preallocation=full", { size: 8 << 20, preallocation: "full" }, ["-o", "preallocation=full"], "8M", false],
  ["preallocation=falloc", { size: 8 << 20, preallocation: "falloc" }, ["-o", "preallocation=falloc"], "8M", false],
  // A two-cluster refcount table and 66 blocks. (At 64G qemu-img check alone takes 16 s here.)
  ["512 B clusters, 64-bit refcounts, 8G", { size: 8 * 2 ** 30, clusterSize: 512, refcountBits: 64 }, ["-o", "cluster_size=512,refcount_bits=64"], "8G", false],
];

function infoFacts(file: string): Record<string, unknown> {
  const info = JSON.parse(qemuImg(["info", "--output=json", file])) as Record<string, unknown> & {
    "format-specific": { data: Record<string, unknown> };
  };
  const { "actual-size": _a, filename: _f, ...rest } = info;
  return rest;
}

describeQemu("create", () => {
  const dir = tempDir("qcow2-create-");
  const at = (name: string) => path.join(dir, name);

  it.each(cases)("%s", async (label, ours, qemuArgs, size, identical) => {
    qemuImg(["create", "-f", "qcow2", at("base.qcow2"), "20M"]);
    qemuImg(["create", "-f", "raw", at("base.raw"), "20M"]);
    const slug = label.replace(/\W+/g, "-");
    const theirs = at(`${slug}-qemu.qcow2`);
    const mine = at(`${slug}-ours.qcow2`);
    qemuImg(["create", "-f", "qcow2", ...qemuArgs, theirs, ...(size === undefined ? [] : [size])]);
    const image = await Qcow2Image.create(mine, ours as CreateOptions);
    await image.close();
    const check = JSON.parse(qemuImg(["check", "--output=json", mine])) as Record<string, number>;
    expect({ corruptions: check.corruptions, leaks: check.leaks, errors: check["check-errors"] }).toEqual({
      corruptions: undefined,
      leaks: undefined,
      errors: 0,
    });
    expect(infoFacts(mine)).toEqual(infoFacts(theirs));
    if (identical) expect(Buffer.compare(readFileSync(mine), readFileSync(theirs))).toBe(0);
  });

  it("a metadata-preallocated image maps every cluster, and reads zeros", async () => {
    await using image = await Qcow2Image.create(at("pm.qcow2"), { size: 4 << 20, preallocation: "metadata" });
    const extents = [];
    for await (const e of image.extents()) extents.push(e);
    expect(extents).toEqual([{ start: 0, length: 4 << 20, kind: "data", hostOffset: 5 * 65536, depth: 0 }]);
    expect((await image.read(0, 4 << 20)).every((b) => b === 0)).toBe(true);
  });
});

it.each([
  [{ size: 1 << 20, clusterSize: 1000 }, /Cluster size must be a power of two between 512 and 2048k/],
  [{ size: 1 << 20, clusterSize: 4 << 20 }, /Cluster size must be a power of two between 512 and 2048k/],
  [{ size: 1 << 20, refcountBits: 3 }, /Refcount width must be a power of two and may not exceed 64 bits/],
  [{ size: 1 << 20, refcountBits: 128 }, /Refcount width must be a power of two and may not exceed 64 bits/],
  [{ size: 1 << 20, version: 2, refcountBits: 8 }, /Different refcount widths than 16 bits require compatibility level 1.1/],
  [{ size: 1 << 20, version: 2, lazyRefcounts: true }, /Lazy refcounts only supported with compatibility level 1.1/],
  [{ size: 1 << 20, backingFile: "b", preallocation: "metadata" }, /Backing file and preallocation/],
  [{ size: 2 ** 40, clusterSize: 512 }, /image size is too large/],
] as const)("create refuses %j as qemu-img does", async (options, message) => {
  const err = await Qcow2Image.create(new MemoryBackend(), options as CreateOptions).catch((e: unknown) => e);
  expect(err).toBeInstanceOf(Qcow2Error);
  expect((err as Error).message).toMatch(message);
});

it("creates into memory and reads back what it wrote", async () => {
  const backend = new MemoryBackend();
  const image = await Qcow2Image.create(backend, { size: 1 << 20, clusterSize: 4096 });
  await image.write(5000, new Uint8Array(10000).fill(7));
  await image.close();
  await using again = await Qcow2Image.open(new MemoryBackend(backend.bytes().slice()));
  const data = await again.read(0, 1 << 20);
  expect(data.subarray(5000, 15000).every((b) => b === 7)).toBe(true);
  expect(data[4999]).toBe(0);
  expect(data[15000]).toBe(0);
});
