// The active L1 table (docs/interop/qcow2.rst "Cluster mapping"): l1_size big-endian u64 entries,
// bits 9..55 the L2 table offset, bit 63 COPIED. Flags are masked off here, at the edge.

import { L1E_OFFSET_MASK_HI, L1E_OFFSET_MASK_LO } from "./constants.js";

export class L1Table {
  readonly size: number;
  readonly bytes: Uint8Array;
  private readonly dv: DataView;

  constructor(size: number) {
    this.size = size;
    this.bytes = new Uint8Array(size * 8);
    this.dv = new DataView(this.bytes.buffer);
  }

  /** The L2 table offset of entry `index`, 0 when unallocated or past the table. */
  l2Offset(index: number): number {
    if (index >= this.size) return 0;
    const hi = this.dv.getUint32(index * 8) & L1E_OFFSET_MASK_HI;
    const lo = this.dv.getUint32(index * 8 + 4) & L1E_OFFSET_MASK_LO;
    return hi * 0x100000000 + (lo >>> 0);
  }
}
