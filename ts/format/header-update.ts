// In-place updates of single header fields (docs/interop/qcow2.rst "Header"), each one write
// inside the first sector followed by a flush, so the header is never half-changed on disk. The
// in-memory header is updated only once the write is durable.

import type { BlockBackend } from "../io/backend.js";
import { setU64 } from "./bytes.js";
import type { Qcow2Header } from "./header.js";

async function writeDurably(backend: BlockBackend, bytes: Uint8Array, pos: number): Promise<void> {
  await backend.write(bytes, pos);
  await backend.flush();
}

/** incompatible_features (bytes 72..79). */
export async function writeIncompatible(backend: BlockBackend, h: Qcow2Header, bits: bigint): Promise<void> {
  const bytes = new Uint8Array(8);
  new DataView(bytes.buffer).setBigUint64(0, bits);
  await writeDurably(backend, bytes, 72);
  h.incompatibleFeatures = bits;
}

/** autoclear_features (bytes 88..95). */
export async function writeAutoclear(backend: BlockBackend, h: Qcow2Header, bits: bigint): Promise<void> {
  const bytes = new Uint8Array(8);
  new DataView(bytes.buffer).setBigUint64(0, bits);
  await writeDurably(backend, bytes, 88);
  h.autoclearFeatures = bits;
}

/** refcount_table_offset and refcount_table_clusters together (bytes 48..59). */
export async function writeRefcountTablePointer(backend: BlockBackend, h: Qcow2Header, tableOffset: number, tableClusters: number): Promise<void> {
  const bytes = new Uint8Array(12);
  const dv = new DataView(bytes.buffer);
  setU64(dv, 0, tableOffset);
  dv.setUint32(8, tableClusters);
  await writeDurably(backend, bytes, 48);
  h.refcountTableOffset = tableOffset;
  h.refcountTableClusters = tableClusters;
}

/** size (bytes 24..31). */
export async function writeSize(backend: BlockBackend, h: Qcow2Header, size: number): Promise<void> {
  const bytes = new Uint8Array(8);
  setU64(new DataView(bytes.buffer), 0, size);
  await writeDurably(backend, bytes, 24);
  h.size = size;
}

/** size, crypt_method, l1_size and l1_table_offset together (bytes 24..47): a moved, larger L1. */
export async function writeSizeAndL1(backend: BlockBackend, h: Qcow2Header, size: number, l1Size: number, l1TableOffset: number): Promise<void> {
  const bytes = new Uint8Array(24);
  const dv = new DataView(bytes.buffer);
  setU64(dv, 0, size);
  dv.setUint32(8, h.cryptMethod);
  dv.setUint32(12, l1Size);
  setU64(dv, 16, l1TableOffset);
  await writeDurably(backend, bytes, 24);
  h.size = size;
  h.l1Size = l1Size;
  h.l1TableOffset = l1TableOffset;
}

/** nb_snapshots and snapshots_offset together (bytes 60..71): a new snapshot table. */
export async function writeSnapshotTablePointer(backend: BlockBackend, h: Qcow2Header, nbSnapshots: number, snapshotsOffset: number): Promise<void> {
  const bytes = new Uint8Array(12);
  const dv = new DataView(bytes.buffer);
  dv.setUint32(0, nbSnapshots);
  setU64(dv, 4, snapshotsOffset);
  await writeDurably(backend, bytes, 60);
  h.nbSnapshots = nbSnapshots;
  h.snapshotsOffset = snapshotsOffset;
}
