// `rebase`: put an image on another backing file (or none) without changing what its guest reads,
// as qemu-img rebase does (qemu 7.2 img_rebase). Wherever the image maps nothing itself, the old
// backing chain and the new backing file are read side by side, in pieces of at most 2 MiB, and
// every run of 512-byte sectors where they differ is copied from the old chain into the image;
// then the header is pointed at the new backing file. Unsafe mode only changes the header.
//
// Both backing files read as zeros past their ends. When the new backing file is an image of the
// old chain, only ranges some image above it maps need comparing. Ranges where block status shows
// both sides reading as zeros are not read at all.

import { Qcow2Error, Qcow2ErrorCode } from "../errors.js";
import { readClipped, RawDevice, type GuestDevice } from "../image/device.js";
import { Qcow2Image } from "../image/qcow2-image.js";

/** qemu-img's IO_BUF_SIZE: the largest piece compared at once. */
export const REBASE_BUFFER_SIZE = 2 * 1024 * 1024;
const SECTOR = 512;

export interface RebaseCopyOptions {
  /** The device the image will read through afterwards; undefined: none (it reads as zeros). */
  newBacking?: GuestDevice;
  /**
   * The new backing device is the image's own chain at this depth (1 = its current backing file):
   * ranges no image above that depth maps are the same on both sides and are skipped.
   */
  prefixDepth?: number;
  /** Called once per piece qemu-img counts for its progress meter. */
  onStep?: () => void;
}

export interface RebaseOptions extends RebaseCopyOptions {
  /** The backing file name stored in the header (as given: relative names are relative to the image); undefined or "": none. */
  backingFile?: string;
  /** The backing format stored in the header extension. */
  backingFormat?: string;
  /** Only change the header (qemu-img rebase -u): the guest then reads the new backing file as it is. */
  unsafe?: boolean;
}

export type RebaseStage = "metadata" | "old-backing" | "new-backing" | "write";

/** A failure of the copy, with the stage it happened in (qemu-img words each differently). */
export class RebaseError extends Qcow2Error {
  readonly stage: RebaseStage;

  constructor(stage: RebaseStage, message: string, cause: unknown) {
    const code = cause instanceof Qcow2Error ? cause.code : Qcow2ErrorCode.IO_ERROR;
    super(code, `${message}: ${cause instanceof Error ? cause.message : String(cause)}`, { cause });
    this.name = "RebaseError";
    this.stage = stage;
  }
}

/** blk_getlength: a qcow2 image's size in whole sectors; a raw file's length rounded up to a sector. */
export function qemuLength(device: GuestDevice): number {
  return device instanceof RawDevice
    ? Math.ceil(device.virtualSize / SECTOR) * SECTOR
    : Math.floor(device.virtualSize / SECTOR) * SECTOR;
}

async function stage<T>(name: RebaseStage, message: string, job: () => Promise<T>): Promise<T> {
  try {
    return await job();
  } catch (e) {
    throw new RebaseError(name, message, e);
  }
}

/**
 * The safe half of a rebase: copy into `image` (open for writing, through its current backing
 * chain) every sector where that chain and `newBacking` differ and the image maps nothing. The
 * header is not changed: what the guest reads is the same before and after, through either chain.
 */
export async function copyForRebase(image: Qcow2Image, options: RebaseCopyOptions = {}): Promise<void> {
  const chain = image.chain();
  const prefix = options.prefixDepth;
  if (prefix !== undefined && (!Number.isInteger(prefix) || prefix < 1 || prefix >= chain.length)) {
    throw new RangeError(`copyForRebase: prefixDepth ${prefix} is not a depth of ${image.name}'s backing chain (1..${chain.length - 1})`);
  }
  const old = image.backing;
  const next = options.newBacking;
  const size = qemuLength(image);
  const oldSize = old ? qemuLength(old) : 0;
  const newSize = next ? qemuLength(next) : 0;
  const bufOld = new Uint8Array(REBASE_BUFFER_SIZE);
  const bufNew = new Uint8Array(REBASE_BUFFER_SIZE);

  let n: number;
  for (let offset = 0; offset < size; offset += n) {
    n = Math.min(REBASE_BUFFER_SIZE, size - offset);
    const at = offset;
    const own = await stage("metadata", `${image.name}: block status at ${at}`, () => image.isAllocated(at, n));
    n = own.length;
    if (own.allocated) continue;
    if (prefix !== undefined) {
      const bytes = n;
      const above = await stage("metadata", `${image.name}: block status of the backing chain at ${at}`, () => allocatedAbove(chain, prefix, at, bytes));
      // Past the end of the old backing file (length 0) the range is compared: it reads as zeros there.
      if (above.length > 0) {
        n = above.length;
        if (!above.allocated) continue;
      }
    }
    const oldPastEnd = !old || offset >= oldSize;
    if (!oldPastEnd) n = Math.min(n, oldSize - offset);
    const newPastEnd = !next || offset >= newSize;
    if (!newPastEnd) n = Math.min(n, newSize - offset);
    const len = n;
    const oldZero = oldPastEnd || (await stage("old-backing", `${old!.name}: block status at ${at}`, () => readsAsZero(old!, at, len)));
    const newZero = newPastEnd || (await stage("new-backing", `${next!.name}: block status at ${at}`, () => readsAsZero(next!, at, len)));
    if (!(oldZero && newZero)) {
      if (oldZero) bufOld.fill(0, 0, len);
      else await stage("old-backing", `${old!.name}: reading ${len} bytes at ${at}`, () => readClipped(old!, bufOld.subarray(0, len), at));
      if (newZero) bufNew.fill(0, 0, len);
      else await stage("new-backing", `${next!.name}: reading ${len} bytes at ${at}`, () => readClipped(next!, bufNew.subarray(0, len), at));
      for (let pos = 0; pos < len; ) {
        const run = sectorRun(bufOld, bufNew, pos, len);
        if (run.differ) {
          const g = at + pos;
          const bytes = run.length;
          // Past the old backing file's end qemu writes zeros as such; elsewhere the old bytes. With
          // no backing file yet, a zero write may leave clusters unmapped (qemu 7.2 even discards
          // them in v2 images, so the new backing file shows through): the zeros go out as data.
          await stage("write", `${image.name}: writing ${bytes} bytes at ${g}`, () =>
            oldPastEnd && old ? image.writeZeroes(g, bytes) : image.write(g, bufOld.subarray(pos, pos + bytes)),
          );
        }
        pos += run.length;
      }
    }
    options.onStep?.();
  }
}

