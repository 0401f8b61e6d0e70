// The active L1 table (docs/interop/qcow2.rst "Cluster mapping"): l1_size big-endian u64 entries,
// bits 9..55 the L2 table offset, bit 63 COPIED. Flags are masked off here, at the edge.

import { L1E_OFFSET_MASK_HI, L1E_OFFSET_MASK_LO, QCOW_OFLAG_COPIED_HI } from "./constants.js";

export class L1Table {
  size: number;
  bytes: Uint8Array;
  private dv: DataView;
  /** Byte range [dirtyStart, dirtyEnd) changed since the last write-back. */
  private dirtyStart = Infinity;
  private dirtyEnd = 0;
  /** Told of every change of an entry's L2 table offset (old, new), e.g. to track metadata. */
  onChange: ((oldOffset: number, newOffset: number) => void) | undefined;

  constructor(size: number, bytes?: Uint8Array) {
    this.size = size;
    this.bytes = bytes ?? new Uint8Array(size * 8);
    this.dv = new DataView(this.bytes.buffer, this.bytes.byteOffset, this.bytes.byteLength);
  }

  /** The L2 table offset of entry `index`, 0 when unallocated or past the table. */
  l2Offset(index: number): number {
    if (index >= this.size) return 0;
    const hi = this.dv.getUint32(index * 8) & L1E_OFFSET_MASK_HI;
    const lo = this.dv.getUint32(index * 8 + 4) & L1E_OFFSET_MASK_LO;
    return hi * 0x100000000 + (lo >>> 0);
  }

  /** QCOW_OFLAG_COPIED of entry `index`: the L2 table's refcount is exactly 1. */
  copied(index: number): boolean {
    return index < this.size && (this.dv.getUint32(index * 8) & QCOW_OFLAG_COPIED_HI) !== 0;
  }

  set(index: number, l2Offset: number, copied: boolean): void {
    if (this.onChange) {
      const old = this.l2Offset(index);
      if (old !== l2Offset) this.onChange(old, l2Offset);
    }
    const hi = Math.floor(l2Offset / 0x100000000) | (copied ? QCOW_OFLAG_COPIED_HI : 0);
    this.dv.setUint32(index * 8, hi >>> 0);
    this.dv.setUint32(index * 8 + 4, l2Offset >>> 0);
    this.dirtyStart = Math.min(this.dirtyStart, index * 8);
    this.dirtyEnd = Math.max(this.dirtyEnd, index * 8 + 8);
  }

  get dirty(): boolean {
    return this.dirtyEnd > 0;
  }

  /** The changed bytes and where they go, then clean; undefined when nothing changed. */
  takeDirty(): { start: number; bytes: Uint8Array } | undefined {
    if (!this.dirty) return undefined;
    const out = { start: this.dirtyStart, bytes: this.bytes.slice(this.dirtyStart, this.dirtyEnd) };
    this.dirtyStart = Infinity;
    this.dirtyEnd = 0;
    return out;
  }

  /** Mark a byte range dirty again (a write-back failed). */
  redirty(start: number, length: number): void {
    this.dirtyStart = Math.min(this.dirtyStart, start);
    this.dirtyEnd = Math.max(this.dirtyEnd, start + length);
  }

  /** A larger table with the same entries (for growth); the caller writes it out whole. */
  grown(size: number): L1Table {
    const bytes = new Uint8Array(size * 8);
    bytes.set(this.bytes.subarray(0, Math.min(this.bytes.length, size * 8)));
    const table = new L1Table(size, bytes);
    table.onChange = this.onChange;
    return table;
  }
}
