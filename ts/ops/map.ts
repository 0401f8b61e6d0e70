// `map`: the guest address space as qemu-img map --output=json reports it (QAPI MapEntry).

import type { Extent, GuestDevice } from "../image/device.js";

export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

/** qemu's view of one extent: compressed clusters have no host offset it will print. */
export function toMapEntry(e: Extent): MapEntry {
  const entry: MapEntry = {
    start: e.start,
    length: e.length,
    depth: e.depth,
    present: e.kind !== "unallocated",
    zero: e.kind === "zero" || e.kind === "unallocated",
    data: e.kind === "data" || e.kind === "compressed" || e.kind === "backing",
  };
  if (e.hostOffset !== undefined && e.kind !== "compressed") entry.offset = e.hostOffset;
  return entry;
}

/** qemu-img's entry_mergeable: same flags and depth, and host offsets that continue. */
function mergeable(a: MapEntry, b: MapEntry): boolean {
  if (a.zero !== b.zero || a.data !== b.data || a.depth !== b.depth || a.present !== b.present) return false;
  if ((a.offset === undefined) !== (b.offset === undefined)) return false;
  return a.offset === undefined || a.offset + a.length === b.offset;
}

export interface MapOptions {
  start?: number;
  length?: number;
}

/** Entries in guest order, merged as qemu-img merges them. */
export async function* mapEntries(device: GuestDevice, options: MapOptions = {}): AsyncGenerator<MapEntry> {
  const start = options.start ?? 0;
  const end = Math.min(device.virtualSize, options.length === undefined ? device.virtualSize : start + options.length);
  let pending: MapEntry | undefined;
  for (let pos = start; pos < end; ) {
    const entry = toMapEntry(await device.blockStatus(pos, end - pos));
    pos += entry.length;
    if (pending && mergeable(pending, entry)) {
      pending.length += entry.length;
      continue;
    }
    if (pending) yield pending;
    pending = entry;
  }
  // qemu-img prints its zero-initialised entry when there is nothing to map (a zero-size disk).
  yield pending ?? { start: 0, length: 0, depth: 0, present: false, zero: false, data: false };
}

export async function map(device: GuestDevice, options: MapOptions = {}): Promise<MapEntry[]> {
  const out: MapEntry[] = [];
  for await (const e of mapEntries(device, options)) out.push(e);
  return out;
}

/** One entry as qemu-img map --output=json prints it (no separator). */
export function mapEntryJson(e: MapEntry): string {
  let s = `{ "start": ${e.start}, "length": ${e.length}, "depth": ${e.depth}, "present": ${e.present}, "zero": ${e.zero}, "data": ${e.data}`;
  if (e.offset !== undefined) s += `, "offset": ${e.offset}`;
  return s + "}";
}

/** qemu-img map --output=json text: one object per line. */
export function formatMapJson(entries: MapEntry[]): string {
  return "[" + entries.map(mapEntryJson).join(",\n") + "]\n";
}

/** The header of qemu-img map's human output. */
export const MAP_HUMAN_HEADER = "Offset          Length          Mapped to       File\n";

/** printf("%#-16"PRIx64): 0x-prefixed hex left-aligned in 16 columns, but a bare "0" for zero. */
function hexColumn(value: number): string {
  return (value === 0 ? "0" : "0x" + value.toString(16)).padEnd(16);
}

/** One row of qemu-img map's human output (qemu prints rows only for data that is not zero). */
export function formatMapHumanRow(e: MapEntry, fileName: string): string {
  return hexColumn(e.start) + hexColumn(e.length) + hexColumn(e.offset ?? 0) + fileName + "\n";
}
