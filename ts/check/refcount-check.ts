// One consistency check of an image's refcounts and COPIED flags, with optional repair: what
// qemu's qcow2_co_check_locked does (block/qcow2-refcount.c qcow2_check_refcounts and friends),
// reproduced so the same image gives the same counts and the same diagnostics.
//
// The expected refcount of every host cluster is counted into an array in WASM memory with the
// image's refcount width (so a slice of it is a refcount block, ready to write when rebuilding);
// the on-disk refcount blocks are read into a second array of the same layout, and the two are
// compared block by block in WASM. Regular L2 entries are counted in WASM; any entry that needs a
// diagnostic or a repair comes back to TypeScript, in table order, so the report does not depend
// on batching. Memory is two refcount-width arrays over the file's clusters plus one batch of
// tables; reads are batched and coalesced.

import { Qcow2Error, Qcow2ErrorCode, hex } from "../errors.js";
import { readFully, type BlockBackend } from "../io/backend.js";
import { MemoryBackend } from "../io/memory.js";
import { getU64, setU64, view } from "../format/bytes.js";
import { INCOMPAT_CORRUPT, INCOMPAT_DIRTY, QCOW_MAX_REFTABLE_SIZE } from "../format/constants.js";
import type { Qcow2Header } from "../format/header.js";
import { writeIncompatible, writeRefcountTablePointer } from "../format/header-update.js";
import { readSnapshotTable, snapshotL1Problem, type SnapshotEntry } from "../format/snapshots.js";
import { WasmCore, type WasmVariant } from "../wasm/core.js";
import {
  CHECK_STATS_SIZE,
  CHECK_STAT_ALLOCATED,
  CHECK_STAT_COMPRESSED,
  CHECK_STAT_FRAGMENTED,
  CHECK_STAT_NEXT_CONTIGUOUS,
  SCAN_FRAG_INFO,
  type WasmExports,
} from "../wasm/exports.js";

export const FIX_LEAKS = 1;
export const FIX_ERRORS = 2;

/** What one check pass found (qemu's BdrvCheckResult). */
export interface CheckCounts {
  checkErrors: number;
  corruptions: number;
  leaks: number;
  corruptionsFixed: number;
  leaksFixed: number;
  imageEndOffset: number;
  totalClusters: number;
  allocatedClusters: number;
  fragmentedClusters: number;
  compressedClusters: number;
}

export function emptyCounts(): CheckCounts {
  return {
    checkErrors: 0,
    corruptions: 0,
    leaks: 0,
    corruptionsFixed: 0,
    leaksFixed: 0,
    imageEndOffset: 0,
    totalClusters: 0,
    allocatedClusters: 0,
    fragmentedClusters: 0,
    compressedClusters: 0,
  };
}

export interface CheckPassOptions {
  fix: number;
  diagnostic: (line: string) => void;
  wasm?: WasmVariant | undefined;
  /** Bytes of tables read per batch. */
  batchBytes?: number | undefined;
  /** Upper bound on each refcount array, in bytes (a reference past it fails the check). */
  arrayLimitBytes?: number | undefined;
}

/** The check could not go on (qemu returns -errno); the counts so far are kept. */
export class CheckAborted extends Error {
  constructor(message: string) {
    super(message);
    this.name = "CheckAborted";
  }
}

const DEFAULT_BATCH_BYTES = 4 * 1024 * 1024;
/** The expected-refcount array may cover at least this much past the file's end. */
const MIN_ARRAY_LIMIT_BYTES = 64 * 1024 * 1024;
/** And never more than this (a wasm32 memory holds two of them and the tables). */
const MAX_ARRAY_BYTES = 1024 * 1024 * 1024;
/** qemu refuses to check files of more clusters than an int holds. */
const INT_MAX = 2 ** 31 - 1;

/** A u64 split in halves, printed as qemu's PRIx64 does (no prefix, no leading zeros). */
function hex64(hi: number, lo: number): string {
  return hi === 0 ? (lo >>> 0).toString(16) : (hi >>> 0).toString(16) + (lo >>> 0).toString(16).padStart(8, "0");
}

/** Bits 9..55 of an L1/L2 entry (exact as a number: a multiple of 512 below 2^56). */
function entryOffset(hi: number, lo: number): number {
  return (hi & 0x00ffffff) * 0x100000000 + ((lo & 0xfffffe00) >>> 0);
}

/** printf's "%#x": 0x-prefixed, except that zero prints as "0". */
function altHex(value: number): string {
  return value === 0 ? "0" : hex(value);
}

/** qemu refuses requests that reach past this (BDRV_MAX_LENGTH): reading there is an I/O error. */
const BDRV_MAX_LENGTH = 2n ** 63n - 2n ** 30n;
/** blockStatus values: the refcount block cannot be read, as qemu's get_refcount fails. */
const BLOCK_UNALIGNED = 1;
const BLOCK_UNREADABLE = 2;

/** Error numbers as qemu prints them through strerror. */
const EIO = "Input/output error";

export class RefcountCheck {
  private readonly cs: number;
  private readonly cb: number;
  private readonly order: number;
  /** Refcount entries per block. */
  private readonly perBlock: number;
  private readonly blockShift: number;
  private readonly maxRefcount: number;
  private readonly x: WasmExports;
  private readonly fix: number;
  private readonly diag: (line: string) => void;
  private readonly batchSlots: number;
  private readonly batchPtr: number;
  private readonly statsPtr: number;
  private readonly arrayLimit: number;
  private readonly fileClusters: number;
  /** Length of the file now (it grows when a repair adds clusters). */
  private fileLength: number;

  /** Expected refcounts. */
  private imrt = 0;
  private imrtCap = 0;
  /** qemu's nb_clusters: clusters compared (the file's, grown by references past its end). */
  private nb: number;

