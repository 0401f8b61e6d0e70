// Internal snapshots (docs/interop/qcow2.rst "Snapshots"; the seed's qcow2_snapshot_create, _goto,
// _delete and _list, and qemu's qcow2-snapshot.c of today): a snapshot is a copy of the active L1
// table plus one more reference on every L2 table and cluster it reaches, recorded in the
// snapshot table. Every step keeps DESIGN.md §4: references are added and made durable before
// anything points at them, and dropped only after nothing does; a crash leaks at worst.

import { Qcow2Error, Qcow2ErrorCode, hex } from "../errors.js";
import { readFully, type BlockBackend } from "../io/backend.js";
import { L1Table } from "../format/l1.js";
import type { Qcow2Header } from "../format/header.js";
import { QCOW_MAX_SNAPSHOTS } from "../format/constants.js";
import { writeSnapshotTablePointer } from "../format/header-update.js";
import {
  encodeSnapshotTable,
  newSnapshotEntry,
  nextSnapshotId,
  readSnapshotTable,
  snapshotL1Problem,
  type SnapshotEntry,
} from "../format/snapshots.js";
import type { ClusterMap } from "./cluster-map.js";

/** What a caller sees of one snapshot (qemu's QEMUSnapshotInfo). */
export interface SnapshotInfo {
  id: string;
  name: string;
  /** Bytes of VM state saved with the snapshot (0 for a disk-only snapshot). */
  vmStateSize: number;
  dateSec: number;
  dateNsec: number;
  /** Guest run time at the snapshot, in nanoseconds. */
  vmClockNsec: number;
  /** Guest disk size at the snapshot. */
  diskSize: number;
  /** Record/replay instruction count; undefined when the snapshot has none (qemu's -1). */
  icount: number | undefined;
  l1TableOffset: number;
  l1Size: number;
}

export interface CreateSnapshotOptions {
  /** The id to give it (default: qemu's rule, one more than the largest numeric id). */
  id?: string;
  /** VM state to save with the snapshot, stored past the end of the disk. */
  vmState?: Uint8Array;
  /** Seconds since the epoch (default now). */
  dateSec?: number;
  dateNsec?: number;
  vmClockNsec?: number;
  /** Default 0, as qemu-img snapshot -c writes it. */
  icount?: number;
}

/** @internal The parts of a Qcow2Image snapshots work on. */
export interface SnapshotHost {
  readonly name: string;
  readonly backend: BlockBackend;
  readonly header: Qcow2Header;
  readonly map: ClusterMap;
  readonly clusterSize: number;
  /** Throws unless the image may be changed. */
  writable(op: string): void;
  /** Run `fn` with no guest request in flight and the metadata lock held, header bits for writing set. */
  exclusive<T>(fn: () => Promise<T>): Promise<T>;
  /** Make every change durable in the crash-safe order (refcounts written, lazy or not). Under lock. */
  writeBack(): Promise<void>;
  /** Give the active L1 at least `l1Size` entries, keeping the virtual size. Under lock. */
  growL1(l1Size: number): Promise<void>;
  /** Change the virtual size (shrinking allowed). Not under lock. */
  resize(size: number): Promise<void>;
  /** The active L1 table was replaced: forget what was derived from it. */
  l1Replaced(): void;
  /** Guest I/O at offsets past the disk (the VM state area); the caller has checked the range. */
  readBeyond(dst: Uint8Array, guestOffset: number): Promise<void>;
  writeBeyond(guestOffset: number, data: Uint8Array): Promise<void>;
  discardBeyond(guestOffset: number, length: number): Promise<void>;
}

/** Bytes of VM state a snapshot can hold at most (qemu keeps it in an int64; we keep it addressable). */
const MAX_VM_STATE = 2 ** 52;

export function snapshotInfo(entry: SnapshotEntry, diskSize: number): SnapshotInfo {
  return {
    id: entry.id,
    name: entry.name,
    vmStateSize: entry.vmStateSize,
    dateSec: entry.dateSec,
    dateNsec: entry.dateNsec,
    vmClockNsec: entry.vmClockNsec,
    diskSize: entry.diskSize ?? diskSize,
    icount: entry.icount === undefined || entry.icount === -1 ? undefined : entry.icount,
    l1TableOffset: entry.l1TableOffset,
    l1Size: entry.l1Size,
  };
}

/**
 * qemu's find_snapshot_by_id_or_name: an id match first, then a name match. `{id, name}` must
 * match both where both are given (qemu's snapshot.id=…,snapshot.name=…).
 */
