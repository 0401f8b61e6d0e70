// Internal snapshots against qemu: randomized workloads (fixed seeds) with snapshots taken,
// applied and deleted in turn by this library and by qemu-img, the guest contents at every
// snapshot compared with a model, and qemu-img check clean after every step.

import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import path from "node:path";
import { expect, it } from "vitest";
import { Qcow2Image, isQcow2Error } from "../../ts/node.js";
import { MemoryBackend } from "../../ts/io/memory.js";
import { describeQemu, qemuImg, rng, tempDir } from "../helpers/qemu.js";
import type { QemuSnapshotInfo } from "../../ts/ops/info.js";

function expectClean(file: string, when: string): void {
  const check = JSON.parse(qemuImg(["check", "--output=json", file])) as Record<string, number>;
  expect({ when, corruptions: check.corruptions ?? 0, leaks: check.leaks ?? 0, errors: check["check-errors"] }).toEqual({
    when,
    corruptions: 0,
    leaks: 0,
    errors: 0,
  });
}

/** The guest bytes qemu reads at a snapshot (or the active disk). */
function qemuContents(dir: string, file: string, snapshot?: string): Buffer {
  const out = path.join(dir, "contents.raw");
  const args = ["convert", ...(snapshot === undefined ? [] : ["-l", `snapshot.name=${snapshot}`]), "-O", "raw", file, out];
  execFileSync("qemu-img", args);
  return readFileSync(out);
}


function qemuSnapshots(file: string): QemuSnapshotInfo[] {
  const info = JSON.parse(qemuImg(["info", "--output=json", file])) as { snapshots?: QemuSnapshotInfo[] };
  return info.snapshots ?? [];
}

const CONFIGS = [
  { name: "v3, 64 KiB clusters", options: "cluster_size=65536", size: 6 << 20 },
  { name: "v3, 4 KiB clusters, 8-bit refcounts", options: "cluster_size=4096,refcount_bits=8", size: 3 << 20 },
  { name: "v2, 512-byte clusters", options: "compat=0.10,cluster_size=512", size: 1 << 20 },
  { name: "v3, lazy refcounts", options: "lazy_refcounts=on", size: 4 << 20 },
];

