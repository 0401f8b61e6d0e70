// The L2 cache: a fixed pool of cluster-sized slots in WASM linear memory, filled from the backend
// on demand and evicted least-recently-used. Lookups in a slot run in WASM (asm/l2.ts).
//
// A slot address is only good until the next await: callers take it from `get()` and use it
// synchronously. Loads read into a JS buffer and copy into the slot after the await, so a memory
// grow during the read cannot leave a detached view behind.
//
// Recency is a doubly linked list over slot indexes (O(1) per hit and per eviction: images with
// 512-byte clusters have tens of thousands of slots). Slots being loaded are off the list, so they
// are never chosen for eviction.

import type { WasmCore } from "../wasm/core.js";

export type L2Loader = (dst: Uint8Array, l2Offset: number) => Promise<void>;

const NONE = -1;

export class L2Cache {
  readonly slotCount: number;
  private readonly core: WasmCore;
  private readonly clusterSize: number;
  private readonly base: number;
  private readonly loader: L2Loader;
  private readonly slotOf = new Map<number, number>();
  private readonly loading = new Map<number, Promise<void>>();
  /** l2Offset held by each slot, or -1. */
  private readonly owner: Float64Array;
  private readonly prev: Int32Array;
  private readonly next: Int32Array;
  /** Most and least recently used slots on the list. */
  private head = NONE;
  private tail = NONE;
  /** Slots never used yet are handed out in order before anything is evicted. */
  private unused = 0;

  constructor(core: WasmCore, clusterSize: number, slotCount: number, loader: L2Loader) {
    this.core = core;
    this.clusterSize = clusterSize;
    this.slotCount = slotCount;
    this.loader = loader;
    this.base = core.reserve(slotCount * clusterSize, 64);
    this.owner = new Float64Array(slotCount).fill(-1);
    this.prev = new Int32Array(slotCount).fill(NONE);
    this.next = new Int32Array(slotCount).fill(NONE);
  }

  /** Slot address holding the table at `l2Offset` if cached and loaded, else -1. Marks it used. */
  peek(l2Offset: number): number {
    const slot = this.slotOf.get(l2Offset);
    if (slot === undefined || this.loading.has(l2Offset)) return -1;
    if (slot !== this.head) {
      this.unlink(slot);
      this.pushHead(slot);
    }
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
    const pending = this.fill(l2Offset);
    this.loading.set(l2Offset, pending);
    return pending;
  }

  private async fill(l2Offset: number): Promise<void> {
    // Claim a slot synchronously, before any await, so concurrent loads never share one.
    let slot = this.claim();
    while (slot === NONE) {
      await Promise.race(this.loading.values()).catch(() => undefined);
      slot = this.claim();
    }
    this.owner[slot] = l2Offset;
    this.slotOf.set(l2Offset, slot);
    const table = new Uint8Array(this.clusterSize);
    try {
      await this.loader(table, l2Offset);
      this.core.u8().set(table, this.base + slot * this.clusterSize);
      this.pushHead(slot);
    } catch (err) {
      this.slotOf.delete(l2Offset);
      this.owner[slot] = -1;
      this.pushTail(slot);
      throw err;
    } finally {
      this.loading.delete(l2Offset);
    }
  }

  /** A slot to fill: a never-used one, else the least recently used (taken off the list). */
  private claim(): number {
    if (this.unused < this.slotCount) return this.unused++;
    const slot = this.tail;
    if (slot === NONE) return NONE;
    this.unlink(slot);
    const previous = this.owner[slot]!;
    if (previous >= 0) this.slotOf.delete(previous);
    this.owner[slot] = -1;
    return slot;
  }

  private unlink(slot: number): void {
    const p = this.prev[slot]!;
    const n = this.next[slot]!;
    if (p !== NONE) this.next[p] = n;
    else this.head = n;
    if (n !== NONE) this.prev[n] = p;
    else this.tail = p;
    this.prev[slot] = NONE;
    this.next[slot] = NONE;
  }

  private pushHead(slot: number): void {
    this.prev[slot] = NONE;
    this.next[slot] = this.head;
    if (this.head !== NONE) this.prev[this.head] = slot;
    this.head = slot;
    if (this.tail === NONE) this.tail = slot;
  }

  private pushTail(slot: number): void {
    this.next[slot] = NONE;
    this.prev[slot] = this.tail;
    if (this.tail !== NONE) this.next[this.tail] = slot;
    this.tail = slot;
    if (this.head === NONE) this.head = slot;
  }

  /** Forget every loaded table (after tables were changed behind the cache's back). */
  clear(): void {
    for (const [offset, slot] of this.slotOf) {
      if (this.loading.has(offset)) continue;
      this.slotOf.delete(offset);
      this.owner[slot] = -1;
      this.unlink(slot);
      this.pushTail(slot);
    }
  }
}