  /** On-disk refcounts in the same layout; blockStatus 1 marks blocks qemu cannot read. */
  private disk = 0;
  private diskCap = 0;
  private blockStatusPtr = 0;
  private diskDirty = new Set<number>();

  private reftable: Uint8Array;
  private reftableEntries: number;
  private l1: Uint8Array;
  private rebuildNeeded = false;
  private signaledCorruption = false;

  private constructor(
    private readonly backend: BlockBackend,
    private readonly h: Qcow2Header,
    private readonly core: WasmCore,
    private readonly snapshots: SnapshotEntry[],
    private readonly snapshotsBytes: number,
    fileSize: number,
    options: CheckPassOptions,
    readonly counts: CheckCounts,
  ) {
    this.cb = h.clusterBits;
    this.cs = 2 ** h.clusterBits;
    this.order = h.refcountOrder;
    this.perBlock = (this.cs * 8) / 2 ** this.order;
    this.blockShift = this.cb + 3 - this.order;
    this.maxRefcount = this.order >= 6 ? Number.MAX_SAFE_INTEGER : 2 ** (2 ** this.order) - 1;
    this.x = core.exports;
    this.fix = options.fix;
    this.diag = options.diagnostic;
    this.fileLength = fileSize;
    this.fileClusters = Math.ceil(fileSize / this.cs);
    this.nb = this.fileClusters;
    const fileBytes = this.arrayBytes(this.fileClusters);
    this.arrayLimit = Math.min(MAX_ARRAY_BYTES, Math.max(options.arrayLimitBytes ?? MIN_ARRAY_LIMIT_BYTES, fileBytes));
    this.batchSlots = Math.max(1, Math.floor((options.batchBytes ?? DEFAULT_BATCH_BYTES) / this.cs));
    this.batchPtr = core.reserve(this.batchSlots * this.cs, 8);
    this.statsPtr = core.reserve(CHECK_STATS_SIZE, 8);
    this.reftable = new Uint8Array(0);
    this.reftableEntries = 0;
    this.l1 = new Uint8Array(0);
  }

  /**
   * Run one pass. `snapshots` is the table as read for the check (qemu re-reads it leniently in
   * check mode); throws CheckAborted when the check cannot complete.
   */
  static async run(
    backend: BlockBackend,
    h: Qcow2Header,
    snapshots: SnapshotEntry[],
    snapshotsBytes: number,
    options: CheckPassOptions,
    counts: CheckCounts,
  ): Promise<void> {
    const fileSize = await backend.size();
    const core = await WasmCore.create(options.wasm);
    const check = new RefcountCheck(backend, h, core, snapshots, snapshotsBytes, fileSize, options, counts);
    await check.checkRefcounts();
  }

  private arrayBytes(entries: number): number {
    // Whole clusters, as qemu sizes its array, so each block is one slice.
    return Math.ceil((entries * 2 ** this.order) / 8 / this.cs) * this.cs;
  }

  // ---- qcow2_check_refcounts ------------------------------------------------------------------

  private async checkRefcounts(): Promise<void> {
    const h = this.h;
    const res = this.counts;
    if (this.nb > INT_MAX) {
      res.checkErrors++;
      throw new CheckAborted(`the file has ${this.nb} clusters, more than ${INT_MAX}`);
    }
    if (this.arrayBytes(this.nb) > MAX_ARRAY_BYTES) {
      res.checkErrors++;
      throw new CheckAborted(`the file has ${this.nb} clusters; counting their refcounts needs more than ${MAX_ARRAY_BYTES} bytes`);
    }
    res.totalClusters = Math.ceil((Math.floor(h.size / 512) * 512) / this.cs);
    this.reftableEntries = (h.refcountTableClusters * this.cs) / 8;
    // Tables past 2^53 (check mode only) lie past any file: they read as zeros, as in qemu.
    this.reftable = new Uint8Array(this.reftableEntries * 8);
    if (h.farTables?.refcountTable === undefined) await readFully(this.backend, this.reftable, h.refcountTableOffset);
    this.l1 = new Uint8Array(h.l1Size * 8);
    if (h.farTables?.l1Table === undefined) await readFully(this.backend, this.l1, h.l1TableOffset);

    this.allocImrt(this.nb);
    await this.calculateRefcounts(this.fix);
    await this.loadDisk();

    const preCompare = { ...res };
    let highest = this.compareRefcounts(0);

    if (this.rebuildNeeded && this.fix & FIX_ERRORS) {
      const old = { ...res };
      let freshLeaks = 0;
      this.diag("Rebuilding refcount structure");
      await this.rebuildRefcountStructure();
      res.corruptions = 0;
      res.leaks = 0;
      // The header now points at the new structure: count again from scratch.
      this.rebuildNeeded = false;
      this.core.u8().fill(0, this.imrt, this.imrt + this.arrayBytes(this.imrtCap));
      await this.calculateRefcounts(0);
      await this.loadDisk();
      if (this.fix & FIX_LEAKS) {
        // The old structure is leaked now; free it. Leaks that remain were made by the rebuild.
        const saved = { ...res };
        Object.assign(res, emptyCounts());
        highest = this.compareRefcounts(FIX_LEAKS);
        await this.writeDirtyBlocks();
        if (this.rebuildNeeded) this.diag("ERROR rebuilt refcount structure is still broken");
        freshLeaks = res.leaks;
        Object.assign(res, saved);
      }
      if (res.corruptions < old.corruptions) res.corruptionsFixed += old.corruptions - res.corruptions;
      if (res.leaks < old.leaks) res.leaksFixed += old.leaks - res.leaks;
      res.leaks += freshLeaks;
    } else if (this.fix) {
      if (this.rebuildNeeded) {
        this.diag("ERROR need to rebuild refcount structures");
        res.checkErrors++;
        throw new CheckAborted(EIO);
      }
      if (res.leaks || res.corruptions) {
        Object.assign(res, preCompare);
        highest = this.compareRefcounts(this.fix);
        await this.writeDirtyBlocks();
      }
    }

    await this.checkOflagCopied();
    res.imageEndOffset = (highest + 1) * this.cs;
  }

