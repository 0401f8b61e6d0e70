// Metadata that contradicts itself, found while the image is open for writing: the access is
// refused and the corrupt bit set, as qemu does, so that nothing is overwritten until a repair.

import { spawnSync } from "node:child_process";
import { copyFileSync, readFileSync } from "node:fs";
import path from "node:path";
import { expect, it } from "vitest";
import { checkImage } from "../../ts/check/check.js";
import { Qcow2Image, isQcow2Error } from "../../ts/node.js";
import { ImageBytes } from "../check/damage.js";
import { describeQemu, qemuImg, qemuIo, tempDir } from "../helpers/qemu.js";

function corruptFlag(file: string): boolean {
  const info = JSON.parse(qemuImg(["info", "--output=json", file])) as { "format-specific": { data: { corrupt: boolean } } };
  return info["format-specific"].data.corrupt;
}

async function caught(fn: () => Promise<unknown>): Promise<unknown> {
  try {
    await fn();
  } catch (err) {
    return err;
  }
  return undefined;
}

describeQemu("corrupt metadata met while writing", () => {
  const dir = tempDir("qcow2-corrupt-");
  const base = path.join(dir, "base.qcow2");
  qemuImg(["create", "-f", "qcow2", base, "16M"]);
  qemuIo(base, ["write -P 0x11 0 128k"]);

  /** base with guest cluster 1 mapped onto the L1 table. */
  function intoL1(name: string): { file: string; l1: Buffer } {
    const img = new ImageBytes(base);
    img.setU64(img.l2Pos(1), 0x8000000000000000n | BigInt(img.h.l1TableOffset));
    const file = img.save(path.join(dir, name));
    return { file, l1: img.buf.subarray(img.h.l1TableOffset, img.h.l1TableOffset + 512) };
  }

  it("refuses a write that would land on the L1 table, and marks the image corrupt as qemu-io does", async () => {
    const { file, l1 } = intoL1("ours.qcow2");
    const image = await Qcow2Image.open(file, { readOnly: false });
    const err = await caught(() => image.write(65536 + 100, new Uint8Array(512).fill(0xee)));
    expect(isQcow2Error(err, "CORRUPT")).toBe(true);
    expect((err as Error).message).toMatch(/overlaps the active L1 table/);
    // Nothing more is written in this session, reads still work.
    expect(isQcow2Error(await caught(() => image.write(0, new Uint8Array(512))), "CORRUPT")).toBe(true);
    expect((await image.read(0, 4))[0]).toBe(0x11);
    await image.close();
    expect(corruptFlag(file)).toBe(true);
    const after = readFileSync(file);
    const img = new ImageBytes(file);
    expect(after.subarray(img.h.l1TableOffset, img.h.l1TableOffset + 512).equals(l1)).toBe(true);
    // And it cannot be opened for writing again until repaired.
    expect(isQcow2Error(await caught(() => Qcow2Image.open(file, { readOnly: false })), "CORRUPT")).toBe(true);

    const theirs = intoL1("theirs.qcow2").file;
    spawnSync("qemu-io", ["-c", "write -P 0xee 65636 512", theirs]);
    expect(corruptFlag(theirs)).toBe(true);
  });

  it("after check repairs it, the image opens for writing and the write goes elsewhere", async () => {
    const { file, l1 } = intoL1("repair.qcow2");
    const image = await Qcow2Image.open(file, { readOnly: false });
    await caught(() => image.write(65536, new Uint8Array(512)));
    await image.close();
    const report = await checkImage(file, { repair: "all" });
    expect(report.corruptions).toBe(0);
    expect(corruptFlag(file)).toBe(false);
    const again = await Qcow2Image.open(file, { readOnly: false });
    await again.write(65536, new Uint8Array(512).fill(0xee));
    await again.close();
    const img = new ImageBytes(file);
    expect(img.buf.subarray(img.h.l1TableOffset, img.h.l1TableOffset + 8).equals(l1.subarray(0, 8))).toBe(true);
    expect(spawnSync("qemu-img", ["check", file]).status).toBe(0);
  });

  it("marks the image corrupt when a read meets an unaligned data cluster offset", async () => {
    const img = new ImageBytes(base);
    img.setU64(img.l2Pos(1), img.u64(img.l2Pos(1)) + 0x200n);
    const file = img.save(path.join(dir, "unaligned.qcow2"));
    copyFileSync(file, `${file}.ro`);
    const ro = await Qcow2Image.open(`${file}.ro`);
    expect(isQcow2Error(await caught(() => ro.read(65536, 512)), "CORRUPT")).toBe(true);
    await ro.close();
    expect(corruptFlag(`${file}.ro`)).toBe(false); // read-only: nothing written
    const rw = await Qcow2Image.open(file, { readOnly: false });
    expect(isQcow2Error(await caught(() => rw.read(65536, 512)), "CORRUPT")).toBe(true);
    await rw.close();
    expect(corruptFlag(file)).toBe(true);
  });
});