/** Rebase `image` (open for writing; through its current chain unless `unsafe`) onto `backingFile`. */
export async function rebase(image: Qcow2Image, options: RebaseOptions = {}): Promise<void> {
  if (!options.unsafe) await copyForRebase(image, options);
  await image.setBackingFile(options.backingFile || undefined, options.backingFile ? options.backingFormat : undefined);
  await image.flush();
}

/** Whether [offset, +length) of `device` reads as zeros by its block status alone (no data read). */
async function readsAsZero(device: GuestDevice, offset: number, length: number): Promise<boolean> {
  const inside = Math.min(length, device.virtualSize - offset);
  if (inside <= 0) return true;
  const e = await device.blockStatus(offset, inside);
  return (e.kind === "zero" || e.kind === "unallocated") && e.length >= inside;
}

/**
 * bdrv_is_allocated_above(backing of the top, image at `prefixDepth`, include_base=false): whether
 * an image between the two maps the range, and for how long that holds. Length 0: the range lies
 * past the end of the top's backing file.
 */
async function allocatedAbove(
  chain: GuestDevice[],
  prefixDepth: number,
  offset: number,
  bytes: number,
): Promise<{ allocated: boolean; length: number }> {
  for (let depth = 1; depth < prefixDepth; depth++) {
    const layer = chain[depth]!;
    const size = qemuLength(layer);
    if (offset >= size) {
      // qemu: EOF on the first image ends the search with nothing; deeper down, the zeros read
      // past a shorter image count as allocated in it.
      return depth === 1 ? { allocated: false, length: 0 } : { allocated: true, length: bytes };
    }
    bytes = Math.min(bytes, size - offset);
    if (!(layer instanceof Qcow2Image)) return { allocated: true, length: bytes };
    const own = await layer.isAllocated(offset, bytes);
    if (own.allocated) return { allocated: true, length: own.length };
    bytes = own.length;
  }
  return { allocated: false, length: bytes };
}

/**
 * qemu's compare_buffers from `start`: the run of 512-byte sectors (up to `end`) that all differ
 * or all match between `a` and `b`, the first sector deciding which.
 */
function sectorRun(a: Uint8Array, b: Uint8Array, start: number, end: number): { differ: boolean; length: number } {
  const first = Math.min(end, start + SECTOR);
  const differ = !equalBytes(a, b, start, first);
  let pos = first;
  if (!differ) {
    // Long equal stretches are the common case: check 64 KiB at a time first.
    while (pos + 65536 <= end && equalBytes(a, b, pos, pos + 65536)) pos += 65536;
  }
  while (pos < end) {
    const stop = Math.min(end, pos + SECTOR);
    if (equalBytes(a, b, pos, stop) === differ) break;
    pos = stop;
  }
  return { differ, length: pos - start };
}

function equalBytes(a: Uint8Array, b: Uint8Array, start: number, end: number): boolean {
  let i = start;
  if ((a.byteOffset + i) % 4 === 0 && (b.byteOffset + i) % 4 === 0) {
    const words = (end - i) >>> 2;
    const wa = new Int32Array(a.buffer, a.byteOffset + i, words);
    const wb = new Int32Array(b.buffer, b.byteOffset + i, words);
    for (let k = 0; k < words; k++) if (wa[k] !== wb[k]) return false;
    i += words * 4;
  }
  for (; i < end; i++) if (a[i] !== b[i]) return false;
  return true;
}
