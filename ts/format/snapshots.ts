// The internal snapshot table (docs/interop/qcow2.rst "Snapshots"): nb_snapshots variable-length
// entries from snapshots_offset, each a 40-byte fixed part, extra data, the id and the name,
// padded to 8 bytes. Parsing checks qemu's limits before sizing anything from the table.

import { Qcow2Error, Qcow2ErrorCode, hex } from "../errors.js";
import { readFully, type BlockBackend } from "../io/backend.js";
import { decodeString, encodeString, getU64, setU64, view } from "./bytes.js";
import { QCOW_MAX_L1_SIZE, QCOW_MAX_SNAPSHOTS, QCOW_MAX_SNAPSHOTS_SIZE } from "./constants.js";

/** qemu refuses more extra data per snapshot than this (QCOW_MAX_SNAPSHOT_EXTRA_DATA). */
export const MAX_SNAPSHOT_EXTRA_DATA = 1024;
export const SNAPSHOT_FIXED_SIZE = 40;

export interface SnapshotEntry {
  /** The L1 table's offset; exact below 2^53, see l1TableOffsetRaw above that. */
  l1TableOffset: number;
  /** The field as stored (qemu's check reads tables past 2^53 as zeros, or fails past 2^63). */
  l1TableOffsetRaw: bigint;
  l1Size: number;
  id: string;
  name: string;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: number;
  /** VM state bytes (the 64-bit extra-data field when present, else the 32-bit one). */
  vmStateSize: number;
  /** Guest disk size at the snapshot, when the extra data records it. */
  diskSize?: number;
  /** Instruction count, when recorded (-1 means none). */
  icount?: number;
  /** Extra data bytes, kept verbatim so a rewrite preserves what this library does not know. */
  extraData: Uint8Array;
  /** The id and name as stored (qemu treats them as bytes; a rewrite keeps them exact). */
  idBytes: Uint8Array;
  nameBytes: Uint8Array;
}

export interface SnapshotTable {
  entries: SnapshotEntry[];
  /** Bytes the table occupies from snapshots_offset. */
  tableBytes: number;
}

const EMPTY = new Uint8Array(0);

/** Reads forward through the table in 64 KiB pieces. */
class TableReader {
  private buf = new Uint8Array(0);
  private bufStart = 0;

  constructor(
    private readonly backend: BlockBackend,
    private readonly start: number,
  ) {}

  async bytes(pos: number, length: number): Promise<Uint8Array> {
    if (pos < this.bufStart || pos + length > this.bufStart + this.buf.length) {
      const size = Math.max(length, 65536);
      this.buf = new Uint8Array(size);
      this.bufStart = pos;
      await readFully(this.backend, this.buf, this.start + pos);
    }
    return this.buf.subarray(pos - this.bufStart, pos - this.bufStart + length);
  }
}

function corrupt(message: string): Qcow2Error {
  return new Qcow2Error(Qcow2ErrorCode.CORRUPT, message);
}

/**
 * Read the snapshot table. Every entry must have an L1 table offset below 2^53, at most
 * MAX_SNAPSHOT_EXTRA_DATA bytes of extra data, and the whole table must stay within
 * QCOW_MAX_SNAPSHOTS_SIZE (qemu's "Snapshot table exceeds the maximum size").
 */
