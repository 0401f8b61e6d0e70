// `amend`: change the options of an existing qcow2 image in place, as `qemu-img amend` does
// (qemu block/qcow2.c qcow2_amend_options, qcow2_upgrade, qcow2_downgrade; block/qcow2-refcount.c
// qcow2_change_refcount_order and walk_over_reftable; block/qcow2-cluster.c
// qcow2_expand_zero_clusters). The steps run in qemu's order — upgrade, refcount width, header
// rewrite, backing file check, lazy refcounts, size, downgrade — and each one leaves a valid image
// behind it (DESIGN.md §4): an amend that fails part way leaves the image openable and consistent,
// at worst with leaked clusters, and keeps the steps done before the failure, as qemu does.
//
// Deliberate differences from qemu-img 7.2:
// - A downgrade that meets a zero cluster whose preallocated host cluster is shared with a snapshot
//   (its refcount exceeds that of the L2 table pointing at it) writes the zeros to a new cluster.
//   qemu zeroes the shared cluster, which destroys the snapshot's data and leaves OFLAG_COPIED
//   errors behind (verified with qemu-img 7.2).
// - What this library cannot do yet is refused before anything changes: a downgrade of an image
//   with persistent bitmaps (qemu keeps the bitmaps extension in a v2 header), a resize of one.

import { Qcow2Error, Qcow2ErrorCode, hex } from "../errors.js";
import { readFully, type BlockBackend } from "../io/backend.js";
import { resolveBackend } from "../io/resolve.js";
import { setU64, view } from "../format/bytes.js";
import {
  AUTOCLEAR_DATA_FILE_RAW,
  COMPAT_LAZY_REFCOUNTS,
  COMPRESSION_ZLIB,
  CRYPT_NONE,
  INCOMPAT_COMPRESSION,
  INCOMPAT_DIRTY,
  L1E_OFFSET_MASK_HI,
  L1E_OFFSET_MASK_LO,
  QCOW2_AUTOCLEAR_MASK,
  QCOW_MAX_L1_SIZE,
  QCOW_MAX_REFTABLE_SIZE,
  QCOW_OFLAG_COMPRESSED_HI,
  QCOW_OFLAG_COPIED_HI,
} from "../format/constants.js";
import { readHeader, type Qcow2Header } from "../format/header.js";
import { encodeHeader } from "../format/header-write.js";
import { writeIncompatible } from "../format/header-update.js";
import { encodeSnapshotTable, readSnapshotTable, type SnapshotEntry } from "../format/snapshots.js";
import { refuseEncrypted, refuseFeatures, refuseWrites } from "../image/features.js";
import { MetadataClusters } from "../image/overlap.js";
import { Qcow2Image, type BackingResolver } from "../image/qcow2-image.js";
import { Refcounts } from "../image/refcounts.js";
import { checkImage } from "../check/check.js";
import { WasmCore, type WasmVariant } from "../wasm/core.js";

/** LUKS key slot changes (qemu's encrypt.* amend options). */
export interface AmendEncryptOptions {
  state?: string;
  keyslot?: number;
  oldSecret?: string;
  newSecret?: string;
  iterTime?: number;
}

/** What to change; options left out stay as they are (qemu changes only what is given). */
export interface AmendOptions {
  /** "0.10" or "v2" (version 2), "1.1" or "v3" (version 3): qemu's `compat`. */
  compat?: string;
  /** New virtual size in bytes; may shrink (no --shrink needed). 0 leaves the size alone, as in qemu. */
  size?: number | bigint;
  /** qemu 7.2 accepts only the current backing file name and format ("Cannot amend the backing file"). */
  backingFile?: string;
  backingFormat?: string;
  /** Only images with an external data file take these (qemu's messages otherwise). */
  dataFile?: string;
  dataFileRaw?: boolean;
  /** v3 only; turning it off leaves the image clean. */
  lazyRefcounts?: boolean;
  /** 1, 2, 4, 8, 16, 32 or 64; other than 16 needs v3. */
  refcountBits?: number;
  /** LUKS key slot changes: images without encryption refuse them as qemu does; encrypted images are not supported yet. */
  encrypt?: AmendEncryptOptions;
  /** Work done and total work, as qemu-img amend reports it for -p (qemu's amend status callback). */
  onProgress?: (done: number, total: number) => void;
  /** Diagnostics of the repair a dirty image (lazy refcounts after a crash) gets before anything else. */
  onDiagnostic?: (line: string) => void;
  /** How backing files are opened (a size change must hide a longer backing file's data). */
  resolveBacking?: BackingResolver;
  wasm?: WasmVariant;
}

