// NodeZlibInflater.inflateMany, from the built package (the worker is a built file): the same
// clusters as inflating one by one, whether a stream is good, bad or inflates past one cluster.

import zlib from "node:zlib";
import { expect, it } from "vitest";
import { rng } from "../helpers/qemu.js";

it("inflateMany (worker pool) gives what inflate gives, batch after batch", async () => {
  const { NodeZlibInflater } = (await import("../../build/codecs/node-zlib.js")) as typeof import("../../ts/codecs/node-zlib.js");
  const inflater = new NodeZlibInflater();
  const cs = 65536;
  const rand = rng(5);
  for (let round = 0; round < 3; round++) {
    const jobs: Array<{ src: Uint8Array; dst: Uint8Array }> = [];
    const expected: Array<Uint8Array | undefined> = [];
    for (let k = 0; k < 40; k++) {
      const cluster = new Uint8Array(cs);
      for (let i = 0; i < cs; i++) cluster[i] = rand() < 0.7 ? 32 + (i % 7) : (rand() * 256) | 0;
      let src: Uint8Array = zlib.deflateRawSync(cluster, { windowBits: 12, memLevel: 9 });
      let want: Uint8Array | undefined = cluster;
      if (k % 13 === 5) {
        src = src.slice(0, 100); // truncated: cannot fill the cluster
        want = undefined;
      }
      if (k % 17 === 3) {
        // A stream that goes on past the cluster: the first cluster is what counts.
        const longer = new Uint8Array(cs * 2);
        longer.set(cluster);
        src = zlib.deflateRawSync(longer, { windowBits: 12, memLevel: 9 });
      }
      jobs.push({ src, dst: new Uint8Array(cs) });
      expected.push(want);
    }
    const ok = await inflater.inflateMany(jobs);
    jobs.forEach((j, k) => {
      expect(ok[k], `cluster ${k}`).toBe(expected[k] !== undefined);
      if (expected[k]) expect(Buffer.from(j.dst).equals(Buffer.from(expected[k]!))).toBe(true);
    });
  }
});

it("deflateMany (worker pool) gives what deflate gives: the same bytes, undefined when not shorter", async () => {
  const { NodeZlibDeflater } = (await import("../../build/codecs/node-zlib.js")) as typeof import("../../ts/codecs/node-zlib.js");
  const deflater = new NodeZlibDeflater();
  const cs = 65536;
  const rand = rng(9);
  for (let round = 0; round < 3; round++) {
    const clusters: Uint8Array[] = [];
    for (let k = 0; k < 37; k++) {
      const cluster = new Uint8Array(cs);
      // Text-like, random (does not shrink), or zeros.
      const kind = k % 3;
      for (let i = 0; i < cs; i++) cluster[i] = kind === 0 ? 97 + ((rand() * rand() * 26) | 0) : kind === 1 ? (rand() * 256) | 0 : 0;
      clusters.push(cluster);
    }
    const packed = await deflater.deflateMany(clusters, cs);
    clusters.forEach((c, k) => {
      const want = deflater.deflate(c, cs);
      if (want === undefined) expect(packed[k], `cluster ${k}`).toBeUndefined();
      else expect(Buffer.from(packed[k]!).equals(Buffer.from(want)), `cluster ${k}`).toBe(true);
    });
  }
});
