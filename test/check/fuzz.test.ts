// Seeded mutation fuzzing of check and repair. qemu-made images get 1..6 changes in the header,
// the L1/L2 tables, the refcount table and blocks or the snapshot table: a random byte, a flipped
// bit, or a whole 64-bit entry replaced by an interesting value (0, an offset past the end, into
// the header, unaligned, huge). Each mutant is checked, repaired (`all`) and checked again; every
// step must end in a report or a Qcow2Error within a time bound, the report must not depend on the
// batch size, and a completed repair must report what a fresh check then finds.
// QCOW2_LONG=1 runs ten times as many cases; QCOW2_FUZZ_SEED picks another seed.

import { expect, it } from "vitest";
import { spawnSync } from "node:child_process";
import { writeFileSync } from "node:fs";
import { checkExitCode, checkImage, checkToQemuJson, type CheckReport } from "../../ts/check/check.js";
import { Qcow2Error } from "../../ts/errors.js";
import { MemoryBackend } from "../../ts/io/memory.js";
import { ImageBytes } from "./damage.js";
import { describeQemu, qemuImg, qemuIo, rng, tempDir } from "../helpers/qemu.js";
import path from "node:path";

const LONG = Boolean(process.env.QCOW2_LONG);
const SEED = Number(process.env.QCOW2_FUZZ_SEED ?? 0xc4ec);
/** Cases per base image: 5 images × 400 = 2000 by default. */
const CASES = LONG ? 4000 : 400;
/** A hang detector, not a speed test: no case may take anywhere near this long. */
const CASE_TIME_LIMIT_MS = 10_000;
/** Every this many cases, the mutant also goes through qemu-img check. */
const QEMU_EVERY = LONG ? 40 : 10;

interface Base {
  name: string;
  bytes: Uint8Array;
  /** [start, length] of each metadata structure worth mutating. */
  regions: Array<[number, number]>;
}

function regionsOf(img: ImageBytes): Array<[number, number]> {
  const h = img.h;
  const cs = img.cs;
  const out: Array<[number, number]> = [
    [0, 512],
    [h.l1TableOffset, h.l1Size * 8],
    [h.refcountTableOffset, Math.min(h.refcountTableClusters * cs, 4096)],
  ];
  for (let i = 0; i < h.l1Size; i++) {
    const l2 = img.offsetOf(img.u64(h.l1TableOffset + i * 8));
    if (l2) out.push([l2, cs]);
  }
  const block = Number(img.u64(h.refcountTableOffset) & ~0x1ffn);
  if (block) out.push([block, cs]);
  if (h.nbSnapshots) out.push([h.snapshotsOffset, 256]);
  return out;
}

function interesting(img: ImageBytes, rand: () => number): bigint {
  const cs = BigInt(img.cs);
  const end = BigInt(img.buf.length);
  const choices = [
    0n,
    1n,
    0x8000000000000000n | cs,
    0x8000000000000000n | (end + cs * 3n),
    end,
    cs + 0x200n,
    BigInt(img.h.l1TableOffset),
    BigInt(img.h.refcountTableOffset),
    0x4000000000000000n | (end - 100n),
    0x00fffffffffffe00n,
    0xffffffffffffffffn,
    0x7fffffffffffffffn,
    BigInt(Math.floor(rand() * 2 ** 32)) * cs,
  ];
  return choices[Math.floor(rand() * choices.length)]!;
}

function mutate(base: Base, rand: () => number): Uint8Array {
  const img = new ImageBytes(base.bytes);
  const count = 1 + Math.floor(rand() * 6);
  for (let k = 0; k < count; k++) {
    const [start, length] = base.regions[Math.floor(rand() * base.regions.length)]!;
    const r = rand();
    if (r < 0.4) {
      const pos = (start + Math.floor(rand() * (length / 8)) * 8) & ~7;
      if (pos + 8 <= img.buf.length) img.setU64(pos, interesting(img, rand));
    } else if (r < 0.7) {
      const pos = start + Math.floor(rand() * length);
      if (pos < img.buf.length) img.buf[pos]! ^= 1 << Math.floor(rand() * 8);
    } else {
      const pos = start + Math.floor(rand() * length);
      if (pos < img.buf.length) img.buf[pos] = Math.floor(rand() * 256);
    }
  }
  return new Uint8Array(img.buf);
}