/** An amend failure with qemu's message and, like qemu's error hints, lines to print after it. */
export class AmendError extends Qcow2Error {
  /** Extra lines, each ending in "\n" (empty when there are none). */
  readonly hint: string;

  constructor(code: Qcow2ErrorCode, message: string, hint = "") {
    super(code, message);
    this.name = "AmendError";
    this.hint = hint;
  }
}

/** Qcow2AmendOperation: the operations that report progress, in the order qemu runs them. */
const UPGRADING = 1;
const CHANGING_REFCOUNT_ORDER = 3;
const DOWNGRADING = 4;

const INT64_MAX = 2n ** 63n - 1n;
const SECTOR = 512;
const REFCOUNT_CACHE_BYTES = 1 << 20;
const ZERO_FLAG_LO = 1;

/**
 * Amend the options of the qcow2 image at `target` (a path where the platform has files, or a
 * backend opened for writing). Nothing else may have the image open meanwhile. Throws a
 * Qcow2Error (AmendError when qemu adds a hint) with qemu-img's message, or a RangeError for an
 * option value qemu refuses; steps completed before a failure stay done, as with qemu.
 */
export async function amend(target: BlockBackend | string, options: AmendOptions): Promise<void> {
  const backend = await resolveBackend(target, false);
  try {
    await amendBackend(backend, options);
  } finally {
    if (typeof target === "string") await backend.close();
  }
}

/**
 * What qemu does as it opens an image for writing, before any amend option is looked at: refuse
 * what cannot be written (here: also what this library cannot write yet), repair a dirty image
 * (lazy refcounts after a crash; diagnostics to `onDiagnostic`), clear the autoclear bits it does
 * not know, open the backing chain. Returns whether there is a backing file. Doing it twice is harmless.
 */
export async function prepareForWriting(
  target: BlockBackend | string,
  o: Pick<AmendOptions, "encrypt" | "onDiagnostic" | "resolveBacking" | "wasm"> = {},
): Promise<{ hasBacking: boolean }> {
  const backend = await resolveBackend(target, false);
  try {
    const name = backend.name;
    let h = await readHeader(backend);
    refuseFeatures(h, name);
    const encrypt = o.encrypt === undefined ? [] : Object.entries(o.encrypt).filter(([, v]) => v !== undefined);
    if (h.cryptMethod !== CRYPT_NONE && encrypt.length > 0) {
      throw new AmendError(Qcow2ErrorCode.NOT_SUPPORTED, `${name}: amending the encryption options (encrypt.${encrypt[0]![0]}) is not supported yet`);
    }
    refuseWrites(h, name);
    refuseEncrypted(h, name);
    if (h.incompatibleFeatures & BigInt(INCOMPAT_DIRTY)) await repairDirty(backend, o);
    const opened = await Qcow2Image.open(borrow(backend), openOptions(o));
    const hasBacking = opened.backing !== undefined;
    await opened.close();
    h = await readHeader(backend);
    if (h.autoclearFeatures & ~BigInt(QCOW2_AUTOCLEAR_MASK)) {
      h.autoclearFeatures &= BigInt(QCOW2_AUTOCLEAR_MASK);
      await writeHeaderCluster(backend, h);
    }
    return { hasBacking };
  } finally {
    if (typeof target === "string") await backend.close();
  }
}

