// The L2 cache: LRU eviction, concurrent loads of the same and of different tables, failed loads.

import { describe, expect, it } from "vitest";
import { L2Cache } from "../../ts/image/l2-cache.js";
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

describe("L2Cache", () => {
  it("loads once, evicts least recently used, and reloads what was evicted", async () => {
    const core = await WasmCore.create();
    const loads: number[] = [];
    const cache = new L2Cache(core, CLUSTER, 3, async (dst, off) => {
      loads.push(off);
      fillFor(dst, off);
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
    const cache = new L2Cache(core, CLUSTER, 4, async (dst, off) => {
      inFlight++;
      maxInFlight = Math.max(maxInFlight, inFlight);
      await new Promise((r) => setTimeout(r, rand() * 3));
      fillFor(dst, off);
      inFlight--;
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
    const cache = new L2Cache(core, CLUSTER, 1, async (dst, off) => {
      if (fail) throw new Error("disk on fire");
      fillFor(dst, off);
    });
    await expect(Promise.all([cache.get(512), cache.get(512)])).rejects.toThrow("disk on fire");
    fail = false;
    check(core, await cache.get(512), 512);
    check(core, await cache.get(1024), 1024);
  });

  it("clear() forgets loaded tables", async () => {
    const core = await WasmCore.create();
    let n = 0;
    const cache = new L2Cache(core, CLUSTER, 2, async (dst, off) => {
      n++;
      fillFor(dst, off);
    });
    await cache.get(512);
    cache.clear();
    expect(cache.peek(512)).toBe(-1);
    check(core, await cache.get(512), 512);
    expect(n).toBe(2);
  });
});