  // ---- the expected-refcount array --------------------------------------------------------------

  private allocImrt(entries: number): void {
    const bytes = this.arrayBytes(Math.max(entries, 1));
    this.imrt = this.core.reserve(bytes, 8);
    this.imrtCap = (bytes * 8) / 2 ** this.order;
  }

  /** Clusters below this are inside both the array and the file: WASM may count them unchecked. */
  private fastLimit(): number {
    return Math.min(this.imrtCap, Math.floor(this.fileLength / this.cs));
  }

  /** Make cluster k countable (qemu reallocs to k + 1 and so compares up to it). */
  private ensure(k: number): void {
    if (k >= this.imrtCap) {
      const need = this.arrayBytes(k + 1);
      if (need > this.arrayLimit) {
        this.counts.checkErrors++;
        throw new CheckAborted(
          `a reference to host cluster ${k} (offset ${hex(k * this.cs)}) lies too far past the end of the file ` +
            `(counting it needs ${need} bytes, the limit is ${this.arrayLimit})`,
        );
      }
      const bytes = Math.min(this.arrayLimit, Math.max(need, this.arrayBytes(this.imrtCap) * 2));
      const old = this.imrt;
      const oldBytes = this.arrayBytes(this.imrtCap);
      this.imrt = this.core.reserve(bytes, 8);
      this.x.copyBytes(this.imrt, old, oldBytes);
      this.imrtCap = (bytes * 8) / 2 ** this.order;
    }
    if (k >= this.nb) this.nb = k + 1;
  }

  private getExpected(k: number): number {
    return this.x.refcountGet(this.imrt + (Math.floor(k / this.perBlock) * this.cs), k % this.perBlock, this.order);
  }

  /** The same for a table stored past 2^53: always past the end of the file. */
  private incRangeFar(offset: bigint | undefined, size: number): boolean {
    if (offset === undefined) return false;
    if (size > 0) {
      this.diag(
        `ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${offset.toString(16)} size 0x${size.toString(16)}`,
      );
      this.counts.corruptions++;
    }
    return true;
  }

  /** qcow2_inc_refcounts_imrt: one more reference to each cluster of [offset, offset + size). */
  private incRange(offset: number, size: number): void {
    if (size <= 0) return;
    // The last cluster may be partly past the end of the file; anything further is not counted.
    if (offset + size - this.fileLength >= this.cs) {
      this.diag(
        `ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${offset.toString(16)} size 0x${size.toString(16)}`,
      );
      this.counts.corruptions++;
      return;
    }
    const first = Math.floor(offset / this.cs);
    const last = Math.floor((offset + size - 1) / this.cs);
    this.ensure(last);
    let k = first;
    while (k <= last) {
      const stopped = this.x.checkAddRange(this.imrt, this.order, k, last);
      if (stopped > last) break;
      this.diag(`ERROR: overflow cluster offset=0x${(stopped * this.cs).toString(16)}`);
      this.diag(
        "Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing",
      );
      this.counts.corruptions++;
      k = stopped + 1;
    }
  }

  // ---- calculate_refcounts ----------------------------------------------------------------------

  private async calculateRefcounts(fix: number): Promise<void> {
    const h = this.h;
    this.fileLength = await this.backend.size();
    // header
    this.incRange(0, this.cs);
    // current L1 table
    await this.checkL1(h.l1TableOffset, h.l1Size, true, fix, this.l1);
    // snapshots
    for (const sn of this.snapshots) {
      const problem = snapshotL1Problem(sn, this.cs);
      if (problem) {
        this.diag(`ERROR snapshot ${sn.id} (${sn.name}) ${problem}; snapshot table entry corrupted`);
        this.counts.corruptions++;
        continue;
      }
      if (sn.l1TableOffsetRaw >= 2n ** 53n) {
        // Past anything a file holds: qemu reads zeros there, or fails past its largest offset.
        if (sn.l1Size === 0) continue;
        this.diag(
          `ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${sn.l1TableOffsetRaw.toString(16)} size 0x${(sn.l1Size * 8).toString(16)}`,
        );
        this.counts.corruptions++;
        if (sn.l1TableOffsetRaw + BigInt(sn.l1Size * 8) > BDRV_MAX_LENGTH) {
          this.diag("ERROR: I/O error in check_refcounts_l1");
          this.counts.checkErrors++;
          throw new CheckAborted(EIO);
        }
        continue;
      }
      await this.checkL1(sn.l1TableOffset, sn.l1Size, false, fix);
    }
    if (!this.incRangeFar(h.farTables?.snapshots, this.snapshotsBytes)) this.incRange(h.snapshotsOffset, this.snapshotsBytes);
    // refcount data
    if (!this.incRangeFar(h.farTables?.refcountTable, this.reftableEntries * 8)) this.incRange(h.refcountTableOffset, this.reftableEntries * 8);
    // encryption
    const crypto = h.extensions.cryptoHeader;
    if (crypto && crypto.length) this.incRange(crypto.offset, crypto.length);
    // bitmaps
    await this.checkBitmaps();
    await this.checkRefblocks(fix);
  }

