// qcow2-img compare against qemu-img compare on the same pairs of files: stdout byte for byte
// (verdicts, mismatch offsets, size warnings, strict-mode block status, progress), stderr and
// exit codes; qcow2 v2/v3 of several cluster sizes, compressed, zero clusters, backing chains,
// raw files (sparse, odd-sized) and mixtures, in both orders.

import { spawnSync } from "node:child_process";
import { copyFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { beforeAll, expect, it } from "vitest";
import { UsageError } from "../../ts/cli/args.js";
import { compare } from "../../ts/cli/compare.js";
import { runOurs, runQemuImg, type CliResult } from "../helpers/cli.js";
import { describeQemu, qemuImg, qemuIo, randomBytes, rng, tempDir } from "../helpers/qemu.js";

type Result = CliResult;

async function ours(args: string[]): Promise<Result> {
  return runOurs(compare, args);
}

function theirs(args: string[]): Result {
  return runQemuImg("compare", args);
}

describeQemu("qcow2-img compare", () => {
  const dir = tempDir("qcow2-clicmp-");
  const at = (name: string): string => path.join(dir, name);

  beforeAll(() => {
    const rand = rng(11);
    const src = at("random.src");
    writeFileSync(src, randomBytes(rand, 4 << 20));

    // The reference: data over several 2 MiB read pieces, a zero cluster, a compressed cluster.
    qemuImg(["create", "-f", "qcow2", at("a.qcow2"), "6M"]);
    qemuIo(at("a.qcow2"), [`write -s ${src} 0 3M`, "write -z 1M 64k", "write -c -P 0x5a 4M 64k", `write -s ${src} 5M 100k`]);
    qemuImg(["convert", "-O", "raw", at("a.qcow2"), at("a.raw")]);
    qemuImg(["convert", "-O", "qcow2", "-o", "compat=0.10,cluster_size=512", at("a.qcow2"), at("a-v2-512.qcow2")]);
    qemuImg(["convert", "-O", "qcow2", "-o", "cluster_size=2M", at("a.qcow2"), at("a-2m.qcow2")]);
    qemuImg(["convert", "-c", "-O", "qcow2", at("a.qcow2"), at("a-compressed.qcow2")]);
    copyFileSync(at("a.qcow2"), at("a-copy.qcow2"));

    // One changed byte each: in the first sector, mid-sector, in the second 2 MiB piece, where the
    // reference reads zeros (unallocated, zero cluster) and in the compressed cluster.
    for (const [name, offset] of [["first", 0], ["mid", 700], ["piece2", (2 << 20) + 4097], ["hole", 3.5 * 2 ** 20 + 5], ["zeroc", (1 << 20) + 1000], ["comp", (4 << 20) + 513]] as const) {
      copyFileSync(at("a.qcow2"), at(`x-${name}.qcow2`));
      qemuIo(at(`x-${name}.qcow2`), [`write -P 0xee ${offset} 1`]);
    }
    // Longer images: zeros past the end, then data past the end.
    copyFileSync(at("a.qcow2"), at("long.qcow2"));
    qemuImg(["resize", at("long.qcow2"), "9M"]);
    copyFileSync(at("long.qcow2"), at("long-data.qcow2"));
    qemuIo(at("long-data.qcow2"), ["write -P 1 8200k 1"]);
    qemuImg(["convert", "-O", "raw", at("long-data.qcow2"), at("long-data.raw")]);

    // The same bytes through a backing chain, the base shorter than the overlay.
    qemuImg(["create", "-f", "qcow2", at("base.qcow2"), "4M"]);
    qemuIo(at("base.qcow2"), [`write -s ${src} 0 3M`, "write -z 1M 64k"]);
    qemuImg(["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", at("top.qcow2"), "6M"]);
    qemuIo(at("top.qcow2"), ["write -P 0 3M 1M", "write -c -P 0x5a 4M 64k", `write -s ${src} 5M 100k`]);

    // Same contents, different allocation: contiguous or not, allocated zeros, sparse raw.
    qemuImg(["create", "-f", "qcow2", at("b1.qcow2"), "1M"]);
    qemuIo(at("b1.qcow2"), ["write -P 1 0 1M"]);
    qemuImg(["create", "-f", "qcow2", at("b2.qcow2"), "1M"]);
    qemuIo(at("b2.qcow2"), ["write -P 1 512k 512k", "write -P 1 0 512k"]);
    qemuImg(["create", "-f", "qcow2", at("z1.qcow2"), "1M"]);
    qemuIo(at("z1.qcow2"), ["write -z 0 64k", "write -P 0 64k 64k"]);
    qemuImg(["create", "-f", "raw", at("z.raw"), "1M"]);
    qemuImg(["create", "-f", "qcow2", at("z2.qcow2"), "1M"]);

    // Raw files of a length that is not a whole number of sectors.
    const odd = randomBytes(rand, 1000);
    writeFileSync(at("odd.raw"), odd);
    writeFileSync(at("odd-1001.raw"), Buffer.concat([odd, new Uint8Array(1)]));
    const changed = Uint8Array.from(odd);
    changed[999] ^= 0xff;
    writeFileSync(at("odd-changed.raw"), changed);
    qemuImg(["convert", "-O", "qcow2", at("odd.raw"), at("odd.qcow2")]);
  });

  /** Every image against the first of its group, both ways; small groups in every pair. */
  const groups: Array<{ name: string; images: string[]; allPairs: boolean }> = [
    { name: "same bytes", images: ["a.qcow2", "a.raw", "a-v2-512.qcow2", "a-2m.qcow2", "a-compressed.qcow2", "a-copy.qcow2", "top.qcow2", "long.qcow2", "long-data.raw"], allPairs: false },
    { name: "one byte changed", images: ["a.qcow2", "x-first.qcow2", "x-mid.qcow2", "x-piece2.qcow2", "x-hole.qcow2", "x-zeroc.qcow2", "x-comp.qcow2", "long-data.qcow2"], allPairs: false },
    { name: "allocation", images: ["b1.qcow2", "b2.qcow2", "z1.qcow2", "z2.qcow2", "z.raw"], allPairs: true },
    { name: "odd raw", images: ["odd.raw", "odd-1001.raw", "odd-changed.raw", "odd.qcow2"], allPairs: true },
  ];

  it.each(groups)("gives qemu-img's verdict on the $name pairs, both ways, with and without -s", async ({ images, allPairs }) => {
    const pairs: Array<[string, string]> = [];
    for (const one of allPairs ? images : images.slice(0, 1)) {
      for (const two of images) {
        if (one !== two) pairs.push([one, two], [two, one]);
      }
    }
    pairs.push([images[0]!, images[0]!]);
    for (const [one, two] of pairs) {
      for (const flags of [[], ["-s"]]) {
        const argv = [...flags, at(one), at(two)];
        expect({ argv, ...(await ours(argv)) }).toEqual({ argv, ...theirs(argv) });
      }
    }
  });

  it("prints qemu-img's progress with -p and nothing with -q", async () => {
    const pairs = [
      ["a.qcow2", "a.raw"],
      ["a.qcow2", "top.qcow2"],
      ["a.qcow2", "x-piece2.qcow2"],
      ["a.qcow2", "long.qcow2"],
      ["long-data.qcow2", "a.raw"],
      ["b1.qcow2", "b2.qcow2"],
    ];
    for (const [one, two] of pairs) {
      for (const flags of [["-p"], ["-q"], ["-q", "-p"], ["-p", "-s"], ["-U", "-T", "none"]]) {
        const argv = [...flags, at(one!), at(two!)];
        expect({ argv, ...(await ours(argv)) }).toEqual({ argv, ...theirs(argv) });
      }
    }
  });

  it("honours -f and -F", async () => {
    for (const argv of [
      ["-f", "raw", at("a.qcow2"), at("a.raw")],
      ["-F", "raw", at("a.raw"), at("a.raw")],
      ["-f", "qcow2", "-F", "raw", at("a.qcow2"), at("a.raw")],
      ["-F", "qcow2", at("a.qcow2"), at("a.raw")],
    ]) {
      expect({ argv, ...(await ours(argv)) }).toEqual({ argv, ...theirs(argv) });
    }
  });

  it("fails as qemu-img does: open errors exit 2, usage errors 1", async () => {
    for (const argv of [
      [at("a.qcow2"), at("missing.qcow2")],
      [at("missing.qcow2"), at("a.qcow2")],
      [at("a.qcow2"), dir],
      ["-f", "nosuchformat", at("a.qcow2"), at("a.qcow2")],
      ["-T", "bogus", at("a.qcow2"), at("a.qcow2")],
      ["-p", at("a.qcow2"), at("missing.qcow2")],
      [at("a.qcow2")],
      [at("a.qcow2"), at("a.qcow2"), at("a.qcow2")],
      ["--bogus", at("a.qcow2"), at("a.qcow2")],
    ]) {
      expect({ argv, ...(await ours(argv)) }).toEqual({ argv, ...theirs(argv) });
    }
  });
});
