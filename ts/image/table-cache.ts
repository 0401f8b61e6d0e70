// A cache of cluster-sized metadata tables (L2 tables, refcount blocks) in slots of WASM linear
// memory, so lookups and refcount scans run in WASM over them (asm/l2.ts, asm/refcount.ts).
//
// A slot address is only good until the next await: take it from `get()`/`create()` and use it
// synchronously. Loads read into a JS buffer and copy into the slot after the await, so a memory
// grow during the read cannot leave a detached view behind.
//
// Recency is a doubly linked list over slot indexes (O(1) per hit and per eviction: images with
// 512-byte clusters have tens of thousands of slots). Slots being loaded or written back are off
// the list, so they are never chosen for eviction. A dirty slot chosen for eviction is written
// through `hooks.store`, which knows what must reach the disk before it (DESIGN.md §4).

import type { WasmCore } from "../wasm/core.js";

export interface TableCacheHooks {
  /** Fill `dst` with the table stored at `offset`. */
  load(dst: Uint8Array, offset: number): Promise<void>;
  /** Write the table for `offset`, after whatever must be durable first. */
  store(src: Uint8Array, offset: number): Promise<void>;
}

const NONE = -1;

export class TableCache {
  readonly slotCount: number;
  private readonly core: WasmCore;
  private readonly tableSize: number;
  private readonly base: number;
  private readonly hooks: TableCacheHooks;
  private readonly slotOf = new Map<number, number>();
  /** Offsets whose slot is being filled or written back: not usable, not evictable. */
  private readonly busy = new Map<number, Promise<void>>();
  private readonly owner: Float64Array;
  private readonly dirty: Uint8Array;
  private readonly prev: Int32Array;
  private readonly next: Int32Array;
  private head = NONE;
  private tail = NONE;
  private unused = 0;

  constructor(core: WasmCore, tableSize: number, slotCount: number, hooks: TableCacheHooks) {
    this.core = core;
    this.tableSize = tableSize;
    this.slotCount = slotCount;
    this.hooks = hooks;
    this.base = core.reserve(slotCount * tableSize, 64);
    this.owner = new Float64Array(slotCount).fill(-1);
    this.dirty = new Uint8Array(slotCount);
    this.prev = new Int32Array(slotCount).fill(NONE);
    this.next = new Int32Array(slotCount).fill(NONE);
  }

  /** Slot address of the table at `offset` if resident, else -1. Marks it recently used. */
  peek(offset: number): number {
    const slot = this.slotOf.get(offset);
    if (slot === undefined || this.busy.has(offset)) return -1;
    if (slot !== this.head) {
      this.unlink(slot);
      this.pushHead(slot);
    }
    return this.base + slot * this.tableSize;
  }

  /** Slot address of the table at `offset`, loading it if needed. */
  async get(offset: number): Promise<number> {
    for (;;) {
      const ptr = this.peek(offset);
      if (ptr >= 0) return ptr;
      const pending = this.busy.get(offset);
      if (pending) await pending.catch(() => undefined);
      else await this.fill(offset, undefined);
    }
  }

  /**
   * Make a slot for a new table at `offset` without reading the disk: zeros, or a copy of `init`.
   * The slot is dirty. Returns its address.
   */
  async create(offset: number, init?: Uint8Array): Promise<number> {
    for (;;) {
      const pending = this.busy.get(offset);
      if (!pending) break;
      await pending.catch(() => undefined);
    }
    const resident = this.slotOf.get(offset);
    if (resident !== undefined) {
      this.write(resident, init);
      this.dirty[resident] = 1;
      return this.peek(offset);
    }
    await this.fill(offset, init ?? null);
    return this.get(offset);
  }

  /** Record that the resident table at `offset` was changed in its slot. */
  markDirty(offset: number): void {
    const slot = this.slotOf.get(offset);
    if (slot === undefined) throw new Error(`table cache: markDirty(${offset}) on a table that is not resident`);
    this.dirty[slot] = 1;
  }

  hasDirty(): boolean {
    return this.dirty.includes(1);
  }

