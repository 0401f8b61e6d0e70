// node:zlib inflater: native zlib, 2.3-3.4x pako per 64 KiB cluster (bench/io-backend.mjs).

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
