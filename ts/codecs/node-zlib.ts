// node:zlib codecs: native zlib, 2.3-3.4x pako per 64 KiB cluster (bench/io-backend.mjs). Batches
// of clusters go to a pool of worker threads, one per core: deflating a cluster takes ~0.6 ms and
// inflating one ~0.2 ms, against ~0.05 ms to hand a piece of a batch to a worker and back.

import { existsSync } from "node:fs";
import os from "node:os";
import { fileURLToPath } from "node:url";
import { Worker } from "node:worker_threads";
import zlib from "node:zlib";
import { PakoInflater, type ClusterDeflater, type ClusterInflater } from "./deflate.js";
import { ITEM_FAILED, ITEM_TOO_LONG, type ZlibPiece, type ZlibReply } from "./zlib-protocol.js";

function inflateOptions(dst: Uint8Array): zlib.ZlibOptions {
  return {
    finishFlush: zlib.constants.Z_SYNC_FLUSH,
    maxOutputLength: dst.length,
    // One output chunk per cluster: no joining of 16 KiB pieces (1.1x per image, bench/io-backend.mjs).
    chunkSize: Math.max(dst.length, 64),
  };
}

const DEFLATE_OPTIONS: zlib.ZlibOptions = { windowBits: 12, memLevel: 9, level: 6 };

export class NodeZlibInflater implements ClusterInflater {
  // Streams that inflate past one cluster are legal (qemu keeps the first cluster); node:zlib
  // refuses to stop there, so those rare ones go through the portable inflater.
  private readonly fallback = new PakoInflater();

  /** Inflate a batch on the worker pool (on this thread when there is none or the batch is small). */
  async inflateMany(jobs: Array<{ src: Uint8Array; dst: Uint8Array }>): Promise<boolean[]> {
    const pool = jobs.length >= MIN_POOL_BATCH ? zlibPool() : undefined;
    const cs = jobs[0]?.dst.length ?? 0;
    if (!pool || jobs.some((j) => j.dst.length !== cs)) return jobs.map((j) => this.inflate(j.src, j.dst));
    const results: boolean[] = [];
    const perPiece = Math.max(1, Math.floor(INFLATE_PIECE_OUTPUT / cs));
    const { outs, buffers } = await pool.run("inflate", jobs.map((j) => j.src), cs, perPiece);
    jobs.forEach((j, k) => {
      const out = outs[k]!;
      if (typeof out !== "number") {
        j.dst.set(out);
        results.push(true);
      } else {
        // ITEM_TOO_LONG, or a worker that failed: the answer is this thread's.
        results.push(out === ITEM_FAILED ? false : this.inflate(j.src, j.dst));
      }
    });
    pool.recycle(buffers);
    return results;
  }

  inflate(src: Uint8Array, dst: Uint8Array): boolean {
    let out: Buffer;
    try {
      out = zlib.inflateRawSync(src, inflateOptions(dst));
    } catch (err) {
      if ((err as { code?: string }).code === "ERR_BUFFER_TOO_LARGE") return this.fallback.inflate(src, dst);
      return false;
    }
    if (out.length !== dst.length) return false;
    dst.set(out);
    return true;
  }
}

export class NodeZlibDeflater implements ClusterDeflater {
  deflate(src: Uint8Array, limit: number): Uint8Array | undefined {
    const out = zlib.deflateRawSync(src, DEFLATE_OPTIONS);
    return out.length < limit ? out : undefined;
  }

  /** One cluster on the libuv thread pool. */
  deflateAsync(src: Uint8Array, limit: number): Promise<Uint8Array | undefined> {
    return new Promise((resolve, reject) => {
      zlib.deflateRaw(src, { ...DEFLATE_OPTIONS, chunkSize: src.length + 1024 }, (err, out) =>
        err ? reject(err) : resolve(out.length < limit ? out : undefined),
      );
    });
  }

  /** A batch on the worker pool (on this thread when there is none or the batch is small). */
  async deflateMany(clusters: Uint8Array[], limit: number): Promise<Array<Uint8Array | undefined>> {
    const pool = clusters.length >= MIN_POOL_BATCH ? zlibPool() : undefined;
    if (!pool || clusters.some((c) => c.length > limit)) return clusters.map((c) => this.deflate(c, limit));
    // The results are views of the workers' replies: those buffers stay with the caller.
    const perPiece = Math.max(1, Math.floor(DEFLATE_PIECE_INPUT / limit));
    const { outs } = await pool.run("deflate", clusters, limit, perPiece);
    return outs.map((out, k) => (typeof out !== "number" ? out : out === ITEM_FAILED ? undefined : this.deflate(clusters[k]!, limit)));
  }
}

/** Below this many clusters a batch is done on the calling thread: the round trip would cost more. */
const MIN_POOL_BATCH = 4;
/**
 * Clusters per piece sent to a worker: a few milliseconds of work, so that pieces balance the
 * workers while messages stay few (each wakes a thread, ~0.2 ms here: bench/convert.mjs).
 */
const DEFLATE_PIECE_INPUT = 512 * 1024;
const INFLATE_PIECE_OUTPUT = 1024 * 1024;
/** Pieces a worker holds at once: one to work on and one waiting, so it never waits for us. */
const PIECES_PER_WORKER = 2;
/** Inflate output buffers kept for reuse (fresh ones cost page faults; ~1 MiB each). */
const MAX_SPARES = 16;

