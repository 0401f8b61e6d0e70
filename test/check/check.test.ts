// check against qemu-img check on a corpus of damaged images: the same counts, exit code and
// diagnostics; after repair by either tool, both give the same verdict, and the guest data is
// unchanged. Where qemu's own repair succeeds, ours prints the same repair report.

import { spawnSync } from "node:child_process";
import { copyFileSync, readFileSync } from "node:fs";
import path from "node:path";
import { expect, it } from "vitest";
import { checkExitCode, checkImage, checkToQemuJson, type RepairMode } from "../../ts/check/check.js";
import { MemoryBackend } from "../../ts/io/memory.js";
import "../../ts/node.js";
import { describeQemu, tempDir } from "../helpers/qemu.js";
import { buildDamageCorpus } from "./damage.js";

interface Verdict {
  status: number | null;
  json: Record<string, unknown> | undefined;
  diagnostics: string[];
}

/** qemu-img check; stderr lines without qemu-img's own "qemu-img: …" messages. */
function qemuCheck(file: string, repair: RepairMode = "none"): Verdict {
  const r = spawnSync("qemu-img", ["check", "--output=json", ...(repair === "none" ? [] : ["-r", repair]), file], {
    encoding: "utf8",
    timeout: 30_000,
  });
  let json: Record<string, unknown> | undefined;
  if (r.stdout.trim()) {
    json = JSON.parse(r.stdout) as Record<string, unknown>;
    delete json.filename;
  }
  return { status: r.status, json, diagnostics: r.stderr.split("\n").filter((l) => l !== "" && !l.startsWith("qemu-img:")) };
}

async function ourCheck(file: string, repair: RepairMode = "none"): Promise<Verdict> {
  try {
    const report = await checkImage(file, { repair });
    let json: Record<string, unknown> | undefined;
    if (report.failure === undefined) {
      json = checkToQemuJson(report);
      delete json.filename;
    }
    return { status: checkExitCode(report), json, diagnostics: report.diagnostics };
  } catch {
    return { status: 1, json: undefined, diagnostics: [] };
  }
}

function guestBytes(file: string): Buffer | undefined {
  const raw = `${file}.raw`;
  const r = spawnSync("qemu-img", ["convert", "-O", "raw", file, raw]);
  return r.status === 0 ? readFileSync(raw) : undefined;
}

describeQemu("check on damaged images, against qemu-img check", () => {
  const dir = tempDir("qcow2-check-");
  const cases = buildDamageCorpus(dir);

  for (const c of cases.filter((c) => !c.qemuHangs)) {
    it(`${c.name}: ${c.what}`, async () => {
      const q = qemuCheck(c.file);
      const ours = await ourCheck(c.file);
      expect({ status: ours.status, json: ours.json }).toEqual({ status: q.status, json: q.json });
      if (q.json) expect(ours.diagnostics).toEqual(q.diagnostics);

      // Repair a copy with each tool; both tools then agree on each result.
      for (const repair of ["leaks", "all"] as const) {
        const mine = path.join(dir, `${c.name}.ours-${repair}.qcow2`);
        const theirs = path.join(dir, `${c.name}.qemu-${repair}.qcow2`);
        copyFileSync(c.file, mine);
        copyFileSync(c.file, theirs);
        const before = guestBytes(c.file);
        const oursRepair = await ourCheck(mine, repair);
        const qemuRepair = qemuCheck(theirs, repair);
        // qemu finished its repair (it may give up: 1; or never finish on a hostile snapshot count).
        const qemuRepaired = qemuRepair.status !== 1 && qemuRepair.status !== null;
        if (qemuRepaired) {
          // The same report, line for line.
          expect({ status: oursRepair.status, json: oursRepair.json }).toEqual({ status: qemuRepair.status, json: qemuRepair.json });
          expect(oursRepair.diagnostics).toEqual(qemuRepair.diagnostics);
        }
        const afterOurs = { qemu: qemuCheck(mine).status, ours: (await ourCheck(mine)).status };
        expect(afterOurs.qemu).toBe(afterOurs.ours);
        // A completed repair reports the state it leaves (its double check).
        if (oursRepair.status !== 1) expect(afterOurs.qemu).toBe(oursRepair.status);
        if (qemuRepaired) expect(afterOurs.qemu).toBe(qemuCheck(theirs).status);
        if (before) expect(guestBytes(mine)?.equals(before)).toBe(true);
      }
    }, 60_000);
  }

  it("repair all leaves every repairable image clean in both tools", async () => {
    const repairable = cases.filter((c) =>
      ["refcount-zero-used", "refcount-low", "refcount-extra-unused", "refcount-high", "l2-into-l1", "reftable-unaligned", "reftable-reserved",
        "refblock-outside", "copied-missing", "copied-extra", "l1-copied-missing", "prealloc-zero-unaligned", "corrupt-bit", "corrupt-bit-and-leak",
        "compressed-refcount-zero", "snapshot-refcount-zero", "v2-refcount-zero", "v2-leak", "refbits1-leak", "dirty-lazy",
        "bitmap-directory-refcount-zero"].includes(c.name),
    );
    expect(repairable.length).toBe(21);
    for (const c of repairable) {
      const copy = path.join(dir, `${c.name}.clean.qcow2`);
      copyFileSync(c.file, copy);
      expect((await ourCheck(copy, "all")).status, c.name).toBe(0);
      expect(qemuCheck(copy), c.name).toMatchObject({ status: 0, diagnostics: [] });
      const info = JSON.parse(spawnSync("qemu-img", ["info", "--output=json", copy], { encoding: "utf8" }).stdout) as {
        "format-specific": { data: { corrupt?: boolean } };
        "dirty-flag": boolean;
      };
      expect(info["format-specific"].data.corrupt ?? false, c.name).toBe(false);
      expect(info["dirty-flag"], c.name).toBe(false);
    }
  }, 120_000);

  it("a backing chain that loops is refused by the CLI, where qemu-img check never returns", () => {
    const loop = cases.find((c) => c.qemuHangs)!;
    const cli = path.join(import.meta.dirname, "..", "..", "build", "cli", "main.js");
    const r = spawnSync(process.execPath, [cli, "check", loop.file], { encoding: "utf8", timeout: 30_000 });
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/Could not open .*loop/);
  });

  it("gives the same report whatever the backend, batch size and WASM build", async () => {
    for (const c of cases.filter((c) => ["l2-past-eof", "refbits1-overflow", "reftable-unaligned", "truncated-data", "base"].some((n) => c.name === n))) {
      const reference = await checkImage(c.file);
      const bytes = new Uint8Array(readFileSync(c.file));
      for (const [batchBytes, wasm] of [[512, "scalar"], [65536, "simd"], [1 << 20, "scalar"]] as const) {
        const report = await checkImage(new MemoryBackend(bytes.slice(), { name: c.file }), { batchBytes, wasm });
        expect(report, `${c.name} batch ${batchBytes} ${wasm}`).toEqual(reference);
      }
    }
  });
});