export async function readSnapshotTable(
  backend: BlockBackend,
  snapshotsOffset: number,
  nbSnapshots: number,
  options: { lenient?: boolean } = {},
): Promise<SnapshotTable> {
  if (nbSnapshots > QCOW_MAX_SNAPSHOTS) {
    throw new Qcow2Error(Qcow2ErrorCode.LIMIT_EXCEEDED, `snapshot table: nb_snapshots ${nbSnapshots} exceeds ${QCOW_MAX_SNAPSHOTS}`);
  }
  const reader = new TableReader(backend, snapshotsOffset);
  const entries: SnapshotEntry[] = [];
  let pos = 0;
  for (let i = 0; i < nbSnapshots; i++) {
    const fixed = view(await reader.bytes(pos, SNAPSHOT_FIXED_SIZE));
    const l1TableOffsetRaw = fixed.getBigUint64(0);
    const l1TableOffset = Number(l1TableOffsetRaw);
    const l1Size = fixed.getUint32(8);
    const idSize = fixed.getUint16(12);
    const nameSize = fixed.getUint16(14);
    const extraSize = fixed.getUint32(36);
    if (!options.lenient && l1TableOffsetRaw >= 2n ** 53n) {
      throw corrupt(`snapshot table entry ${i}: l1_table_offset is at or past 2^53`);
    }
    if (extraSize > MAX_SNAPSHOT_EXTRA_DATA) {
      throw corrupt(`snapshot table entry ${i}: extra_data_size ${extraSize} exceeds ${MAX_SNAPSHOT_EXTRA_DATA}`);
    }
    const entryBytes = Math.ceil((SNAPSHOT_FIXED_SIZE + extraSize + idSize + nameSize) / 8) * 8;
    if (pos + entryBytes > QCOW_MAX_SNAPSHOTS_SIZE) {
      throw new Qcow2Error(
        Qcow2ErrorCode.LIMIT_EXCEEDED,
        `snapshot table at ${hex(snapshotsOffset)}: entry ${i} ends past the ${QCOW_MAX_SNAPSHOTS_SIZE}-byte limit`,
      );
    }
    const dateSec = fixed.getUint32(16);
    const dateNsec = fixed.getUint32(20);
    const vmClockNsec = getU64(fixed, 24);
    let vmStateSize = fixed.getUint32(32);
    const extraData = (await reader.bytes(pos + SNAPSHOT_FIXED_SIZE, extraSize)).slice();
    const ev = view(extraData);
    const entry: SnapshotEntry = {
      l1TableOffset,
      l1TableOffsetRaw,
      l1Size,
      id: "",
      name: "",
      dateSec,
      dateNsec,
      vmClockNsec,
      vmStateSize,
      extraData,
      idBytes: EMPTY,
      nameBytes: EMPTY,
    };
    if (extraSize >= 8) entry.vmStateSize = vmStateSize = getU64(ev, 0);
    if (extraSize >= 16) entry.diskSize = getU64(ev, 8);
    if (extraSize >= 24) entry.icount = Number(ev.getBigInt64(16));
    entry.idBytes = (await reader.bytes(pos + SNAPSHOT_FIXED_SIZE + extraSize, idSize)).slice();
    entry.nameBytes = (await reader.bytes(pos + SNAPSHOT_FIXED_SIZE + extraSize + idSize, nameSize)).slice();
    entry.id = decodeString(entry.idBytes);
    entry.name = decodeString(entry.nameBytes);
    entries.push(entry);
    pos += entryBytes;
  }
  return { entries, tableBytes: pos };
}

/** The problems qemu's check reports for a snapshot's L1 table reference (checked before use). */
export function snapshotL1Problem(entry: SnapshotEntry, clusterSize: number): string | undefined {
  if (entry.l1TableOffsetRaw % BigInt(clusterSize) !== 0n) {
    return `l1_offset=${hex(entry.l1TableOffsetRaw)}: L1 table is not cluster aligned`;
  }
  if (entry.l1Size > QCOW_MAX_L1_SIZE / 8) {
    return `l1_size=${hex(entry.l1Size)}: L1 table is too large`;
  }
  return undefined;
}

/** The extra data qemu always writes: vm_state_size_large, disk_size and icount (QCowSnapshotExtraData). */
export const SNAPSHOT_EXTRA_SIZE = 24;

/** Bytes one entry takes in a table this library writes (qemu's layout), before padding to 8. */
function encodedEntrySize(entry: SnapshotEntry): number {
  return SNAPSHOT_FIXED_SIZE + Math.max(SNAPSHOT_EXTRA_SIZE, entry.extraData.length) + entry.idBytes.length + entry.nameBytes.length;
}

/** Bytes a table of `entries` takes when written (as qemu's qcow2_write_snapshots sizes it). */
export function snapshotTableSize(entries: readonly SnapshotEntry[]): number {
  let size = 0;
  for (const entry of entries) size = Math.ceil(size / 8) * 8 + encodedEntrySize(entry);
  return size;
}

