// `convert`: copy the guest contents of one or more devices (concatenated, as qemu-img does) into a
// new or existing raw or qcow2 image. Ranges the source maps as zero or unallocated are skipped on
// a target that already reads as zero; data is read in large chunks straight into WASM memory,
// where runs of zero blocks (`sparseSize`, qemu's -S) are found and left out of the target too.

import type { BlockBackend } from "../io/backend.js";
import type { GuestDevice } from "../image/device.js";
import type { CreateOptions } from "../image/create.js";
import { Qcow2Image } from "../image/qcow2-image.js";
import { resolveBackend } from "../io/resolve.js";
import { WasmCore, type WasmVariant } from "../wasm/core.js";

export interface ConvertOptions {
  /** Output format (qemu-img's default is raw). */
  format: "raw" | "qcow2";
  /** qcow2 creation options (cluster size, compat, backing file...); the size is the sources'. */
  create?: Omit<CreateOptions, "size">;
  /** Write every cluster compressed (qcow2 only; -c). */
  compress?: boolean;
  /**
   * Zero detection granularity in bytes (-S, default 4096): aligned blocks of zeros in the data
   * are not written. 0 writes everything, allocating the whole target as qemu's -S 0 does.
   */
  sparseSize?: number;
  /** Write into an existing image instead of creating one (-n). */
  existing?: boolean;
  /** With `existing`: the target already reads as zeros, so zero ranges need not be written. */
  targetIsZero?: boolean;
  /**
   * Copy only what the top image of each source maps (-B: the target's backing file holds the
   * rest). Ranges mapped below, or nowhere, are left to the backing file.
   */
  topOnly?: boolean;
  /** Bytes per read (default 2 MiB, at least one cluster of the target). */
  bufferSize?: number;
  onProgress?: (done: number, total: number) => void;
  wasm?: WasmVariant;
}

interface Target {
  readonly size: number;
  /** The target reads as zero wherever it is not written. */
  readonly zeroed: boolean;
  write(data: Uint8Array, offset: number): Promise<void>;
  writeZeroes(offset: number, length: number): Promise<void>;
  close(): Promise<void>;
}

const DEFAULT_BUFFER = 2 * 1024 * 1024;
/**
 * Chunks in flight: one being written, the rest read ahead (or deflating). Three keep the kernel
 * busy copying plain data; inflating takes longer than reading, so a source with compressed
 * clusters gets eight, to keep every worker thread busy (bench/convert.mjs: 1.25 s against 1.37 s
 * with four on the compressed image; eight cost ~5% on plain data).
 */
const CHUNKS_IN_FLIGHT = 3;
const CHUNKS_IN_FLIGHT_COMPRESSED = 8;
const READY = Promise.resolve();

/**
 * The chunks in flight. Each is read into its own buffer, then drained (written) once it is read
 * and every earlier chunk's drain has finished, so the target sees writes in guest order (as
 * qemu-img without -W) while reads run ahead. An `overlap` drain waits only for the earlier drains
 * to have started: compressed writes place their clusters in call order themselves, so chunks
 * can deflate side by side. The buffer is free again when its drain is done.
 */
class ChunkQueue {
  private readonly free: number[];
  /** Buffers in use at most (the rest stay untouched until `widen`). */
  private limit: number;
  private readonly waiters: Array<() => void> = [];
  /** Settles when the last chunk's drain has finished. */
  private done: Promise<void> = Promise.resolve();
  /** Settles when the last chunk's drain has started (or will not). */
  private started: Promise<void> = Promise.resolve();
  private readonly running = new Set<Promise<void>>();
  private failure: { error: unknown } | undefined;

  constructor(
    private readonly buffers: number[],
    limit: number,
  ) {
    this.free = [...buffers].reverse();
    this.limit = Math.min(limit, buffers.length);
  }

  /** Let every buffer be used. */
  widen(): void {
    this.limit = this.buffers.length;
  }