  /** check_refcounts_l1 (and check_refcounts_l2 for each table it points to). */
  private async checkL1(l1Offset: number, l1Size: number, active: boolean, fix: number, known?: Uint8Array): Promise<void> {
    if (l1Size === 0) return;
    if (!(active && this.incRangeFar(this.h.farTables?.l1Table, l1Size * 8))) this.incRange(l1Offset, l1Size * 8);
    let l1 = known;
    if (!l1) {
      l1 = new Uint8Array(l1Size * 8);
      await readFully(this.backend, l1, l1Offset);
    }
    const dv = view(l1);
    const cs = this.cs;
    let i = 0;
    while (i < l1Size) {
      // Gather the next batch of L2 tables and read them, coalescing neighbours.
      const batch: { index: number; l2Offset: number }[] = [];
      let j = i;
      for (; j < l1Size && batch.length < this.batchSlots; j++) {
        const hi = dv.getUint32(j * 8);
        const lo = dv.getUint32(j * 8 + 4);
        if (hi === 0 && lo === 0) continue;
        batch.push({ index: j, l2Offset: entryOffset(hi, lo) });
      }
      await this.readTables(batch.map((b) => b.l2Offset));
      for (let b = 0; b < batch.length; b++) {
        const { index, l2Offset } = batch[b]!;
        const hi = dv.getUint32(index * 8);
        const lo = dv.getUint32(index * 8 + 4);
        if (hi & 0x7f000000 || lo & 0x1ff) {
          this.diag(`ERROR found L1 entry with reserved bits set: ${hex64(hi, lo)}`);
          this.counts.corruptions++;
        }
        this.incRange(l2Offset, cs);
        if (l2Offset % cs !== 0) {
          this.diag(`ERROR l2_offset=${l2Offset.toString(16)}: Table is not cluster aligned; L1 entry corrupted`);
          this.counts.corruptions++;
        }
        await this.checkL2(this.batchPtr + b * cs, l2Offset, active, fix);
      }
      i = j;
    }
  }

  /** Read tables of one cluster each into consecutive batch slots; zeros past the file's end. */
  private async readTables(offsets: number[]): Promise<void> {
    const cs = this.cs;
    let s = 0;
    while (s < offsets.length) {
      let e = s + 1;
      while (e < offsets.length && offsets[e] === offsets[e - 1]! + cs) e++;
      const first = offsets[s]!;
      const dst = this.core.bytes(this.batchPtr + s * cs, (e - s) * cs);
      if (first + (e - s) * cs > Number.MAX_SAFE_INTEGER) dst.fill(0);
      else await readFully(this.backend, dst, first);
      s = e;
    }
  }

  private async checkL2(slot: number, l2Offset: number, active: boolean, fix: number): Promise<void> {
    const x = this.x;
    const entries = this.cs / 8;
    const frag = active ? SCAN_FRAG_INFO : 0;
    this.stats()[CHECK_STAT_NEXT_CONTIGUOUS] = 0;
    let i = 0;
    for (;;) {
      i = x.checkScanL2(slot, i, entries, this.cb, this.imrt, this.fastLimit(), this.order, frag, this.statsPtr);
      if (i >= entries) break;
      await this.checkL2Entry(slot, l2Offset, i, active, fix);
      i++;
    }
    if (active) {
      const s = this.stats();
      this.counts.allocatedClusters = s[CHECK_STAT_ALLOCATED]!;
      this.counts.fragmentedClusters = s[CHECK_STAT_FRAGMENTED]!;
      this.counts.compressedClusters = s[CHECK_STAT_COMPRESSED]!;
    }
  }

  /** The WASM scan's counters (re-derived: memory may have grown since the last view). */
  private stats(): Float64Array {
    return new Float64Array(this.core.u8().buffer, this.statsPtr, 4);
  }

  /** The full per-entry logic of check_refcounts_l2, for entries the WASM scan handed back. */
  private async checkL2Entry(slot: number, l2Offset: number, i: number, active: boolean, fix: number): Promise<void> {
    const res = this.counts;
    const cs = this.cs;
    const dv = this.core.dataView();
    const hi = dv.getUint32(slot + i * 8);
    const lo = dv.getUint32(slot + i * 8 + 4);
    const compressed = (hi & 0x40000000) !== 0;
    if (!compressed && (hi & 0x3f000000 || lo & 0x1fe)) {
      this.diag(`ERROR found l2 entry with reserved bits set: ${hex64(hi, lo)}`);
      res.corruptions++;
    }
    if (compressed) {
      const entry = (BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0);
      const shift = BigInt(62 - (this.cb - 8));
      const coffset = entry & ((1n << shift) - 1n);
      if (hi & 0x80000000) {
        this.diag(`ERROR: coffset=0x${coffset.toString(16)}: copied flag must never be set for compressed clusters`);
        res.corruptions++;
      }
      const sectors = Number((entry >> shift) & ((1n << BigInt(this.cb - 8)) - 1n)) + 1;
      const csize = sectors * 512 - Number(coffset & 511n);
      this.incRange(Number(coffset), csize);
      if (active) {
        const s = this.stats();
        s[CHECK_STAT_ALLOCATED]!++;
        s[CHECK_STAT_COMPRESSED]!++;
        s[CHECK_STAT_FRAGMENTED]!++;
      }
      return;
    }
    const hostOffset = entryOffset(hi, lo);
    if (hostOffset === 0) return; // zero without a cluster, or unallocated
    const zero = (lo & 1) !== 0;
    if (hostOffset % cs !== 0) {
      res.corruptions++;
      if (zero) {
        this.diag(
          `${fix & FIX_ERRORS ? "Repairing" : "ERROR"} offset=${hostOffset.toString(16)}: Preallocated cluster is not properly aligned; L2 entry corrupted.`,
        );
        if (fix & FIX_ERRORS) {
          // Make it a plain zero cluster: nothing is allocated for it any more.
          const cleared = new Uint8Array(8);
          cleared[7] = 1;
          this.core.u8().set(cleared, slot + i * 8);
          await this.backend.write(cleared, l2Offset + i * 8);
          await this.backend.flush();
          res.corruptions--;
          res.corruptionsFixed++;
          return;
        }
      } else {
        this.diag(`ERROR offset=${hostOffset.toString(16)}: Data cluster is not properly aligned; L2 entry corrupted.`);
      }
    }
    if (active) {
      const s = this.stats();
      s[CHECK_STAT_ALLOCATED]!++;
      const next = s[CHECK_STAT_NEXT_CONTIGUOUS]!;
      if (next !== 0 && hostOffset !== next) s[CHECK_STAT_FRAGMENTED]!++;
      s[CHECK_STAT_NEXT_CONTIGUOUS] = hostOffset + cs;
    }
    this.incRange(hostOffset, cs);
  }

