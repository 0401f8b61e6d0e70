// Crash safety of snapshot operations (DESIGN.md §4): create, delete and apply are cut at every
// write, with the unflushed writes dropped or a random subset kept. Every time, every snapshot the
// table still lists reads back exactly the disk it was taken of, and qemu-img check finds nothing
// worse than leaks and COPIED flags that disagree with a refcount. The flags cannot change in the
// same write as the refcounts they mirror, so qemu's own snapshot code has the same window; they
// only decide whether a write copies a cluster first, and `check -r all` sets them right.

import { spawnSync } from "node:child_process";
import { writeFileSync } from "node:fs";
import path from "node:path";
import { expect, it } from "vitest";
import { MemoryBackend, Qcow2Image } from "../../ts/node.js";
import { CrashBackend } from "../helpers/crash-backend.js";
import { describeQemu, rng, tempDir } from "../helpers/qemu.js";

const SIZE = 1 << 20;
const CLUSTER = 4096;

function fill(seed: number): Uint8Array {
  const out = new Uint8Array(SIZE);
  const r = rng(seed);
  // Some clusters left unallocated, some compressed-looking runs, some random.
  for (let c = 0; c < SIZE / CLUSTER; c++) {
    const x = r();
    if (x < 0.3) continue;
    const v = Math.floor(r() * 255) + 1;
    out.fill(v, c * CLUSTER, (c + 1) * CLUSTER - (x < 0.6 ? 100 : 0));
  }
  return out;
}

/** An image holding snapshots "a" (state 1) and "b" (state 2), and state 3 active. */
async function baseImage(): Promise<{ bytes: Uint8Array; states: Map<string, Uint8Array> }> {
  const backend = new MemoryBackend();
  const image = await Qcow2Image.create(backend, { size: SIZE, clusterSize: CLUSTER });
  const states = new Map<string, Uint8Array>();
  for (const [seed, name] of [[1, "a"], [2, "b"]] as const) {
    const state = fill(seed);
    await image.write(0, state);
    await image.snapshots.create(name);
    states.set(name, state);
  }
  const active = fill(3);
  await image.write(0, active.subarray(0, SIZE / 2));
  active.set(fill(2).subarray(SIZE / 2), SIZE / 2);
  states.set("active", active);
  await image.close();
  return { bytes: backend.bytes().slice(), states };
}

/** Create "c", delete "a", apply "b", create "d", with writes between. */
async function workload(image: Qcow2Image, states: Map<string, Uint8Array>): Promise<void> {
  // Each state is noted before the call: a crash may come after the table names the snapshot.
  states.set("c", states.get("active")!);
  await image.snapshots.create("c");
  await image.write(8192, new Uint8Array(20000).fill(0xee));
  await image.snapshots.delete("a");
  await image.snapshots.apply("b");
  await image.write(0, new Uint8Array(5000).fill(0xdd));
  const d = states.get("b")!.slice();
  d.fill(0xdd, 0, 5000);
  states.set("d", d);
  await image.snapshots.create("d");
  await image.close();
}

/** qemu-img check's JSON and its ERROR lines (it exits 2 on corruption and 3 on leaks). */
function qemuCheck(dir: string, disk: Uint8Array, repair = false): { json: Record<string, number>; errors: string[] } {
  const file = path.join(dir, "crash.qcow2");
  writeFileSync(file, disk);
  const r = spawnSync("qemu-img", ["check", ...(repair ? ["-r", "all"] : []), "--output=json", file], { encoding: "utf8" });
  if (r.status !== 0 && r.status !== 2 && r.status !== 3) throw new Error(`qemu-img check failed (${r.status}): ${r.stderr}`);
  return { json: JSON.parse(r.stdout) as Record<string, number>, errors: r.stderr.split("\n").filter((l) => l.startsWith("ERROR")) };
}

/** What a crash may leave: the count of corruptions that are not COPIED-flag mismatches, and whether a repair makes it clean. */
function verdict(dir: string, disk: Uint8Array): { otherCorruptions: number; checkErrors: number; cleanAfterRepair: boolean } {
  const { json, errors } = qemuCheck(dir, disk);
  const copied = errors.filter((l) => l.startsWith("ERROR OFLAG_COPIED")).length;
  const corruptions = json.corruptions ?? 0;
  let cleanAfterRepair = true;
  if (corruptions > 0) {
    const repaired = qemuCheck(dir, disk, true).json;
    cleanAfterRepair = (repaired.corruptions ?? 0) === 0 && (repaired.leaks ?? 0) === 0 && repaired["check-errors"] === 0;
  }
  return { otherCorruptions: corruptions - copied, checkErrors: json["check-errors"] ?? 0, cleanAfterRepair };
}

describeQemu("snapshot operations cut at every write", () => {
  const dir = tempDir("qcow2-snapcrash-");

  it("every crash point leaves every listed snapshot intact, and nothing a repair cannot fix", async () => {
    const base = await baseImage();
    const counter = new CrashBackend(base.bytes, Number.MAX_SAFE_INTEGER);
    const states = new Map(base.states);
    await workload(await Qcow2Image.open(counter, { readOnly: false }), states);
    const total = counter.writeCount;
    expect(total).toBeGreaterThan(30);
    // The uncut run: every snapshot as expected, check clean.
    const whole = new MemoryBackend(counter.afterCrash(() => 0, 1));
    const check = qemuCheck(dir, whole.bytes()).json;
    expect({ corruptions: check.corruptions ?? 0, leaks: check.leaks ?? 0 }).toEqual({ corruptions: 0, leaks: 0 });

    const pick = rng(5);
    for (let crashAt = 1; crashAt <= total; crashAt++) {
      const backend = new CrashBackend(base.bytes, crashAt);
      const seen = new Map(base.states);
      await workload(await Qcow2Image.open(backend, { readOnly: false }), seen).catch(() => undefined);
      for (const keep of [0, 0.5]) {
        const disk = backend.afterCrash(pick, keep);
        expect({ crashAt, keep, ...verdict(dir, disk) }).toEqual({ crashAt, keep, otherCorruptions: 0, checkErrors: 0, cleanAfterRepair: true });
        const image = await Qcow2Image.open(new MemoryBackend(disk, { readOnly: true }));
        const listed = await image.snapshots.list();
        await image.close();
        for (const sn of listed) {
          const at = await Qcow2Image.open(new MemoryBackend(disk, { readOnly: true }), { snapshot: { id: sn.id } });
          const data = await at.read(0, SIZE);
          await at.close();
          expect({ crashAt, keep, name: sn.name, intact: Buffer.compare(data, seen.get(sn.name)!) === 0 }).toEqual({
            crashAt,
            keep,
            name: sn.name,
            intact: true,
          });
        }
      }
    }
  }, 600_000);
});
