// NodeZlibInflater.inflateMany, from the built package (the worker is a built file): the same
// clusters as inflating one by one, whether a stream is good, bad or inflates past one cluster.

import zlib from "node:zlib";
import { expect, it } from "vitest";
import { rng } from "../helpers/qemu.js";

it("inflateMany (main thread + worker) gives what inflate gives, batch after batch", async () => {
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
