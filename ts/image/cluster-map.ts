// ClusterMap: guest offset -> host extent through the active L1 table and the L2 cache, and the
// metadata changes writes make (DESIGN.md §1, §3, §4). Changes are made under `lock`; the order in
// which they reach the disk is written down once, in `writeBack()`.

import { Qcow2Error, Qcow2ErrorCode, hex } from "../errors.js";
import { readFully, type BlockBackend } from "../io/backend.js";
import type { L1Table } from "../format/l1.js";
import type { WasmCore } from "../wasm/core.js";
import {
  L2_INVALID_OFFSET_TOO_LARGE,
  L2_INVALID_UNALIGNED,
  L2_TYPE_COMPRESSED,
  L2_TYPE_INVALID,
  L2_TYPE_NORMAL,
  L2_TYPE_ZERO_ALLOC,
} from "../wasm/exports.js";
import type { Refcounts } from "./refcounts.js";
import { AsyncLock, InFlight } from "./sync.js";
import { TableCache } from "./table-cache.js";

/** One run of same-typed L2 entries, as seen from a guest offset. */
export interface Run {
  /** L2_TYPE_* */
  type: number;
  /** Normal / zero-alloc: host offset of the run's first cluster. Compressed: the stream's offset. */
  hostOffset: number;
  /** Compressed: bytes to read (an upper bound). */
  compressedSize: number;
  /** QCOW_OFLAG_COPIED of the run (runs split where it changes when asked). */
  copied: boolean;
  /** Guest bytes from the looked-up offset that this run covers. */
  bytes: number;
  /** Offset of the looked-up guest offset inside its cluster. */
  inCluster: number;
  l1Index: number;
  l2Index: number;
  /** 0 when the L1 entry is unallocated (the run is then unallocated). */
  l2Offset: number;
}

export interface ClusterMapOptions {
  name: string;
  backend: BlockBackend;
  core: WasmCore;
  clusterBits: number;
  version: number;
  l1: L1Table;
  l1TableOffset: number;
  l2CacheSize: number;
  /** Present when the image is writable. */
  refcounts?: Refcounts;
}

const MIN_L2_SLOTS = 16;
const QCOW_OFLAG_COPIED_HI = 0x80000000;
const QCOW_OFLAG_COMPRESSED_HI = 0x40000000;

export class ClusterMap {
  readonly name: string;
  readonly clusterBits: number;
  readonly clusterSize: number;
  readonly l2Entries: number;
  /** Guest bytes one L2 table maps. */
  readonly l1Span: number;
  readonly version: number;
  readonly lock = new AsyncLock();
  readonly inflight = new InFlight();
  l1: L1Table;
  l1TableOffset: number;
  readonly l2: TableCache;
  readonly refcounts: Refcounts | undefined;
  private readonly backend: BlockBackend;
  private readonly core: WasmCore;

  constructor(o: ClusterMapOptions) {
    this.name = o.name;
    this.backend = o.backend;
    this.core = o.core;
    this.clusterBits = o.clusterBits;
    this.clusterSize = 2 ** o.clusterBits;
    this.l2Entries = this.clusterSize / 8;
    this.l1Span = this.clusterSize * this.l2Entries;
    this.version = o.version;
    this.l1 = o.l1;
    this.l1TableOffset = o.l1TableOffset;
    this.refcounts = o.refcounts;
    const slots = Math.max(MIN_L2_SLOTS, Math.min(Math.max(1, o.l1.size), Math.floor(o.l2CacheSize / this.clusterSize)));
    this.l2 = new TableCache(o.core, this.clusterSize, slots, {
      load: (dst, offset) => readFully(this.backend, dst, offset),
      // An L2 table written on eviction must not get ahead of the data and refcounts it points to.
      store: async (src, offset) => {
        await this.backend.flush();
        if (this.refcounts?.hasDirty()) {
          await this.refcounts.writeBack();
          await this.backend.flush();
        }
        await this.backend.write(src, offset);
      },
    });
  }