  /** qcow2_check_bitmaps_refcounts: the directory, each bitmap table and its data clusters. */
  private async checkBitmaps(): Promise<void> {
    const ext = this.h.extensions.bitmaps;
    if (!ext || (this.h.autoclearFeatures & 1n) === 0n) return;
    const res = this.counts;
    this.incRange(ext.bitmapDirectoryOffset, ext.bitmapDirectorySize);
    const dir = new Uint8Array(ext.bitmapDirectorySize);
    await readFully(this.backend, dir, ext.bitmapDirectoryOffset);
    const dv = view(dir);
    let pos = 0;
    const tables: { offset: number; size: number }[] = [];
    for (let n = 0; n < ext.nbBitmaps; n++) {
      if (pos + 24 > dir.length) {
        res.corruptions++;
        throw new CheckAborted(`bitmap directory entry ${n} lies past the directory's ${dir.length} bytes`);
      }
      const tableOffset = getU64(dv, pos);
      const tableSize = dv.getUint32(pos + 8);
      const nameSize = dv.getUint16(pos + 18);
      const extraSize = dv.getUint32(pos + 20);
      if (!Number.isFinite(tableOffset) || tableOffset % this.cs !== 0 || tableSize * 8 > QCOW_MAX_REFTABLE_SIZE * 4) {
        res.corruptions++;
        throw new CheckAborted(`bitmap directory entry ${n}: bitmap table at ${hex(tableOffset)} (${tableSize} entries) is not valid`);
      }
      tables.push({ offset: tableOffset, size: tableSize });
      pos += Math.ceil((24 + extraSize + nameSize) / 8) * 8;
    }
    for (const t of tables) {
      this.incRange(t.offset, t.size * 8);
      const table = new Uint8Array(t.size * 8);
      await readFully(this.backend, table, t.offset);
      const tv = view(table);
      for (let i = 0; i < t.size; i++) {
        const hi = tv.getUint32(i * 8);
        const lo = tv.getUint32(i * 8 + 4);
        const offset = entryOffset(hi, lo);
        if (hi & 0xff000000 || lo & 0x1fe || (offset !== 0 && (lo & 1 || offset % this.cs !== 0))) {
          res.corruptions++;
          continue;
        }
        if (offset !== 0) this.incRange(offset, this.cs);
      }
    }
  }

  /** check_refblocks: each refcount block is counted, and must be aligned, inside the file, used once. */
  private async checkRefblocks(fix: number): Promise<void> {
    const res = this.counts;
    const dv = view(this.reftable);
    for (let i = 0; i < this.reftableEntries; i++) {
      const hi = dv.getUint32(i * 8);
      const lo = dv.getUint32(i * 8 + 4);
      if (lo & 0x1ff) {
        this.diag(`ERROR refcount table entry ${i} has reserved bits set`);
        res.corruptions++;
        this.rebuildNeeded = true;
        continue;
      }
      const offset = hi * 0x100000000 + (lo >>> 0);
      if (offset % this.cs !== 0) {
        this.diag(`ERROR refcount block ${i} is not cluster aligned; refcount table entry corrupted`);
        res.corruptions++;
        this.rebuildNeeded = true;
        continue;
      }
      const cluster = offset / this.cs;
      if (cluster >= this.nb) {
        res.corruptions++;
        this.diag(`${fix & FIX_ERRORS ? "Repairing" : "ERROR"} refcount block ${i} is outside image`);
        if (fix & FIX_ERRORS) {
          // Grow the file to hold the block, as qemu does; it then reads as zeros.
          // Unlike qemu, never grow the file by more than its size or 64 MiB for a stray entry.
          const newClusters = cluster + 1;
          const growthLimit = this.fileLength + Math.max(this.fileLength, MIN_ARRAY_LIMIT_BYTES);
          if (this.arrayBytes(newClusters) > this.arrayLimit || offset + this.cs > growthLimit) {
            this.rebuildNeeded = true;
            this.diag(`ERROR could not resize image: File too large`);
            continue;
          }
          await this.backend.truncate(offset + this.cs);
          this.fileLength = offset + this.cs;
          this.ensure(cluster);
          res.corruptions--;
          res.corruptionsFixed++;
          this.incRange(offset, this.cs);
        }
        continue;
      }
      if (offset !== 0) {
        this.incRange(offset, this.cs);
        const count = this.getExpected(cluster);
        if (count !== 1) {
          this.diag(`ERROR refcount block ${i} refcount=${count}`);
          res.corruptions++;
          this.rebuildNeeded = true;
        }
      }
    }
  }

  // ---- on-disk refcounts --------------------------------------------------------------------------

