// The L2 cache: LRU eviction, concurrent loads of the same and of different tables, failed loads.

import { describe, expect, it } from "vitest";
import { TableCache } from "../../ts/image/table-cache.js";
import { WasmCore } from "../../ts/wasm/core.js";
import { rng } from "../helpers/qemu.js";

const CLUSTER = 512;

/** A table's content: every byte is a function of its offset, so a wrong slot shows. */
function fillFor(dst: Uint8Array, l2Offset: number): void {
  for (let i = 0; i < dst.length; i++) dst[i] = (l2Offset / CLUSTER + i * 7) & 0xff;
}

function check(core: WasmCore, ptr: number, l2Offset: number): void {
  const expected = new Uint8Array(CLUSTER);
  fillFor(expected, l2Offset);
  expect(Buffer.from(core.bytes(ptr, CLUSTER)).equals(Buffer.from(expected))).toBe(true);
}

const noStore = async (): Promise<void> => {
  throw new Error("nothing is dirty in this test");
};

describe("TableCache", () => {
  it("loads once, evicts least recently used, and reloads what was evicted", async () => {
    const core = await WasmCore.create();
    const loads: number[] = [];
    const cache = new TableCache(core, CLUSTER, 3, {
      load: async (dst, off) => {
        loads.push(off);
        fillFor(dst, off);
      },
      store: noStore,
    });
    for (const off of [512, 1024, 1536]) check(core, await cache.get(off), off);
    check(core, await cache.get(512), 512); // hit; 1024 is now the least recently used
    check(core, await cache.get(2048), 2048); // evicts 1024
    expect(cache.peek(1024)).toBe(-1);
    expect(cache.peek(512)).toBeGreaterThanOrEqual(0);
    check(core, await cache.get(1024), 1024); // evicts 1536
    expect(loads).toEqual([512, 1024, 1536, 2048, 1024]);
  });

  it("serves many concurrent gets through few slots, each table loaded once per residency", async () => {
    const core = await WasmCore.create();
    const rand = rng(11);
    let inFlight = 0;
    let maxInFlight = 0;
    const cache = new TableCache(core, CLUSTER, 4, {
      load: async (dst, off) => {
        inFlight++;
        maxInFlight = Math.max(maxInFlight, inFlight);
        await new Promise((r) => setTimeout(r, rand() * 3));
        fillFor(dst, off);
        inFlight--;
      },
      store: noStore,
    });
    const offsets = Array.from({ length: 400 }, () => (1 + Math.floor(rand() * 12)) * CLUSTER);
    await Promise.all(
      offsets.map(async (off) => {
        const ptr = await cache.get(off);
        check(core, ptr, off); // used synchronously after get(), as the engine does
      }),
    );
    expect(maxInFlight).toBeLessThanOrEqual(4);
  });

  it("a failed load rejects its callers and leaves the slot usable", async () => {
    const core = await WasmCore.create();
    let fail = true;
    const cache = new TableCache(core, CLUSTER, 1, {
      load: async (dst, off) => {
        if (fail) throw new Error("disk on fire");
        fillFor(dst, off);
      },
      store: noStore,
    });
    await expect(Promise.all([cache.get(512), cache.get(512)])).rejects.toThrow("disk on fire");
    fail = false;
    check(core, await cache.get(512), 512);
    check(core, await cache.get(1024), 1024);
  });

  it("clear() forgets loaded tables", async () => {
    const core = await WasmCore.create();
    let n = 0;
    const cache = new TableCache(core, CLUSTER, 2, {
      load: async (dst, off) => {
        n++;
        fillFor(dst, off);
      },
      store: noStore,
    });
    await cache.get(512);
    cache.clear();
    expect(cache.peek(512)).toBe(-1);
    check(core, await cache.get(512), 512);
    expect(n).toBe(2);
  });

  it("writes a dirty table back before its slot is reused, and a get() of it waits for that write", async () => {
    const core = await WasmCore.create();
    const disk = new Map<number, Uint8Array>();
    const stored: number[] = [];
    const cache = new TableCache(core, CLUSTER, 1, {
      load: async (dst, off) => {
        const saved = disk.get(off);
        if (saved) dst.set(saved);
        else fillFor(dst, off);
      },
      store: async (src, off) => {
        await new Promise((r) => setTimeout(r, 2));
        stored.push(off);
        disk.set(off, src.slice());
      },
    });
    const ptr = await cache.create(512);
    core.bytes(ptr, CLUSTER).fill(0xab);
    cache.markDirty(512);
    const [other, again] = await Promise.all([cache.get(1024), cache.get(512)]);
    expect(other).toBeGreaterThanOrEqual(0);
    expect(again).toBeGreaterThanOrEqual(0);
    expect(stored).toEqual([512]);
    const now = await cache.get(512);
    expect(core.bytes(now, CLUSTER).every((b) => b === 0xab)).toBe(true);
  });

  it("flush() writes each dirty table once and leaves it clean", async () => {
    const core = await WasmCore.create();
    const stored: number[] = [];
    const cache = new TableCache(core, CLUSTER, 4, {
      load: async (dst, off) => fillFor(dst, off),
      store: async (_src, off) => void stored.push(off),
    });
    await cache.create(512);
    await cache.get(1024);
    await cache.create(1536, new Uint8Array(CLUSTER).fill(3));
    expect(cache.hasDirty()).toBe(true);
    await cache.flush();
    await cache.flush();
    expect(stored.sort((a, b) => a - b)).toEqual([512, 1536]);
    expect(cache.hasDirty()).toBe(false);
  });
});
