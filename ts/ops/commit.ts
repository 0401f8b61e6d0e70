// `commit`: write what an image and the images between it and a base file of its backing chain
// map into that base, as qemu-img commit does (qemu 7.2: an active commit, i.e. a mirror of the
// top onto the base). The ranges the images above the base map are rounded out to the mirror's
// granularity (the base's cluster size between 4 KiB and 64 KiB; 64 KiB for raw) and copied in
// pieces of up to 1 MiB, as the top's guest reads them: zeros are written as zeros (unmapping
// where the base can), everything else as data. A base shorter than the top is grown first.
// Afterwards the top can be emptied, as qemu-img commit does unless told not to (-d, -b).

import { Qcow2Error, Qcow2ErrorCode } from "../errors.js";
import type { BlockBackend } from "../io/backend.js";
import { resolveBackend } from "../io/resolve.js";
import type { GuestDevice } from "../image/device.js";
import { Qcow2Image, type OpenOptions } from "../image/qcow2-image.js";
import { qemuLength } from "./rebase.js";

/** Bytes read and written at once: qemu's mirror works in pieces of at most 1 MiB (MAX_IO_BYTES). */
const COMMIT_CHUNK = 1024 * 1024;
/** qemu's default dirty-bitmap granularity bounds (bdrv_get_default_bitmap_granularity). */
const MIN_GRANULARITY = 4096;
const MAX_GRANULARITY = 65536;
const SECTOR = 512;

export interface CommitOptions {
  /** Depth in `top.chain()` of the image that receives the data (default 1: the backing file). */
  baseDepth?: number;
  /** Deallocate everything in the top image afterwards (qemu-img commit without -d or -b). */
  emptyTop?: boolean;
  /** Bytes per second at most (qemu-img commit -r); 0 or undefined: no limit. */
  rateLimit?: number;
  /**
   * Opens the base file for writing, by the name its overlay resolved it to (default: the
   * platform's files). A qcow2 base is opened with `baseOpenOptions` (its own backing chain).
   */
  openBase?: (name: string) => Promise<BlockBackend>;
  baseOpenOptions?: Omit<OpenOptions, "readOnly">;
  /** Bytes committed so far, of the total the images above the base map (rounded to the granularity). */
  onProgress?: (done: number, total: number) => void;
}

/** The base, open for writing. */
interface CommitTarget {
  /** blk_getlength. */
  size: number;
  grow(size: number): Promise<void>;
  write(data: Uint8Array, offset: number): Promise<void>;
  writeZeroes(offset: number, length: number): Promise<void>;
  close(): Promise<void>;
}

/**
 * Commit `top` (open for writing when `emptyTop`, with its backing chain) into the image at
 * `baseDepth` of its chain. Images in between are not changed: read through the top, the guest
 * sees the same bytes before and after.
 */
