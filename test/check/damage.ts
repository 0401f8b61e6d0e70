// A corpus of damaged images: qemu-made images with bytes patched the way real damage looks
// (lost refcount updates, torn tables, bit flips in offsets, hostile sizes). Each case names what
// it breaks; the tests compare our check with qemu-img check on every one.

import { execFileSync, spawnSync } from "node:child_process";
import { copyFileSync, readFileSync, truncateSync, writeFileSync } from "node:fs";
import path from "node:path";
import { parseHeader, type Qcow2Header } from "../../ts/format/header.js";

export interface DamageCase {
  name: string;
  file: string;
  /** What the damage is, for failure messages. */
  what: string;
  /** qemu-img check never finishes on this one (it follows the loop); we must fail cleanly. */
  qemuHangs?: boolean;
}

function q(args: string[]): void {
  execFileSync("qemu-img", args, { stdio: "ignore" });
}

function io(file: string, commands: string[], extra: string[] = []): void {
  const args = [...extra];
  for (const c of commands) args.push("-c", c);
  spawnSync("qemu-io", [...args, file], { stdio: "ignore" });
}

/** An image file in memory with the accessors patches need. */
export class ImageBytes {
  buf: Buffer;
  h: Qcow2Header;
  cs: number;

  constructor(source: string | Uint8Array) {
    this.buf = typeof source === "string" ? readFileSync(source) : Buffer.from(source);
    this.h = parseHeader(this.buf.subarray(0, 2 * 1024 * 1024));
    this.cs = 2 ** this.h.clusterBits;
  }

  u64(pos: number): bigint {
    return this.buf.readBigUInt64BE(pos);
  }

  setU64(pos: number, value: bigint): void {
    this.buf.writeBigUInt64BE(value, pos);
  }

  offsetOf(entry: bigint): number {
    return Number(entry & 0x00fffffffffffe00n);
  }

  l1Pos(index: number): number {
    return this.h.l1TableOffset + index * 8;
  }

  l2Offset(l1Index = 0): number {
    return this.offsetOf(this.u64(this.l1Pos(l1Index)));
  }

  l2Pos(index: number, l1Index = 0): number {
    return this.l2Offset(l1Index) + index * 8;
  }

  reftablePos(index: number): number {
    return this.h.refcountTableOffset + index * 8;
  }

  /** Set a refcount (16-bit images) through refcount block 0. */
  setRefcount16(cluster: number, value: number): void {
    const block = Number(this.u64(this.reftablePos(0)));
    this.buf.writeUInt16BE(value, block + cluster * 2);
  }

  refcount16(cluster: number): number {
    const block = Number(this.u64(this.reftablePos(0)));
    return this.buf.readUInt16BE(block + cluster * 2);
  }

  save(file: string): string {
    writeFileSync(file, this.buf);
    return file;
  }
}

