// Backend errors during writes: every failure reaches the caller as a Qcow2Error, later requests
// go on, and the image closes into one that qemu-img check finds free of corruption (leaks allowed),
// with every byte outside the failed requests as the model says.

import { spawnSync } from "node:child_process";
import { writeFileSync } from "node:fs";
import path from "node:path";
import { expect, it } from "vitest";
import { MemoryBackend, Qcow2Error, Qcow2ErrorCode, Qcow2Image } from "../../ts/node.js";
import { describeQemu, rng, tempDir } from "../helpers/qemu.js";

/** A memory backend whose writes and flushes fail now and then (seeded). */
class FlakyBackend extends MemoryBackend {
  failures = 0;
  enabled = true;
  constructor(initial: Uint8Array, private readonly chance: () => boolean) {
    super(initial);
  }
  override async write(src: Uint8Array, pos: number): Promise<void> {
    if (this.enabled && this.chance()) {
      this.failures++;
      throw new Qcow2Error(Qcow2ErrorCode.IO_ERROR, `flaky: write of ${src.length} at ${pos} failed`);
    }
    return super.write(src, pos);
  }
  override async flush(): Promise<void> {
    if (this.enabled && this.chance()) {
      this.failures++;
      throw new Qcow2Error(Qcow2ErrorCode.IO_ERROR, "flaky: flush failed");
    }
    return super.flush();
  }
}

describeQemu("backend errors during writes", () => {
  const dir = tempDir("qcow2-ioerr-");

  it.each([1, 2, 3])("seed %i: errors reach the caller and leave no corruption", async (seed) => {
    const size = 4 << 20;
    const cs = 4096;
    const created = new MemoryBackend();
    await (await Qcow2Image.create(created, { size, clusterSize: cs })).close();
    const rand = rng(seed);
    const backend = new FlakyBackend(created.bytes().slice(), () => rand() < 0.03);
    const image = await Qcow2Image.open(backend, { readOnly: false });
    const model = new Uint8Array(size);
    const unsure = new Uint8Array(size);
    let errors = 0;
    for (let i = 0; i < 300; i++) {
      const start = Math.floor(rand() * (size - 1));
      const len = Math.min(size - start, 1 + Math.floor(rand() * 3 * cs));
      const data = new Uint8Array(len).fill((i % 250) + 1);
      const op = rand();
      try {
        if (op < 0.8) {
          await image.write(start, data);
          model.set(data, start);
          unsure.fill(0, start, start + len);
        } else if (op < 0.9) {
          await image.writeZeroes(start, len);
          model.fill(0, start, start + len);
          unsure.fill(0, start, start + len);
        } else {
          await image.flush();
        }
      } catch (err) {
        expect(err).toBeInstanceOf(Qcow2Error);
        expect((err as Qcow2Error).code).toBe("IO_ERROR");
        errors++;
        // A failed request may have landed in part, or not at all.
        if (op < 0.9) unsure.fill(1, start, start + len);
      }
    }
    expect(errors).toBeGreaterThan(0);
    backend.enabled = false;
    await image.close();
    const file = path.join(dir, `flaky-${seed}.qcow2`);
    writeFileSync(file, backend.bytes());
    const r = spawnSync("qemu-img", ["check", "--output=json", file], { encoding: "utf8" });
    const check = JSON.parse(r.stdout) as Record<string, number>;
    expect({ corruptions: check.corruptions ?? 0, errors: check["check-errors"] }).toEqual({ corruptions: 0, errors: 0 });
    await using reopened = await Qcow2Image.open(file);
    const data = await reopened.read(0, size);
    let wrong = -1;
    for (let i = 0; i < size; i++) {
      if (!unsure[i] && data[i] !== model[i]) {
        wrong = i;
        break;
      }
    }
    expect(wrong).toBe(-1);
  });
});
