// Runs the conformance suite against every backend, then checks what is specific to each.

import { writeFileSync } from "node:fs";
import path from "node:path";
import { describe, it, expect } from "vitest";
import { Qcow2Error } from "../../ts/errors.js";
import { BlobBackend } from "../../ts/io/blob.js";
import { MemoryBackend } from "../../ts/io/memory.js";
import { NodeFileBackend } from "../../ts/io/node-file.js";
import { randomBytes, rng, tempDir } from "../helpers/qemu.js";
import { backendConformance } from "./conformance.js";

const dir = tempDir("qcow2-backends-");
let files = 0;

function tempFile(initial: Uint8Array): string {
  const file = path.join(dir, `file-${files++}.img`);
  writeFileSync(file, initial);
  return file;
}

backendConformance("MemoryBackend", async (initial, { readOnly }) => new MemoryBackend(initial, { readOnly }), {
  writable: true,
});

for (const sync of [true, false]) {
  backendConformance(
    `NodeFileBackend (sync: ${sync})`,
    (initial, { readOnly }) => NodeFileBackend.open(tempFile(initial), { readOnly, sync }),
    { writable: true },
  );
  backendConformance(
    `NodeFileBackend (sync: ${sync}, read-only only)`,
    (initial) => NodeFileBackend.open(tempFile(initial), { sync }),
    { writable: false },
  );
}

backendConformance("BlobBackend", async (initial) => new BlobBackend(new Blob([initial.slice()])), {
  writable: false,
});

describe("MemoryBackend", () => {
  it("writes through to the wrapped array until it must grow", async () => {
    const data = new Uint8Array(16);
    const b = new MemoryBackend(data);
    await b.write(new Uint8Array([7, 8]), 3);
    expect(data[3]).toBe(7);
    expect(data[4]).toBe(8);
    await b.write(new Uint8Array(8), 12);
    expect(b.bytes().length).toBe(20);
    expect(b.bytes()[3]).toBe(7);
  });

  it("defaults to read-write and an empty array", async () => {
    const b = new MemoryBackend();
    expect(b.readOnly).toBe(false);
    expect(await b.size()).toBe(0);
  });
});

describe("NodeFileBackend", () => {
  it("open of a missing file fails with IO_ERROR naming the path", async () => {
    const missing = path.join(dir, "does-not-exist.qcow2");
    for (const readOnly of [true, false]) {
      const err = await NodeFileBackend.open(missing, { readOnly }).then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(err).toBeInstanceOf(Qcow2Error);
      expect((err as Qcow2Error).code).toBe("IO_ERROR");
      expect((err as Qcow2Error).message).toContain(missing);
      expect((err as Qcow2Error).cause).toBeInstanceOf(Error);
    }
  });

  it("opens read-only by default and is named by its path", async () => {
    const file = tempFile(new Uint8Array(10));
    const b = await NodeFileBackend.open(file);
    try {
      expect(b.readOnly).toBe(true);
      expect(b.name).toBe(file);
    } finally {
      await b.close();
    }
  });

  it("create: makes a missing file; positional writes do not append", async () => {
    const file = path.join(dir, "created.img");
    const b = await NodeFileBackend.open(file, { readOnly: false, create: true });
    try {
      expect(await b.size()).toBe(0);
      await b.write(new Uint8Array([1, 2, 3, 4]), 100);
      await b.write(new Uint8Array([9]), 0);
      expect(await b.size()).toBe(104);
      const head = new Uint8Array(1);
      expect(await b.read(head, 0)).toBe(1);
      expect(head[0]).toBe(9);
    } finally {
      await b.close();
    }
  });

  it("allocatedSize() is a non-negative number", async () => {
    const file = tempFile(randomBytes(rng(30), 64 * 1024));
    const b = await NodeFileBackend.open(file);
    try {
      const allocated = await b.allocatedSize();
      expect(typeof allocated).toBe("number");
      expect(Number.isSafeInteger(allocated)).toBe(true);
      expect(allocated).toBeGreaterThanOrEqual(0);
    } finally {
      await b.close();
    }
  });

  it("writes are visible to a second open of the same file", async () => {
    const data = randomBytes(rng(31), 5000);
    const file = tempFile(new Uint8Array(0));
    const w = await NodeFileBackend.open(file, { readOnly: false });
    await w.write(data, 0);
    await w.flush();
    await w.close();
    const r = await NodeFileBackend.open(file);
    try {
      const out = new Uint8Array(5000);
      expect(await r.read(out, 0)).toBe(5000);
      expect(out).toEqual(data);
    } finally {
      await r.close();
    }
  });
});

describe("BlobBackend", () => {
  it("takes its name from a File, else the given name, else 'blob'", () => {
    expect(new BlobBackend(new Blob([])).name).toBe("blob");
    expect(new BlobBackend(new Blob([]), "dropped").name).toBe("dropped");
    expect(new BlobBackend(new File([], "disk.qcow2")).name).toBe("disk.qcow2");
  });
});
