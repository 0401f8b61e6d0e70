// Which host clusters hold metadata, so a guest write never lands on one (qemu's
// qcow2_check_metadata_overlap). Only a corrupt L2 entry can point a data cluster there; when one
// does, the write is refused and the image marked corrupt instead of its tables being destroyed.
//
// The L2 tables and refcount blocks are kept as counts per host cluster, updated as the L1 table
// and refcount table change; fixed ranges (header, L1, refcount table, snapshot table) are given
// by the caller at each check, as they move when tables grow.

export interface MetadataRange {
  what: string;
  start: number;
  length: number;
}

export class MetadataClusters {
  private readonly counts = new Map<number, { what: string; n: number }>();

  constructor(private readonly clusterSize: number) {}

  add(hostOffset: number, what: string): void {
    if (hostOffset === 0) return;
    const k = Math.floor(hostOffset / this.clusterSize);
    const entry = this.counts.get(k);
    if (entry) entry.n++;
    else this.counts.set(k, { what, n: 1 });
  }

  remove(hostOffset: number): void {
    if (hostOffset === 0) return;
    const k = Math.floor(hostOffset / this.clusterSize);
    const entry = this.counts.get(k);
    if (!entry) return;
    if (--entry.n === 0) this.counts.delete(k);
  }

  /** What metadata [hostOffset, +length) overlaps, or undefined. */
  overlap(hostOffset: number, length: number, ranges: MetadataRange[]): string | undefined {
    if (length <= 0) return undefined;
    if (hostOffset < this.clusterSize) return "qcow2_header";
    // Whole clusters, as qemu tests: a table shares its cluster with nothing else.
    const cs = this.clusterSize;
    const start = Math.floor(hostOffset / cs) * cs;
    const end = Math.ceil((hostOffset + length) / cs) * cs;
    for (const r of ranges) {
      if (r.length > 0 && start < r.start + r.length && r.start < end) return r.what;
    }
    const first = start / cs;
    const last = end / cs - 1;
    for (let k = first; k <= last; k++) {
      const entry = this.counts.get(k);
      if (entry) return entry.what;
    }
    return undefined;
  }
}