export function findSnapshot(entries: readonly SnapshotEntry[], which: string | { id?: string; name?: string }): number {
  if (typeof which === "string") {
    const byId = entries.findIndex((e) => e.id === which);
    return byId >= 0 ? byId : entries.findIndex((e) => e.name === which);
  }
  return entries.findIndex((e) => (which.id === undefined || e.id === which.id) && (which.name === undefined || e.name === which.name));
}

function describe(which: string | { id?: string; name?: string }): string {
  if (typeof which === "string") return `'${which}'`;
  return [which.id !== undefined ? `id '${which.id}'` : "", which.name !== undefined ? `name '${which.name}'` : ""].filter(Boolean).join(" and ");
}

/** Internal snapshots of one open image. Get it from `image.snapshots`. */
export class Snapshots {
  private entries: SnapshotEntry[] | undefined;
  /** Bytes of the table on disk (for releasing it when it is replaced). */
  private tableBytes = 0;

  /** @internal */
  constructor(private readonly host: SnapshotHost) {}

  /** The snapshot table, read once (and validated: a hostile table is refused). */
  private async table(): Promise<SnapshotEntry[]> {
    if (this.entries) return this.entries;
    const h = this.host.header;
    if (h.nbSnapshots === 0) {
      this.entries = [];
      this.tableBytes = 0;
      return this.entries;
    }
    const table = await readSnapshotTable(this.host.backend, h.snapshotsOffset, h.nbSnapshots);
    this.entries = table.entries;
    this.tableBytes = table.tableBytes;
    return this.entries;
  }

  /** Every snapshot, in table order. */
  async list(): Promise<SnapshotInfo[]> {
    const size = this.host.header.size;
    return (await this.table()).map((e) => snapshotInfo(e, size));
  }

  /** One snapshot by id or name (id first, as qemu looks them up), or undefined. */
  async find(which: string | { id?: string; name?: string }): Promise<SnapshotInfo | undefined> {
    const entries = await this.table();
    const i = findSnapshot(entries, which);
    return i < 0 ? undefined : snapshotInfo(entries[i]!, this.host.header.size);
  }

  private async entry(which: string | { id?: string; name?: string }, op: string): Promise<{ index: number; entry: SnapshotEntry }> {
    const entries = await this.table();
    const index = findSnapshot(entries, which);
    if (index < 0) throw new Qcow2Error(Qcow2ErrorCode.NOT_FOUND, `${this.host.name}: ${op}: no snapshot with id or name ${describe(which)}`);
    const entry = entries[index]!;
    const cs = this.host.clusterSize;
    const problem = snapshotL1Problem(entry, cs);
    if (problem || entry.l1TableOffset + entry.l1Size * 8 > Number.MAX_SAFE_INTEGER || (entry.l1Size > 0 && entry.l1TableOffset === 0)) {
      throw new Qcow2Error(
        Qcow2ErrorCode.CORRUPT,
        `${this.host.name}: snapshot '${entry.name}' (id ${entry.id}): ${problem ?? `l1_table_offset ${hex(entry.l1TableOffset)} is invalid`}`,
      );
    }
    return { index, entry };
  }

  /** The L1 table a snapshot points at, `minSize` entries at least (zero padded). */
  private async readL1(entry: SnapshotEntry, minSize = 0): Promise<L1Table> {
    const size = Math.max(entry.l1Size, minSize);
    const l1 = new L1Table(size);
    await readFully(this.host.backend, l1.bytes.subarray(0, entry.l1Size * 8), entry.l1TableOffset);
    return l1;
  }

  /**
   * Write the table `entries` to newly allocated clusters, then point the header at it (one
   * 12-byte write of nb_snapshots and snapshots_offset), then release the old table. Under lock.
   */
  private async writeTable(entries: SnapshotEntry[]): Promise<void> {
    const host = this.host;
    const cs = host.clusterSize;
    const refcounts = host.map.refcounts!;
    const bytes = encodeSnapshotTable(entries, host.header.size);
    let offset = 0;
    if (bytes.length > 0) {
      offset = await refcounts.allocate(Math.ceil(bytes.length / cs));
      await host.writeBack();
      await host.backend.write(bytes, offset);
      await host.backend.flush();
    }
    const oldOffset = host.header.snapshotsOffset;
    const oldBytes = host.header.nbSnapshots > 0 ? this.tableBytes : 0;
    await writeSnapshotTablePointer(host.backend, host.header, entries.length, offset);
    this.entries = entries;
    this.tableBytes = bytes.length;
    if (oldOffset !== 0 && oldBytes > 0) {
      refcounts.releaseLater(oldOffset / cs, Math.ceil(oldBytes / cs));
      await host.writeBack();
    }
    host.l1Replaced();
  }