describeQemu("internal snapshots", () => {
  const dir = tempDir("qcow2-snapshots-");

  for (const config of CONFIGS) {
    for (const seed of [1, 2]) {
      it(`${config.name}, seed ${seed}: snapshots by both tools keep every disk state`, async () => {
        const file = path.join(dir, `work-${seed}.qcow2`);
        const size = config.size;
        qemuImg(["create", "-q", "-f", "qcow2", "-o", config.options, file, String(size)]);
        const rand = rng(seed * 1000 + config.size);
        let model = new Uint8Array(size);
        const states = new Map<string, Uint8Array>();
        let counter = 0;
        for (let round = 0; round < 7; round++) {
          // A round of guest writes through the library, overlapping and of every kind.
          const image = await Qcow2Image.open(file, { readOnly: false });
          const cs = image.clusterSize;
          const jobs: Promise<void>[] = [];
          for (let i = 0; i < 12; i++) {
            const kind = rand();
            if (kind < 0.1) {
              const start = Math.floor((rand() * size) / cs) * cs;
              const n = Math.min(size - start, cs * (1 + Math.floor(rand() * 3)));
              const data = new Uint8Array(n).fill(0x30 + (i % 16));
              model.set(data, start);
              jobs.push(image.writeCompressed(start, data));
            } else if (kind < 0.2) {
              const start = Math.floor(rand() * (size - 1));
              const n = Math.min(size - start, 1 + Math.floor(rand() * 4 * cs));
              model.fill(0, start, start + n);
              jobs.push(image.writeZeroes(start, n));
            } else {
              const start = Math.floor(rand() * (size - 1));
              const n = Math.min(size - start, 1 + Math.floor(rand() * 3 * cs));
              const data = new Uint8Array(n);
              for (let k = 0; k < n; k++) data[k] = (round * 37 + i * 11 + k) & 0xff;
              model.set(data, start);
              jobs.push(image.write(start, data));
            }
            // Writes run concurrently but must not overlap here, or the model's order is unknown.
            await Promise.all(jobs.splice(0));
          }
          // Snapshot: by us on even rounds, by qemu-img on odd ones.
          const name = `snap${counter++}`;
          if (round % 2 === 0) {
            await image.snapshots.create(name);
            await image.close();
          } else {
            await image.close();
            qemuImg(["snapshot", "-c", name, file]);
          }
          states.set(name, model.slice());
          expectClean(file, `after creating ${name}`);

          // Now and then apply or delete one, alternating the tool.
          const names = [...states.keys()];
          const pick = names[Math.floor(rand() * names.length)]!;
          const action = rand();
          const byUs = rand() < 0.5;
          if (action < 0.3) {
            if (byUs) {
              const img = await Qcow2Image.open(file, { readOnly: false });
              await img.snapshots.apply(pick);
              await img.close();
            } else {
              qemuImg(["snapshot", "-a", pick, file]);
            }
            model = states.get(pick)!.slice();
            expectClean(file, `after applying ${pick} (${byUs ? "us" : "qemu"})`);
          } else if (action < 0.55 && names.length > 1) {
            if (byUs) {
              const img = await Qcow2Image.open(file, { readOnly: false });
              await img.snapshots.delete(pick);
              await img.close();
            } else {
              qemuImg(["snapshot", "-d", pick, file]);
            }
            states.delete(pick);
            expectClean(file, `after deleting ${pick} (${byUs ? "us" : "qemu"})`);
          }
        }

        // Every state, read by qemu and by us, equals the model.
        expect(Buffer.compare(qemuContents(dir, file), model)).toBe(0);
        const listed = qemuSnapshots(file).map((s) => s.name);
        expect(listed).toEqual([...states.keys()]);
        const image = await Qcow2Image.open(file);
        const ours = await image.snapshots.list();
        expect(ours.map((s) => s.name)).toEqual(listed);
        expect(ours.map((s) => s.id)).toEqual(qemuSnapshots(file).map((s) => s.id));
        await image.close();
        for (const [name, state] of states) {
          expect({ name, same: Buffer.compare(qemuContents(dir, file, name), state) === 0 }).toEqual({ name, same: true });
          const at = await Qcow2Image.open(file, { snapshot: name });
          expect(at.virtualSize).toBe(size);
          const bytes = await at.read(0, size);
          expect({ name, same: Buffer.compare(bytes, state) === 0 }).toEqual({ name, same: true });
          await at.close();
        }
      });
    }
  }

  it("records what qemu records, and qemu-img snapshot -l lists it the same way", async () => {
    const file = path.join(dir, "fields.qcow2");
    qemuImg(["create", "-q", "-f", "qcow2", file, "64M"]);
    qemuImg(["snapshot", "-c", "first", file]);
    const image = await Qcow2Image.open(file, { readOnly: false });
    const made = await image.snapshots.create("second", { dateSec: 1_700_000_000, dateNsec: 123_000_000, vmClockNsec: 3_723_456_000_000 });
    expect(made).toMatchObject({ id: "2", name: "second", vmStateSize: 0, diskSize: 64 << 20, icount: 0 });
    await image.close();
    const listed = qemuSnapshots(file);
    expect(listed[1]).toEqual({
      id: "2",
      name: "second",
      "vm-state-size": 0,
      "date-sec": 1_700_000_000,
      "date-nsec": 123_000_000,
      "vm-clock-sec": 3723,
      "vm-clock-nsec": 456_000_000,
      icount: 0,
    });
    // qemu's entry read by us.
    const again = await Qcow2Image.open(file);
    const [first] = await again.snapshots.list();
    expect(first).toMatchObject({ id: "1", name: "first", diskSize: 64 << 20, icount: 0, vmClockNsec: 0, dateSec: listed[0]!["date-sec"] });
    await again.close();
  });

  it("ids follow qemu's rule, names may repeat, and lookups go by id first", async () => {
    const file = path.join(dir, "ids.qcow2");
    qemuImg(["create", "-q", "-f", "qcow2", file, "1M"]);
    const image = await Qcow2Image.open(file, { readOnly: false });
    await image.snapshots.create("a");
    await image.snapshots.create("a");
    await image.snapshots.create("2");
    expect((await image.snapshots.list()).map((s) => [s.id, s.name])).toEqual([["1", "a"], ["2", "a"], ["3", "2"]]);
    // "2" is an id before it is a name.
    expect((await image.snapshots.find("2"))?.name).toBe("a");
    expect((await image.snapshots.find({ name: "2" }))?.id).toBe("3");
    await image.snapshots.delete("1");
    await image.snapshots.delete("3");
    // One more than the largest id left.
    expect((await image.snapshots.create("b")).id).toBe("3");
    await expect(image.snapshots.apply("nope")).rejects.toSatisfy((e) => isQcow2Error(e, "NOT_FOUND"));
    await expect(image.snapshots.create("x", { id: "2" })).rejects.toSatisfy((e) => isQcow2Error(e, "ALREADY_EXISTS"));
    await image.snapshots.rename("b", "renamed");
    await image.close();
    expect(qemuSnapshots(file).map((s) => [s.id, s.name])).toEqual([["2", "a"], ["3", "renamed"]]);
    expectClean(file, "after ids");
    qemuImg(["snapshot", "-d", "a", file]);
    qemuImg(["snapshot", "-d", "renamed", file]);
    // No snapshots left: the header says so the way qemu leaves it (no table).
    const header = readFileSync(file).subarray(60, 72);
    expect([...header]).toEqual(new Array(12).fill(0));
  });

  it("applies a snapshot taken at another disk size (v3), and refuses to resize v2 with snapshots", async () => {
    const file = path.join(dir, "sizes.qcow2");
    qemuImg(["create", "-q", "-f", "qcow2", file, "1M"]);
    const image = await Qcow2Image.open(file, { readOnly: false });
    await image.write(0, new Uint8Array(1000).fill(9));
    await image.snapshots.create("small");
    await image.resize(3 << 20);
    await image.write(2 << 20, new Uint8Array(1000).fill(8));
    await image.snapshots.create("big");
    // Read without applying: at the snapshot's size, or (as qemu-img convert -l) at the current one.
    const view = await Qcow2Image.open(file, { snapshot: "small" });
    expect(view.virtualSize).toBe(1 << 20);
    await view.close();
    const wide = await Qcow2Image.open(file, { snapshot: "small", snapshotAtCurrentSize: true });
    expect(wide.virtualSize).toBe(3 << 20);
    expect([(await wide.read(0, 1))[0], (await wide.read(2 << 20, 1))[0]]).toEqual([9, 0]);
    await wide.close();
    await image.snapshots.apply("small");
    expect(image.virtualSize).toBe(1 << 20);
    expect((await image.read(0, 4))[0]).toBe(9);
    await image.close();
    expectClean(file, "after apply small");
    expect(JSON.parse(qemuImg(["info", "--output=json", file]))["virtual-size"]).toBe(1 << 20);
    qemuImg(["snapshot", "-a", "big", file]);
    const back = await Qcow2Image.open(file, { readOnly: false });
    expect(back.virtualSize).toBe(3 << 20);
    expect((await back.read(2 << 20, 1))[0]).toBe(8);
    await back.snapshots.apply("small");
    await back.close();
    expectClean(file, "after apply small again");

    const v2 = path.join(dir, "v2.qcow2");
    qemuImg(["create", "-q", "-f", "qcow2", "-o", "compat=0.10", v2, "1M"]);
    qemuImg(["snapshot", "-c", "s", v2]);
    const old = await Qcow2Image.open(v2, { readOnly: false });
    await expect(old.resize(2 << 20)).rejects.toThrow("Can't resize a v2 image which has snapshots");
    await old.close();
  });

  it("saves VM state with a snapshot, past the disk, and loads it back after apply", async () => {
    const file = path.join(dir, "vmstate.qcow2");
    qemuImg(["create", "-q", "-f", "qcow2", file, "8M"]);
    const image = await Qcow2Image.open(file, { readOnly: false });
    const rand = rng(77);
    const state = new Uint8Array(300_000);
    for (let i = 0; i < state.length; i++) state[i] = Math.floor(rand() * 256);
    await image.write(0, new Uint8Array(65536).fill(1));
    const sn = await image.snapshots.create("with-state", { vmState: state });
    expect(sn.vmStateSize).toBe(state.length);
    // The active disk no longer holds it.
    expect([...(await image.snapshots.loadVmState(0, 16))]).toEqual(new Array(16).fill(0));
    await image.write(0, new Uint8Array(65536).fill(2));
    await image.close();
    expectClean(file, "after saving VM state");
    expect(qemuSnapshots(file)[0]!["vm-state-size"]).toBe(state.length);
    expect(qemuImg(["snapshot", "-l", file])).toMatch(/with-state\s+293 KiB/);

    const again = await Qcow2Image.open(file, { readOnly: false });
    await again.snapshots.apply("with-state");
    expect(Buffer.compare(await again.snapshots.loadVmState(0, state.length), state)).toBe(0);
    expect(Buffer.compare(await again.snapshots.loadVmState(1000, 5000), state.subarray(1000, 6000))).toBe(0);
    expect((await again.read(0, 1))[0]).toBe(1);
    await again.close();
    expectClean(file, "after applying VM state");
    // Deleting it frees the state too.
    qemuImg(["snapshot", "-d", "with-state", file]);
    expectClean(file, "after deleting by qemu");
  });

  it("reads qemu's VM state: a snapshot saved by qemu with vmstate", async () => {
    // qemu-img cannot save VM state; build one with the library and check qemu deletes it cleanly,
    // then the reverse: the library deletes a snapshot whose L1 reaches past the disk.
    const file = path.join(dir, "vm2.qcow2");
    qemuImg(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", file, "1M"]);
    const image = await Qcow2Image.open(file, { readOnly: false });
    await image.snapshots.create("a", { vmState: new Uint8Array(3 << 20).fill(5) });
    await image.snapshots.create("b");
    await image.snapshots.delete("a");
    await image.close();
    expectClean(file, "after deleting a VM-state snapshot");
  });

  it("refuses a hostile snapshot table with a clear error", async () => {
    const file = path.join(dir, "hostile.qcow2");
    qemuImg(["create", "-q", "-f", "qcow2", file, "1M"]);
    qemuImg(["snapshot", "-c", "s", file]);
    const bytes = new Uint8Array(readFileSync(file));
    const dv = new DataView(bytes.buffer);
    const table = Number(dv.getBigUint64(64));
    // An unaligned L1 table offset in the entry.
    dv.setUint32(table + 4, dv.getUint32(table + 4) + 8);
    const image = await Qcow2Image.open(new MemoryBackend(bytes.slice()), { readOnly: false });
    await expect(image.snapshots.apply("s")).rejects.toSatisfy((e) => isQcow2Error(e, "CORRUPT") && /not cluster aligned/.test((e as Error).message));
    await image.close();
    await expect(Qcow2Image.open(new MemoryBackend(bytes.slice()), { snapshot: "s" })).rejects.toSatisfy((e) => isQcow2Error(e, "CORRUPT"));
    // extra_data_size past qemu's limit.
    const huge = bytes.slice();
    new DataView(huge.buffer).setUint32(table + 36, 1 << 20);
    const img2 = await Qcow2Image.open(new MemoryBackend(huge), { readOnly: false });
    await expect(img2.snapshots.list()).rejects.toSatisfy((e) => isQcow2Error(e, "CORRUPT") && /extra_data_size/.test((e as Error).message));
    await img2.close();
  });

  it("refuses a snapshot on 1-bit refcounts of a disk with data, before changing anything", async () => {
    const file = path.join(dir, "rc1.qcow2");
    qemuImg(["create", "-q", "-f", "qcow2", "-o", "refcount_bits=1", file, "1M"]);
    // An empty disk has nothing to share: qemu takes that snapshot, and so do we.
    const empty = await Qcow2Image.open(file, { readOnly: false });
    await empty.snapshots.create("empty");
    await empty.write(0, new Uint8Array(512).fill(1));
    await empty.close();
    expectClean(file, "after a snapshot on 1-bit refcounts");
    const before = readFileSync(file);
    const image = await Qcow2Image.open(file, { readOnly: false });
    await expect(image.snapshots.create("s")).rejects.toSatisfy((e) => isQcow2Error(e, "LIMIT_EXCEEDED"));
    await image.close();
    expect(Buffer.compare(readFileSync(file), before)).toBe(0);
  });
});
