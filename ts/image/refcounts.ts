// Host cluster refcounts (docs/interop/qcow2.rst "Host cluster management"): the refcount table
// and its blocks, the allocator, and the order in which changes reach the disk (DESIGN.md §4).
//
// Increments are applied at once (a crash then leaks at worst). Decrements are queued and applied
// only by `applyDecrements()`, which the image calls after the L2 and L1 tables that stopped
// pointing at those clusters are durable; so a freed cluster is never reused before the next flush.

import { Qcow2Error, Qcow2ErrorCode, hex } from "../errors.js";
import { readFully, type BlockBackend } from "../io/backend.js";
import { QCOW_MAX_REFTABLE_SIZE } from "../format/constants.js";
import type { WasmCore } from "../wasm/core.js";
import { TableCache } from "./table-cache.js";

export interface RefcountsOptions {
  backend: BlockBackend;
  core: WasmCore;
  clusterBits: number;
  refcountOrder: number;
  tableOffset: number;
  tableClusters: number;
  /** Refcount block cache size in bytes. */
  cacheSize: number;
  /** Point the header at a new refcount table (one write of bytes 48..59), durably. */
  writeTablePointer(tableOffset: number, tableClusters: number): Promise<void>;
}

const REFT_OFFSET_MASK_HI = 0xffffffff;
const REFT_OFFSET_MASK_LO = 0xfffffe00;
const MAX_CLUSTER_INDEX_BITS = 56;

export class Refcounts {
  readonly clusterSize: number;
  readonly clusterBits: number;
  readonly order: number;
  /** Refcounts per block. */
  readonly entriesPerBlock: number;
  readonly maxRefcount: number;
  tableOffset: number;
  tableClusters: number;
  private table: Uint8Array;
  private tableView: DataView;
  private tableDirty = false;
  private readonly blocks: TableCache;
  private readonly backend: BlockBackend;
  private readonly core: WasmCore;
  private readonly writeTablePointer: RefcountsOptions["writeTablePointer"];
  /** Cluster index -> how many decrements wait for the next applyDecrements(). */
  private readonly pending = new Map<number, number>();
  /** Where the free-cluster search starts. */
  private freeHint = 0;
  /** Next free byte in the cluster compressed streams are being packed into, 0 for none. */
  private freeByteOffset = 0;

  private constructor(options: RefcountsOptions, table: Uint8Array) {
    this.backend = options.backend;
    this.core = options.core;
    this.clusterBits = options.clusterBits;
    this.clusterSize = 2 ** options.clusterBits;
    this.order = options.refcountOrder;
    this.entriesPerBlock = (this.clusterSize * 8) >> this.order;
    this.maxRefcount = this.order >= 6 ? Number.MAX_SAFE_INTEGER : 2 ** (2 ** this.order) - 1;
    this.tableOffset = options.tableOffset;
    this.tableClusters = options.tableClusters;
    this.table = table;
    this.tableView = new DataView(table.buffer, table.byteOffset, table.byteLength);
    this.writeTablePointer = options.writeTablePointer;
    const slots = Math.max(16, Math.floor(options.cacheSize / this.clusterSize));
    this.blocks = new TableCache(options.core, this.clusterSize, slots, {
      load: (dst, offset) => readFully(this.backend, dst, offset),
      // Blocks only ever carry increments and already-ordered decrements: writing one early is safe.
      store: (src, offset) => this.backend.write(src, offset),
    });
  }

  static async open(options: RefcountsOptions): Promise<Refcounts> {
    const table = new Uint8Array(options.tableClusters * 2 ** options.clusterBits);
    await readFully(options.backend, table, options.tableOffset);
    return new Refcounts(options, table);
  }

  get tableEntries(): number {
    return this.table.length / 8;
  }

  /** Offset of refcount block `tableIndex`, 0 when it does not exist. */
  blockOffset(tableIndex: number): number {
    if (tableIndex >= this.tableEntries) return 0;
    const hi = this.tableView.getUint32(tableIndex * 8) & REFT_OFFSET_MASK_HI;
    const lo = this.tableView.getUint32(tableIndex * 8 + 4) & REFT_OFFSET_MASK_LO;
    const offset = hi * 0x100000000 + (lo >>> 0);
    if (offset % this.clusterSize !== 0 || offset >= 2 ** 53) {
      throw new Qcow2Error(
        Qcow2ErrorCode.CORRUPT,
        `refcount table entry ${tableIndex} (${hex(offset)}) is not a cluster-aligned offset below 2^53`,
      );
    }
    return offset;
  }

