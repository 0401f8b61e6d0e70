// node:zlib inflater: native zlib, about twice as fast as pako per cluster (bench/codecs.mjs).

import zlib from "node:zlib";
import { PakoInflater, type ClusterInflater } from "./deflate.js";

export class NodeZlibInflater implements ClusterInflater {
  // Streams that inflate past one cluster are legal (qemu keeps the first cluster); node:zlib
  // refuses to stop there, so those rare ones go through the portable inflater.
  private readonly fallback = new PakoInflater();

  inflate(src: Uint8Array, dst: Uint8Array): boolean {
    let out: Buffer;
    try {
      out = zlib.inflateRawSync(src, {
        finishFlush: zlib.constants.Z_SYNC_FLUSH,
        maxOutputLength: dst.length,
      });
    } catch (err) {
      if ((err as { code?: string }).code === "ERR_BUFFER_TOO_LARGE") return this.fallback.inflate(src, dst);
      return false;
    }
    if (out.length !== dst.length) return false;
    dst.set(out);
    return true;
  }
}