  /** A free buffer, once there is one; throws the first failure of a chunk. */
  async take(): Promise<number> {
    while (this.buffers.length - this.free.length >= this.limit && !this.failure) {
      await new Promise<void>((resolve) => this.waiters.push(resolve));
    }
    if (this.failure) throw this.failure.error;
    return this.free.pop()!;
  }

  /** Queue the chunk in buffer `ptr` (none for a write of zeroes), being filled by `fill`. */
  add(ptr: number | undefined, fill: Promise<void>, drain: () => Promise<void>, overlap: boolean): void {
    fill.catch(() => undefined); // reported through the job below
    const previous = overlap ? this.started : this.done;
    let markStarted!: () => void;
    const started = new Promise<void>((resolve) => (markStarted = resolve));
    const job = (async () => {
      try {
        await fill;
        await previous;
        const draining = drain();
        markStarted();
        await draining;
      } catch (error) {
        this.failure ??= { error };
        throw error;
      } finally {
        markStarted();
        if (ptr !== undefined) {
          this.free.push(ptr);
          this.waiters.shift()?.();
        }
      }
    })();
    this.track(job);
    this.started = started;
    this.done = job;
  }

  /** Wait for every queued chunk; throw the first failure. */
  async finish(): Promise<void> {
    await this.settle();
    if (this.failure) throw this.failure.error;
  }

  /** Wait until no chunk is in flight, failed or not. */
  async settle(): Promise<void> {
    while (this.running.size > 0) await Promise.allSettled([...this.running]);
  }

  private track(job: Promise<void>): void {
    const settled = job.then(
      () => undefined,
      () => undefined,
    );
    this.running.add(settled);
    void settled.then(() => this.running.delete(settled));
  }
}

async function rawTarget(target: BlockBackend | string, size: number, existing: boolean, targetIsZero: boolean): Promise<Target> {
  const backend = await resolveBackend(target, false, !existing);
  if (!existing) {
    // Empty it in place (an O_TRUNC open makes ext4 flush the whole file at close), then size it.
    await backend.truncate(0);
    await backend.truncate(size);
  }
  const zeros = new Uint8Array(1024 * 1024);
  return {
    size: existing ? await backend.size() : size,
    zeroed: !existing || targetIsZero,
    write: (data, offset) => backend.write(data, offset),
    async writeZeroes(offset, length) {
      for (let pos = 0; pos < length; pos += zeros.length) {
        await backend.write(zeros.subarray(0, Math.min(zeros.length, length - pos)), offset + pos);
      }
    },
    async close() {
      await backend.flush();
      await backend.close();
    },
  };
}

async function qcow2Target(
  target: BlockBackend | string,
  size: number,
  options: ConvertOptions,
): Promise<{ target: Target; image: Qcow2Image }> {
  const image = options.existing
    ? await Qcow2Image.open(target, { readOnly: false, ...(options.wasm ? { wasm: options.wasm } : {}) })
    : await Qcow2Image.create(target, { ...options.create, size, ...(options.wasm ? { wasm: options.wasm } : {}) });
  const compress = options.compress ?? false;
  const hasBacking = image.header.backingFile !== undefined;
  return {
    image,
    target: {
      size: image.virtualSize,
      // A backing file shows through unwritten clusters: zero ranges must then be written.
      zeroed: (!options.existing && !hasBacking) || (options.targetIsZero ?? false),
      write: (data, offset) => (compress ? image.writeCompressed(offset, data) : image.write(offset, data)),
      writeZeroes: (offset, length) => image.writeZeroes(offset, length),
      close: () => image.close(),
    },
  };
}

/**
 * Convert `sources` (their guest bytes, one after another) into `target`. The target is created
 * (or, with `existing`, opened) here and closed when done; the sources stay open.
 */
