// Rebuilding the refcount structure from what references each host cluster (qemu's
// rebuild_refcount_structure, run by `qemu-img check -r all` and on opening a dirty image with
// lazy refcounts). The new table and blocks go after everything in use; the old ones are simply
// no longer referenced, so they read as free in the new structure.

import { Qcow2Error, Qcow2ErrorCode, hex } from "../errors.js";
import { readFully, type BlockBackend } from "../io/backend.js";
import { getU64, view } from "../format/bytes.js";
import { INCOMPAT_DIRTY, QCOW_MAX_REFTABLE_SIZE } from "../format/constants.js";
import type { Qcow2Header } from "../format/header.js";
import { writeIncompatible, writeRefcountTablePointer } from "../format/header-update.js";

/** Clusters the count array may grow to (4 bytes each): 1 GiB of counts. */
const MAX_COUNTED_CLUSTERS = 2 ** 28;

class Counts {
  data = new Uint32Array(1024);
  end = 0;

  constructor(private readonly clusterSize: number) {}

  /** Count one more reference to each cluster touched by [offset, offset + length). */
  addRange(offset: number, length: number): void {
    if (length <= 0) return;
    const first = Math.floor(offset / this.clusterSize);
    const last = Math.floor((offset + length - 1) / this.clusterSize);
    for (let c = first; c <= last; c++) this.add(c);
  }

  add(cluster: number): void {
    if (cluster >= this.data.length) {
      if (cluster >= MAX_COUNTED_CLUSTERS) {
        throw new Qcow2Error(Qcow2ErrorCode.LIMIT_EXCEEDED, `refcount rebuild: cluster ${cluster} is past the ${MAX_COUNTED_CLUSTERS} clusters it can count`);
      }
      const grown = new Uint32Array(Math.min(MAX_COUNTED_CLUSTERS, Math.max(cluster + 1, this.data.length * 2)));
      grown.set(this.data);
      this.data = grown;
    }
    this.data[cluster]!++;
    if (cluster >= this.end) this.end = cluster + 1;
  }
}

function entryOffset(dv: DataView, pos: number): number {
  const hi = dv.getUint32(pos) & 0x00ffffff;
  const lo = dv.getUint32(pos + 4) & 0xfffffe00;
  return hi * 0x100000000 + (lo >>> 0);
}

/** Count the references of one L1 table and everything below it. */
async function countL1(backend: BlockBackend, counts: Counts, h: Qcow2Header, l1Offset: number, l1Size: number, what: string): Promise<void> {
  const cs = 2 ** h.clusterBits;
  if (l1Size === 0) return;
  counts.addRange(l1Offset, l1Size * 8);
  const l1 = new Uint8Array(l1Size * 8);
  await readFully(backend, l1, l1Offset);
  const l1v = view(l1);
  const l2 = new Uint8Array(cs);
  const l2v = view(l2);
  const x = 62 - (h.clusterBits - 8);
  for (let i = 0; i < l1Size; i++) {
    const l2Offset = entryOffset(l1v, i * 8);
    if (l2Offset === 0) continue;
    if (l2Offset % cs !== 0) {
      throw new Qcow2Error(Qcow2ErrorCode.CORRUPT, `${what} L1 entry ${i}: L2 table offset ${hex(l2Offset)} is not cluster aligned`);
    }
    counts.add(l2Offset / cs);
    await readFully(backend, l2, l2Offset);
    for (let j = 0; j < cs / 8; j++) {
      const hi = l2v.getUint32(j * 8);
      const lo = l2v.getUint32(j * 8 + 4);
      if (hi & 0x40000000) {
        // Compressed: the 512-byte sectors of the stream, in every host cluster they touch.
        const entry = (BigInt(hi & 0x3fffffff) << 32n) | BigInt(lo);
        const coffset = Number(entry & ((1n << BigInt(x)) - 1n));
        const sectors = Number((entry >> BigInt(x)) & ((1n << BigInt(h.clusterBits - 8)) - 1n)) + 1;
        const start = coffset - (coffset % 512);
        counts.addRange(start, sectors * 512);
        continue;
      }
      const host = entryOffset(l2v, j * 8);
      if (host === 0) continue;
      if (host % cs !== 0) {
        throw new Qcow2Error(Qcow2ErrorCode.CORRUPT, `${what} L2 table ${hex(l2Offset)} entry ${j}: cluster offset ${hex(host)} is not aligned`);
      }
      counts.add(host / cs);
    }
  }
}