async function withinLimit<T>(what: string, work: Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const limit = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: still running after ${CASE_TIME_LIMIT_MS} ms`)), CASE_TIME_LIMIT_MS);
  });
  try {
    return await Promise.race([work, limit]);
  } finally {
    clearTimeout(timer);
  }
}

/** A report, or the Qcow2Error that refused the image; anything else is a bug. */
async function tryCheck(bytes: Uint8Array, options: Parameters<typeof checkImage>[1]): Promise<CheckReport | Qcow2Error> {
  try {
    return await checkImage(new MemoryBackend(bytes, { name: "fuzz" }), options);
  } catch (err) {
    if (err instanceof Qcow2Error) return err;
    throw err;
  }
}

describeQemu("check and repair on mutated images", () => {
  const dir = tempDir("qcow2-checkfuzz-");
  const bases: Base[] = [];
  const make = (name: string, options: string, size: string, io: string[], after?: (file: string) => void): void => {
    const file = path.join(dir, `${name}.qcow2`);
    qemuImg(["create", "-f", "qcow2", "-o", options, file, size]);
    qemuIo(file, io);
    after?.(file);
    const img = new ImageBytes(file);
    bases.push({ name, bytes: new Uint8Array(img.buf), regions: regionsOf(img) });
  };
  make("v3-4k", "cluster_size=4096", "2M", ["write -P 1 0 40k", "write -z 100k 8k", "discard 8k 4k", "write -P 2 1M 12k"]);
  make("v2-512", "compat=0.10,cluster_size=512", "1M", ["write -P 3 0 6k", "write -P 4 300k 2k"]);
  make("refbits1-4k", "cluster_size=4096,refcount_bits=1", "2M", ["write -P 5 0 24k", "write -P 6 1M 4k"]);
  make("refbits64-4k", "cluster_size=4096,refcount_bits=64", "2M", ["write -P 7 0 24k"]);
  make("snapshot-4k", "cluster_size=4096", "2M", ["write -P 8 0 32k"], (file) => {
    qemuImg(["snapshot", "-c", "one", file]);
    qemuIo(file, ["write -P 9 4k 8k", "write -c 64k 4k"]);
  });

  it(`${CASES} mutants of each of 5 images end in a report or a Qcow2Error (seed ${SEED})`, async () => {
    expect(bases.length).toBe(5);
    let reports = 0;
    let refused = 0;
    let repaired = 0;
    let compared = 0;
    for (const [b, base] of bases.entries()) {
      const rand = rng(SEED + b);
      for (let i = 0; i < CASES; i++) {
        const bytes = mutate(base, rand);
        const where = `seed ${SEED} image ${base.name} case ${i}`;
        const first = await withinLimit(where, tryCheck(bytes.slice(), {}));
        if (i % QEMU_EVERY === 0) {
          // Differential: the same verdict as qemu-img check on this mutant.
          const file = path.join(dir, "mutant.qcow2");
          writeFileSync(file, bytes);
          const q = spawnSync("qemu-img", ["check", "--output=json", file], { encoding: "utf8", timeout: 20_000 });
          if (q.status !== null) {
            compared++;
            if (first instanceof Qcow2Error) {
              // Without the magic, qemu probes the file as raw, which has no check.
              expect(q.status, `${where}: we refused (${first.message})`).toBe(first.code === "BAD_MAGIC" ? 63 : 1);
            } else {
              const theirs = q.stdout.trim() ? (JSON.parse(q.stdout) as Record<string, unknown>) : undefined;
              if (theirs) theirs.filename = "fuzz";
              const ours = first.failure === undefined ? checkToQemuJson(first) : undefined;
              // QCOW2_FUZZ_KEEP=dir keeps a mutant on which the two tools disagree.
              const keep = process.env.QCOW2_FUZZ_KEEP;
              if (keep && (checkExitCode(first) !== q.status || JSON.stringify(ours) !== JSON.stringify(theirs))) {
                writeFileSync(path.join(keep, `${base.name}-${SEED}-${i}.qcow2`), bytes);
              }
              expect({ status: checkExitCode(first), json: ours }, where).toEqual({ status: q.status, json: theirs });
            }
          }
        }
        if (first instanceof Qcow2Error) {
          refused++;
          continue;
        }
        reports++;
        // Batching never changes the report.
        if (i % 8 === 0) {
          const small = await withinLimit(where, tryCheck(bytes.slice(), { batchBytes: 512 }));
          expect(small, where).toEqual(first);
        }
        if (checkExitCode(first) === 0) continue;
        const copy = bytes.slice();
        const backend = new MemoryBackend(copy, { name: "fuzz" });
        const fixed = await withinLimit(where, checkImage(backend, { repair: "all" }).catch((e: unknown) => e));
        if (fixed instanceof Error) {
          expect(fixed, where).toBeInstanceOf(Qcow2Error);
          continue;
        }
        const fixedReport = fixed as CheckReport;
        if (fixedReport.failure !== undefined) continue;
        repaired++;
        // What the repair reports is what a fresh check of the repaired image finds.
        const after = await withinLimit(where, tryCheck(backend.bytes().slice(), {}));
        expect(after instanceof Qcow2Error ? after.message : checkExitCode(after), where).toBe(checkExitCode(fixedReport));
      }
    }
    console.log(`check fuzz: ${reports} reports, ${refused} refused at open, ${repaired} repairs completed, ${compared} compared with qemu-img`);
    expect(reports).toBeGreaterThan(CASES);
  }, 600_000);
});