export async function convert(sources: GuestDevice[], target: BlockBackend | string, options: ConvertOptions): Promise<void> {
  const total = sources.reduce((n, s) => n + s.virtualSize, 0);
  if (options.compress && options.format !== "qcow2") {
    throw new TypeError("convert: compression needs a qcow2 target");
  }
  const sparse = options.sparseSize ?? 4096;
  if (!Number.isSafeInteger(sparse) || sparse < 0 || (sparse !== 0 && sparse % 512 !== 0)) {
    throw new RangeError(`convert: sparse size ${sparse} must be 0 or a multiple of 512`);
  }
  let out: Target;
  let clusterSize = 512;
  if (options.format === "qcow2") {
    const q = await qcow2Target(target, total, options);
    out = q.target;
    clusterSize = q.image.clusterSize;
  } else {
    out = await rawTarget(target, total, options.existing ?? false, options.targetIsZero ?? false);
  }
  let queue: ChunkQueue | undefined;
  try {
    if (out.size < total) {
      throw new RangeError(`convert: the target holds ${out.size} bytes, less than the ${total} of the source`);
    }
    // Compressed clusters are written whole, so reads go by whole target clusters.
    const unit = options.compress ? clusterSize : 512;
    const bufferSize = Math.max(unit, Math.floor((options.bufferSize ?? DEFAULT_BUFFER) / unit) * unit);
    // Zero blocks are found at -S granularity; on qcow2, whole clusters are what can be left out.
    const grain = sparse !== 0 && options.format === "qcow2" && sparse < clusterSize && clusterSize % sparse === 0 ? clusterSize : sparse;
    const core = await WasmCore.create(options.wasm);
    // Chunks read ahead while earlier ones are written (or deflated); each has its own buffer,
    // all reserved now: memory must not grow while reads into it are in flight.
    const buffers: number[] = [];
    for (let i = 0; i < CHUNKS_IN_FLIGHT_COMPRESSED; i++) buffers.push(core.reserve(bufferSize, 64));
    queue = new ChunkQueue(buffers, CHUNKS_IN_FLIGHT);
    const chunks = queue;
    /** Read a chunk into a free buffer; `write` runs once it is read and its turn has come. */
    const copyChunk = async (
      source: GuestDevice,
      from: number,
      length: number,
      write: (ptr: number, buf: Uint8Array) => Promise<void>,
      overlap: boolean,
    ): Promise<void> => {
      const ptr = await chunks.take();
      const buf = core.bytes(ptr, length);
      chunks.add(ptr, source.readInto(buf, from), () => write(ptr, buf), overlap);
    };
    let base = 0;
    let done = 0;
    for (const source of sources) {
      let pos = 0;
      while (pos < source.virtualSize) {
        const limit = Math.min(bufferSize, source.virtualSize - pos);
        const extent = await source.blockStatus(pos, limit);
        if (extent.kind === "compressed") chunks.widen();
        let length = extent.length;
        const mapped = extent.kind !== "unallocated" && !(options.topOnly && extent.depth > 0);
        const zero = extent.kind === "zero" || extent.kind === "unallocated";
        if (mapped && !zero) {
          // Join the data extents that follow (compressed clusters come one per extent) into one
          // read, so the source can work on many clusters at once.
          while (length < limit) {
            const next = await source.blockStatus(pos + length, limit - length);
            if (next.kind === "compressed") chunks.widen();
            const nextMapped = next.kind !== "unallocated" && !(options.topOnly && next.depth > 0);
            if (!nextMapped || next.kind === "zero") break;
            length += next.length;
          }
        }
        const at = base + pos;
        if (options.compress) {
          if (!mapped || zero) {
            // Whole clusters that read as zero are not written; a partial one is read below.
            const whole = Math.floor(length / unit) * unit;
            if (whole > 0 && at % unit === 0) {
              if (!out.zeroed) chunks.add(undefined, READY, () => out.writeZeroes(at, whole), true);
              pos += whole;
              done += whole;
              options.onProgress?.(done, total);
              continue;
            }
          }
          length = Math.min(bufferSize, source.virtualSize - pos);
          // Compressed writes keep their order by themselves: chunks deflate side by side.
          await copyChunk(source, pos, length, (ptr, buf) => writeCompressedRuns(core, ptr, buf, at, unit, out), true);
        } else if (!mapped && (options.topOnly || sparse !== 0)) {
          // Left to the backing file (topOnly) or already zero in the target.
          if (!options.topOnly && !out.zeroed) chunks.add(undefined, READY, () => out.writeZeroes(at, length), false);
        } else if (zero && sparse !== 0) {
          if (!out.zeroed) chunks.add(undefined, READY, () => out.writeZeroes(at, length), false);
        } else {
          await copyChunk(source, pos, length, (ptr, buf) => writeData(core, ptr, buf, at, grain, out), false);
        }
        pos += length;
        done += length;
        options.onProgress?.(done, total);
      }
      base += source.virtualSize;
    }
    await chunks.finish();
  } finally {
    // Nothing may still be writing when the target closes, whatever failed.
    await queue?.settle();
    await out.close();
  }
}