  /** Read every refcount block that covers [0, imrtCap) into the disk array. */
  private async loadDisk(): Promise<void> {
    const blocks = Math.ceil(this.imrtCap / this.perBlock);
    const bytes = blocks * this.cs;
    if (this.diskCap < this.imrtCap) {
      this.disk = this.core.reserve(bytes, 8);
      this.blockStatusPtr = this.core.reserve(blocks, 8);
      this.diskCap = this.imrtCap;
    }
    const u8 = this.core.u8();
    u8.fill(0, this.disk, this.disk + bytes);
    u8.fill(0, this.blockStatusPtr, this.blockStatusPtr + blocks);
    this.diskDirty.clear();
    const dv = view(this.reftable);
    let ti = 0;
    const limit = Math.min(blocks, this.reftableEntries);
    while (ti < limit) {
      const offset = this.blockOffset(dv, ti);
      if (offset === 0 || offset === Infinity) {
        ti++;
        continue;
      }
      if (offset < 0) {
        this.core.u8()[this.blockStatusPtr + ti] = offset === -1 ? BLOCK_UNALIGNED : BLOCK_UNREADABLE;
        ti++;
        continue;
      }
      // Coalesce blocks that follow each other on disk too, up to one batch.
      let end = ti + 1;
      while (end < limit && end - ti < this.batchSlots && this.blockOffset(dv, end) === offset + (end - ti) * this.cs) end++;
      await readFully(this.backend, this.core.bytes(this.disk + ti * this.cs, (end - ti) * this.cs), offset);
      ti = end;
    }
  }

  /**
   * A refcount table entry as qemu's get_refcount uses it: 0 none, -1 unaligned, -2 unreadable
   * (past qemu's largest request offset, 2^63 - 2^30), Infinity past 2^53 (reads as zeros).
   */
  private blockOffset(dv: DataView, ti: number): number {
    const hi = dv.getUint32(ti * 8);
    const lo = dv.getUint32(ti * 8 + 4) & 0xfffffe00;
    if (hi >= 0x200000) {
      const offset = (BigInt(hi) << 32n) | BigInt(lo >>> 0);
      if (offset % BigInt(this.cs) !== 0n) return -1;
      return offset + BigInt(this.cs) > BDRV_MAX_LENGTH ? -2 : Infinity;
    }
    const offset = hi * 0x100000000 + (lo >>> 0);
    if (offset % this.cs !== 0) return -1;
    return offset;
  }

  private blockOffsetMasked(ti: number): number {
    const dv = view(this.reftable);
    return dv.getUint32(ti * 8) * 0x100000000 + ((dv.getUint32(ti * 8 + 4) & 0xfffffe00) >>> 0);
  }

  private getDisk(k: number): number {
    return this.x.refcountGet(this.disk + Math.floor(k / this.perBlock) * this.cs, k % this.perBlock, this.order);
  }

  private setDisk(k: number, value: number): void {
    const ti = Math.floor(k / this.perBlock);
    this.x.refcountSet(this.disk + ti * this.cs, k % this.perBlock, this.order, value);
    this.diskDirty.add(ti);
  }

  private async writeDirtyBlocks(): Promise<void> {
    if (this.diskDirty.size === 0) return;
    const dv = view(this.reftable);
    for (const ti of [...this.diskDirty].sort((a, b) => a - b)) {
      const offset = this.blockOffset(dv, ti);
      if (offset > 0 && Number.isFinite(offset)) {
        await this.backend.write(this.core.bytes(this.disk + ti * this.cs, this.cs).slice(), offset);
      }
    }
    this.diskDirty.clear();
    await this.backend.flush();
  }

  // ---- compare_refcounts --------------------------------------------------------------------------

  /** Compare on-disk and expected refcounts of clusters [0, nb); returns the highest cluster in use. */
  private compareRefcounts(fix: number): number {
    const res = this.counts;
    const x = this.x;
    const cs = this.cs;
    const bits = 2 ** this.order;
    let highest = 0;
    const blocks = Math.ceil(this.nb / this.perBlock);
    for (let ti = 0; ti < blocks; ti++) {
      const base = ti * this.perBlock;
      const end = Math.min(this.nb, base + this.perBlock);
      const status = this.core.u8()[this.blockStatusPtr + ti]!;
      if (status !== 0) {
        if (status === BLOCK_UNALIGNED && !this.signaledCorruption && base < end) {
          // qemu's qcow2_signal_corruption, once per image.
          this.signaledCorruption = true;
          const offset = this.blockOffsetMasked(ti);
          this.diag(
            this.fix
              ? `qcow2: Marking image as corrupt: Refblock offset ${altHex(offset)} unaligned (reftable index: ${altHex(ti)}); further corruption events will be suppressed`
              : `qcow2: Image is corrupt: Refblock offset ${altHex(offset)} unaligned (reftable index: ${altHex(ti)}); further non-fatal corruption events will be suppressed`,
          );
        }
        for (let k = base; k < end; k++) {
          this.diag(`Can't get refcount for cluster ${k}: ${EIO}`);
          res.checkErrors++;
        }
        continue;
      }
      const d = this.disk + ti * cs;
      const e = this.imrt + ti * cs;
      // Bytes wholly inside [base, end); a partial last byte (sub-byte widths) is done entry by entry.
      const wholeBytes = Math.floor(((end - base) * bits) / 8);
      let byte = 0;
      for (;;) {
        byte = x.checkFirstDiff(d, e, byte, wholeBytes);
        if (byte >= wholeBytes) break;
        const firstEntry = bits >= 8 ? Math.floor(byte / (bits / 8)) : byte * (8 / bits);
        const lastEntry = bits >= 8 ? firstEntry : firstEntry + 8 / bits - 1;
        for (let idx = firstEntry; idx <= lastEntry; idx++) this.compareOne(base + idx, fix);
        byte = bits >= 8 ? (lastEntry + 1) * (bits / 8) : byte + 1;
      }
      for (let k = base + (wholeBytes * 8) / bits; k < end; k++) this.compareOne(k, fix);
      // Highest cluster with a refcount or a reference in this block.
      const top = Math.max(this.lastNonZero(d, end - base), this.lastNonZero(e, end - base));
      if (top >= 0) highest = base + top;
    }
    return highest;
  }

