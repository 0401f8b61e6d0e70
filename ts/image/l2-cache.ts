// The L2 cache: a fixed pool of cluster-sized slots in WASM linear memory, filled from the backend
// on demand and evicted least-recently-used. Lookups in a slot run in WASM (asm/l2.ts).
//
// A slot address is only good until the next await: callers take it from `get()` and use it
// synchronously. Loads read into a JS buffer and copy into the slot after the await, so a memory
// grow during the read cannot leave a detached view behind.

import type { WasmCore } from "../wasm/core.js";

export type L2Loader = (dst: Uint8Array, l2Offset: number) => Promise<void>;

export class L2Cache {
  readonly slotCount: number;
  private readonly core: WasmCore;
  private readonly clusterSize: number;
  private readonly base: number;
  private readonly loader: L2Loader;
  /** l2Offset of the table in each slot, or -1. */
  private readonly owner: Float64Array;
  /** Use stamp per slot for LRU; 0 while loading (never evicted then). */
  private readonly stamp: Float64Array;
  private readonly slotOf = new Map<number, number>();
  private readonly loading = new Map<number, Promise<void>>();
  private clock = 1;

  constructor(core: WasmCore, clusterSize: number, slotCount: number, loader: L2Loader) {
    this.core = core;
    this.clusterSize = clusterSize;
    this.slotCount = slotCount;
    this.loader = loader;
    this.base = core.reserve(slotCount * clusterSize, 64);
    this.owner = new Float64Array(slotCount).fill(-1);
    this.stamp = new Float64Array(slotCount);
  }

  /** Slot address holding the table at `l2Offset` if cached, else -1. Marks it recently used. */
  peek(l2Offset: number): number {
    const slot = this.slotOf.get(l2Offset);
    if (slot === undefined || this.stamp[slot] === 0) return -1;
    this.stamp[slot] = this.clock++;
    return this.base + slot * this.clusterSize;
  }

  /** Slot address holding the table at `l2Offset`, loading it if needed. Use before the next await. */
  async get(l2Offset: number): Promise<number> {
    for (;;) {
      const ptr = this.peek(l2Offset);
      if (ptr >= 0) return ptr;
      await (this.loading.get(l2Offset) ?? this.load(l2Offset));
    }
  }

  private load(l2Offset: number): Promise<void> {
    const pending = this.fill(l2Offset).finally(() => this.loading.delete(l2Offset));
    this.loading.set(l2Offset, pending);
    return pending;
  }

  private async fill(l2Offset: number): Promise<void> {
    let slot = this.victim();
    while (slot < 0) {
      await Promise.race(this.loading.values());
      slot = this.victim();
    }
    const previous = this.owner[slot]!;
    if (previous >= 0) this.slotOf.delete(previous);
    this.owner[slot] = l2Offset;
    this.stamp[slot] = 0;
    this.slotOf.set(l2Offset, slot);
    const table = new Uint8Array(this.clusterSize);
    try {
      await this.loader(table, l2Offset);
    } catch (err) {
      this.slotOf.delete(l2Offset);
      this.owner[slot] = -1;
      this.stamp[slot] = 1;
      throw err;
    }
    this.core.u8().set(table, this.base + slot * this.clusterSize);
    this.stamp[slot] = this.clock++;
  }

  /** Least recently used slot that is not loading, or -1 when every slot is loading. */
  private victim(): number {
    let best = -1;
    let bestStamp = Infinity;
    for (let i = 0; i < this.slotCount; i++) {
      const s = this.stamp[i]!;
      if (this.owner[i] === -1) return i;
      if (s !== 0 && s < bestStamp) {
        best = i;
        bestStamp = s;
      }
    }
    return best;
  }

  /** Forget every cached table (after the L1 or L2 tables were changed behind the cache's back). */
  clear(): void {
    for (let i = 0; i < this.slotCount; i++) {
      if (this.stamp[i] !== 0) {
        this.owner[i] = -1;
        this.stamp[i] = 1;
      }
    }
    for (const [offset, slot] of this.slotOf) if (this.owner[slot] === -1) this.slotOf.delete(offset);
  }
}
