// What a backing chain is made of: anything that presents guest bytes and says where they live.

import type { BlockBackend } from "../io/backend.js";
import { readFully } from "../io/backend.js";

export type ExtentKind = "data" | "zero" | "compressed" | "backing" | "unallocated";

/**
 * A guest range with one mapping.
 * - data: a normal cluster run, `hostOffset` in the image at `depth`.
 * - zero: reads as zero by the zero flag at `depth` (`hostOffset` when the cluster is preallocated).
 * - compressed: one compressed cluster at `depth`; `hostOffset` is the compressed stream's offset.
 * - backing: bytes of a raw backing file at `depth`, `hostOffset` in that file.
 * - unallocated: mapped nowhere in the chain; reads as zero. `depth` is the last layer consulted.
 */
export interface Extent {
  start: number;
  length: number;
  kind: ExtentKind;
  hostOffset?: number;
  depth: number;
}

export interface GuestDevice {
  readonly format: "qcow2" | "raw";
  readonly name: string;
  readonly virtualSize: number;
  /** Fill `dst` with guest bytes from `guestOffset`; the range must lie inside virtualSize. */
  readInto(dst: Uint8Array, guestOffset: number): Promise<void>;
  /** The mapping of the range starting at `guestOffset`, at most `maxLength` long (depth 0 = this device). */
  blockStatus(guestOffset: number, maxLength: number): Promise<Extent>;
  close(): Promise<void>;
}

/** A raw image used as a backing file: guest offset = host offset. */
export class RawDevice implements GuestDevice {
  readonly format = "raw";
  readonly name: string;
  readonly virtualSize: number;
  private readonly backend: BlockBackend;

  private constructor(backend: BlockBackend, size: number) {
    this.backend = backend;
    this.name = backend.name;
    this.virtualSize = size;
  }

  static async open(backend: BlockBackend): Promise<RawDevice> {
    return new RawDevice(backend, await backend.size());
  }

  readInto(dst: Uint8Array, guestOffset: number): Promise<void> {
    return readFully(this.backend, dst, guestOffset);
  }

  async blockStatus(guestOffset: number, maxLength: number): Promise<Extent> {
    const length = Math.min(maxLength, this.virtualSize - guestOffset);
    return { start: guestOffset, length, kind: "backing", hostOffset: guestOffset, depth: 0 };
  }

  close(): Promise<void> {
    return this.backend.close();
  }
}

/** Read [guestOffset, +dst.length) of `device`, zero past its end (a backing file shorter than its overlay). */
export async function readClipped(device: GuestDevice, dst: Uint8Array, guestOffset: number): Promise<void> {
  const inside = Math.max(0, Math.min(dst.length, device.virtualSize - guestOffset));
  if (inside > 0) await device.readInto(inside === dst.length ? dst : dst.subarray(0, inside), guestOffset);
  if (inside < dst.length) dst.fill(0, inside);
}
