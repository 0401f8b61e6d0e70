// `dd`: copy a run of blocks of one device into a new raw or qcow2 image, as qemu-img 7.2 dd
// does it (qemu-img.c img_dd). The output's size and the range copied follow qemu's arithmetic,
// including its reading of count= as the end of the copy counted from the start of the input
// (not from skip=). Every byte of the range is written, zeros included, so a qcow2 output has
// every cluster allocated as qemu's has; the copy goes in large pieces rather than block by block,
// which writes the same bytes.

import type { BlockBackend } from "../io/backend.js";
import { readClipped, type GuestDevice } from "../image/device.js";
import { Qcow2Image } from "../image/qcow2-image.js";
import type { CreateOptions } from "../image/create.js";
import { resolveBackend } from "../io/resolve.js";

const INT64_MAX = (1n << 63n) - 1n;
const SECTOR = 512;
/** Bytes per read and write: a multiple of every cluster size, so qcow2 writes stay aligned. */
const DEFAULT_BUFFER = 4 * 1024 * 1024;

export interface DdOptions {
  /** Output format (qemu-img dd's default is raw). */
  format: "raw" | "qcow2";
  /** Bytes per block (bs=, default 512). */
  blockSize?: number;
  /** count=: the copy ends at count * blockSize bytes into the input (qemu 7.2), if that is sooner. */
  count?: bigint;
  /** skip=: blocks of the input left out before the copy starts. */
  skip?: bigint;
  /**
   * The input's length as qemu sees it (blk_getlength: a raw file rounded up to a sector, a qcow2
   * image's size rounded down to one). Default: the source's virtual size. Bytes past the source's
   * end read as zeros.
   */
  inputSize?: number;
  /** qcow2 creation options other than the size (qemu-img dd uses the defaults). */
  create?: Omit<CreateOptions, "size">;
  /** Bytes per read and write (default 4 MiB). */
  bufferSize?: number;
}

export interface DdPlan {
  /** Input offset of the first byte copied. */
  start: number;
  /** Input offset where the copy ends. */
  end: number;
  /** The size asked of the output driver (qemu rounds it up to a sector when creating). */
  outputSize: number;
  /** skip= lies past the input's end: qemu warns, and creates an empty output. */
  skipPastEnd: boolean;
}

/** qemu's arithmetic (int64_t) for what dd copies and how large its output is. */
export function ddPlan(inputSize: number, options: Pick<DdOptions, "blockSize" | "count" | "skip">): DdPlan {
  const bs = BigInt(options.blockSize ?? SECTOR);
  if (bs < 1n || bs > 0x7fffffffn) throw new RangeError(`dd: block size ${bs} is not between 1 and 2147483647`);
  const count = options.count;
  const skip = options.skip;
  for (const [what, v] of [["count", count], ["skip", skip]] as const) {
    if (v !== undefined && (v < 0n || v > INT64_MAX)) throw new RangeError(`dd: ${what} ${v} is not between 0 and ${INT64_MAX}`);
  }
  let size = BigInt(inputSize);
  if (count !== undefined && count <= INT64_MAX / bs && count * bs < size) size = count * bs;
  const skipPastEnd = skip !== undefined && (skip > INT64_MAX / bs || size < bs * skip);
  const start = skipPastEnd ? size : (skip ?? 0n) * bs;
  return { start: Number(start), end: Number(size), outputSize: Number(size - start), skipPastEnd };
}

/**
 * Create the output (`target`, a path or a backend, emptied first) at the planned size and copy
 * the planned range of `source` into it. The source stays open; the output is closed.
 */
export async function dd(source: GuestDevice, target: BlockBackend | string, options: DdOptions): Promise<DdPlan> {
  const plan = ddPlan(options.inputSize ?? source.virtualSize, options);
  const size = Math.ceil(plan.outputSize / SECTOR) * SECTOR;
  const bufferSize = options.bufferSize ?? DEFAULT_BUFFER;
  if (!Number.isSafeInteger(bufferSize) || bufferSize < 1) throw new RangeError(`dd: buffer size ${bufferSize} is not a positive integer`);
  let write: (data: Uint8Array, offset: number) => Promise<void>;
  let close: () => Promise<void>;
  if (options.format === "qcow2") {
    let image: Qcow2Image;
    try {
      image = await Qcow2Image.create(target, { ...options.create, size });
    } catch (e) {
      throw new DdError("create", 0, e);
    }
    write = (data, offset) => image.write(offset, data);
    close = () => image.close();
  } else {
    let backend: BlockBackend | undefined;
    try {
      backend = await resolveBackend(target, false, true);
      // Emptied in place, then sized: the output reads as zeros past what is copied.
      await backend.truncate(0);
      await backend.truncate(size);
    } catch (e) {
      await backend?.close().catch(() => undefined);
      throw new DdError("create", 0, e);
    }
    const output = backend;
    write = (data, offset) => output.write(data, offset);
    close = async () => {
      try {
        await output.flush();
      } finally {
        await output.close();
      }
    };
  }
  try {
    const buf = new Uint8Array(Math.min(bufferSize, Math.max(1, plan.end - plan.start)));
    for (let pos = plan.start; pos < plan.end; ) {
      const n = Math.min(buf.length, plan.end - pos);
      const piece = n === buf.length ? buf : buf.subarray(0, n);
      try {
        await readClipped(source, piece, pos);
      } catch (e) {
        throw new DdError("read", pos, e);
      }
      try {
        await write(piece, pos - plan.start);
      } catch (e) {
        throw new DdError("write", pos - plan.start, e);
      }
      pos += n;
    }
  } catch (e) {
    await close().catch(() => undefined);
    throw e;
  }
  await close();
  return plan;
}

/** Creating the output, a read of the input or a write of the output failed; `cause` says why. */
export class DdError extends Error {
  override name = "DdError";
  constructor(
    readonly op: "create" | "read" | "write",
    readonly offset: number,
    cause: unknown,
  ) {
    super(`dd: ${op} at offset ${offset} failed: ${cause instanceof Error ? cause.message : String(cause)}`, { cause });
  }
}