  /** Offset of the L2 table for `l1Index`, 0 when unallocated; CORRUPT for a bad L1 entry. */
  l2TableOffset(l1Index: number): number {
    const offset = this.l1.l2Offset(l1Index);
    if (offset !== 0 && offset % this.clusterSize !== 0) {
      throw new Qcow2Error(
        Qcow2ErrorCode.CORRUPT,
        `${this.name}: L2 table offset ${hex(offset)} at L1 index ${l1Index} is not aligned to the cluster size ${this.clusterSize}`,
      );
    }
    // The whole table must be addressable: a table at 2^53 - cluster_size would end past 2^53.
    if (offset + this.clusterSize > Number.MAX_SAFE_INTEGER) {
      throw new Qcow2Error(Qcow2ErrorCode.CORRUPT, `${this.name}: L2 table offset ${hex(offset)} at L1 index ${l1Index} ends past 2^53`);
    }
    return offset;
  }

  /**
   * The run of same-typed entries at `guestOffset`, at most `maxBytes` long and never past the
   * end of its L2 table. `flags` are asm/l2.ts LOOKUP_* flags.
   */
  async lookup(guestOffset: number, maxBytes: number, flags: number): Promise<Run> {
    const cs = this.clusterSize;
    const l1Index = Math.floor(guestOffset / this.l1Span);
    const inTable = guestOffset - l1Index * this.l1Span;
    const l2Index = Math.floor(inTable / cs);
    const inCluster = inTable - l2Index * cs;
    const limit = Math.min(maxBytes, this.l1Span - inTable);
    const l2Offset = this.l2TableOffset(l1Index);
    if (l2Offset === 0) {
      return { type: 0, hostOffset: 0, compressedSize: 0, copied: false, bytes: limit, inCluster, l1Index, l2Index, l2Offset };
    }
    let slot = this.l2.peek(l2Offset);
    if (slot < 0) slot = await this.l2.get(l2Offset);
    const n = this.core.l2Lookup(slot, l2Index, Math.ceil((inCluster + limit) / cs), this.clusterBits, flags);
    const r = this.core.result;
    const run: Run = {
      type: r.type,
      hostOffset: r.hostOffset,
      compressedSize: r.compressedSize,
      copied: r.copied,
      bytes: Math.min(limit, n * cs - inCluster),
      inCluster,
      l1Index,
      l2Index,
      l2Offset,
    };
    if (r.type === L2_TYPE_INVALID) throw this.invalidEntry(run, r.invalidReason);
    if (r.type === L2_TYPE_NORMAL && r.hostOffset + inCluster + run.bytes > Number.MAX_SAFE_INTEGER) {
      throw this.invalidEntry(run, L2_INVALID_OFFSET_TOO_LARGE);
    }
    return run;
  }

  private invalidEntry(run: Run, reason: number): Qcow2Error {
    const where = `L2 table ${hex(run.l2Offset)} (L1 index ${run.l1Index}), entry ${run.l2Index}`;
    const why =
      reason === L2_INVALID_UNALIGNED
        ? `cluster offset ${hex(run.hostOffset)} is not aligned to the cluster size ${this.clusterSize}`
        : reason === L2_INVALID_OFFSET_TOO_LARGE
          ? `host offset${run.hostOffset > 0 ? ` ${hex(run.hostOffset)}` : ""} (with the bytes it maps) reaches 2^53`
          : `zero flag set in a version ${this.version} image (only v3 has zero clusters)`;
    return new Qcow2Error(Qcow2ErrorCode.CORRUPT, `${this.name}: ${where}: ${why}`);
  }

  private get writableRefcounts(): Refcounts {
    if (!this.refcounts) throw new Qcow2Error(Qcow2ErrorCode.READ_ONLY, `${this.name}: image is open read-only`);
    return this.refcounts;
  }

  /**
   * The L2 table for `l1Index`, ready to be changed: allocated if missing, copied if shared with a
   * snapshot (L1 entry without COPIED). Call under `lock`.
   */
  async writableL2(l1Index: number): Promise<number> {
    const refcounts = this.writableRefcounts;
    const current = this.l2TableOffset(l1Index);
    if (current !== 0 && this.l1.copied(l1Index)) return current;
    const fresh = await refcounts.allocate(1);
    if (current === 0) {
      await this.l2.create(fresh);
    } else {
      const ptr = await this.l2.get(current);
      const copy = this.core.bytes(ptr, this.clusterSize).slice();
      await this.l2.create(fresh, copy);
      refcounts.releaseLater(current / this.clusterSize, 1);
    }
    this.l1.set(l1Index, fresh, true);
    return fresh;
  }