async function amendBackend(backend: BlockBackend, o: AmendOptions): Promise<void> {
  const { hasBacking } = await prepareForWriting(backend, o);
  let h = await readHeader(backend);
  const encrypt = o.encrypt === undefined ? [] : Object.entries(o.encrypt).filter(([, v]) => v !== undefined);

  // The option loop of qcow2_amend_options, in its option table's order (encrypt.*, size, compat,
  // backing_file, backing_fmt, data_file, data_file_raw, lazy_refcounts, refcount_bits).
  const oldVersion = h.version;
  let newVersion = oldVersion;
  if (encrypt.length > 0) {
    throw new AmendError(Qcow2ErrorCode.NOT_SUPPORTED, "Can't amend encryption options - encryption not present");
  }
  const newSize = o.size === undefined ? 0n : BigInt(o.size);
  if (newSize < 0n) throw new RangeError(`amend: size ${newSize} is negative`);
  if (o.compat !== undefined) {
    if (o.compat === "0.10" || o.compat === "v2") newVersion = 2;
    else if (o.compat === "1.1" || o.compat === "v3") newVersion = 3;
    else throw new RangeError(`Unknown compatibility level ${o.compat}`);
  }
  if (o.dataFile !== undefined) {
    throw new AmendError(Qcow2ErrorCode.NOT_SUPPORTED, "data-file can only be set for images that use an external data file");
  }
  if (o.dataFileRaw === true) throw new AmendError(Qcow2ErrorCode.NOT_SUPPORTED, "data-file-raw cannot be set on existing images");
  const lazyNow = h.version >= 3 && (h.compatibleFeatures & BigInt(COMPAT_LAZY_REFCOUNTS)) !== 0n;
  const lazy = o.lazyRefcounts ?? lazyNow;
  const oldBits = 2 ** h.refcountOrder;
  const refcountBits = o.refcountBits ?? oldBits;
  if (!Number.isInteger(refcountBits) || refcountBits <= 0 || refcountBits > 64 || (refcountBits & (refcountBits - 1)) !== 0) {
    throw new RangeError("Refcount width must be a power of two and may not exceed 64 bits");
  }
  // Not yet here (qemu would go on): refused before anything changes.
  if (newVersion < oldVersion && h.extensions.bitmaps) {
    throw new AmendError(Qcow2ErrorCode.NOT_SUPPORTED, `${backend.name}: downgrading an image with persistent bitmaps to compat=0.10 is not supported yet`);
  }

  const progress = new AmendProgress(Number(newVersion !== oldVersion) + Number(refcountBits !== oldBits), o.onProgress);

  // Upgrade first: some features may need compat=1.1.
  if (newVersion > oldVersion) await upgrade(backend, o, progress);

  if (refcountBits !== oldBits) {
    if (newVersion < 3 && refcountBits !== 16) {
      throw new AmendError(
        Qcow2ErrorCode.NOT_SUPPORTED,
        "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
      );
    }
    await changeRefcountOrder(backend, Math.log2(refcountBits), o, progress);
  }

  // qemu rewrites the header here whatever was asked (data_file_raw is cleared: it needs a data file).
  h = await readHeader(backend);
  h.autoclearFeatures &= BigInt(QCOW2_AUTOCLEAR_MASK) & ~BigInt(AUTOCLEAR_DATA_FILE_RAW);
  await writeHeaderCluster(backend, h);

  if (o.backingFile !== undefined || o.backingFormat !== undefined) {
    if (o.backingFile !== h.backingFile || o.backingFormat !== h.extensions.backingFormat) {
      throw new AmendError(Qcow2ErrorCode.NOT_SUPPORTED, "Cannot amend the backing file", "You can use 'qcow2-img rebase' instead.\n");
    }
  }

  if (lazy !== lazyNow) {
    if (lazy && newVersion < 3) {
      throw new AmendError(
        Qcow2ErrorCode.NOT_SUPPORTED,
        "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
      );
    }
    // Turning them off: the image is clean here (repaired at open; nothing since was lazy).
    h = await readHeader(backend);
    if (lazy) h.compatibleFeatures |= BigInt(COMPAT_LAZY_REFCOUNTS);
    else h.compatibleFeatures &= ~BigInt(COMPAT_LAZY_REFCOUNTS);
    await writeHeaderCluster(backend, h);
  }

  if (newSize !== 0n) await resizeTo(backend, newSize, o);

  // Downgrade last, once what v2 cannot hold has been removed.
  if (newVersion < oldVersion) await downgrade(backend, hasBacking, o, progress);
}

function openOptions(o: Pick<AmendOptions, "resolveBacking" | "wasm">): { readOnly: false; resolveBacking?: BackingResolver; wasm?: WasmVariant } {
  return { readOnly: false, ...(o.resolveBacking ? { resolveBacking: o.resolveBacking } : {}), ...(o.wasm ? { wasm: o.wasm } : {}) };
}

/** The same backend, except that close() leaves it open: the amend goes on using it. */
function borrow(b: BlockBackend): BlockBackend {
  const lent: BlockBackend = {
    get readOnly() {
      return b.readOnly;
    },
    name: b.name,
    read: (dst, pos) => b.read(dst, pos),
    write: (src, pos) => b.write(src, pos),
    size: () => b.size(),
    truncate: (size) => b.truncate(size),
    flush: () => b.flush(),
    close: async () => undefined,
  };
  if (b.allocatedSize) lent.allocatedSize = () => b.allocatedSize!();
  return lent;
}

