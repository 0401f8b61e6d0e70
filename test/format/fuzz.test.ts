// Seeded mutation fuzzing of the open and read paths. Images made by qemu-img/qemu-io get 1..8
// random bytes changed, either in cluster 0 (header, extensions, backing name) or in the L1/L2
// tables; each mutant is opened, read and mapped. Every case must end in success or a Qcow2Error,
// within a time bound, without runaway memory. QCOW2_LONG=1 runs ten times as many cases;
// QCOW2_FUZZ_SEED picks another seed (failures print the seed, image, region and case index).

import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import path from "node:path";
import { beforeAll, describe, expect, it } from "vitest";
import { MemoryBackend, Qcow2Error, Qcow2Image } from "../../ts/node.js";
import { parseHeader } from "../../ts/format/header.js";
import { describeQemu, qemuImg, qemuIo, rng, tempDir } from "../helpers/qemu.js";

const LONG = Boolean(process.env.QCOW2_LONG);
const SEED = Number(process.env.QCOW2_FUZZ_SEED ?? 0x9c0f2);
/** Cases per image and region: 7 images × 2 regions × 500 = 7000 by default. */
const CASES = LONG ? 5000 : 500;
/** No single case may take longer than this (checked between library calls). */
const CASE_TIME_LIMIT_MS = 2000;
/** Peak resident-set growth allowed over the whole run: one case may legitimately hold a 32 MiB
 * L1 and a 32 MiB L2 cache (qemu's limits), a few may be alive before the GC runs. */
const RSS_GROWTH_LIMIT = 768 * 1024 * 1024;
/** Guest bytes read and mapped per window. The base images are at most 4 MiB and are read whole;
 * a mutant whose size grew past two windows gets one window at its start and one at its end. */
const WINDOW = 4 * 1024 * 1024;
const CHUNK = 64 * 1024;

interface BaseImage {
  name: string;
  bytes: Uint8Array;
  clusterSize: number;
  /** Byte ranges of the L1 table and every L2 table the L1 points to. */
  tables: Array<[start: number, length: number]>;
}

interface Mutation {
  offset: number;
  value: number;
}

interface Failure {
  seed: number;
  image: string;
  region: string;
  index: number;
  mutations: Mutation[];
  error: string;
}

const INTERESTING = [0x00, 0xff, 0x7f, 0x80, 0x01, 0x20, 0x40, 0xfe];

/** The L1 table and the L2 tables it points at, from the unmutated image. */
function tableRanges(bytes: Uint8Array): Array<[number, number]> {
  const h = parseHeader(bytes.subarray(0, 2 ** new DataView(bytes.buffer, bytes.byteOffset).getUint32(20)));
  const clusterSize = 2 ** h.clusterBits;
  const ranges: Array<[number, number]> = [[h.l1TableOffset, h.l1Size * 8]];
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  for (let i = 0; i < h.l1Size; i++) {
    const pos = h.l1TableOffset + i * 8;
    if (pos + 8 > bytes.length) break;
    const l2Offset = (dv.getUint32(pos) & 0x00ffffff) * 2 ** 32 + ((dv.getUint32(pos + 4) & 0xfffffe00) >>> 0);
    if (l2Offset !== 0 && l2Offset + clusterSize <= bytes.length) ranges.push([l2Offset, clusterSize]);
  }
  return ranges;
}

/** 1..8 byte changes: a random byte, one flipped bit, or an interesting value. */
function mutate(base: BaseImage, region: "header" | "tables", rand: () => number): { bytes: Uint8Array; mutations: Mutation[] } {
  const bytes = base.bytes.slice();
  const count = 1 + Math.floor(rand() * 8);
  const mutations: Mutation[] = [];
  for (let k = 0; k < count; k++) {
    let offset: number;
    if (region === "header") {
      // Mostly the bytes that mean something: header, extensions, backing name.
      const span = rand() < 0.8 ? Math.min(base.clusterSize, 1024) : base.clusterSize;
      offset = Math.floor(rand() * span);
    } else {
      const [start, length] = base.tables[Math.floor(rand() * base.tables.length)]!;
      offset = start + Math.floor(rand() * length);
    }
    const old = bytes[offset]!;
    const pick = rand();
    const value =
      pick < 0.45 ? Math.floor(rand() * 256) : pick < 0.8 ? old ^ (1 << Math.floor(rand() * 8)) : INTERESTING[Math.floor(rand() * INTERESTING.length)]!;
    bytes[offset] = value;
    mutations.push({ offset, value });
  }
  return { bytes, mutations };
}

