// `bench`: qemu-img 7.2's I/O benchmark (qemu-img.c img_bench and bench_cb). `count` requests of
// `bufferSize` bytes, `depth` of them in flight at once, the first at `offset` and each next one
// `step` bytes further, wrapping modulo the device size; writes carry the pattern byte. With a
// flush interval, a flush goes out whenever the number of requests not yet sent is a multiple of
// it: after draining the queue (the default), or alongside the requests still running.
//
// The state machine is bench_cb's, transition for transition: a completion decrements the
// counters, may start a flush, then tops the queue back up. Requests are promises issued without
// waiting for one another, so a device that overlaps its work (Qcow2Image's concurrent requests,
// an asynchronous backend) has `depth` of them to overlap.

import type { BlockBackend } from "../io/backend.js";
import { readFully } from "../io/backend.js";
import type { Qcow2Image } from "../image/qcow2-image.js";

const SECTOR = 512;

/** What bench sends its requests to. */
export interface BenchTarget {
  /** Bytes the requests may address (qemu's blk_getlength). */
  readonly size: number;
  read(dst: Uint8Array, offset: number): Promise<void>;
  write(src: Uint8Array, offset: number): Promise<void>;
  flush(): Promise<void>;
}

/** A qcow2 image as bench sees it: its virtual size in whole sectors, as qemu's block layer has it. */
export function imageBenchTarget(image: Qcow2Image): BenchTarget {
  return {
    size: Math.floor(image.virtualSize / SECTOR) * SECTOR,
    read: async (dst, offset) => void (await image.read(offset, dst)),
    write: (src, offset) => image.write(offset, src),
    flush: () => image.flush(),
  };
}

/**
 * A raw file: `size` is the file's length rounded up to a sector (qemu's length for it); reads past
 * the end of the file return zeros, writes there extend it.
 */
export function backendBenchTarget(backend: BlockBackend, size: number): BenchTarget {
  return {
    size,
    read: (dst, offset) => readFully(backend, dst, offset),
    write: (src, offset) => backend.write(src, offset),
    flush: () => backend.flush(),
  };
}

export interface BenchOptions {
  /** Requests to send (-c, qemu's default 75000). */
  count?: number;
  /** Requests in flight at once (-d, default 64). */
  depth?: number;
  /** Bytes per request (-s, default 4096). */
  bufferSize?: number;
  /** Bytes from one request's offset to the next (-S); 0 or absent means bufferSize. */
  step?: number;
  /** Offset of the first request (-o); may lie past the device, as in qemu (the request fails). */
  offset?: number | bigint;
  /** Write instead of read (-w). */
  write?: boolean;
  /** The byte every write carries (--pattern, default 0). */
  pattern?: number;
  /** Flush whenever this many requests are left to send (--flush-interval; 0 = never). */
  flushInterval?: number;
  /** Let no request run while a flush does (default true; --no-drain sets false). */
  drainOnFlush?: boolean;
  /** Each write is flushed before it completes (qemu's cache=writethrough/directsync). */
  writethrough?: boolean;
  /** Flushes do nothing (qemu's cache=unsafe). */
  noFlush?: boolean;
}

export interface BenchResult {
  /** From the first request sent to the last completed, as qemu times it. */
  seconds: number;
  requests: number;
  flushes: number;
}

/** A request or a flush failed: qemu's "Failed request: ..." (or "Failed flush request: ..."). */
export class BenchError extends Error {
  override name = "BenchError";
  constructor(
    readonly kind: "request" | "flush",
    /** Why, in qemu's words where it has them: "Input/output error" for a request out of bounds. */
    readonly reason: string,
    options?: { cause?: unknown },
  ) {
    super(`bench: ${kind === "flush" ? "flush" : "request"} failed: ${reason}`, options);
  }
}

const INT_MAX = 0x7fffffff;

function checkCount(name: string, value: number, min: number, max: number): void {
  if (!Number.isSafeInteger(value) || value < min || value > max) {
    throw new RangeError(`bench: ${name} ${value} is not an integer between ${min} and ${max}`);
  }
}

/** blk_check_byte_request: a request that does not lie inside the device fails with EIO. */
function outOfBounds(offset: number | bigint, bytes: number, size: number): boolean {
  if (typeof offset === "bigint") return offset > BigInt(size) || BigInt(size) - offset < BigInt(bytes);
  return offset > size || size - offset < bytes;
}

