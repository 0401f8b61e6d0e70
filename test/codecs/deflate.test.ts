// The two cluster inflaters (pako's port and node:zlib) against each other and against qemu's rule
// for compressed clusters (block/qcow2-threads.c qcow2_zlib_decompress): the stream must produce one
// full cluster; bytes after the stream are ignored; output past one cluster is never produced.

import zlib from "node:zlib";
import { describe, it, expect } from "vitest";
import { PakoInflater, type ClusterInflater } from "../../ts/codecs/deflate.js";
import { NodeZlibInflater } from "../../ts/codecs/node-zlib.js";
import { randomBytes, rng } from "../helpers/qemu.js";

const INFLATERS: [string, () => ClusterInflater][] = [
  ["PakoInflater", () => new PakoInflater()],
  ["NodeZlibInflater", () => new NodeZlibInflater()],
];

/** How qemu writes a compressed cluster: raw deflate, 4 KiB window. */
function deflateCluster(data: Uint8Array, options: zlib.ZlibOptions = {}): Uint8Array {
  return zlib.deflateRawSync(data, { windowBits: 12, memLevel: 9, ...options });
}

/**
 * Compressible but not trivial: a mix of zero runs, repeats of earlier bytes (within and beyond
 * the 4 KiB window), text-like bytes from a small alphabet, and incompressible stretches.
 */
function clusterData(rand: () => number, size: number): Uint8Array {
  const out = new Uint8Array(size);
  let i = 0;
  while (i < size) {
    const n = Math.min(size - i, 1 + Math.floor(rand() * 700));
    const kind = rand();
    if (kind < 0.2) {
      // zeros: already there
    } else if (kind < 0.5 && i > 0) {
      const from = Math.max(0, i - 1 - Math.floor(rand() * Math.min(i, 8192)));
      for (let k = 0; k < n; k++) out[i + k] = out[from + (k % (i - from))]!;
    } else if (kind < 0.85) {
      for (let k = 0; k < n; k++) out[i + k] = 0x61 + Math.floor(rand() * rand() * 26);
    } else {
      out.set(randomBytes(rand, n), i);
    }
    i += n;
  }
  return out;
}

function concat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  return Buffer.from(a.buffer, a.byteOffset, a.length).equals(b);
}

/** Bytes a stream prefix can produce at most (what a sync-flushed inflate gets out of it). */
function producible(src: Uint8Array): number {
  try {
    return zlib.inflateRawSync(src, { finishFlush: zlib.constants.Z_SYNC_FLUSH }).length;
  } catch {
    return 0;
  }
}

const CLUSTER_SIZES = Array.from({ length: 13 }, (_, i) => 512 << i); // 512 B .. 2 MiB