export async function commit(top: Qcow2Image, options: CommitOptions = {}): Promise<void> {
  const chain = top.chain();
  const baseDepth = options.baseDepth ?? 1;
  if (!Number.isInteger(baseDepth) || baseDepth < 1 || baseDepth >= chain.length) {
    throw new Qcow2Error(
      Qcow2ErrorCode.BAD_BACKING,
      chain.length === 1
        ? `${top.name}: has no backing file to commit into`
        : `${top.name}: no image at depth ${baseDepth} of its backing chain (1..${chain.length - 1})`,
    );
  }
  if (options.emptyTop && top.readOnly) {
    throw new Qcow2Error(Qcow2ErrorCode.READ_ONLY, `${top.name}: commit with emptyTop: the image is open read-only`);
  }
  const baseLayer = chain[baseDepth]!;
  const size = qemuLength(top);
  const granularity =
    baseLayer instanceof Qcow2Image ? Math.min(MAX_GRANULARITY, Math.max(MIN_GRANULARITY, baseLayer.clusterSize)) : MAX_GRANULARITY;
  const dirty = await rangesAbove(top, baseDepth, size, granularity);
  const total = dirty.reduce((sum, [start, end]) => sum + end - start, 0);

  const target = await openTarget(baseLayer, options);
  try {
    if (size > target.size) await target.grow(size);
    options.onProgress?.(0, total);
    const buf = new Uint8Array(COMMIT_CHUNK);
    const started = Date.now();
    let done = 0;
    for (const [start, end] of dirty) {
      for (let pos = start; pos < end; ) {
        const first = await top.blockStatus(pos, Math.min(end - pos, COMMIT_CHUNK));
        let length = first.length;
        if (readsZero(first.kind)) {
          await target.writeZeroes(pos, length);
        } else {
          // Data runs up to one chunk go out in one read and one write.
          while (length < COMMIT_CHUNK && pos + length < end) {
            const e = await top.blockStatus(pos + length, Math.min(end - pos - length, COMMIT_CHUNK - length));
            if (readsZero(e.kind)) break;
            length += e.length;
          }
          const data = buf.subarray(0, length);
          await top.read(pos, data);
          await target.write(data, pos);
        }
        pos += length;
        done += length;
        options.onProgress?.(done, total);
        if (options.rateLimit) await throttle(started, done, options.rateLimit);
      }
    }
  } finally {
    await target.close();
  }
  if (options.emptyTop) await top.makeEmpty();
}

function readsZero(kind: string): boolean {
  return kind === "zero" || kind === "unallocated";
}

/**
 * The ranges some image above the base maps (bdrv_is_allocated_above(top, base overlay)), rounded
 * out to `granularity` and merged. Where the top reads past the end of a shorter image above the
 * base, the zeros it reads count as mapped there (they are not what the base holds).
 */
async function rangesAbove(top: Qcow2Image, baseDepth: number, size: number, granularity: number): Promise<Array<[number, number]>> {
  const out: Array<[number, number]> = [];
  for (let pos = 0; pos < size; ) {
    const e = await top.blockStatus(pos, size - pos);
    if (e.depth < baseDepth) {
      const start = Math.floor(pos / granularity) * granularity;
      const end = Math.min(size, Math.ceil((pos + e.length) / granularity) * granularity);
      const last = out[out.length - 1];
      if (last && last[1] >= start) last[1] = Math.max(last[1], end);
      else out.push([start, end]);
    }
    pos += e.length;
  }
  return out;
}

async function openTarget(base: GuestDevice, options: CommitOptions): Promise<CommitTarget> {
  const backend = options.openBase ? await options.openBase(base.name) : await resolveBackend(base.name, false);
  if (base.format === "raw") {
    const zeros = new Uint8Array(Math.min(COMMIT_CHUNK, 1 << 20));
    return {
      size: Math.ceil((await backend.size()) / SECTOR) * SECTOR,
      grow: (size) => backend.truncate(size),
      write: (data, offset) => backend.write(data, offset),
      async writeZeroes(offset, length) {
        for (let pos = 0; pos < length; pos += zeros.length) {
          await backend.write(zeros.subarray(0, Math.min(zeros.length, length - pos)), offset + pos);
        }
      },
      async close() {
        try {
          await backend.flush();
        } finally {
          await backend.close();
        }
      },
    };
  }
  const image = await Qcow2Image.open(backend, { ...options.baseOpenOptions, readOnly: false });
  return {
    size: qemuLength(image),
    grow: (size) => image.resize(size),
    write: (data, offset) => image.write(offset, data),
    writeZeroes: (offset, length) => image.writeZeroes(offset, length, { mayUnmap: true }),
    close: () => image.close(),
  };
}

/** qemu's rate limit: wait until `done` bytes are no more than `rate` per second since `started`. */
async function throttle(started: number, done: number, rate: number): Promise<void> {
  const due = started + (done / rate) * 1000;
  const wait = due - Date.now();
  if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
}