  /** Write every dirty table through hooks.store. */
  async flush(): Promise<void> {
    const jobs: Promise<void>[] = [];
    for (const [offset, slot] of this.slotOf) {
      if (!this.dirty[slot] || this.busy.has(offset)) continue;
      this.dirty[slot] = 0;
      const copy = this.core.bytes(this.base + slot * this.tableSize, this.tableSize).slice();
      jobs.push(
        this.hooks.store(copy, offset).catch((err: unknown) => {
          if (this.slotOf.get(offset) === slot) this.dirty[slot] = 1;
          throw err;
        }),
      );
    }
    const results = await Promise.allSettled(jobs);
    const failed = results.find((r): r is PromiseRejectedResult => r.status === "rejected");
    if (failed) throw failed.reason;
  }

  /** Forget the table at `offset` without writing it (its cluster was freed). */
  drop(offset: number): void {
    const slot = this.slotOf.get(offset);
    if (slot === undefined || this.busy.has(offset)) return;
    this.slotOf.delete(offset);
    this.owner[slot] = -1;
    this.dirty[slot] = 0;
    this.unlink(slot);
    this.pushTail(slot);
  }

  /** Forget every clean resident table (after tables were changed behind the cache's back). */
  clear(): void {
    for (const [offset, slot] of this.slotOf) if (!this.dirty[slot]) this.drop(offset);
  }

  private write(slot: number, init: Uint8Array | undefined | null): void {
    const view = this.core.bytes(this.base + slot * this.tableSize, this.tableSize);
    if (init) view.set(init.subarray(0, this.tableSize));
    else view.fill(0);
  }

  /** Load (init undefined) or create (init null or bytes) the table at `offset` into a free slot. */
  private fill(offset: number, init: Uint8Array | null | undefined): Promise<void> {
    const job = this.fillSlot(offset, init).finally(() => this.busy.delete(offset));
    this.busy.set(offset, job);
    return job;
  }

  private async fillSlot(offset: number, init: Uint8Array | null | undefined): Promise<void> {
    let slot = this.claim();
    while (slot === NONE) {
      await Promise.race([...this.busy.entries()].filter(([o]) => o !== offset).map(([, p]) => p)).catch(() => undefined);
      slot = this.claim();
    }
    try {
      await this.evict(slot);
    } catch (err) {
      this.pushTail(slot);
      throw err;
    }
    this.owner[slot] = offset;
    this.slotOf.set(offset, slot);
    let table: Uint8Array | undefined;
    try {
      if (init === undefined) {
        table = new Uint8Array(this.tableSize);
        await this.hooks.load(table, offset);
      }
    } catch (err) {
      this.slotOf.delete(offset);
      this.owner[slot] = -1;
      this.pushTail(slot);
      throw err;
    }
    this.write(slot, table ?? init ?? null);
    this.dirty[slot] = init === undefined ? 0 : 1;
    this.pushHead(slot);
  }

  /** Empty a claimed slot, writing its table back first if dirty. */
  private async evict(slot: number): Promise<void> {
    const previous = this.owner[slot]!;
    if (previous < 0) return;
    if (this.dirty[slot]) {
      const copy = this.core.bytes(this.base + slot * this.tableSize, this.tableSize).slice();
      // Until the write lands, a get() of the old table must wait rather than read stale bytes.
      const job = this.hooks.store(copy, previous);
      this.busy.set(previous, job);
      try {
        await job;
      } finally {
        this.busy.delete(previous);
      }
      this.dirty[slot] = 0;
    }
    this.slotOf.delete(previous);
    this.owner[slot] = -1;
  }

  /** A slot to fill: a never-used one, else the least recently used (taken off the list). */
  private claim(): number {
    if (this.unused < this.slotCount) return this.unused++;
    const slot = this.tail;
    if (slot === NONE) return NONE;
    this.unlink(slot);
    return slot;
  }

  private unlink(slot: number): void {
    const p = this.prev[slot]!;
    const n = this.next[slot]!;
    if (p !== NONE) this.next[p] = n;
    else if (this.head === slot) this.head = n;
    if (n !== NONE) this.prev[n] = p;
    else if (this.tail === slot) this.tail = p;
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
}