/** Run the benchmark against `target`. Resolves when every request has completed. */
export async function bench(target: BenchTarget, options: BenchOptions = {}): Promise<BenchResult> {
  const count = options.count ?? 75000;
  const depth = options.depth ?? 64;
  const bufferSize = options.bufferSize ?? 4096;
  const step = options.step || bufferSize;
  const flushInterval = options.flushInterval ?? 0;
  const drain = options.drainOnFlush ?? true;
  const isWrite = options.write ?? false;
  const pattern = options.pattern ?? 0;
  checkCount("count", count, 0, INT_MAX);
  checkCount("depth", depth, 0, INT_MAX);
  checkCount("buffer size", bufferSize, 0, INT_MAX);
  checkCount("step", step, 0, INT_MAX);
  checkCount("flush interval", flushInterval, 0, INT_MAX);
  checkCount("pattern", pattern, 0, 255);
  const first = options.offset ?? 0;
  if ((typeof first === "bigint" && first < 0n) || (typeof first === "number" && (!Number.isSafeInteger(first) || first < 0))) {
    throw new RangeError(`bench: offset ${first} is not a non-negative integer`);
  }
  if (flushInterval !== 0 && !isWrite) throw new RangeError("bench: a flush interval is only for write tests");
  if (flushInterval !== 0 && flushInterval < depth) {
    throw new RangeError(`bench: flush interval ${flushInterval} is below the depth ${depth}`);
  }
  // qemu would wait forever for requests it never sends.
  if (depth === 0 && count > 0) throw new RangeError("bench: a depth of 0 sends no requests");
  const size = target.size;

  // qemu allocates a buffer per request in flight but sends every request with the first one
  // (bench_cb passes b->qiov); so does this. Writes send the pattern; reads overwrite it.
  let buf: Uint8Array;
  try {
    buf = new Uint8Array(bufferSize);
  } catch (cause) {
    throw new RangeError(`bench: cannot allocate a buffer of ${bufferSize} bytes`, { cause });
  }
  if (pattern !== 0) buf.fill(pattern);

  const flush = (): Promise<void> => (options.noFlush ? Promise.resolve() : target.flush());
  const send = async (at: number | bigint): Promise<void> => {
    if (outOfBounds(at, bufferSize, size)) throw new BenchError("request", "Input/output error");
    if (!isWrite) return target.read(buf, Number(at));
    await target.write(buf, Number(at));
    if (options.writethrough) await flush();
  };

  let n = count;
  let inFlight = 0;
  let inFlush = false;
  let offset: number | bigint = first;
  let flushes = 0;
  let failure: BenchError | undefined;
  /** Every request and flush still running, so that nothing is left behind on return. */
  const pending = new Set<Promise<void>>();
  let finish!: () => void;
  const finished = new Promise<void>((resolve) => (finish = resolve));

  const track = (p: Promise<void>): void => {
    pending.add(p);
    void p.finally(() => pending.delete(p));
  };
  const fail = (kind: "request" | "flush", e: unknown): void => {
    if (failure) return;
    failure = e instanceof BenchError ? e : new BenchError(kind, e instanceof Error ? e.message : String(e), { cause: e });
    finish();
  };
  const startFlush = (drained: boolean): void => {
    flushes++;
    track(
      flush().then(
        () => (drained ? completed() : undefined),
        (e: unknown) => fail(drained ? "request" : "flush", e),
      ),
    );
  };

  /** bench_cb: one request (or a drained flush) completed. */
  const completed = (): void => {
    if (failure) return;
    if (inFlush) {
      inFlush = false;
    } else if (inFlight > 0) {
      const remaining = n - inFlight;
      n--;
      inFlight--;
      if (n === 0) finish();
      if (flushInterval && remaining % flushInterval === 0) {
        if (inFlight === 0 || !drain) {
          if (drain) inFlush = true;
          startFlush(drain);
        }
        if (drain) return;
      }
    }
    while (n > inFlight && inFlight < depth) {
      const at = offset;
      inFlight++;
      offset =
        size === 0
          ? 0 // qemu 7.2 divides by zero here; later versions restart at 0
          : typeof at === "bigint"
            ? Number((at + BigInt(step)) % BigInt(size))
            : (at + step) % size;
      track(send(at).then(completed, (e: unknown) => fail("request", e)));
    }
  };

  const t0 = performance.now();
  if (n === 0) finish();
  completed();
  await finished;
  const seconds = (performance.now() - t0) / 1000;
  // Flushes still running when the last request completed, or requests left after a failure.
  while (pending.size > 0) await Promise.allSettled([...pending]);
  if (failure) throw failure;
  return { seconds, requests: count, flushes };
}