  /** Index of the last non-zero entry among the first `count` of a block, or -1. */
  private lastNonZero(ptr: number, count: number): number {
    const bits = 2 ** this.order;
    const wholeBytes = Math.floor((count * bits) / 8);
    for (let idx = count - 1; idx >= (wholeBytes * 8) / bits; idx--) {
      if (this.x.refcountGet(ptr, idx, this.order) !== 0) return idx;
    }
    const b = this.x.checkLastNonZero(ptr, wholeBytes);
    if (b === 0) return -1;
    if (bits >= 8) return Math.floor((b - 1) / (bits / 8));
    for (let idx = (b * 8) / bits - 1; ; idx--) {
      if (this.x.refcountGet(ptr, idx, this.order) !== 0) return idx;
    }
  }

  private compareOne(k: number, fix: number): void {
    const r1 = this.getDisk(k);
    const r2 = this.getExpected(k);
    if (r1 === r2) return;
    const res = this.counts;
    let fixed: "leaksFixed" | "corruptionsFixed" | undefined;
    if (r1 === 0) this.rebuildNeeded = true;
    else if (r1 > r2 && fix & FIX_LEAKS) fixed = "leaksFixed";
    else if (r1 < r2 && fix & FIX_ERRORS) fixed = "corruptionsFixed";
    this.diag(`${fixed ? "Repairing" : r1 < r2 ? "ERROR" : "Leaked"} cluster ${k} refcount=${r1} reference=${r2}`);
    if (fixed) {
      this.setDisk(k, r2);
      res[fixed]++;
      return;
    }
    if (r1 < r2) res.corruptions++;
    else res.leaks++;
  }

  // ---- rebuild_refcount_structure ----------------------------------------------------------------

  /** alloc_clusters_imrt: first fit from *first, growing the array (and nb) past its end. */
  private allocClusters(count: number, first: { v: number }): number {
    let cluster = first.v;
    let free = 0;
    let firstGap = true;
    for (; cluster < this.nb && free < count; cluster++) {
      if (this.getExpected(cluster) === 0) {
        free++;
        if (firstGap) {
          first.v = cluster;
          firstGap = false;
        }
      } else if (free) {
        free = 0;
      }
    }
    if (free < count) {
      // Grow: the free run at the end continues past nb.
      cluster += count - free;
      this.ensure(cluster - 1);
      free = count;
    }
    const start = cluster - free;
    for (let k = start; k < start + count; k++) this.x.checkAddRange(this.imrt, this.order, k, k);
    return start * this.cs;
  }

  private async writeRefblocks(firstCluster: number, endCluster: number, table: { entries: number[] }): Promise<boolean> {
    let grown = false;
    const first = { v: 0 };
    let end = endCluster;
    for (let cluster = firstCluster; cluster < end; cluster++) {
      cluster = this.x.checkFindNonZero(this.imrt, this.order, cluster, end);
      if (cluster >= end) break;
      const index = Math.floor(cluster / this.perBlock);
      const blockStart = index * this.perBlock;
      let blockOffset = table.entries[index] ?? 0;
      if (!blockOffset) {
        if (first.v < blockStart) first.v = blockStart;
        blockOffset = this.allocClusters(1, first);
        const blockCluster = blockOffset / this.cs;
        if (blockCluster >= end) end = blockCluster + 1;
        if (table.entries.length <= index) {
          const entries = Math.ceil(((index + 1) * 8) / this.cs) * (this.cs / 8);
          while (table.entries.length < entries) table.entries.push(0);
          grown = true;
        }
        table.entries[index] = blockOffset;
      }
      await this.backend.write(this.core.bytes(this.imrt + index * this.cs, this.cs).slice(), blockOffset);
      cluster = blockStart + this.perBlock - 1;
    }
    return grown;
  }

  private async rebuildRefcountStructure(): Promise<void> {
    const table = { entries: [] as number[] };
    let changed = await this.writeRefblocks(0, this.nb, table);
    let tableOffset = -1;
    let tableClusters = 0;
    while (changed) {
      const length = table.entries.length * 8;
      tableClusters = Math.ceil(length / this.cs);
      if (length > QCOW_MAX_REFTABLE_SIZE) {
        this.counts.checkErrors++;
        throw new CheckAborted(`the rebuilt refcount table would need ${length} bytes, more than ${QCOW_MAX_REFTABLE_SIZE}`);
      }
      tableOffset = this.allocClusters(tableClusters, { v: 0 });
      const start = tableOffset / this.cs;
      changed = await this.writeRefblocks(start, start + tableClusters, table);
    }
    const bytes = new Uint8Array(tableClusters * this.cs);
    const dv = view(bytes);
    table.entries.forEach((offset, i) => setU64(dv, i * 8, offset));
    await this.backend.write(bytes, tableOffset);
    await this.backend.flush();
    await writeRefcountTablePointer(this.backend, this.h, tableOffset, tableClusters);
    this.reftable = bytes;
    this.reftableEntries = bytes.length / 8;
  }

  // ---- check_oflag_copied -------------------------------------------------------------------------