/** qcow2_do_open on a dirty image: a check with full repair, its diagnostics passed on. */
async function repairDirty(backend: BlockBackend, o: Pick<AmendOptions, "onDiagnostic" | "wasm">): Promise<void> {
  const report = await checkImage(backend, {
    repair: "all",
    ...(o.onDiagnostic ? { onDiagnostic: o.onDiagnostic } : {}),
    ...(o.wasm ? { wasm: o.wasm } : {}),
  });
  if (report.failure !== undefined || report.checkErrors || report.corruptions) {
    throw new Qcow2Error(
      Qcow2ErrorCode.CORRUPT,
      `${backend.name}: could not repair the dirty image: ${report.failure ?? `${report.corruptions} corruptions remain`}`,
    );
  }
}

/**
 * qcow2_update_header: the whole header cluster rebuilt (qemu's extension order, its own feature
 * table, the size in whole sectors) and written in one write, then flushed.
 */
async function writeHeaderCluster(backend: BlockBackend, h: Qcow2Header): Promise<void> {
  const cs = 2 ** h.clusterBits;
  const canonical: Qcow2Header = {
    ...h,
    size: Math.floor(h.size / SECTOR) * SECTOR,
    extensions: { ...h.extensions, featureNames: [] },
  };
  const cluster = new Uint8Array(cs);
  cluster.set(encodeHeader(canonical, cs));
  await backend.write(cluster, 0);
  await backend.flush();
}

async function openRefcounts(backend: BlockBackend, h: Qcow2Header, core: WasmCore): Promise<Refcounts> {
  return Refcounts.open({
    backend,
    core,
    clusterBits: h.clusterBits,
    refcountOrder: h.refcountOrder,
    tableOffset: h.refcountTableOffset,
    tableClusters: h.refcountTableClusters,
    cacheSize: REFCOUNT_CACHE_BYTES,
    writeTablePointer: async (tableOffset, tableClusters) => {
      // The table grew: point the header at it (the whole cluster, as every header write here).
      h.refcountTableOffset = tableOffset;
      h.refcountTableClusters = tableClusters;
      await writeHeaderCluster(backend, h);
    },
  });
}

/** Make what the refcounts hold in cache durable. */
async function persist(backend: BlockBackend, refcounts: Refcounts): Promise<void> {
  await refcounts.writeBack();
  await backend.flush();
}

/**
 * Qcow2AmendHelperCBInfo and qcow2_amend_helper_cb: each operation's progress is scaled into one
 * meter, the work of the operations still to come projected from those seen so far.
 */
class AmendProgress {
  private completed = 0;
  private offsetCompleted = 0;
  private last = 0;
  private lastWork = 0;

  constructor(
    private readonly total: number,
    private readonly cb: ((done: number, total: number) => void) | undefined,
  ) {}

  report(operation: number, offset: number, work: number): void {
    if (!this.cb) return;
    if (operation !== this.last) {
      if (this.last !== 0) {
        this.offsetCompleted += this.lastWork;
        this.completed++;
      }
      this.last = operation;
    }
    this.lastWork = work;
    const current = this.offsetCompleted + work;
    const projected = Math.trunc((current * (this.total - this.completed - 1)) / (this.completed + 1));
    this.cb(this.offsetCompleted + offset, current + projected);
  }
}

// ---- upgrade ---------------------------------------------------------------------------------

/** qcow2_upgrade: v3 snapshot entries need the 64-bit VM state size and the disk size; then the header. */
async function upgrade(backend: BlockBackend, o: AmendOptions, progress: AmendProgress): Promise<void> {
  progress.report(UPGRADING, 0, 2);
  let h = await readHeader(backend);
  if (h.nbSnapshots > 0) {
    const table = await readSnapshotTable(backend, h.snapshotsOffset, h.nbSnapshots);
    if (table.entries.some((sn) => sn.extraData.length < 16)) await rewriteSnapshotTable(backend, h, table.entries, table.tableBytes, o);
  }
  progress.report(UPGRADING, 1, 2);
  h = await readHeader(backend);
  h.version = 3;
  await writeHeaderCluster(backend, h);
  progress.report(UPGRADING, 2, 2);
}

/**
 * qcow2_write_snapshots: the table in qemu's v3 layout in new clusters, then the header pointed at
 * it, then the old table freed.
 */