  /**
   * Set `count` consecutive entries of the L2 table at `l2Offset` from `l2Index`: `hostOffset`
   * advancing one cluster per entry (0 for none), with COPIED and the zero flag as given. The table
   * must be writable (from writableL2 in the same locked section).
   */
  async setEntries(l2Offset: number, l2Index: number, count: number, hostOffset: number, copied: boolean, zero: boolean): Promise<void> {
    const ptr = await this.l2.get(l2Offset);
    const dv = this.core.dataView();
    for (let i = 0; i < count; i++) {
      const host = hostOffset === 0 ? 0 : hostOffset + i * this.clusterSize;
      const hi = Math.floor(host / 0x100000000) | (copied ? QCOW_OFLAG_COPIED_HI : 0);
      dv.setUint32(ptr + (l2Index + i) * 8, hi >>> 0);
      dv.setUint32(ptr + (l2Index + i) * 8 + 4, ((host >>> 0) | (zero ? 1 : 0)) >>> 0);
    }
    this.l2.markDirty(l2Offset);
  }

  /** Store a raw compressed-cluster descriptor (already shifted) at one entry. */
  async setCompressedEntry(l2Offset: number, l2Index: number, descriptorHi: number, descriptorLo: number): Promise<void> {
    const ptr = await this.l2.get(l2Offset);
    const dv = this.core.dataView();
    dv.setUint32(ptr + l2Index * 8, (descriptorHi | QCOW_OFLAG_COMPRESSED_HI) >>> 0);
    dv.setUint32(ptr + l2Index * 8 + 4, descriptorLo >>> 0);
    this.l2.markDirty(l2Offset);
  }

  /** Queue the release of the host clusters `run` (of `clusters` clusters) held. */
  release(run: Pick<Run, "type" | "hostOffset" | "compressedSize">, clusters: number): void {
    const refcounts = this.writableRefcounts;
    if (run.type === L2_TYPE_NORMAL || run.type === L2_TYPE_ZERO_ALLOC) {
      refcounts.releaseLater(run.hostOffset / this.clusterSize, clusters);
    } else if (run.type === L2_TYPE_COMPRESSED) {
      // qemu counts every host cluster the 512-byte sectors of the stream touch.
      const start = run.hostOffset - (run.hostOffset % 512);
      refcounts.releaseBytesLater(start, run.compressedSize + (run.hostOffset % 512));
    }
  }