/** Build the corpus in `dir`. */
export function buildDamageCorpus(dir: string): DamageCase[] {
  const p = (name: string): string => path.join(dir, name);

  // Bases, all made by qemu.
  const base = p("base.qcow2");
  q(["create", "-f", "qcow2", base, "64M"]);
  io(base, ["write -P 0x11 0 192k", "write -P 0x22 1M 64k", "write -P 0x33 3M 64k", "write -z 5M 64k", "discard 64k 64k"]);
  // write -z on an allocated cluster keeps it: a preallocated zero cluster.
  io(base, ["write -P 0x44 6M 64k", "write -z 6M 64k"]);

  const v2 = p("base-v2.qcow2");
  q(["create", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4096", v2, "16M"]);
  io(v2, ["write -P 0x55 0 40k", "write -P 0x66 8M 4k"]);

  const text = p("text.raw");
  let s = "";
  for (let i = 0; s.length < 1 << 20; i++) s += `line ${i} of a compressible guest file\n`;
  writeFileSync(text, s.slice(0, 1 << 20));
  const compressed = p("base-compressed.qcow2");
  q(["convert", "-c", "-f", "raw", "-O", "qcow2", text, compressed]);

  const snap = p("base-snap.qcow2");
  q(["create", "-f", "qcow2", snap, "16M"]);
  io(snap, ["write -P 0x77 0 128k"]);
  q(["snapshot", "-c", "s1", snap]);
  io(snap, ["write -P 0x78 64k 64k"]);

  const bits1 = p("base-refbits1.qcow2");
  q(["create", "-f", "qcow2", "-o", "refcount_bits=1", bits1, "16M"]);
  io(bits1, ["write -P 0x12 0 128k"]);

  // Persistent dirty bitmaps: their directory, tables and data clusters are referenced too.
  const bitmaps = p("base-bitmaps.qcow2");
  q(["create", "-f", "qcow2", bitmaps, "64M"]);
  io(bitmaps, ["write -P 0x21 0 1M"]);
  q(["bitmap", "--add", bitmaps, "b0"]);
  q(["bitmap", "--add", "-g", "65536", bitmaps, "b1"]);
  io(bitmaps, ["write -P 0x22 2M 1M"]);

  const cases: DamageCase[] = [];
  const add = (name: string, what: string, make: (img: ImageBytes) => void, from = base): void => {
    const img = new ImageBytes(from);
    make(img);
    cases.push({ name, what, file: img.save(p(`${name}.qcow2`)) });
  };

  const l2 = (img: ImageBytes, i: number) => img.u64(img.l2Pos(i));
  const dataCluster = (img: ImageBytes, i: number) => img.offsetOf(l2(img, i)) / img.cs;

  cases.push({ name: "clean", what: "an undamaged image", file: base });
  add("refcount-zero-used", "refcount of a used data cluster set to 0", (img) => img.setRefcount16(dataCluster(img, 0), 0));
  add("refcount-low", "refcount of a snapshot-shared cluster set to 1", (img) => img.setRefcount16(dataCluster(img, 0), 1), snap);
  add("refcount-extra-unused", "refcount 1 on the discarded cluster inside the file", (img) => {
    const hole = img.offsetOf(l2(img, 0)) / img.cs + 1; // the cluster discarded at guest 64k
    img.setRefcount16(hole, 1);
  });
  add("refcount-high", "refcount 2 on a data cluster used once", (img) => img.setRefcount16(dataCluster(img, 2), 2));
  add("l2-past-eof", "L2 entry pointing 3 clusters past the end of the file", (img) => {
    const past = Math.ceil(img.buf.length / img.cs) + 3;
    img.setU64(img.l2Pos(16), 0x8000000000000000n | BigInt(past * img.cs));
  });
  add("l2-into-l1", "L2 entry pointing at the L1 table", (img) => {
    img.setU64(img.l2Pos(1), 0x8000000000000000n | BigInt(img.h.l1TableOffset));
  });
  add("l2-into-header", "L2 entry pointing at the header cluster", (img) => {
    img.setU64(img.l2Pos(1), 0x8000000000000000n | 0x200n);
  });
  add("l1-overlaps-reftable", "L1 table offset moved onto the refcount table", (img) => {
    img.buf.writeBigUInt64BE(BigInt(img.h.refcountTableOffset), 40);
  });
  add("l2-unaligned", "data cluster offset off by 512 bytes", (img) => img.setU64(img.l2Pos(2), l2(img, 2) + 0x200n));
  add("l1-unaligned", "L2 table offset off by 512 bytes", (img) => img.setU64(img.l1Pos(0), img.u64(img.l1Pos(0)) + 0x200n));
  add("reftable-unaligned", "refcount block offset off by 512 bytes", (img) =>
    img.setU64(img.reftablePos(0), img.u64(img.reftablePos(0)) + 0x200n),
  );
  add("reftable-reserved", "reserved bits in a refcount table entry", (img) => img.setU64(img.reftablePos(0), img.u64(img.reftablePos(0)) | 1n));
  add("refblock-outside", "a refcount table entry pointing past the end of the file", (img) =>
    img.setU64(img.reftablePos(1), BigInt((Math.ceil(img.buf.length / img.cs) + 8) * img.cs)),
  );
  add("l2-reserved", "reserved bits in an L2 entry", (img) => img.setU64(img.l2Pos(0), l2(img, 0) | 0x2n));
  add("l1-reserved", "reserved bits in an L1 entry", (img) => img.setU64(img.l1Pos(0), img.u64(img.l1Pos(0)) | 0x100n));
  add("copied-missing", "COPIED flag cleared on a data cluster used once", (img) =>
    img.setU64(img.l2Pos(0), l2(img, 0) & ~0x8000000000000000n),
  );
  add("copied-extra", "COPIED flag set on a cluster shared with a snapshot", (img) => {
    img.setU64(img.l2Pos(0), l2(img, 0) | 0x8000000000000000n);
  }, snap);
  add("l1-copied-missing", "COPIED flag cleared on an L1 entry", (img) =>
    img.setU64(img.l1Pos(0), img.u64(img.l1Pos(0)) & ~0x8000000000000000n),
  );
  add("prealloc-zero-unaligned", "preallocated zero cluster with an unaligned offset", (img) => {
    const i = (6 << 20) / img.cs;
    img.setU64(img.l2Pos(i), l2(img, i) + 0x200n);
  });
  add("l1-size-huge", "l1_size past qemu's 32 MiB L1 limit", (img) => img.buf.writeUInt32BE(0x01000000, 36));
  add("reftable-clusters-huge", "refcount_table_clusters past the 8 MiB limit", (img) => img.buf.writeUInt32BE(0x00100000, 56));
  add("nb-snapshots-huge", "nb_snapshots past 65536", (img) => img.buf.writeUInt32BE(0x00100000, 60));
  add("extension-length-huge", "a header extension length running past the cluster", (img) => {
    // The first extension follows the v3 header (112 bytes): type, then length.
    img.buf.writeUInt32BE(0x00f00000, img.h.headerLength + 4);
  });
  add("unknown-incompat-bit", "an incompatible feature bit qemu does not know", (img) =>
    img.buf.writeBigUInt64BE(img.h.incompatibleFeatures | (1n << 40n), 72),
  );
  add("corrupt-bit", "the corrupt bit on an otherwise clean image", (img) =>
    img.buf.writeBigUInt64BE(img.h.incompatibleFeatures | 2n, 72),
  );
  add("corrupt-bit-and-leak", "the corrupt bit and a leaked cluster", (img) => {
    img.buf.writeBigUInt64BE(img.h.incompatibleFeatures | 2n, 72);
    img.setRefcount16(img.offsetOf(l2(img, 0)) / img.cs + 1, 1);
  });
  add("compressed-past-eof", "a compressed cluster past the end of the file", (img) => {
    const e = l2(img, 0);
    const x = 62n - BigInt(img.h.clusterBits - 8);
    const sectors = (e >> x) & ((1n << BigInt(img.h.clusterBits - 8)) - 1n);
    const past = BigInt((Math.ceil(img.buf.length / img.cs) + 2) * img.cs + 100);
    img.setU64(img.l2Pos(0), 0x4000000000000000n | (sectors << x) | past);
  }, compressed);
  add("compressed-copied", "a compressed L2 entry with COPIED set", (img) =>
    img.setU64(img.l2Pos(1), l2(img, 1) | 0x8000000000000000n),
  compressed);
  add("compressed-refcount-zero", "refcount 0 on a host cluster holding compressed streams", (img) => {
    const e = l2(img, 0);
    const x = 62n - BigInt(img.h.clusterBits - 8);
    const host = Number(e & ((1n << x) - 1n));
    img.setRefcount16(Math.floor(host / img.cs), 0);
  }, compressed);
  cases.push({ name: "bitmaps", what: "an undamaged image with two persistent bitmaps", file: bitmaps });
  add("bitmap-directory-refcount-zero", "refcount 0 on the bitmap directory's cluster", (img) => {
    img.setRefcount16(img.h.extensions.bitmaps!.bitmapDirectoryOffset / img.cs, 0);
  }, bitmaps);
  add("snapshot-l1-unaligned", "a snapshot whose L1 table offset is not cluster aligned", (img) => {
    img.setU64(img.h.snapshotsOffset, img.u64(img.h.snapshotsOffset) + 0x200n);
  }, snap);
  add("snapshot-refcount-zero", "refcount 0 on an L2 table only a snapshot uses", (img) => {
    const snapL1 = Number(img.u64(img.h.snapshotsOffset));
    img.setRefcount16(snapL1 / img.cs, 0);
  }, snap);
  add("v2-refcount-zero", "v2 image, 4 KiB clusters, refcount 0 on data", (img) => {
    const block = Number(img.u64(img.reftablePos(0)));
    img.buf.writeUInt16BE(0, block + dataCluster(img, 3) * 2);
  }, v2);
  add("v2-leak", "v2 image with an extra refcount past the used clusters", (img) => {
    const block = Number(img.u64(img.reftablePos(0)));
    const cluster = Math.ceil(img.buf.length / img.cs) - 1;
    img.buf.writeUInt16BE(img.buf.readUInt16BE(block + cluster * 2) + 1, block + cluster * 2);
  }, v2);
  add("refbits1-overflow", "1-bit refcounts and one cluster mapped twice", (img) => img.setU64(img.l2Pos(1), l2(img, 0)), bits1);
  add("refbits1-leak", "1-bit refcounts and a stray bit on a cluster appended to the file", (img) => {
    const block = Number(img.u64(img.reftablePos(0)));
    const cluster = Math.ceil(img.buf.length / img.cs);
    img.buf[block + (cluster >> 3)]! |= 1 << (cluster & 7);
    img.buf = Buffer.concat([img.buf, Buffer.alloc(img.cs)]);
  }, bits1);

  // Truncated files: cut inside the data, and cut inside the metadata.
  const truncatedData = p("truncated-data.qcow2");
  copyFileSync(base, truncatedData);
  truncateSync(truncatedData, new ImageBytes(base).offsetOf(l2(new ImageBytes(base), 0)) + 4096);
  cases.push({ name: "truncated-data", what: "file cut inside the first data cluster", file: truncatedData });
  const truncatedMeta = p("truncated-meta.qcow2");
  copyFileSync(base, truncatedMeta);
  truncateSync(truncatedMeta, new ImageBytes(base).l2Offset() + 16);
  cases.push({ name: "truncated-meta", what: "file cut inside the first L2 table", file: truncatedMeta });

  // Lazy refcounts left dirty by a qemu that died mid-write.
  const dirty = p("dirty-lazy.qcow2");
  q(["create", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4096", dirty, "8M"]);
  io(dirty, ["write -P 0xaa 0 64k", "write -P 0xbb 1M 300k", "write -z 1040k 8k", "abort"]);
  cases.push({ name: "dirty-lazy", what: "dirty bit set and refcounts stale (lazy refcounts, qemu aborted)", file: dirty });

  // A backing chain that loops: a -> b -> a.
  const loopA = p("loop-a.qcow2");
  const loopB = p("loop-b.qcow2");
  q(["create", "-f", "qcow2", loopB, "16M"]);
  q(["create", "-f", "qcow2", "-b", loopB, "-F", "qcow2", loopA]);
  q(["rebase", "-u", "-b", loopA, "-F", "qcow2", loopB]);
  cases.push({ name: "backing-loop", what: "a backing chain that loops back to itself", file: loopA, qemuHangs: true });
  return cases;
}