/**
 * Write whole clusters compressed, in runs; clusters that are all zero are left out. Every write is
 * issued before the first await, so the image places the clusters in the order of the chunks.
 */
async function writeCompressedRuns(core: WasmCore, ptr: number, buf: Uint8Array, offset: number, cs: number, out: Target): Promise<void> {
  const x = core.exports;
  const writes: Promise<void>[] = [];
  let runStart = -1;
  for (let pos = 0; pos < buf.length; pos += cs) {
    const n = Math.min(cs, buf.length - pos);
    const isZero = x.firstNonZero(ptr + pos, n) === n;
    if (!isZero && runStart < 0) runStart = pos;
    if (isZero && runStart >= 0) {
      writes.push(out.write(buf.subarray(runStart, pos), offset + runStart));
      runStart = -1;
    }
    if (isZero && !out.zeroed) writes.push(out.writeZeroes(offset + pos, n));
  }
  if (runStart >= 0) writes.push(out.write(buf.subarray(runStart), offset + runStart));
  await settleAll(writes);
}

/** Wait for every promise; then throw the first failure. */
async function settleAll(promises: Promise<void>[]): Promise<void> {
  const results = await Promise.allSettled(promises);
  for (const r of results) if (r.status === "rejected") throw r.reason;
}

/**
 * Write a buffer of guest data. With a grain, blocks of `grain` bytes (aligned in the target) that
 * are all zero are left out of a target that reads as zero, and written as zeroes otherwise.
 */
async function writeData(core: WasmCore, ptr: number, buf: Uint8Array, offset: number, grain: number, out: Target): Promise<void> {
  if (grain === 0) {
    await out.write(buf, offset);
    return;
  }
  const x = core.exports;
  let runStart = 0;
  let runData = true;
  let pos = 0;
  const flush = async (end: number): Promise<void> => {
    if (end <= runStart) return;
    if (runData) await out.write(buf.subarray(runStart, end), offset + runStart);
    else if (!out.zeroed) await out.writeZeroes(offset + runStart, end - runStart);
  };
  const extend = async (end: number, data: boolean): Promise<void> => {
    if (data !== runData) {
      await flush(pos);
      runStart = pos;
      runData = data;
    }
    pos = end;
  };
  // An unaligned first block, then runs of whole blocks found in WASM.
  const head = offset % grain === 0 ? 0 : Math.min(buf.length, grain - (offset % grain));
  if (head > 0) {
    runData = x.firstNonZero(ptr, head) < head;
    pos = head;
  }
  while (pos < buf.length) {
    const zeros = x.blockRun(ptr + pos, buf.length - pos, grain, 1);
    if (zeros > 0) {
      await extend(pos + zeros, false);
      continue;
    }
    const data = x.blockRun(ptr + pos, buf.length - pos, grain, 0);
    await extend(pos + data, true);
  }
  await flush(buf.length);
}
