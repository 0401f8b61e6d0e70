// A worker that inflates compressed clusters for NodeZlibInflater.inflateMany: each message is a
// batch of raw deflate streams; the reply carries the clusters (transferred) or null where a
// stream does not fill one cluster.

import { parentPort } from "node:worker_threads";
import zlib from "node:zlib";

interface Batch {
  id: number;
  clusterSize: number;
  sources: Uint8Array[];
}

parentPort!.on("message", (batch: Batch) => {
  const outs: Array<Uint8Array | null> = [];
  const transfer: ArrayBuffer[] = [];
  for (const src of batch.sources) {
    try {
      const out = zlib.inflateRawSync(src, {
        finishFlush: zlib.constants.Z_SYNC_FLUSH,
        maxOutputLength: batch.clusterSize,
        chunkSize: Math.max(batch.clusterSize, 64),
      });
      if (out.length !== batch.clusterSize) outs.push(null);
      else {
        const copy = new Uint8Array(out);
        outs.push(copy);
        transfer.push(copy.buffer);
      }
    } catch {
      outs.push(null); // the caller retries these itself (over-long streams are legal)
    }
  }
  parentPort!.postMessage({ id: batch.id, outs }, transfer);
});