async function rewriteSnapshotTable(
  backend: BlockBackend,
  h: Qcow2Header,
  entries: SnapshotEntry[],
  oldBytes: number,
  o: AmendOptions,
): Promise<void> {
  const cs = 2 ** h.clusterBits;
  const bytes = encodeSnapshotTable(entries, Math.floor(h.size / SECTOR) * SECTOR);
  const refcounts = await openRefcounts(backend, h, await WasmCore.create(o.wasm));
  const offset = await refcounts.allocate(Math.ceil(bytes.length / cs));
  await persist(backend, refcounts);
  await backend.write(bytes, offset);
  await backend.flush();
  const oldOffset = h.snapshotsOffset;
  h.snapshotsOffset = offset;
  await writeHeaderCluster(backend, h);
  if (oldBytes > 0) refcounts.releaseBytesLater(oldOffset, oldBytes);
  await refcounts.applyDecrements();
  await persist(backend, refcounts);
}

// ---- refcount width --------------------------------------------------------------------------

/** printf's "%#x": 0x-prefixed, except that zero prints as "0". */
function altHex(value: number): string {
  return value === 0 ? "0" : hex(value);
}

/**
 * qcow2_change_refcount_order. Walks over the refcount table (walk_over_reftable) allocate the new
 * refcount blocks and then the new table in the old structure, until a walk allocates nothing;
 * the old structure is made durable; a last walk writes the new blocks; then the new table, the
 * header (one write), and last the old blocks and table are freed in the new structure. A crash
 * before the header write leaves the old structure with leaked clusters; after it, the new one.
 */