  /**
   * qemu's qcow2_update_snapshot_refcount over the tables `l1` reaches: with `addend` +1 every L2
   * table and host cluster it reaches gains a reference now; with -1 each loses one, queued until
   * the next writeBack (after the tables that stopped pointing at them are durable); with 0 only
   * QCOW_OFLAG_COPIED is recomputed. COPIED is set in the L2 entries and in `l1` where the
   * refcount is exactly 1 (compressed clusters never), cleared elsewhere; a -1 pass leaves the
   * flags alone (the tables it walks are leaving). Returns the L2 tables `l1` reaches. Under `lock`.
   */
  async updateSnapshotRefcount(l1: L1Table, addend: -1 | 0 | 1): Promise<number[]> {
    const refcounts = this.writableRefcounts;
    const cs = this.clusterSize;
    const tables: number[] = [];
    // Increments go out in runs of contiguous clusters.
    let runFirst = -1;
    let runCount = 0;
    const addRun = async (first: number, count: number): Promise<void> => {
      if (addend === 0) return;
      if (addend < 0) {
        refcounts.releaseLater(first, count);
        return;
      }
      if (runCount > 0 && first === runFirst + runCount) {
        runCount += count;
        return;
      }
      if (runCount > 0) await refcounts.add(runFirst, runCount, 1);
      runFirst = first;
      runCount = count;
    };
    const csizeShift = 62 - (this.clusterBits - 8);
    for (let l1Index = 0; l1Index < l1.size; l1Index++) {
      const l2Offset = l1.l2Offset(l1Index);
      if (l2Offset === 0) continue;
      if (l2Offset % cs !== 0) {
        throw new Qcow2Error(Qcow2ErrorCode.CORRUPT, `${this.name}: L2 table offset ${hex(l2Offset)} at L1 index ${l1Index} is not cluster aligned`);
      }
      tables.push(l2Offset);
      await this.l2.get(l2Offset);
      let changed = false;
      for (let i = 0; i < this.l2Entries; i++) {
        // The slot is looked up again after every await (the cache may have moved it).
        let ptr = await this.l2.get(l2Offset);
        let dv = this.core.dataView();
        const hi = dv.getUint32(ptr + i * 8);
        const lo = dv.getUint32(ptr + i * 8 + 4);
        let refcount = 0;
        if (hi & QCOW_OFLAG_COMPRESSED_HI) {
          // Offset in the low csizeShift bits, then (512-byte sectors - 1).
          const desc = (BigInt(hi & 0x3fffffff) << 32n) | BigInt(lo);
          const hostOffset = Number(desc & ((1n << BigInt(csizeShift)) - 1n));
          const sectors = Number((desc >> BigInt(csizeShift)) & BigInt(2 ** (this.clusterBits - 8) - 1)) + 1;
          const size = sectors * 512 - (hostOffset % 512);
          const first = Math.floor(hostOffset / cs);
          await addRun(first, Math.floor((hostOffset + size - 1) / cs) - first + 1);
          refcount = 2;
        } else {
          const hostOffset = (hi & 0x00ffffff) * 0x100000000 + ((lo & 0xfffffe00) >>> 0);
          if (hostOffset !== 0) {
            if (hostOffset % cs !== 0) {
              throw new Qcow2Error(
                Qcow2ErrorCode.CORRUPT,
                `${this.name}: L2 table ${hex(l2Offset)} entry ${i}: cluster offset ${hex(hostOffset)} is not cluster aligned`,
              );
            }
            await addRun(hostOffset / cs, 1);
            refcount = addend > 0 ? 2 : addend === 0 ? await refcounts.get(hostOffset / cs) : -1;
          }
        }
        if (addend < 0) continue;
        const copied = refcount === 1;
        if (copied !== ((hi & QCOW_OFLAG_COPIED_HI) !== 0)) {
          ptr = await this.l2.get(l2Offset);
          dv = this.core.dataView();
          dv.setUint32(ptr + i * 8, (copied ? hi | QCOW_OFLAG_COPIED_HI : hi & ~QCOW_OFLAG_COPIED_HI) >>> 0);
          changed = true;
        }
      }
      if (changed) this.l2.markDirty(l2Offset);
      await addRun(l2Offset / cs, 1);
      if (addend < 0) continue;
      const copied = addend === 0 && (await refcounts.get(l2Offset / cs)) === 1;
      if (copied !== l1.copied(l1Index)) l1.set(l1Index, l2Offset, copied);
    }
    if (runCount > 0) await refcounts.add(runFirst, runCount, 1);
    return tables;
  }

  get dirty(): boolean {
    return this.l1.dirty || this.l2.hasDirty() || (this.refcounts?.hasDirty() ?? false) || (this.refcounts?.hasPendingDecrements() ?? false);
  }

  /**
   * Make every completed change durable, in the one order that keeps a crash harmless:
   * guest data, refcount increments, L2 tables, L1 entries, and only then the decrements of
   * clusters those tables stopped pointing at. Call under `lock`. `beforeRelease` runs before
   * decrements are applied (the image waits there for reads that may still use freed clusters).
   * With `lazyRefcounts` (the image is marked dirty) refcount blocks are left in the cache: a crash
   * then leaves stale refcounts, which the next read-write open rebuilds.
   */
  async writeBack(beforeRelease: () => Promise<void>, lazyRefcounts = false): Promise<void> {
    const refcounts = this.refcounts;
    await this.backend.flush();
    if (!lazyRefcounts && refcounts?.hasDirty()) {
      await refcounts.writeBack();
      await this.backend.flush();
    }
    if (this.l2.hasDirty()) {
      await this.l2.flush();
      await this.backend.flush();
    }
    const l1 = this.l1.takeDirty();
    if (l1) {
      try {
        await this.backend.write(l1.bytes, this.l1TableOffset + l1.start);
      } catch (err) {
        this.l1.redirty(l1.start, l1.bytes.length);
        throw err;
      }
      await this.backend.flush();
    }
    if (refcounts?.hasPendingDecrements()) {
      await beforeRelease();
      await refcounts.applyDecrements();
      if (!lazyRefcounts) {
        await refcounts.writeBack();
        await this.backend.flush();
      }
    }
  }
}