  /**
   * Take a snapshot of the disk as it is now (qemu's qcow2_snapshot_create): the active L1 copied
   * to new clusters, one more reference on every table and cluster it reaches (COPIED cleared, so
   * the next write to any of them copies it first), then the new table.
   */
  async create(name: string, options: CreateSnapshotOptions = {}): Promise<SnapshotInfo> {
    const host = this.host;
    host.writable("snapshots.create");
    if (typeof name !== "string") throw new TypeError("snapshots.create: name must be a string");
    const entries = await this.table();
    if (entries.length >= QCOW_MAX_SNAPSHOTS) {
      throw new Qcow2Error(Qcow2ErrorCode.LIMIT_EXCEEDED, `${host.name}: cannot create snapshot '${name}': the image already has ${QCOW_MAX_SNAPSHOTS} snapshots`);
    }
    const refcounts = host.map.refcounts!;
    if (refcounts.maxRefcount < 2 && host.map.l1.bytes.some((b) => b !== 0)) {
      // Every L2 table the disk has would need a second reference (qemu fails half-way, leaking).
      throw new Qcow2Error(
        Qcow2ErrorCode.LIMIT_EXCEEDED,
        `${host.name}: cannot create snapshot '${name}': refcount_bits ${2 ** refcounts.order} cannot count a second reference`,
      );
    }
    const id = options.id ?? nextSnapshotId(entries);
    if (findSnapshot(entries, { id }) >= 0) {
      throw new Qcow2Error(Qcow2ErrorCode.ALREADY_EXISTS, `${host.name}: cannot create snapshot '${name}': id '${id}' is taken`);
    }
    const vmState = options.vmState;
    if (vmState !== undefined && vmState.length > MAX_VM_STATE) {
      throw new RangeError(`snapshots.create: VM state of ${vmState.length} bytes is too large`);
    }
    const now = Date.now();
    const dateSec = options.dateSec ?? Math.floor(now / 1000);
    const dateNsec = options.dateNsec ?? (now % 1000) * 1_000_000;
    if (vmState !== undefined && vmState.length > 0) await this.saveVmState(0, vmState);

    const info = await host.exclusive(async () => {
      const cs = host.clusterSize;
      const map = host.map;
      await host.writeBack();
      const active = map.l1;
      const l1Bytes = active.size * 8;
      // The copy is written with the flags as they are now, before the pass below clears them.
      const l1TableOffset = l1Bytes > 0 ? await refcounts.allocate(Math.ceil(l1Bytes / cs)) : 0;
      if (l1Bytes > 0) await host.backend.write(active.bytes.slice(0, l1Bytes), l1TableOffset);
      await map.updateSnapshotRefcount(active, 1);
      // Refcounts, then the tables with COPIED cleared, then the L1 copy: all durable before the
      // snapshot table names them.
      await host.writeBack();
      const entry = newSnapshotEntry({
        id,
        name,
        l1TableOffset,
        l1Size: active.size,
        dateSec,
        dateNsec,
        vmClockNsec: options.vmClockNsec ?? 0,
        vmStateSize: vmState?.length ?? 0,
        diskSize: host.header.size,
        icount: options.icount ?? 0,
      });
      await this.writeTable([...entries, entry]);
      return snapshotInfo(entry, host.header.size);
    });
    // The saved VM state lives on in the snapshot only (qemu drops it from the active table:
    // leaving it would make the next snapshot copy it).
    if (vmState !== undefined && vmState.length > 0) {
      await host.discardBeyond(this.vmStateOffset(), Math.ceil(vmState.length / host.clusterSize) * host.clusterSize);
    }
    return info;
  }

  /**
   * Make a snapshot's disk the active one (qemu's qcow2_snapshot_goto): the disk takes the
   * snapshot's size, its tables gain a reference, the active L1 is overwritten with the
   * snapshot's, the old active tables lose theirs, and COPIED is recomputed.
   */
  async apply(which: string | { id?: string; name?: string }): Promise<SnapshotInfo> {
    const host = this.host;
    host.writable("snapshots.apply");
    const { entry } = await this.entry(which, "snapshots.apply");
    const diskSize = entry.diskSize ?? host.header.size;
    if (diskSize !== host.header.size) await host.resize(diskSize);
    return host.exclusive(async () => {
      const map = host.map;
      await host.writeBack();
      if (entry.l1Size > map.l1.size) await host.growL1(entry.l1Size);
      const old = map.l1;
      const fresh = await this.readL1(entry, old.size);
      // The snapshot's tables gain their reference before the active L1 points at them.
      await map.updateSnapshotRefcount(fresh, 1);
      await host.writeBack();
      await host.backend.write(fresh.bytes, map.l1TableOffset);
      await host.backend.flush();
      // Only now may the old active tables lose theirs (applied once the new L1 is durable).
      const oldTables = await map.updateSnapshotRefcount(old, -1);
      fresh.onChange = old.onChange;
      map.l1 = fresh;
      host.l1Replaced();
      await host.writeBack();
      await this.dropFreedTables(oldTables);
      await map.updateSnapshotRefcount(map.l1, 0);
      await host.writeBack();
      return snapshotInfo(entry, host.header.size);
    });
  }