class CaseTimeout extends Error {}

/** Open, read and map one mutant; throws whatever the library throws. */
async function exercise(bytes: Uint8Array, deadline: number): Promise<string> {
  const check = (): void => {
    if (performance.now() > deadline) throw new CaseTimeout(`case exceeded ${CASE_TIME_LIMIT_MS} ms`);
  };
  const image = await Qcow2Image.open(new MemoryBackend(bytes, { readOnly: true }), { backing: "none" });
  try {
    check();
    const size = image.virtualSize;
    const windows: Array<[number, number]> =
      size <= 2 * WINDOW ? [[0, size]] : [
        [0, WINDOW],
        [size - WINDOW, WINDOW],
      ];
    const buffer = new Uint8Array(CHUNK);
    for (const [start, length] of windows) {
      for (let pos = start; pos < start + length; pos += CHUNK) {
        const n = Math.min(CHUNK, start + length - pos);
        await image.read(pos, n === CHUNK ? buffer : buffer.subarray(0, n));
        check();
      }
      let covered = 0;
      for await (const extent of image.extents({ start, length })) {
        if (extent.start !== start + covered || extent.length <= 0) {
          throw new Error(`extents: ${JSON.stringify(extent)} does not continue at ${start + covered}`);
        }
        covered += extent.length;
        check();
      }
      if (covered !== length) throw new Error(`extents covered ${covered} of ${length} bytes`);
    }
    return "ok";
  } finally {
    await image.close();
  }
}