async function changeRefcountOrder(backend: BlockBackend, newOrder: number, o: AmendOptions, progress: AmendProgress): Promise<void> {
  let h = await readHeader(backend);
  const cs = 2 ** h.clusterBits;
  const core = await WasmCore.create(o.wasm);
  const old = await openRefcounts(backend, h, core);
  const newBits = 2 ** newOrder;
  const newPerBlock = (cs * 8) / newBits;
  const newMax = newOrder >= 6 ? Infinity : 2 ** newBits - 1;
  const tableEntriesPerCluster = cs / 8;
  /** The new refcount table: block offsets, 0 where no block is needed. */
  const reftable: number[] = [];
  let reftableOffset = 0;
  let reftableClusters = 0;
  const blockPtr = core.reserve(cs, 8);
  const counts = new Float64Array(old.entriesPerBlock);
  let allocations = 0;

  /** One walk_over_reftable: alloc_refblock for each new block, or (write) flush_refblock. */
  const walk = async (index: number, total: number, write: boolean): Promise<boolean> => {
    let allocated = false;
    let newIndex = 0;
    let inBlock = 0;
    let empty = true;
    const perOld = old.entriesPerBlock;
    if (write) core.u8().fill(0, blockPtr, blockPtr + cs);
    const finish = async (): Promise<void> => {
      if (write) {
        const offset = reftable[newIndex] ?? 0;
        if (offset !== 0) await backend.write(core.bytes(blockPtr, cs).slice(), offset);
        else if (!empty) {
          throw new Qcow2Error(Qcow2ErrorCode.CORRUPT, `${backend.name}: refcounts changed while the new refcount blocks were written`);
        }
        core.u8().fill(0, blockPtr, blockPtr + cs);
      } else if (!empty) {
        if (newIndex >= reftable.length) {
          const size = Math.ceil((newIndex + 1) / tableEntriesPerCluster) * tableEntriesPerCluster;
          if (size * 8 > QCOW_MAX_REFTABLE_SIZE) {
            throw new Qcow2Error(
              Qcow2ErrorCode.LIMIT_EXCEEDED,
              "This operation would make the refcount table grow beyond the maximum size supported by QEMU, aborting",
            );
          }
          while (reftable.length < size) reftable.push(0);
        }
        if (reftable[newIndex] === 0) {
          reftable[newIndex] = await old.allocate(1);
          allocated = true;
          allocations++;
        }
      }
      newIndex++;
      inBlock = 0;
      empty = true;
    };
    for (let ti = 0; ti < old.tableEntries; ti++) {
      progress.report(CHANGING_REFCOUNT_ORDER, index * old.tableEntries + ti, total * old.tableEntries);
      if (old.blockOffset(ti) === 0) {
        // No block: all of its refcounts are 0.
        for (let left = perOld; left > 0; ) {
          if (inBlock >= newPerBlock) await finish();
          const n = Math.min(left, newPerBlock - inBlock);
          inBlock += n;
          left -= n;
        }
        continue;
      }
      await old.getMany(ti * perOld, counts);
      for (let k = 0; k < perOld; k++) {
        if (inBlock >= newPerBlock) {
          const before = allocations;
          await finish();
          // qemu's walk reads through the refcount cache: it sees the block it just allocated.
          if (allocations !== before) await old.getMany(ti * perOld, counts);
        }
        const refcount = counts[k]!;
        if (refcount > newMax) {
          throw new Qcow2Error(
            Qcow2ErrorCode.LIMIT_EXCEEDED,
            `Cannot decrease refcount entry width to ${newBits} bits: Cluster at offset ${altHex((ti * perOld + k) * cs)} has a refcount of ${refcount}`,
          );
        }
        if (refcount !== 0) {
          if (write) core.exports.refcountSet(blockPtr, inBlock, newOrder, refcount);
          empty = false;
        }
        inBlock++;
      }
    }
    if (inBlock > 0) await finish();
    progress.report(CHANGING_REFCOUNT_ORDER, (index + 1) * old.tableEntries, total * old.tableEntries);
    return allocated;
  };

  let walkIndex = 0;
  try {
    for (;;) {
      const totalWalks = Math.max(walkIndex + 2, 3);
      if (!(await walk(walkIndex++, totalWalks, false))) break;
      if (reftableOffset !== 0) {
        // Never written: given back at once.
        old.releaseLater(reftableOffset / cs, reftableClusters);
        await old.applyDecrements();
      }
      reftableClusters = (reftable.length * 8) / cs;
      reftableOffset = await old.allocate(reftableClusters);
    }
    // Every new cluster is taken in the old structure before anything is written to it.
    await persist(backend, old);
    if (old.hasPendingDecrements()) {
      // A table the allocations replaced (the header no longer points at it).
      await old.applyDecrements();
      await persist(backend, old);
    }
    await walk(walkIndex, walkIndex + 1, true);
    const table = new Uint8Array(reftableClusters * cs);
    const dv = view(table);
    reftable.forEach((offset, i) => setU64(dv, i * 8, offset));
    await backend.write(table, reftableOffset);
    await backend.flush();
  } catch (err) {
    // Give back what was taken for the new structure; the old one stays in use.
    try {
      for (const offset of reftable) if (offset !== 0) old.releaseLater(offset / cs, 1);
      if (reftableOffset !== 0) old.releaseLater(reftableOffset / cs, reftableClusters);
      await old.applyDecrements();
      await persist(backend, old);
    } catch {
      // Leaked clusters at worst.
    }
    throw err;
  }

  const oldBlocks: number[] = [];
  for (let ti = 0; ti < old.tableEntries; ti++) {
    const offset = old.blockOffset(ti);
    if (offset !== 0) oldBlocks.push(offset);
  }
  const oldTable = { offset: old.tableOffset, clusters: old.tableClusters };
  h = await readHeader(backend);
  h.refcountOrder = newOrder;
  h.refcountTableOffset = reftableOffset;
  h.refcountTableClusters = reftableClusters;
  await writeHeaderCluster(backend, h);

  // The old structure is now unreferenced: free it in the new one.
  const fresh = await openRefcounts(backend, h, core);
  for (const offset of oldBlocks) fresh.releaseLater(offset / cs, 1);
  fresh.releaseLater(oldTable.offset / cs, oldTable.clusters);
  await fresh.applyDecrements();
  await persist(backend, fresh);
}

// ---- size --------------------------------------------------------------------------------------

/** blk_truncate(exact) through qcow2_co_truncate's checks, with qemu's messages. */
async function resizeTo(backend: BlockBackend, newSize: bigint, o: AmendOptions): Promise<void> {
  if (newSize > INT64_MAX) throw new RangeError("Image size cannot be negative");
  const h = await readHeader(backend);
  if (newSize % BigInt(SECTOR) !== 0n) throw new RangeError(`The new size must be a multiple of ${SECTOR}`);
  if (h.nbSnapshots > 0 && h.version < 3) {
    throw new AmendError(Qcow2ErrorCode.NOT_SUPPORTED, "Can't resize a v2 image which has snapshots");
  }
  if (h.extensions.bitmaps && h.extensions.bitmaps.nbBitmaps > 0) {
    throw new AmendError(Qcow2ErrorCode.NOT_SUPPORTED, `${backend.name}: resizing an image with persistent bitmaps is not supported yet`);
  }
  const cs = 2n ** BigInt(h.clusterBits);
  const l1Span = cs * (cs / 8n);
  const l1Needed = (newSize + l1Span - 1n) / l1Span;
  if (l1Needed > BigInt(h.l1Size) && l1Needed * 8n > BigInt(QCOW_MAX_L1_SIZE)) {
    throw new AmendError(Qcow2ErrorCode.LIMIT_EXCEEDED, "Failed to grow the L1 table: File too large");
  }
  if (newSize > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new AmendError(Qcow2ErrorCode.NOT_SUPPORTED, `a virtual size above 2^53 (${newSize}) is not supported yet`);
  }
  const image = await Qcow2Image.open(borrow(backend), openOptions(o));
  try {
    await image.resize(Number(newSize), { shrink: true });
  } finally {
    await image.close();
  }
}