  private async checkOflagCopied(): Promise<void> {
    const res = this.counts;
    const repair = this.fix & FIX_ERRORS ? true : this.fix & FIX_LEAKS ? !res.checkErrors && !res.corruptions && !res.leaks : false;
    const tag = repair ? "Repairing" : "ERROR";
    const cs = this.cs;
    const l1 = this.l1;
    const dv = view(l1);
    const l1Size = this.h.l1Size;
    let i = 0;
    while (i < l1Size) {
      const batch: number[] = [];
      const offsets: number[] = [];
      let j = i;
      for (; j < l1Size && batch.length < this.batchSlots; j++) {
        const l2Offset = entryOffset(dv.getUint32(j * 8), dv.getUint32(j * 8 + 4));
        if (l2Offset === 0) continue;
        batch.push(j);
        offsets.push(l2Offset);
      }
      await this.readTables(offsets);
      for (let b = 0; b < batch.length; b++) {
        const index = batch[b]!;
        const l2Offset = offsets[b]!;
        const hi = dv.getUint32(index * 8);
        const lo = dv.getUint32(index * 8 + 4);
        const refcount = await this.diskRefcount(Math.floor(l2Offset / cs));
        if (refcount !== undefined && (refcount === 1) !== ((hi & 0x80000000) !== 0)) {
          res.corruptions++;
          this.diag(`${tag} OFLAG_COPIED L2 cluster: l1_index=${index} l1_entry=${hex64(hi, lo)} refcount=${refcount}`);
          if (repair) {
            dv.setUint32(index * 8, refcount === 1 ? hi | 0x80000000 : hi & 0x7fffffff);
            await this.backend.write(l1.slice(index * 8, index * 8 + 8), this.h.l1TableOffset + index * 8);
            await this.backend.flush();
            res.corruptions--;
            res.corruptionsFixed++;
          }
        }
        const slot = this.batchPtr + b * cs;
        let dirty = 0;
        let k = 0;
        for (;;) {
          k = this.x.checkCopiedScan(slot, k, cs / 8, this.cb, this.disk, this.diskCap, this.order, this.blockStatusPtr, this.blockShift);
          if (k >= cs / 8) break;
          const mem = this.core.dataView();
          const ehi = mem.getUint32(slot + k * 8);
          const elo = mem.getUint32(slot + k * 8 + 4);
          const r = await this.diskRefcount(Math.floor(entryOffset(ehi, elo) / cs));
          if (r !== undefined && (r === 1) !== ((ehi & 0x80000000) !== 0)) {
            res.corruptions++;
            this.diag(`${tag} OFLAG_COPIED data cluster: l2_entry=${hex64(ehi, elo)} refcount=${r}`);
            if (repair) {
              this.core.dataView().setUint32(slot + k * 8, r === 1 ? ehi | 0x80000000 : ehi & 0x7fffffff);
              dirty++;
            }
          }
          k++;
        }
        if (dirty > 0) {
          await this.backend.write(this.core.bytes(slot, cs).slice(), l2Offset);
          res.corruptions -= dirty;
          res.corruptionsFixed += dirty;
        }
      }
      i = j;
    }
    if (repair) await this.backend.flush();
  }

  /** qcow2_get_refcount on the structure as it is now; undefined where qemu gets an error. */
  private async diskRefcount(k: number): Promise<number | undefined> {
    const ti = Math.floor(k / this.perBlock);
    if (k < this.diskCap) {
      if (this.core.u8()[this.blockStatusPtr + ti] !== 0) return undefined;
      return this.getDisk(k);
    }
    if (ti >= this.reftableEntries) return 0;
    const offset = this.blockOffset(view(this.reftable), ti);
    if (offset === 0 || offset === Infinity) return 0;
    if (offset < 0) return undefined;
    const block = new Uint8Array(this.cs);
    await readFully(this.backend, block, offset);
    return readEntry(block, k % this.perBlock, this.order);
  }
}

function readEntry(block: Uint8Array, index: number, order: number): number {
  const bits = 2 ** order;
  if (bits < 8) return (block[(index * bits) >> 3]! >> ((index * bits) & 7)) & ((1 << bits) - 1);
  const bytes = bits / 8;
  let v = 0;
  for (let b = 0; b < bytes; b++) v = v * 256 + block[index * bytes + b]!;
  return v;
}

/** qcow2_co_check_locked's bookends: clear the dirty and corrupt bits once a repair left no errors. */
export async function markCleanAfterRepair(backend: BlockBackend, h: Qcow2Header, counts: CheckCounts): Promise<void> {
  if (counts.checkErrors !== 0 || counts.corruptions !== 0) return;
  const bits = h.incompatibleFeatures;
  const cleared = bits & ~BigInt(INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
  if (cleared !== bits) await writeIncompatible(backend, h, cleared);
}

/** Read the snapshot table for a check: a table qemu cannot read fails the check (check error). */
export async function readSnapshotsForCheck(
  backend: BlockBackend,
  h: Qcow2Header,
  counts: CheckCounts,
  diag: (line: string) => void,
  fix = 0,
): Promise<{ entries: SnapshotEntry[]; bytes: number; incomplete: number }> {
  if (h.nbSnapshots === 0) return { entries: [], bytes: 0, incomplete: 0 };
  try {
    // A table past 2^53 reads as zeros: entries of 40 bytes, nothing in them.
    const table =
      h.farTables?.snapshots !== undefined
        ? await readSnapshotTable(new MemoryBackend(new Uint8Array(0)), 0, h.nbSnapshots, { lenient: true })
        : await readSnapshotTable(backend, h.snapshotsOffset, h.nbSnapshots, { lenient: true });
    let incomplete = 0;
    if (h.version >= 3) {
      // v3 entries must carry at least the VM state size and disk size as extra data; a repair
      // rewrites the table with them (rewriteSnapshotTable), after the refcounts are sound.
      table.entries.forEach((sn, i) => {
        if (sn.extraData.length < 16) {
          diag(`${fix & FIX_ERRORS ? "Repairing" : "ERROR"} snapshot table entry ${i} is incomplete`);
          counts.corruptions++;
          incomplete++;
        }
      });
    }
    return { entries: table.entries, bytes: table.tableBytes, incomplete };
  } catch (err) {
    if (!(err instanceof Qcow2Error)) throw err;
    counts.checkErrors++;
    diag(`ERROR failed to read the snapshot table: ${err.message}`);
    throw new CheckAborted(err.message);
  }
}