/** The references of every cluster: header, tables, data, snapshots, encryption header. */
export async function countReferences(backend: BlockBackend, h: Qcow2Header): Promise<Counts> {
  const cs = 2 ** h.clusterBits;
  const counts = new Counts(cs);
  counts.add(0);
  if (h.extensions.bitmaps) {
    throw new Qcow2Error(Qcow2ErrorCode.NOT_SUPPORTED, `refcount rebuild of an image with persistent bitmaps is not supported yet`);
  }
  await countL1(backend, counts, h, h.l1TableOffset, h.l1Size, "active");
  if (h.nbSnapshots > 0) {
    // The snapshot table: fixed 40-byte entries with extra data, id and name, each padded to 8.
    let pos = h.snapshotsOffset;
    const fixed = new Uint8Array(40);
    const dv = view(fixed);
    for (let i = 0; i < h.nbSnapshots; i++) {
      await readFully(backend, fixed, pos);
      const l1Offset = getU64(dv, 0);
      const l1Size = dv.getUint32(8);
      const idSize = dv.getUint16(12);
      const nameSize = dv.getUint16(14);
      const extra = dv.getUint32(36);
      if (!Number.isFinite(l1Offset) || l1Offset % cs !== 0 || l1Size * 8 > 32 * 1024 * 1024 || extra > 1024) {
        throw new Qcow2Error(Qcow2ErrorCode.CORRUPT, `snapshot ${i}: L1 table ${hex(l1Offset)} (${l1Size} entries, ${extra} bytes extra) is not valid`);
      }
      await countL1(backend, counts, h, l1Offset, l1Size, `snapshot ${i}`);
      pos += Math.ceil((40 + extra + idSize + nameSize) / 8) * 8;
    }
    counts.addRange(h.snapshotsOffset, pos - h.snapshotsOffset);
  }
  if (h.extensions.cryptoHeader) counts.addRange(h.extensions.cryptoHeader.offset, h.extensions.cryptoHeader.length);
  return counts;
}

function setEntry(block: Uint8Array, index: number, order: number, value: number): void {
  const bits = 2 ** order;
  if (bits < 8) {
    const bitPos = index * bits;
    block[bitPos >> 3]! |= value << (bitPos & 7);
    return;
  }
  const bytes = bits / 8;
  let v = value;
  for (let k = bytes - 1; k >= 0 && v > 0; k--) {
    block[index * bytes + k] = v % 256;
    v = Math.floor(v / 256);
  }
}

/**
 * Replace the refcount structure with one computed from the references, then clear the dirty
 * bit: new blocks and table written and durable, then the header pointer, then the bit.
 * Returns the new table's place.
 */
export async function rebuildRefcounts(backend: BlockBackend, h: Qcow2Header): Promise<{ tableOffset: number; tableClusters: number }> {
  const cs = 2 ** h.clusterBits;
  const counts = await countReferences(backend, h);
  const fileClusters = Math.ceil((await backend.size()) / cs);
  const first = Math.max(fileClusters, counts.end);
  const perBlock = (cs * 8) >> h.refcountOrder;
  let blocks = 1;
  let tableClusters = 1;
  for (;;) {
    const total = first + blocks + tableClusters;
    const needBlocks = Math.ceil(total / perBlock);
    const needTable = Math.ceil((needBlocks * 8) / cs);
    if (needBlocks <= blocks && needTable <= tableClusters) break;
    blocks = Math.max(blocks, needBlocks);
    tableClusters = Math.max(tableClusters, needTable);
  }
  if (tableClusters * cs > QCOW_MAX_REFTABLE_SIZE) {
    throw new Qcow2Error(Qcow2ErrorCode.LIMIT_EXCEEDED, `rebuilt refcount table would need ${tableClusters * cs} bytes`);
  }
  for (let c = first; c < first + blocks + tableClusters; c++) counts.add(c);
  const max = h.refcountOrder >= 6 ? Number.MAX_SAFE_INTEGER : 2 ** (2 ** h.refcountOrder) - 1;
  const out = new Uint8Array(blocks * cs);
  for (let c = 0; c < counts.end; c++) {
    const n = counts.data[c]!;
    if (n === 0) continue;
    if (n > max) {
      throw new Qcow2Error(Qcow2ErrorCode.CORRUPT, `cluster ${c} has ${n} references, more than ${2 ** h.refcountOrder}-bit refcounts hold`);
    }
    setEntry(out.subarray(Math.floor(c / perBlock) * cs), c % perBlock, h.refcountOrder, n);
  }
  const tableOffset = (first + blocks) * cs;
  const table = new Uint8Array(tableClusters * cs);
  const tdv = view(table);
  for (let b = 0; b < blocks; b++) {
    const offset = (first + b) * cs;
    tdv.setUint32(b * 8, Math.floor(offset / 0x100000000));
    tdv.setUint32(b * 8 + 4, offset >>> 0);
  }
  await backend.write(out, first * cs);
  await backend.write(table, tableOffset);
  await backend.flush();
  await writeRefcountTablePointer(backend, h, tableOffset, tableClusters);
  await writeIncompatible(backend, h, h.incompatibleFeatures & ~BigInt(INCOMPAT_DIRTY));
  return { tableOffset, tableClusters };
}