  /** Told of every refcount block placed (old offset, new offset), e.g. to track metadata. */
  onBlockChange: ((oldOffset: number, newOffset: number) => void) | undefined;

  private setBlockOffset(tableIndex: number, offset: number): void {
    if (this.onBlockChange) {
      const old = tableIndex < this.tableEntries ? this.blockOffset(tableIndex) : 0;
      if (old !== offset) this.onBlockChange(old, offset);
    }
    this.tableView.setUint32(tableIndex * 8, Math.floor(offset / 0x100000000));
    this.tableView.setUint32(tableIndex * 8 + 4, offset >>> 0);
    this.tableDirty = true;
  }

  /** The refcount of host cluster `cluster` as on disk plus applied changes. */
  async get(cluster: number): Promise<number> {
    const ti = Math.floor(cluster / this.entriesPerBlock);
    const blockOffset = this.blockOffset(ti);
    if (blockOffset === 0) return 0;
    const ptr = await this.blocks.get(blockOffset);
    return this.core.exports.refcountGet(ptr, cluster - ti * this.entriesPerBlock, this.order);
  }

  // ---- Added for amend (ops/amend.ts, qemu's qcow2_change_refcount_order walks every refblock) ----

  /** Refcounts of the clusters [first, first + dst.length) into `dst`: one block lookup per block. */
  async getMany(first: number, dst: Float64Array): Promise<void> {
    const e = this.entriesPerBlock;
    const x = this.core.exports;
    for (let i = 0; i < dst.length; ) {
      const c = first + i;
      const ti = Math.floor(c / e);
      const n = Math.min(dst.length - i, (ti + 1) * e - c);
      const blockOffset = this.blockOffset(ti);
      if (blockOffset === 0) {
        dst.fill(0, i, i + n);
      } else {
        const ptr = await this.blocks.get(blockOffset);
        for (let k = 0; k < n; k++) dst[i + k] = x.refcountGet(ptr, c - ti * e + k, this.order);
      }
      i += n;
    }
  }

  // ---- end of the amend additions ----

  /** Add `delta` to the refcount of every cluster in [first, first + count) now; blocks must exist. */
  async add(first: number, count: number, delta: number): Promise<void> {
    const e = this.entriesPerBlock;
    for (let c = first; c < first + count; ) {
      const ti = Math.floor(c / e);
      const blockOffset = this.blockOffset(ti);
      if (blockOffset === 0) throw new Qcow2Error(Qcow2ErrorCode.CORRUPT, `refcounts: no refcount block covers cluster ${c}`);
      const ptr = await this.blocks.get(blockOffset);
      const end = Math.min(first + count, (ti + 1) * e);
      const x = this.core.exports;
      for (; c < end; c++) {
        const index = c - ti * e;
        const value = x.refcountGet(ptr, index, this.order) + delta;
        if (value < 0 || value > this.maxRefcount) {
          // Below zero the refcounts are wrong; past the width there are simply too many references.
          throw new Qcow2Error(
            value < 0 ? Qcow2ErrorCode.CORRUPT : Qcow2ErrorCode.LIMIT_EXCEEDED,
            `refcount of cluster ${c} would become ${value} (refcount width ${2 ** this.order} bits)`,
          );
        }
        x.refcountSet(ptr, index, this.order, value);
      }
      this.blocks.markDirty(blockOffset);
    }
  }

  /** Queue a decrement for each cluster in [first, first + count) until applyDecrements(). */
  releaseLater(first: number, count: number): void {
    for (let c = first; c < first + count; c++) this.pending.set(c, (this.pending.get(c) ?? 0) + 1);
  }

  /** Queue the release of the host clusters a byte range touches (compressed clusters). */
  releaseBytesLater(hostOffset: number, length: number): void {
    const first = Math.floor(hostOffset / this.clusterSize);
    const last = Math.floor((hostOffset + length - 1) / this.clusterSize);
    this.releaseLater(first, last - first + 1);
  }

  hasPendingDecrements(): boolean {
    return this.pending.size > 0;
  }