/**
 * Serialize a snapshot table as qemu writes one: every entry gets at least the 24 bytes of extra
 * data qemu knows (any longer extra data is kept after them), the 32-bit VM state size only when
 * it fits (older readers then see a disk-only snapshot rather than a truncated one), and entries
 * padded to 8 bytes. `diskSize` stands in for entries that do not record theirs.
 */
export function encodeSnapshotTable(entries: readonly SnapshotEntry[], diskSize: number): Uint8Array {
  const size = snapshotTableSize(entries);
  if (entries.length > QCOW_MAX_SNAPSHOTS) {
    throw new Qcow2Error(Qcow2ErrorCode.LIMIT_EXCEEDED, `snapshot table: ${entries.length} snapshots exceed the limit of ${QCOW_MAX_SNAPSHOTS}`);
  }
  if (size > QCOW_MAX_SNAPSHOTS_SIZE) {
    throw new Qcow2Error(Qcow2ErrorCode.LIMIT_EXCEEDED, `snapshot table: ${size} bytes exceed the ${QCOW_MAX_SNAPSHOTS_SIZE}-byte limit`);
  }
  const out = new Uint8Array(Math.ceil(size / 8) * 8);
  const dv = view(out);
  let pos = 0;
  for (const entry of entries) {
    pos = Math.ceil(pos / 8) * 8;
    if (entry.idBytes.length > 0xffff || entry.nameBytes.length > 0xffff) {
      throw new Qcow2Error(Qcow2ErrorCode.LIMIT_EXCEEDED, `snapshot "${entry.name}": id or name longer than 65535 bytes`);
    }
    const extraSize = Math.max(SNAPSHOT_EXTRA_SIZE, entry.extraData.length);
    setU64(dv, pos, entry.l1TableOffset);
    dv.setUint32(pos + 8, entry.l1Size);
    dv.setUint16(pos + 12, entry.idBytes.length);
    dv.setUint16(pos + 14, entry.nameBytes.length);
    dv.setUint32(pos + 16, entry.dateSec);
    dv.setUint32(pos + 20, entry.dateNsec);
    setU64(dv, pos + 24, entry.vmClockNsec);
    dv.setUint32(pos + 32, entry.vmStateSize <= 0xffffffff ? entry.vmStateSize : 0);
    dv.setUint32(pos + 36, extraSize);
    const extra = pos + SNAPSHOT_FIXED_SIZE;
    if (entry.extraData.length > SNAPSHOT_EXTRA_SIZE) out.set(entry.extraData.subarray(SNAPSHOT_EXTRA_SIZE), extra + SNAPSHOT_EXTRA_SIZE);
    setU64(dv, extra, entry.vmStateSize);
    setU64(dv, extra + 8, entry.diskSize ?? diskSize);
    dv.setBigInt64(extra + 16, BigInt(entry.icount ?? -1));
    out.set(entry.idBytes, extra + extraSize);
    out.set(entry.nameBytes, extra + extraSize + entry.idBytes.length);
    pos += encodedEntrySize(entry);
  }
  return out;
}

/** A new entry's fields; the extra data is made from them when the table is written. */
export function newSnapshotEntry(fields: {
  id: string;
  name: string;
  l1TableOffset: number;
  l1Size: number;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: number;
  vmStateSize: number;
  diskSize: number;
  icount: number;
}): SnapshotEntry {
  const idBytes = encodeString(fields.id);
  const nameBytes = encodeString(fields.name);
  return { ...fields, l1TableOffsetRaw: BigInt(fields.l1TableOffset), extraData: EMPTY, idBytes, nameBytes };
}

/** qemu's find_new_snapshot_id: one more than the largest id read as a number (strtoul). */
export function nextSnapshotId(entries: readonly SnapshotEntry[]): string {
  let max = 0;
  for (const entry of entries) {
    const m = /^\s*\+?(\d+)/.exec(entry.id);
    if (m) max = Math.max(max, Number(m[1]));
  }
  return String(max + 1);
}
