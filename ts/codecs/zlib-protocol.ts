// Messages between the node:zlib pool (node-zlib.ts) and its workers (zlib-worker.ts).

/** Results that are not data: the caller works these out itself. */
export const ITEM_FAILED = -1;
/** An inflate whose stream runs on past one cluster (legal: qemu keeps the first cluster). */
export const ITEM_TOO_LONG = -2;

/** A piece of one batch: the clusters (or compressed streams) back to back in `input`. */
export interface ZlibPiece {
  id: number;
  op: "deflate" | "inflate";
  clusterSize: number;
  input: ArrayBuffer;
  lengths: number[];
  /** An output buffer the pool is done with, for the worker to fill again (no fresh pages). */
  spare?: ArrayBuffer;
}

/** The results back to back in `output`, with the bytes of each (or ITEM_FAILED, ITEM_TOO_LONG). */
export interface ZlibReply {
  id: number;
  output: ArrayBuffer;
  lengths: Int32Array;
}