  /** Apply the queued decrements to the cached blocks (the caller writes them afterwards). */
  async applyDecrements(): Promise<void> {
    const clusters = [...this.pending.entries()].sort((a, b) => a[0] - b[0]);
    this.pending.clear();
    for (const [cluster, count] of clusters) {
      await this.add(cluster, 1, -count);
      if (cluster < this.freeHint) this.freeHint = cluster;
      // A freed cluster may go to anyone next: stop packing compressed streams into it.
      if (this.freeByteOffset !== 0 && Math.floor(this.freeByteOffset / this.clusterSize) === cluster && (await this.get(cluster)) === 0) {
        this.freeByteOffset = 0;
      }
    }
  }

  hasDirty(): boolean {
    return this.tableDirty || this.blocks.hasDirty();
  }

  /** Write dirty blocks (phase 1) then, once they are durable, the table (phase 2). */
  async writeBack(): Promise<void> {
    if (this.blocks.hasDirty()) {
      await this.blocks.flush();
      if (this.tableDirty) await this.backend.flush();
    }
    if (this.tableDirty) {
      this.tableDirty = false;
      try {
        await this.backend.write(this.table, this.tableOffset);
      } catch (err) {
        this.tableDirty = true;
        throw err;
      }
    }
  }

  /** Find and take `count` contiguous free clusters; returns the host offset of the first. */
  async allocate(count: number): Promise<number> {
    const cluster = await this.allocateFrom(count, this.freeHint);
    this.freeHint = cluster + count;
    return cluster * this.clusterSize;
  }

  /** Take the first run of `count` free clusters at or after cluster `from`; returns its first cluster. */
  private async allocateFrom(count: number, from: number): Promise<number> {
    const e = this.entriesPerBlock;
    for (;;) {
      const start = await this.findFreeRun(count, from);
      if ((start + count) * this.clusterSize > 2 ** 53 || start + count >= 2 ** (MAX_CLUSTER_INDEX_BITS - this.clusterBits)) {
        throw new Qcow2Error(Qcow2ErrorCode.LIMIT_EXCEEDED, `no room for ${count} more clusters below the host offset limit`);
      }
      let missing = -1;
      for (let ti = Math.floor(start / e); ti <= Math.floor((start + count - 1) / e); ti++) {
        if (this.blockOffset(ti) === 0) {
          missing = ti;
          break;
        }
      }
      if (missing < 0) {
        await this.add(start, count, 1);
        return start;
      }
      if (missing >= this.tableEntries) await this.growTable(missing);
      else if (count > 1 && missing * e >= start && missing * e < start + count) await this.createBlockAfter(missing, start + count);
      else await this.createBlock(missing);
      // The new block or table may sit where the run was: search again.
    }
  }

  /** The first run of `count` free clusters at or after cluster `from`. */
  private async findFreeRun(count: number, from: number): Promise<number> {
    const e = this.entriesPerBlock;
    const x = this.core.exports;
    let c = from;
    let runStart = c;
    let runLength = 0;
    while (runLength < count) {
      const ti = Math.floor(c / e);
      const blockOffset = this.blockOffset(ti);
      if (blockOffset === 0) {
        // No block: every cluster it would describe is free.
        if (runLength === 0) runStart = c;
        runLength += (ti + 1) * e - c;
        c = (ti + 1) * e;
        continue;
      }
      const ptr = await this.blocks.get(blockOffset);
      let index = c - ti * e;
      if (runLength === 0) {
        index = x.refcountFindZero(ptr, e, this.order, index);
        if (index === e) {
          c = (ti + 1) * e;
          continue;
        }
        runStart = ti * e + index;
      }
      const n = x.refcountZeroRun(ptr, e, this.order, index, count - runLength);
      runLength += n;
      c = ti * e + index + n;
      if (runLength < count && index + n < e) {
        // A used cluster broke the run.
        runLength = 0;
        c += 1;
      }
    }
    return runStart;
  }

  /** Create refcount block `tableIndex` at the first cluster of the range it describes. */
  private async createBlock(tableIndex: number): Promise<void> {
    const blockCluster = tableIndex * this.entriesPerBlock;
    const ptr = await this.blocks.create(blockCluster * this.clusterSize);
    this.core.exports.refcountSet(ptr, 0, this.order, 1);
    this.setBlockOffset(tableIndex, blockCluster * this.clusterSize);
  }

