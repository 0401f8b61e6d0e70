// check's repair of the snapshot table: v3 entries without the extra data qemu requires are
// reported, and `repair: "all"` writes the table anew with it, as qemu-img check -r all does.
// Both tools repair copies of one image; reports, diagnostics and the repaired tables must agree.

import { spawnSync } from "node:child_process";
import { copyFileSync, readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { expect, it } from "vitest";
import { checkImage, checkToQemuJson } from "../../ts/node.js";
import { describeQemu, qemuImg, qemuIo, tempDir } from "../helpers/qemu.js";

/** The image's snapshot table with the entries listed in `strip` rewritten without extra data. */
function stripExtraData(file: string, strip: number[]): void {
  const bytes = new Uint8Array(readFileSync(file));
  const dv = new DataView(bytes.buffer);
  const nb = dv.getUint32(60);
  const offset = Number(dv.getBigUint64(64));
  const parts: Uint8Array[] = [];
  let pos = offset;
  for (let i = 0; i < nb; i++) {
    const idSize = dv.getUint16(pos + 12);
    const nameSize = dv.getUint16(pos + 14);
    const extraSize = dv.getUint32(pos + 36);
    const fixed = bytes.slice(pos, pos + 40);
    const extra = bytes.slice(pos + 40, pos + 40 + extraSize);
    const names = bytes.slice(pos + 40 + extraSize, pos + 40 + extraSize + idSize + nameSize);
    const keep = strip.includes(i) ? new Uint8Array(0) : extra;
    new DataView(fixed.buffer).setUint32(36, keep.length);
    const entry = new Uint8Array(Math.ceil((40 + keep.length + names.length) / 8) * 8);
    entry.set(fixed);
    entry.set(keep, 40);
    entry.set(names, 40 + keep.length);
    parts.push(entry);
    pos += Math.ceil((40 + extraSize + idSize + nameSize) / 8) * 8;
  }
  let at = offset;
  bytes.fill(0, offset, pos);
  for (const p of parts) {
    bytes.set(p, at);
    at += p.length;
  }
  writeFileSync(file, bytes);
}

function qemuCheck(file: string, repair: boolean): { status: number; json: unknown; diagnostics: string[] } {
  const r = spawnSync("qemu-img", ["check", ...(repair ? ["-r", "all"] : []), "--output=json", file], { encoding: "utf8" });
  return { status: r.status ?? -1, json: JSON.parse(r.stdout), diagnostics: r.stderr.split("\n").filter(Boolean) };
}

describeQemu("check: the snapshot table", () => {
  const dir = tempDir("qcow2-snaptable-");

  it("reports incomplete v3 entries, and repairs them as qemu-img check -r all does", async () => {
    const base = path.join(dir, "base.qcow2");
    qemuImg(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", base, "1M"]);
    qemuIo(base, ["write -P 1 0 64k"]);
    qemuImg(["snapshot", "-c", "first", base]);
    qemuIo(base, ["write -P 2 32k 64k"]);
    qemuImg(["snapshot", "-c", "second", base]);
    qemuImg(["snapshot", "-c", "third", base]);
    stripExtraData(base, [0, 2]);

    const theirs = qemuCheck(base, false);
    const ours = await checkImage(base);
    expect({ json: checkToQemuJson({ ...ours, filename: base }), diagnostics: ours.diagnostics }).toEqual({
      json: theirs.json,
      diagnostics: theirs.diagnostics,
    });

    const a = path.join(dir, "ours.qcow2");
    const b = path.join(dir, "qemu.qcow2");
    copyFileSync(base, a);
    copyFileSync(base, b);
    const repaired = await checkImage(a, { repair: "all" });
    const qemuRepaired = qemuCheck(b, true);
    expect(qemuRepaired.json).toMatchObject({ "corruptions-fixed": 2 });
    expect({ json: checkToQemuJson({ ...repaired, filename: b }), diagnostics: repaired.diagnostics }).toEqual({
      json: qemuRepaired.json,
      diagnostics: qemuRepaired.diagnostics,
    });
    // Both repaired copies check clean in both tools and list the same snapshots.
    for (const file of [a, b]) {
      expect(qemuCheck(file, false).status).toBe(0);
      expect((await checkImage(file)).corruptions).toBe(0);
    }
    const list = (file: string): unknown => (JSON.parse(qemuImg(["info", "--output=json", file])) as { snapshots: unknown }).snapshots;
    expect(list(a)).toEqual(list(b));
    for (const name of ["first", "second", "third"]) {
      const read = (file: string): Buffer => {
        const out = path.join(dir, "out.raw");
        qemuImg(["convert", "-l", `snapshot.name=${name}`, "-O", "raw", file, out]);
        return readFileSync(out);
      };
      expect({ name, same: Buffer.compare(read(a), read(b)) === 0 }).toEqual({ name, same: true });
    }
  });
});