  /**
   * Delete a snapshot (qemu's qcow2_snapshot_delete): the table without it is written first, then
   * every table and cluster it reached loses a reference, its L1 table is freed, and COPIED is
   * recomputed in the active tables (clusters it shared become the active disk's alone).
   */
  async delete(which: string | { id?: string; name?: string }): Promise<void> {
    const host = this.host;
    host.writable("snapshots.delete");
    await this.entry(which, "snapshots.delete");
    await host.exclusive(async () => {
      const cs = host.clusterSize;
      const map = host.map;
      // Looked up again: another operation may have changed the table meanwhile.
      const { index, entry } = await this.entry(which, "snapshots.delete");
      const entries = await this.table();
      await host.writeBack();
      const l1 = await this.readL1(entry);
      await this.writeTable(entries.filter((_, i) => i !== index));
      // From here a failure leaks clusters at worst.
      const tables = await map.updateSnapshotRefcount(l1, -1);
      if (entry.l1Size > 0) map.refcounts!.releaseLater(entry.l1TableOffset / cs, Math.ceil((entry.l1Size * 8) / cs));
      await host.writeBack();
      await this.dropFreedTables(tables);
      await map.updateSnapshotRefcount(map.l1, 0);
      await host.writeBack();
    });
  }

  /** Give a snapshot a new name (the id stays). */
  async rename(which: string | { id?: string; name?: string }, newName: string): Promise<void> {
    const host = this.host;
    host.writable("snapshots.rename");
    if (typeof newName !== "string") throw new TypeError("snapshots.rename: name must be a string");
    await this.entry(which, "snapshots.rename");
    await host.exclusive(async () => {
      const { index, entry } = await this.entry(which, "snapshots.rename");
      const entries = [...(await this.table())];
      entries[index] = { ...entry, name: newName, nameBytes: new TextEncoder().encode(newName) };
      await this.writeTable(entries);
    });
  }

  /** Tables no longer referenced by anything must not be written from the cache into reused clusters. */
  private async dropFreedTables(tables: number[]): Promise<void> {
    const refcounts = this.host.map.refcounts!;
    const cs = this.host.clusterSize;
    for (const t of tables) if ((await refcounts.get(t / cs)) === 0) this.host.map.l2.drop(t);
  }

  /** Guest offset where VM state starts: the first L1 entry past the disk (qemu's qcow2_vm_state_offset). */
  vmStateOffset(): number {
    const span = this.host.map.l1Span;
    return Math.ceil(this.host.header.size / span) * span;
  }

  /** Write VM state at byte `pos` of the VM state area of the active disk (qemu's save_vmstate). */
  async saveVmState(pos: number, data: Uint8Array): Promise<void> {
    this.host.writable("saveVmState");
    if (!Number.isSafeInteger(pos) || pos < 0 || pos + data.length > MAX_VM_STATE) {
      throw new RangeError(`saveVmState: position ${pos} (+${data.length}) is outside the VM state area`);
    }
    if (data.length === 0) return;
    const start = this.vmStateOffset() + pos;
    const l1Needed = Math.ceil((start + data.length) / this.host.map.l1Span);
    if (l1Needed > this.host.map.l1.size) await this.host.exclusive(() => this.host.growL1(l1Needed));
    await this.host.writeBeyond(start, data);
  }

  /**
   * Read VM state from byte `pos` of the active disk's VM state area (after `apply`, that of the
   * applied snapshot, which is how qemu's loadvm reads it). Unwritten bytes read as zeros.
   */
  async loadVmState(pos: number, length: number): Promise<Uint8Array> {
    if (!Number.isSafeInteger(pos) || pos < 0 || !Number.isSafeInteger(length) || length < 0 || pos + length > MAX_VM_STATE) {
      throw new RangeError(`loadVmState: position ${pos} (+${length}) is outside the VM state area`);
    }
    const dst = new Uint8Array(length);
    if (length > 0) await this.host.readBeyond(dst, this.vmStateOffset() + pos);
    return dst;
  }
}