// ---- downgrade ---------------------------------------------------------------------------------

/** qcow2_downgrade to version 2. */
async function downgrade(backend: BlockBackend, hasBacking: boolean, o: AmendOptions, progress: AmendProgress): Promise<void> {
  let h = await readHeader(backend);
  if (h.refcountOrder !== 4) throw new AmendError(Qcow2ErrorCode.NOT_SUPPORTED, "compat=0.10 requires refcount_bits=16");
  const table = h.nbSnapshots > 0 ? await readSnapshotTable(backend, h.snapshotsOffset, h.nbSnapshots) : { entries: [], tableBytes: 0 };
  const snapshots = table.entries;
  const diskSize = Math.floor(h.size / SECTOR) * SECTOR;
  // v2 readers would not know that these snapshots need their extra data.
  if (snapshots.some((sn) => sn.vmStateSize > 0xffffffff || (sn.diskSize ?? diskSize) !== diskSize)) {
    throw new AmendError(Qcow2ErrorCode.NOT_SUPPORTED, "Internal snapshots prevent downgrade of image");
  }
  if (h.incompatibleFeatures & BigInt(INCOMPAT_DIRTY)) {
    await writeIncompatible(backend, h, h.incompatibleFeatures & ~BigInt(INCOMPAT_DIRTY));
  }
  const incompatible = h.incompatibleFeatures & ~BigInt(INCOMPAT_COMPRESSION);
  if (incompatible !== 0n) {
    throw new AmendError(Qcow2ErrorCode.NOT_SUPPORTED, `Cannot downgrade an image with incompatible features ${incompatible.toString(16)} set`);
  }
  await expandZeroClusters(backend, h, snapshots, table.tableBytes, hasBacking, o, progress);
  h = await readHeader(backend);
  h.compatibleFeatures = 0n;
  h.autoclearFeatures = 0n;
  // zstd images are not opened yet, so the compression type here is zlib (deflate).
  h.incompatibleFeatures &= ~BigInt(INCOMPAT_COMPRESSION);
  h.compressionType = COMPRESSION_ZLIB;
  h.version = 2;
  await writeHeaderCluster(backend, h);
}

/**
 * qcow2_expand_zero_clusters: v2 has no zero flag. A zero cluster without an allocation becomes
 * unallocated when nothing shows through from a backing file, else a newly allocated cluster of
 * zeros; one with an allocation has its cluster zeroed (or, when a snapshot shares that cluster,
 * gets a new one). Per L2 table: new clusters taken and zeros written, refcounts made durable,
 * then the table written, then the shared clusters released.
 */