describeQemu("mutation fuzzing of open, read and extents", () => {
  const dir = tempDir("qcow2-fuzz-");
  const at = (name: string): string => path.join(dir, name);
  const images: BaseImage[] = [];

  beforeAll(() => {
    const make = (name: string, size: string, options: string[], io: string[] = [], extra: string[] = []): void => {
      qemuImg(["create", "-q", "-f", "qcow2", ...(options.length ? ["-o", options.join(",")] : []), ...extra, at(name), size]);
      if (io.length) qemuIo(at(name), io);
    };
    make("v3-64k.qcow2", "4M", [], ["write -P 0xaa 0 100k", "write -z 1M 128k", "write -P 0x55 3M 64k", "discard 64k 64k"]);
    make("v3-4k.qcow2", "2M", ["cluster_size=4k"], ["write -P 0x11 0 20k", "write -z 200k 64k", "write -P 0x22 1M 8k", "write -P 0x33 2044k 4k"]);
    make("v2-512.qcow2", "1M", ["compat=0.10", "cluster_size=512"], ["write -P 0x44 0 10k", "write -P 0x45 600k 3k"]);
    // Compressed clusters (deflate), 8 KiB clusters.
    qemuImg(["convert", "-q", "-c", "-O", "qcow2", "-o", "cluster_size=8k", at("v3-4k.qcow2"), at("compressed.qcow2")]);
    // An overlay over a backing file (opened with backing: "none"), and one whose backing was removed.
    make("base.qcow2", "4M", [], ["write -P 0x66 0 1M"]);
    make("overlay.qcow2", "4M", ["cluster_size=16k"], ["write -P 0x77 512k 100k"], ["-b", "base.qcow2", "-F", "qcow2"]);
    make("unbacked.qcow2", "3M", ["cluster_size=32k"], ["write -P 0x78 0 64k", "write -P 0x79 2M 32k"], ["-b", "base.qcow2", "-F", "qcow2"]);
    qemuImg(["rebase", "-u", "-b", "", at("unbacked.qcow2")]);
    // An internal snapshot (snapshot table, shared clusters) and writes after it.
    make("snapshot.qcow2", "2M", ["cluster_size=4k", "lazy_refcounts=on"], ["write -P 0x88 0 16k"]);
    qemuImg(["snapshot", "-c", "snap1", at("snapshot.qcow2")]);
    qemuIo(at("snapshot.qcow2"), ["write -P 0x99 4k 4k"]);

    for (const name of ["v3-64k", "v3-4k", "v2-512", "compressed", "overlay", "unbacked", "snapshot"]) {
      const bytes = new Uint8Array(readFileSync(at(`${name}.qcow2`)));
      const h = parseHeader(bytes.subarray(0, 2 ** new DataView(bytes.buffer).getUint32(20)));
      images.push({ name, bytes, clusterSize: 2 ** h.clusterBits, tables: tableRanges(bytes) });
    }
  });

  it("the unmutated images read exactly as qemu reads them", async () => {
    for (const base of images) {
      const raw = at(`${base.name}.raw`);
      // Backing "none" reads unallocated clusters as zeros: compare with qemu on an unbacked copy.
      const flat = at(`${base.name}.flat.qcow2`);
      execFileSync("cp", [at(`${base.name}.qcow2`), flat]);
      qemuImg(["rebase", "-u", "-b", "", flat]);
      qemuImg(["convert", "-O", "raw", flat, raw]);
      const expected = new Uint8Array(readFileSync(raw));
      await using image = await Qcow2Image.open(new MemoryBackend(base.bytes.slice()), { backing: "none" });
      const got = await image.read(0, image.virtualSize);
      // Buffer.equals: vitest's deep equality takes seconds on megabytes.
      expect(Buffer.from(got).equals(expected), base.name).toBe(true);
      expect(base.tables.length, `${base.name} has L2 tables to mutate`).toBeGreaterThan(1);
    }
  });

  it(
    `${CASES * 2} mutants per image (seed ${SEED}) end in success or a Qcow2Error`,
    async () => {
      const failures: Failure[] = [];
      const outcomes = new Map<string, number>();
      const rssBaseline = process.memoryUsage().rss;
      let rssPeak = rssBaseline;
      let slowest = { ms: 0, where: "" };
      let total = 0;
      const started = performance.now();

      for (const [imageIndex, base] of images.entries()) {
        for (const region of ["header", "tables"] as const) {
          for (let index = 0; index < CASES; index++) {
            // One generator per case: a case replays alone from (seed, image, region, index).
            const caseSeed = (SEED ^ Math.imul(imageIndex + 1, 0x9e3779b1) ^ Math.imul(index + 1, 0x85ebca6b) ^ (region === "tables" ? 0x5bd1e995 : 0)) >>> 0;
            const { bytes, mutations } = mutate(base, region, rng(caseSeed));
            const t0 = performance.now();
            let outcome: string;
            try {
              outcome = await exercise(bytes, t0 + CASE_TIME_LIMIT_MS);
            } catch (err) {
              if (err instanceof Qcow2Error) {
                outcome = err.code;
              } else {
                outcome = "FAILED";
                if (failures.length < 20) {
                  failures.push({
                    seed: SEED,
                    image: base.name,
                    region,
                    index,
                    mutations,
                    error: err instanceof Error ? `${err.constructor.name}: ${err.message}` : String(err),
                  });
                }
              }
            }
            const ms = performance.now() - t0;
            if (ms > slowest.ms) slowest = { ms, where: `${base.name}/${region}/${index}` };
            outcomes.set(outcome, (outcomes.get(outcome) ?? 0) + 1);
            total++;
            if ((index & 15) === 0) rssPeak = Math.max(rssPeak, process.memoryUsage().rss);
          }
        }
      }

      const summary = {
        seed: SEED,
        cases: total,
        seconds: Math.round(performance.now() - started) / 1000,
        slowestCaseMs: Math.round(slowest.ms),
        slowestCase: slowest.where,
        rssGrowthMiB: Math.round((rssPeak - rssBaseline) / 1048576),
        outcomes: Object.fromEntries([...outcomes].sort()),
      };
      console.log(`fuzz: ${JSON.stringify(summary)}`);

      expect(failures, `non-Qcow2Error outcomes (reproduce with QCOW2_FUZZ_SEED=${SEED})`).toEqual([]);
      expect(slowest.ms, `slowest case ${slowest.where}`).toBeLessThan(CASE_TIME_LIMIT_MS);
      expect(rssPeak - rssBaseline).toBeLessThan(RSS_GROWTH_LIMIT);
      expect(total).toBe(images.length * 2 * CASES);
      // The fuzzer must reach past the header checks: plenty of mutants open and read fine, and
      // the read path (CORRUPT, BAD_COMPRESSED_DATA) is exercised too.
      expect(outcomes.get("ok") ?? 0).toBeGreaterThan(total / 10);
      expect(outcomes.get("CORRUPT") ?? 0).toBeGreaterThan(0);
      expect(outcomes.get("BAD_COMPRESSED_DATA") ?? 0).toBeGreaterThan(0);
    },
    LONG ? 900_000 : 60_000,
  );
});