  /**
   * Create refcount block `tableIndex` somewhere past cluster `after`: a run longer than one
   * block's range cannot start each range with that range's own block and stay contiguous.
   */
  private async createBlockAfter(tableIndex: number, after: number): Promise<void> {
    const e = this.entriesPerBlock;
    const blockCluster = await this.allocateFrom(1, Math.ceil(after / e) * e);
    await this.blocks.create(blockCluster * this.clusterSize);
    this.setBlockOffset(tableIndex, blockCluster * this.clusterSize);
  }

  /**
   * Room for a compressed stream of `size` bytes (at most one cluster), packed byte-granular after
   * the previous one as qemu packs them: a stream that does not fit in what is left of the current
   * host cluster runs on into the next one when the allocator hands out the cluster right after it.
   * Each host cluster's refcount counts the streams that touch it.
   */
  async allocateBytes(size: number): Promise<number> {
    const cs = this.clusterSize;
    if (size <= 0 || size > cs) throw new RangeError(`allocateBytes: size ${size} is not 1..${cs}`);
    const offset = this.freeByteOffset;
    const current = Math.floor(offset / cs);
    // Share the cluster only while its refcount has room (1-bit refcounts never share).
    const shareable = offset !== 0 && (await this.get(current)) < this.maxRefcount;
    if (shareable && (offset % cs) + size <= cs) {
      await this.add(current, 1, 1);
      this.freeByteOffset = (offset + size) % cs === 0 ? 0 : offset + size;
      return offset;
    }
    const fresh = await this.allocate(1);
    if (shareable && fresh === (current + 1) * cs) {
      await this.add(current, 1, 1);
      this.freeByteOffset = offset + size;
      return offset;
    }
    this.freeByteOffset = size === cs ? 0 : fresh + size;
    return fresh;
  }

  /**
   * Move the refcount table to a larger one that covers `tableIndex`. The new blocks and table sit
   * together at the start of block `tableIndex`'s range, the blocks describing themselves and the
   * table. Order: blocks, table, header pointer, each durable before the next; then the old table
   * is released.
   */
  private async growTable(tableIndex: number): Promise<void> {
    const cs = this.clusterSize;
    const e = this.entriesPerBlock;
    const area = tableIndex * e;
    let blocks = 1;
    let tableClusters = 0;
    for (;;) {
      const entries = Math.max(tableIndex + blocks, Math.ceil(this.tableEntries * 1.5));
      tableClusters = Math.ceil((entries * 8) / cs);
      if (blocks + tableClusters <= blocks * e) break;
      blocks++;
    }
    if (tableClusters * cs > QCOW_MAX_REFTABLE_SIZE) {
      throw new Qcow2Error(
        Qcow2ErrorCode.LIMIT_EXCEEDED,
        `the refcount table would need ${tableClusters * cs} bytes, over the ${QCOW_MAX_REFTABLE_SIZE / 1048576} MiB limit`,
      );
    }
    const newTable = new Uint8Array(tableClusters * cs);
    newTable.set(this.table);
    const newView = new DataView(newTable.buffer);
    // Layout from the area's first cluster: the new blocks back to back, then the table. Block j
    // describes the range [area + j*e, area + (j+1)*e), so the area's clusters k = 0..blocks +
    // tableClusters - 1 are counted in block floor(k / e), entry k % e.
    const used = blocks + tableClusters;
    for (let j = 0; j < blocks; j++) {
      const blockOffset = (area + j) * cs;
      const ptr = await this.blocks.create(blockOffset);
      for (let k = j * e; k < Math.min(used, (j + 1) * e); k++) this.core.exports.refcountSet(ptr, k - j * e, this.order, 1);
      newView.setUint32((tableIndex + j) * 8, Math.floor(blockOffset / 0x100000000));
      newView.setUint32((tableIndex + j) * 8 + 4, blockOffset >>> 0);
      this.onBlockChange?.(0, blockOffset);
    }
    const newTableOffset = (area + blocks) * cs;
    await this.blocks.flush();
    await this.backend.flush();
    await this.backend.write(newTable, newTableOffset);
    await this.backend.flush();
    await this.writeTablePointer(newTableOffset, tableClusters);
    const oldOffset = this.tableOffset;
    const oldClusters = this.tableClusters;
    this.table = newTable;
    this.tableView = newView;
    this.tableOffset = newTableOffset;
    this.tableClusters = tableClusters;
    this.tableDirty = false;
    this.releaseLater(oldOffset / cs, oldClusters);
  }

  /** Forget cached blocks that are clean (after repair rewrote them). */
  dropCaches(): void {
    this.blocks.clear();
  }
}
