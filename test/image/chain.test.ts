// Backing chains: resolution, format probing, loops, depth, missing files; and reads past the end.

import { copyFileSync, readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { describe, expect, it } from "vitest";
import { MemoryBackend, Qcow2Error, Qcow2Image, isQcow2Error } from "../../ts/node.js";
import { execFileSync } from "node:child_process";
import { describeQemu, qemuImg, qemuIo, tempDir } from "../helpers/qemu.js";

function code(err: unknown): string {
  return err instanceof Qcow2Error ? err.code : `not a Qcow2Error: ${String(err)}`;
}

describeQemu("backing chains", () => {
  const dir = tempDir("qcow2-chain-");
  const at = (name: string) => path.join(dir, name);

  it("probes the backing format when the image records none", async () => {
    qemuImg(["create", "-f", "qcow2", at("probe-base.qcow2"), "4M"]);
    qemuIo(at("probe-base.qcow2"), ["write -P 0x5a 0 1M"]);
    qemuImg(["create", "-f", "qcow2", "-b", "probe-base.qcow2", "-F", "qcow2", at("probe-top.qcow2"), "4M"]);
    // Rename the backing-format extension to an unknown type: the format is gone, the bytes stay.
    const bytes = readFileSync(at("probe-top.qcow2"));
    const pos = bytes.indexOf(Buffer.from([0xe2, 0x79, 0x2a, 0xca]), 112);
    expect(pos).toBeGreaterThan(0);
    bytes.writeUInt32BE(0x7a7a7a7a, pos);
    writeFileSync(at("probe-top.qcow2"), bytes);
    await using image = await Qcow2Image.open(at("probe-top.qcow2"));
    expect(image.header.extensions.backingFormat).toBeUndefined();
    expect(image.header.extensions.unknown.map((e) => e.type)).toContain(0x7a7a7a7a);
    expect(image.backing?.format).toBe("qcow2");
    expect(Buffer.from(await image.read(0, 1 << 20)).equals(Buffer.alloc(1 << 20, 0x5a))).toBe(true);
  });

  it("refuses a loop, naming the chain", async () => {
    qemuImg(["create", "-f", "qcow2", at("loop-a.qcow2"), "1M"]);
    qemuImg(["create", "-f", "qcow2", "-b", "loop-a.qcow2", "-F", "qcow2", at("loop-b.qcow2"), "1M"]);
    // Point a back at b with qemu's own unsafe rebase.
    qemuImg(["rebase", "-u", "-b", "loop-b.qcow2", "-F", "qcow2", at("loop-a.qcow2")]);
    const err = await Qcow2Image.open(at("loop-b.qcow2")).catch((e: unknown) => e);
    expect(code(err)).toBe("BAD_BACKING");
    expect((err as Error).message).toMatch(/loops: .*loop-b\.qcow2 -> .*loop-a\.qcow2 -> .*loop-b\.qcow2/);
  });

  it("refuses a chain deeper than 64", async () => {
    // 66 distinct in-memory images, each backed by the next.
    qemuImg(["create", "-f", "qcow2", "-u", "-b", "next", "-F", "qcow2", at("deep-link.qcow2"), "64k"]);
    const link = readFileSync(at("deep-link.qcow2"));
    let opened = 0;
    const err = await Qcow2Image.open(new MemoryBackend(link.slice(), { name: "img0" }), {
      resolveBacking: async () => new MemoryBackend(link.slice(), { name: `img${++opened}` }),
    }).catch((e: unknown) => e);
    expect(code(err)).toBe("BAD_BACKING");
    expect((err as Error).message).toMatch(/deeper than 64/);
    expect(opened).toBe(64);
  });

  it("reports a missing backing file as BAD_BACKING with the name", async () => {
    qemuImg(["create", "-f", "qcow2", at("gone-base.qcow2"), "1M"]);
    qemuImg(["create", "-f", "qcow2", "-b", "gone-base.qcow2", "-F", "qcow2", at("orphan.qcow2"), "1M"]);
    copyFileSync(at("orphan.qcow2"), at("orphan2.qcow2"));
    qemuImg(["rebase", "-u", "-b", "no-such-file.qcow2", "-F", "qcow2", at("orphan2.qcow2")]);
    const err = await Qcow2Image.open(at("orphan2.qcow2")).catch((e: unknown) => e);
    expect(code(err)).toBe("BAD_BACKING");
    expect((err as Error).message).toContain("no-such-file.qcow2");
    // Without following the chain the image opens, and unallocated clusters read as zeros.
    await using image = await Qcow2Image.open(at("orphan2.qcow2"), { backing: "none" });
    expect(image.backing).toBeUndefined();
    expect((await image.read(0, 512)).every((b) => b === 0)).toBe(true);
  });

  it("refuses a backing format it does not know", async () => {
    qemuImg(["create", "-f", "qcow2", at("fmt-base.qcow2"), "1M"]);
    qemuImg(["create", "-f", "qcow2", "-b", "fmt-base.qcow2", "-F", "qcow2", at("fmt-top.qcow2"), "1M"]);
    const bytes = readFileSync(at("fmt-top.qcow2"));
    const pos = bytes.indexOf(Buffer.from("qcow2"), 112);
    bytes.write("vmdk\0", pos, "latin1");
    bytes.writeUInt32BE(4, pos - 4); // extension length
    writeFileSync(at("fmt-top.qcow2"), bytes);
    const err = await Qcow2Image.open(at("fmt-top.qcow2")).catch((e: unknown) => e);
    expect(code(err)).toBe("NOT_SUPPORTED");
    expect((err as Error).message).toContain('"vmdk"');
  });
});

describeQemu("reads, ranges and errors", () => {
  const dir = tempDir("qcow2-read-");
  const at = (name: string) => path.join(dir, name);

  it("rejects ranges outside the disk with RangeError and reads at the very end", async () => {
    qemuImg(["create", "-f", "qcow2", at("r.qcow2"), "1M"]);
    qemuIo(at("r.qcow2"), ["write -P 0x77 1044480 4096"]);
    await using image = await Qcow2Image.open(at("r.qcow2"));
    await expect(image.read(1 << 20, 1)).rejects.toBeInstanceOf(RangeError);
    await expect(image.read(-1, 1)).rejects.toBeInstanceOf(RangeError);
    await expect(image.read(0.5, 1)).rejects.toBeInstanceOf(RangeError);
    expect((await image.read((1 << 20) - 1, 1))[0]).toBe(0x77);
    expect((await image.read(1 << 20, 0)).length).toBe(0);
    const dst = new Uint8Array(4096);
    expect(await image.read(1044480, dst)).toBe(dst);
    expect(dst.every((b) => b === 0x77)).toBe(true);
  });

  it("says which ranges are allocated in the image itself", async () => {
    qemuImg(["create", "-f", "qcow2", at("a-base.qcow2"), "1M"]);
    qemuIo(at("a-base.qcow2"), ["write -P 1 0 1M"]);
    qemuImg(["create", "-f", "qcow2", "-b", "a-base.qcow2", "-F", "qcow2", at("a.qcow2"), "1M"]);
    qemuIo(at("a.qcow2"), ["write -P 2 64k 64k", "write -z 256k 64k"]);
    await using image = await Qcow2Image.open(at("a.qcow2"));
    expect(await image.isAllocated(0, 1 << 20)).toEqual({ allocated: false, length: 65536 });
    expect(await image.isAllocated(65536 + 100, 1 << 19)).toEqual({ allocated: true, length: 65536 - 100 });
    expect(await image.isAllocated(262144, 65536)).toEqual({ allocated: true, length: 65536 });
    const extents = [];
    for await (const e of image.extents()) extents.push(e);
    expect(extents.map((e) => [e.start, e.length, e.kind, e.depth])).toEqual([
      [0, 65536, "data", 1],
      [65536, 65536, "data", 0],
      [131072, 131072, "data", 1],
      [262144, 65536, "zero", 0],
      [327680, 720896, "data", 1],
    ]);
  });

  it("refuses an L2 entry with an unaligned cluster offset as CORRUPT", async () => {
    qemuImg(["create", "-f", "qcow2", at("c.qcow2"), "1M"]);
    qemuIo(at("c.qcow2"), ["write -P 3 0 64k"]);
    const bytes = readFileSync(at("c.qcow2"));
    const l1 = Number(bytes.readBigUInt64BE(40));
    const l2 = Number(bytes.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
    bytes.writeBigUInt64BE(bytes.readBigUInt64BE(l2) | 0x200n, l2); // offset + 512
    await using image = await Qcow2Image.open(new MemoryBackend(bytes, { readOnly: true }));
    const err = await image.read(0, 512).catch((e: unknown) => e);
    expect(isQcow2Error(err, "CORRUPT")).toBe(true);
    expect((err as Error).message).toMatch(/entry 0: cluster offset 0x\w+ is not aligned/);
  });

  it("refuses a zero flag in a v2 image as CORRUPT", async () => {
    qemuImg(["create", "-f", "qcow2", "-o", "compat=0.10", at("v2.qcow2"), "1M"]);
    qemuIo(at("v2.qcow2"), ["write -P 3 0 64k"]);
    const bytes = readFileSync(at("v2.qcow2"));
    const l1 = Number(bytes.readBigUInt64BE(40));
    const l2 = Number(bytes.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
    bytes.writeBigUInt64BE(bytes.readBigUInt64BE(l2) | 1n, l2);
    await using image = await Qcow2Image.open(new MemoryBackend(bytes, { readOnly: true }));
    const err = await image.read(0, 512).catch((e: unknown) => e);
    expect(isQcow2Error(err, "CORRUPT")).toBe(true);
    expect((err as Error).message).toMatch(/zero flag set in a version 2 image/);
  });

  it("refuses a compressed cluster that does not inflate to a whole cluster", async () => {
    qemuImg(["create", "-f", "qcow2", at("z.qcow2"), "1M"]);
    qemuIo(at("z.qcow2"), ["write -c -P 9 0 64k"]);
    const bytes = readFileSync(at("z.qcow2"));
    const l1 = Number(bytes.readBigUInt64BE(40));
    const l2 = Number(bytes.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
    const coffset = Number(bytes.readBigUInt64BE(l2) & ((1n << 54n) - 1n));
    bytes.fill(0xff, coffset, coffset + 16);
    await using image = await Qcow2Image.open(new MemoryBackend(bytes, { readOnly: true }));
    const err = await image.read(0, 4096).catch((e: unknown) => e);
    expect(code(err)).toBe("BAD_COMPRESSED_DATA");
  });

  it("opens an encrypted image for its facts and refuses to read its data", async () => {
    qemuImg([
      "create", "-f", "qcow2", "--object", "secret,id=s0,data=pw",
      "-o", "encrypt.format=aes,encrypt.key-secret=s0", at("enc.qcow2"), "1M",
    ]);
    execFileSync("qemu-io", [
      "--object", "secret,id=s0,data=pw", "--image-opts", "-c", "write -P 0x11 0 4k",
      `driver=qcow2,file.filename=${at("enc.qcow2")},encrypt.key-secret=s0`,
    ]);
    await using image = await Qcow2Image.open(at("enc.qcow2"));
    expect(image.info().encryption).toBe("aes");
    const err = await image.read(0, 512).catch((e: unknown) => e);
    expect(code(err)).toBe("ENCRYPTED");
    expect((await image.read(65536, 512)).every((b) => b === 0)).toBe(true);
  });

  it("refuses writes to a read-only image, and use after close", async () => {
    qemuImg(["create", "-f", "qcow2", at("rw.qcow2"), "1M"]);
    await using ro = await Qcow2Image.open(at("rw.qcow2"));
    expect(code(await ro.write(0, new Uint8Array(1)).catch((e: unknown) => e))).toBe("READ_ONLY");
    expect(code(await ro.discard(0, 65536).catch((e: unknown) => e))).toBe("READ_ONLY");
    const image = await Qcow2Image.open(at("rw.qcow2"));
    await image.close();
    await image.close();
    expect(code(await image.read(0, 1).catch((e: unknown) => e))).toBe("CLOSED");
  });
});

describe("without a file system", () => {
  it("explains that a path needs qcow2-wasm/node when no platform can open files", async () => {
    const { platform } = await import("../../ts/platform.js");
    const saved = platform.openFile;
    delete platform.openFile;
    try {
      await expect(Qcow2Image.open("x.qcow2")).rejects.toThrow(/qcow2-wasm\/node/);
    } finally {
      platform.openFile = saved;
    }
  });
});