// Hostile inputs found while writing the fuzzer, kept as regressions: each used to escape as a
// RangeError from the backend ("read: range ... is past 2^53") instead of a Qcow2Error.
describe("fuzzer finds", () => {
  /** A tiny valid v3 image: 64 KiB clusters, 4 MiB, L1 at 0x30000 → L2 at 0x40000 → data at 0x50000. */
  function image(): { bytes: Uint8Array; dv: DataView } {
    const bytes = new Uint8Array(0x60000);
    const dv = new DataView(bytes.buffer);
    dv.setUint32(0, 0x514649fb);
    dv.setUint32(4, 3);
    dv.setUint32(20, 16);
    dv.setBigUint64(24, 4n << 20n);
    dv.setUint32(36, 1);
    dv.setBigUint64(40, 0x30000n);
    dv.setBigUint64(48, 0x10000n);
    dv.setUint32(56, 1);
    dv.setUint32(96, 4);
    dv.setUint32(100, 112);
    dv.setBigUint64(0x30000, 0x8000000000040000n);
    dv.setBigUint64(0x40000, 0x8000000000050000n);
    bytes.fill(0xab, 0x50000);
    return { bytes, dv };
  }

  async function outcome(bytes: Uint8Array): Promise<Qcow2Error> {
    try {
      const img = await Qcow2Image.open(new MemoryBackend(bytes), { backing: "none" });
      await img.read(0, 65536);
      for await (const _ of img.extents()) void _;
      await img.close();
    } catch (err) {
      if (err instanceof Qcow2Error) return err;
      throw err;
    }
    throw new Error("expected a Qcow2Error");
  }

  it("the base image opens and reads", async () => {
    const { bytes } = image();
    await using img = await Qcow2Image.open(new MemoryBackend(bytes), { backing: "none" });
    expect(await img.read(0, 16)).toEqual(new Uint8Array(16).fill(0xab));
  });

  it("an L1 table ending past 2^53 → BAD_HEADER", async () => {
    const { bytes, dv } = image();
    dv.setUint32(36, 8192);
    dv.setBigUint64(40, (1n << 53n) - 0x10000n);
    const err = await outcome(bytes);
    expect(err.code).toBe("BAD_HEADER");
    expect(err.message).toMatch(/l1_table_offset 0x1fffffffff0000 \+ 65536 bytes of table ends past 2\^53/);
  });

  it("a refcount table ending past 2^53 → BAD_HEADER", async () => {
    const { bytes, dv } = image();
    dv.setUint32(56, 2);
    dv.setBigUint64(48, (1n << 53n) - 0x10000n);
    const err = await outcome(bytes);
    expect(err.code).toBe("BAD_HEADER");
    expect(err.message).toMatch(/refcount_table_offset 0x1fffffffff0000 \+ 131072 bytes of table ends past 2\^53/);
  });

  it("an L2 table at 2^53 - cluster_size → CORRUPT", async () => {
    const { bytes, dv } = image();
    dv.setBigUint64(0x30000, 0x8000000000000000n | ((1n << 53n) - 0x10000n));
    const err = await outcome(bytes);
    expect(err.code).toBe("CORRUPT");
    expect(err.message).toMatch(/L2 table offset 0x1fffffffff0000 at L1 index 0 ends past 2\^53/);
  });

  it("a data cluster at 2^53 - cluster_size → CORRUPT", async () => {
    const { bytes, dv } = image();
    dv.setBigUint64(0x40000, 0x8000000000000000n | ((1n << 53n) - 0x10000n));
    const err = await outcome(bytes);
    expect(err.code).toBe("CORRUPT");
    expect(err.message).toMatch(/entry 0: host offset 0x1fffffffff0000 \(with the bytes it maps\) reaches 2\^53/);
  });

  it("a run of data clusters whose last one ends at 2^53 → CORRUPT", async () => {
    const { bytes, dv } = image();
    dv.setBigUint64(0x40000, 0x8000000000000000n | ((1n << 53n) - 0x20000n));
    dv.setBigUint64(0x40008, 0x8000000000000000n | ((1n << 53n) - 0x10000n));
    const img = await Qcow2Image.open(new MemoryBackend(bytes), { backing: "none" });
    expect((await img.read(0, 65536)).length).toBe(65536);
    await expect(img.read(0, 131072)).rejects.toMatchObject({ code: "CORRUPT" });
    await img.close();
  });
});
