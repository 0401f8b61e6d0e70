// node:zlib inflater: native zlib, 2.3-3.4x pako per 64 KiB cluster (bench/io-backend.mjs).

import os from "node:os";
import { Worker } from "node:worker_threads";
import zlib from "node:zlib";
import { PakoInflater, type ClusterDeflater, type ClusterInflater } from "./deflate.js";

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

  /**
   * Split the batch between this thread and a worker (on machines with more than one core):
   * the worker takes the second half, this thread inflates the first meanwhile.
   */
  async inflateMany(jobs: Array<{ src: Uint8Array; dst: Uint8Array }>): Promise<boolean[]> {
    const worker = jobs.length >= MIN_WORKER_BATCH ? inflateWorker() : undefined;
    if (!worker) return jobs.map((j) => this.inflate(j.src, j.dst));
    const half = Math.floor(jobs.length / 2);
    const theirs = jobs.slice(half);
    const reply = worker.run(theirs.map((j) => j.src), theirs[0]!.dst.length);
    const results = jobs.slice(0, half).map((j) => this.inflate(j.src, j.dst));
    const outs = await reply;
    theirs.forEach((j, k) => {
      const out = outs[k];
      if (out && out.length === j.dst.length) {
        j.dst.set(out);
        results.push(true);
      } else {
        results.push(this.inflate(j.src, j.dst));
      }
    });
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

  // Deflating a cluster takes ~1 ms, so the thread pool's per-call cost (~0.2 ms) pays off; an
  // inflate takes 0.04 ms, so inflating stays synchronous.
  deflateAsync(src: Uint8Array, limit: number): Promise<Uint8Array | undefined> {
    return new Promise((resolve, reject) => {
      zlib.deflateRaw(src, DEFLATE_OPTIONS, (err, out) => (err ? reject(err) : resolve(out.length < limit ? out : undefined)));
    });
  }
}

/** Below this many clusters a batch is inflated here: the round trip would cost more. */
const MIN_WORKER_BATCH = 8;

interface InflateWorker {
  run(sources: Uint8Array[], clusterSize: number): Promise<Array<Uint8Array | null>>;
}

let shared: InflateWorker | null | undefined;

/** One worker per process, started on first use, never keeping the process alive. */
function inflateWorker(): InflateWorker | undefined {
  if (shared !== undefined) return shared ?? undefined;
  if (os.availableParallelism() < 2) {
    shared = null;
    return undefined;
  }
  let worker: Worker;
  try {
    worker = new Worker(new URL("./inflate-worker.js", import.meta.url));
  } catch {
    shared = null; // no worker script here (running from sources): inflate on this thread
    return undefined;
  }
  worker.unref();
  const pending = new Map<number, (outs: Array<Uint8Array | null>) => void>();
  let nextId = 0;
  worker.on("message", (m: { id: number; outs: Array<Uint8Array | null> }) => {
    pending.get(m.id)?.(m.outs);
    pending.delete(m.id);
  });
  worker.on("error", () => {
    // Whatever was sent is redone on this thread; no worker from now on.
    for (const resolve of pending.values()) resolve([]);
    pending.clear();
    shared = null;
  });
  shared = {
    run(sources, clusterSize) {
      const id = nextId++;
      return new Promise((resolve) => {
        pending.set(id, resolve);
        worker.ref();
        worker.postMessage({ id, clusterSize, sources });
      }).finally(() => {
        if (pending.size === 0) worker.unref();
      }) as Promise<Array<Uint8Array | null>>;
    },
  };
  return shared;
}