describe("cluster inflaters agree with each other and with qemu's rule", () => {
  for (const [name, make] of INFLATERS) {
    describe(name, () => {
      const inflater = make();

      it("inflates a full cluster exactly, every cluster size and several deflate settings", () => {
        const rand = rng(1);
        for (const clusterSize of CLUSTER_SIZES) {
          const settings: zlib.ZlibOptions[] =
            clusterSize <= 65536
              ? [{}, { level: 0 }, { level: 1 }, { level: 9 }, { strategy: zlib.constants.Z_HUFFMAN_ONLY },
                 { strategy: zlib.constants.Z_RLE }, { strategy: zlib.constants.Z_FIXED }]
              : [{}];
          const data = clusterData(rand, clusterSize);
          for (const options of settings) {
            const src = deflateCluster(data, options);
            const dst = new Uint8Array(clusterSize).fill(0xcc);
            expect(inflater.inflate(src, dst), `cluster ${clusterSize} ${JSON.stringify(options)}`).toBe(true);
            expect(sameBytes(dst, data), `cluster ${clusterSize} ${JSON.stringify(options)}`).toBe(true);
          }
        }
      });

      it("inflates all-zero and incompressible clusters", () => {
        const rand = rng(2);
        for (const clusterSize of [512, 4096, 65536, 2 << 20]) {
          for (const data of [new Uint8Array(clusterSize), randomBytes(rand, clusterSize)]) {
            const dst = new Uint8Array(clusterSize).fill(0xcc);
            expect(inflater.inflate(deflateCluster(data), dst)).toBe(true);
            expect(sameBytes(dst, data)).toBe(true);
          }
        }
      });

      it("ignores bytes after the end of the stream (the rest of the last sector)", () => {
        const rand = rng(3);
        for (const clusterSize of [512, 4096, 65536]) {
          const data = clusterData(rand, clusterSize);
          const src = deflateCluster(data);
          for (const tail of [randomBytes(rand, 1), randomBytes(rand, 511), new Uint8Array(512), src]) {
            const dst = new Uint8Array(clusterSize);
            expect(inflater.inflate(concat(src, tail), dst), `cluster ${clusterSize} + ${tail.length} bytes`).toBe(true);
            expect(sameBytes(dst, data)).toBe(true);
          }
        }
      });

      it("refuses a truncated stream that cannot fill the cluster", () => {
        const rand = rng(4);
        for (const clusterSize of [512, 4096, 65536, 1 << 20]) {
          const data = clusterData(rand, clusterSize);
          const src = deflateCluster(data);
          for (const cut of [0, 1, 2, Math.floor(src.length / 4), Math.floor(src.length / 2), src.length - 64]) {
            const prefix = src.subarray(0, cut);
            expect(producible(prefix), `precondition: ${cut} of ${src.length} bytes`).toBeLessThan(clusterSize);
            expect(inflater.inflate(prefix, new Uint8Array(clusterSize)), `cut at ${cut} of ${src.length}`).toBe(false);
          }
        }
      });

      it("a stream shorter than the cluster is refused", () => {
        const rand = rng(5);
        for (const clusterSize of [512, 65536]) {
          for (const short of [0, 1, clusterSize - 1]) {
            const src = deflateCluster(clusterData(rand, short));
            expect(inflater.inflate(src, new Uint8Array(clusterSize)), `${short} bytes into ${clusterSize}`).toBe(false);
          }
        }
      });

      it("keeps the first cluster of a stream that inflates to more", () => {
        const rand = rng(6);
        for (const clusterSize of [512, 4096, 65536, 2 << 20]) {
          for (const extra of [1, 100, clusterSize]) {
            const data = clusterData(rand, clusterSize + extra);
            const dst = new Uint8Array(clusterSize).fill(0xcc);
            expect(inflater.inflate(deflateCluster(data), dst), `${clusterSize} + ${extra}`).toBe(true);
            expect(sameBytes(dst, data.subarray(0, clusterSize)), `${clusterSize} + ${extra}`).toBe(true);
          }
        }
      });

      it("returns false on garbage and never throws; still works afterwards", () => {
        const rand = rng(7);
        const good = clusterData(rand, 65536);
        const goodSrc = deflateCluster(good);
        const garbage: Uint8Array[] = [
          new Uint8Array(0),
          new Uint8Array([0xff]),
          new Uint8Array(100).fill(0xff),
          // Reserved block type 3.
          new Uint8Array([0x07, 0, 0, 0]),
          // Stored block whose LEN and NLEN disagree.
          new Uint8Array([0x01, 0x00, 0x02, 0x00, 0x00, 0x00]),
          // A zlib-wrapped stream is not raw deflate.
          zlib.deflateSync(good),
          // Written with a preset dictionary: its distances reach before the start of the output.
          deflateCluster(concat(good.subarray(0, 4096), good), { dictionary: good.subarray(0, 4096) }),
        ];
        for (let i = 0; i < 300; i++) garbage.push(randomBytes(rand, 1 + Math.floor(rand() * 2000)));
        for (const clusterSize of [4096, 65536]) {
          for (const [i, src] of garbage.entries()) {
            let result: boolean | undefined;
            expect(() => {
              result = inflater.inflate(src, new Uint8Array(clusterSize));
            }, `garbage ${i}`).not.toThrow();
            expect(result, `garbage ${i} (${src.length} bytes) into ${clusterSize}`).toBe(false);
          }
        }
        const dst = new Uint8Array(65536);
        expect(inflater.inflate(goodSrc, dst)).toBe(true);
        expect(sameBytes(dst, good)).toBe(true);
      });
    });
  }

  it("both give the same answer and bytes on random streams, prefixes and tails", () => {
    const rand = rng(8);
    const [pako, node] = INFLATERS.map(([, make]) => make()) as [ClusterInflater, ClusterInflater];
    let accepted = 0;
    for (let i = 0; i < 300; i++) {
      const clusterSize = 512 << Math.floor(rand() * 8);
      const length = Math.floor(clusterSize * (0.5 + rand()));
      let src = deflateCluster(clusterData(rand, length), { level: Math.floor(rand() * 10) });
      const r = rand();
      if (r < 0.3) src = src.subarray(0, Math.floor(rand() * src.length));
      else if (r < 0.5) src = concat(src, randomBytes(rand, Math.floor(rand() * 600)));
      else if (r < 0.6) {
        src = src.slice();
        src[Math.floor(rand() * src.length)] ^= 1 << Math.floor(rand() * 8);
      }
      const a = new Uint8Array(clusterSize).fill(0xcc);
      const b = new Uint8Array(clusterSize).fill(0xcc);
      const okA = pako.inflate(src, a);
      const okB = node.inflate(src, b);
      expect(okB, `case ${i}: ${src.length} bytes into ${clusterSize}`).toBe(okA);
      if (okA) {
        accepted++;
        expect(sameBytes(a, b), `case ${i}`).toBe(true);
      }
    }
    expect(accepted).toBeGreaterThan(50);
    expect(accepted).toBeLessThan(300);
  });
});