/** A result: the bytes, or ITEM_FAILED / ITEM_TOO_LONG (also given for a worker that failed). */
type Item = Uint8Array | number;

interface Piece {
  op: "deflate" | "inflate";
  clusterSize: number;
  items: Uint8Array[];
  done: (outs: Item[], buffer?: ArrayBuffer) => void;
}

interface PoolWorker {
  worker: Worker;
  busy: Map<number, Piece>;
}

/** Worker threads that deflate and inflate pieces of batches, first come first served. */
class ZlibPool {
  private readonly workers: PoolWorker[] = [];
  private readonly queue: Piece[] = [];
  private readonly spares: ArrayBuffer[] = [];
  private nextId = 0;

  constructor(script: URL, count: number) {
    for (let i = 0; i < count; i++) {
      const worker = new Worker(script);
      worker.unref();
      const entry: PoolWorker = { worker, busy: new Map() };
      worker.on("message", (reply: ZlibReply) => this.finish(entry, reply));
      worker.on("error", () => this.lose(entry));
      worker.on("exit", () => this.lose(entry));
      this.workers.push(entry);
    }
  }

  get size(): number {
    return this.workers.length;
  }

  /**
   * Run `op` over `items` in pieces of `perPiece` items; each result is the output bytes or a code
   * the caller resolves on its own thread. `clusterSize`: deflate keeps outputs shorter than it;
   * inflate fills exactly it. `buffers` hold the outputs; `recycle` them when done with those.
   */
  run(op: "deflate" | "inflate", items: Uint8Array[], clusterSize: number, perPiece: number): Promise<{ outs: Item[]; buffers: ArrayBuffer[] }> {
    const outs: Item[] = new Array<Item>(items.length);
    const buffers: ArrayBuffer[] = [];
    const pieces: Promise<void>[] = [];
    for (let start = 0; start < items.length; ) {
      const end = Math.min(items.length, start + perPiece);
      const from = start;
      pieces.push(
        new Promise<void>((resolve) => {
          this.queue.push({
            op,
            clusterSize,
            items: items.slice(from, end),
            done: (results, buffer) => {
              results.forEach((r, k) => (outs[from + k] = r));
              if (buffer) buffers.push(buffer);
              resolve();
            },
          });
        }),
      );
      start = end;
    }
    this.pump();
    return Promise.all(pieces).then(() => ({ outs, buffers }));
  }

  /** Output buffers the caller is done with: the workers fill them again. */
  recycle(buffers: ArrayBuffer[]): void {
    for (const b of buffers) if (this.spares.length < MAX_SPARES) this.spares.push(b);
  }

  /** Hand queued pieces to the workers with room for them. */
  private pump(): void {
    for (;;) {
      if (this.queue.length === 0) return;
      let target: PoolWorker | undefined;
      for (const w of this.workers) if (w.busy.size < PIECES_PER_WORKER && (!target || w.busy.size < target.busy.size)) target = w;
      if (!target) return;
      const piece = this.queue.shift()!;
      const id = this.nextId++;
      let total = 0;
      for (const item of piece.items) total += item.length;
      const input = new Uint8Array(total);
      let pos = 0;
      for (const item of piece.items) {
        input.set(item, pos);
        pos += item.length;
      }
      const message: ZlibPiece = { id, op: piece.op, clusterSize: piece.clusterSize, input: input.buffer, lengths: piece.items.map((i) => i.length) };
      const transfer = [input.buffer];
      const spare = piece.op === "inflate" ? this.spares.pop() : undefined;
      if (spare) {
        message.spare = spare;
        transfer.push(spare);
      }
      if (target.busy.size === 0) target.worker.ref();
      target.busy.set(id, piece);
      target.worker.postMessage(message, transfer);
    }
  }

  private finish(entry: PoolWorker, reply: ZlibReply): void {
    const piece = entry.busy.get(reply.id);
    if (!piece) return;
    entry.busy.delete(reply.id);
    if (entry.busy.size === 0) entry.worker.unref();
    const output = new Uint8Array(reply.output);
    const outs: Item[] = [];
    let pos = 0;
    for (const n of reply.lengths) {
      if (n < 0) outs.push(n);
      else {
        outs.push(output.subarray(pos, pos + n));
        pos += n;
      }
    }
    piece.done(outs, reply.output);
    this.pump();
  }

  /** A worker that fails or exits: its pieces are done on the calling thread; the rest carry on. */
  private lose(entry: PoolWorker): void {
    const index = this.workers.indexOf(entry);
    if (index < 0) return;
    this.workers.splice(index, 1);
    for (const piece of entry.busy.values()) piece.done(piece.items.map(() => ITEM_TOO_LONG));
    entry.busy.clear();
    if (this.workers.length === 0) {
      for (const piece of this.queue.splice(0)) piece.done(piece.items.map(() => ITEM_TOO_LONG));
    }
    this.pump();
  }
}

let shared: ZlibPool | null | undefined;

/** The process's pool, started on first use: one worker per core, none on a single core. */
function zlibPool(): ZlibPool | undefined {
  if (shared === undefined) {
    const script = new URL("./zlib-worker.js", import.meta.url);
    const cores = os.availableParallelism();
    // No worker script beside this module when running from the TypeScript sources.
    shared = cores >= 2 && script.protocol === "file:" && existsSync(fileURLToPath(script)) ? new ZlibPool(script, Math.min(cores, 8)) : null;
  }
  return shared && shared.size > 0 ? shared : undefined;
}
