// Prototypes of cheaper node:zlib use for compressed clusters, measured beside the library's
// inflaters (bench/io-backend.mjs) and inside a whole-image read (bench/read-sequential.mjs).
// Not library code: they exist to put numbers on a suggested change to ts/codecs/node-zlib.ts.

import zlib from "node:zlib";

/** Prototype: inflateRawSync with a cluster-sized chunk, so the output is produced in one piece. */
export class OneChunkZlibInflater {
  inflate(src, dst) {
    let out;
    try {
      out = zlib.inflateRawSync(src, { finishFlush: zlib.constants.Z_SYNC_FLUSH, maxOutputLength: dst.length, chunkSize: dst.length });
    } catch {
      return false;
    }
    if (out.length !== dst.length) return false;
    dst.set(out);
    return true;
  }
}

/**
 * Prototype: one native zlib handle reused for every cluster and inflating straight into `dst`
 * (no stream object, no output allocation, no copy; output stops at one cluster as qemu's does).
 * It drives node:zlib's internal handle (`_handle.writeSync`), so it only marks what is possible.
 */
export class HandleZlibInflater {
  constructor() {
    this.stream = zlib.createInflateRaw();
    this.handle = this.stream._handle;
    this.state = this.stream._writeState; // [availOutAfter, availInAfter]
  }
  inflate(src, dst) {
    this.handle.reset();
    this.handle.writeSync(zlib.constants.Z_SYNC_FLUSH, src, 0, src.length, dst, 0, dst.length);
    return this.state[0] === 0;
  }
}