async function expandZeroClusters(
  backend: BlockBackend,
  h: Qcow2Header,
  snapshots: SnapshotEntry[],
  snapshotTableBytes: number,
  hasBacking: boolean,
  o: AmendOptions,
  progress: AmendProgress,
): Promise<void> {
  const cs = 2 ** h.clusterBits;
  const refcounts = await openRefcounts(backend, h, await WasmCore.create(o.wasm));
  const tables = [{ what: "active L1 table", offset: h.l1TableOffset, size: h.l1Size }];
  for (const sn of snapshots) {
    if (sn.l1TableOffset % cs !== 0 || sn.l1Size * 8 > QCOW_MAX_L1_SIZE) {
      throw new Qcow2Error(Qcow2ErrorCode.CORRUPT, `${backend.name}: snapshot ${sn.id} (${sn.name}): its L1 table is not valid`);
    }
    tables.push({ what: "inactive L1 table", offset: sn.l1TableOffset, size: sn.l1Size });
  }
  const l1s: Uint8Array[] = [];
  for (const t of tables) {
    const l1 = new Uint8Array(t.size * 8);
    await readFully(backend, l1, t.offset);
    l1s.push(l1);
  }
  // What zeros written in place must never land on (qemu's pre-write overlap check).
  const meta = new MetadataClusters(cs);
  l1s.forEach((l1, n) => {
    for (let i = 0; i < tables[n]!.size; i++) meta.add(l1Offset(l1, i), n === 0 ? "active L2 table" : "inactive L2 table");
  });
  for (let ti = 0; ti < refcounts.tableEntries; ti++) meta.add(refcounts.blockOffset(ti), "refcount block");
  const ranges = [
    ...tables.map((t) => ({ what: t.what, start: t.offset, length: t.size * 8 })),
    { what: "refcount table", start: refcounts.tableOffset, length: refcounts.tableClusters * cs },
    { what: "snapshot table", start: h.snapshotsOffset, length: snapshotTableBytes },
  ];

  const total = tables.reduce((n, t) => n + t.size, 0);
  let visited = 0;
  const l2 = new Uint8Array(cs);
  const dv = view(l2);
  const zeros = new Uint8Array(cs);
  for (let n = 0; n < tables.length; n++) {
    const l1 = l1s[n]!;
    for (let i = 0; i < tables[n]!.size; i++) {
      const l2Offset = l1Offset(l1, i);
      if (l2Offset !== 0) {
        if (l2Offset % cs !== 0) {
          throw new Qcow2Error(Qcow2ErrorCode.CORRUPT, `${backend.name}: L2 table offset ${hex(l2Offset)} unaligned (L1 index: ${hex(i)})`);
        }
        const l2Refcount = await refcounts.get(l2Offset / cs);
        await readFully(backend, l2, l2Offset);
        const zeroAt: number[] = [];
        const shared: number[] = [];
        let dirty = false;
        const fresh = async (): Promise<number> => {
          const offset = await refcounts.allocate(1);
          // A shared L2 table: the new cluster is referenced once through each of its owners.
          if (l2Refcount > 1) await refcounts.add(offset / cs, 1, l2Refcount - 1);
          return offset;
        };
        for (let j = 0; j < cs / 8; j++) {
          const hi = dv.getUint32(j * 8);
          const lo = dv.getUint32(j * 8 + 4);
          if (hi & QCOW_OFLAG_COMPRESSED_HI || !(lo & ZERO_FLAG_LO)) continue;
          const offset = (hi & L1E_OFFSET_MASK_HI) * 0x100000000 + ((lo & L1E_OFFSET_MASK_LO) >>> 0);
          let target: number;
          if (offset === 0) {
            if (!hasBacking) {
              // Unallocated reads as zeros when there is no backing file.
              setU64(dv, j * 8, 0);
              dirty = true;
              continue;
            }
            target = await fresh();
          } else {
            if (offset % cs !== 0) {
              throw new Qcow2Error(
                Qcow2ErrorCode.CORRUPT,
                `${backend.name}: Cluster allocation offset ${hex(offset)} unaligned (L2 offset: ${hex(l2Offset)}, L2 index: ${hex(j)})`,
              );
            }
            if ((await refcounts.get(offset / cs)) > l2Refcount) {
              // Shared with a snapshot that still reads its data there (qemu would zero it).
              target = await fresh();
              shared.push(offset / cs);
            } else {
              const what = meta.overlap(offset, cs, ranges);
              if (what !== undefined) {
                throw new Qcow2Error(
                  Qcow2ErrorCode.CORRUPT,
                  `${backend.name}: Failed to turn zero into data clusters: the zero cluster at ${hex(offset)} overlaps the ${what}`,
                );
              }
              target = offset;
            }
          }
          zeroAt.push(target);
          setU64(dv, j * 8, target);
          if (l2Refcount === 1) dv.setUint32(j * 8, dv.getUint32(j * 8) | QCOW_OFLAG_COPIED_HI);
          dirty = true;
        }
        if (dirty) {
          for (const offset of zeroAt) await backend.write(zeros, offset);
          await persist(backend, refcounts);
          await backend.write(l2, l2Offset);
          await backend.flush();
          if (shared.length > 0) {
            for (const cluster of shared) for (let k = 0; k < l2Refcount; k++) refcounts.releaseLater(cluster, 1);
            await refcounts.applyDecrements();
            await persist(backend, refcounts);
          }
        }
      }
      visited++;
      progress.report(DOWNGRADING, visited, total);
    }
  }
}

/** Bits 9..55 of entry `i` of an L1 table. */
function l1Offset(l1: Uint8Array, i: number): number {
  const dv = view(l1);
  return (dv.getUint32(i * 8) & L1E_OFFSET_MASK_HI) * 0x100000000 + ((dv.getUint32(i * 8 + 4) & L1E_OFFSET_MASK_LO) >>> 0);
}
