// qcow2-img measure against qemu-img measure on the same arguments and the same files: stdout
// (human and JSON, byte for byte), stderr and the exit code. With --size over a seeded sweep of
// sizes, cluster sizes, refcount widths, preallocation modes and extended L2; with sources that
// are qcow2 (data, zero, compressed clusters, backing chains, metadata preallocation, bitmaps) and
// raw (sparse, preallocated).

import { spawnSync } from "node:child_process";
import { closeSync, openSync, writeFileSync, writeSync } from "node:fs";
import path from "node:path";
import { beforeAll, expect, it } from "vitest";
import { UsageError } from "../../ts/cli/args.js";
import { create } from "../../ts/cli/create.js";
import { measure } from "../../ts/cli/measure.js";
import { runOurs, type CliResult } from "../helpers/cli.js";
import { describeQemu, qemuImg, qemuIo, randomBytes, rng, tempDir } from "../helpers/qemu.js";

async function ours(args: string[]): Promise<CliResult> {
  return runOurs(measure, args, { qemuNames: false });
}

describeQemu("qcow2-img measure", () => {
  const dir = tempDir("qcow2-climeasure-");
  const at = (name: string): string => path.join(dir, name);

  beforeAll(async () => {
    qemuImg(["create", "-q", "-f", "raw", at("sparse.raw"), "64M"]);
    qemuImg(["create", "-q", "-f", "qcow2", at("q.qcow2"), "1G"]);
    qemuIo(at("q.qcow2"), ["write -P 1 0 100k", "write -P 0 1M 64k", "write -z 2M 64k", "write -c -P 7 4M 64k"]);
    qemuImg(["create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", at("pm.qcow2"), "64M"]);
    qemuIo(at("pm.qcow2"), ["write -P 3 1M 4k"]);
    qemuImg(["create", "-q", "-f", "raw", "-o", "preallocation=full", at("full.raw"), "1M"]);
    qemuImg(["create", "-q", "-f", "raw", at("data.raw"), "10M"]);
    qemuIo(at("data.raw"), ["write -P 5 3M 5k", "write -P 5 8M 1"], ["-f", "raw"]);
    qemuImg(["create", "-q", "-f", "qcow2", "-b", "data.raw", "-F", "raw", at("over-raw.qcow2"), "12M"]);
    qemuIo(at("over-raw.qcow2"), ["write -P 9 5M 64k"]);
    qemuImg(["create", "-q", "-f", "qcow2", "-b", "q.qcow2", "-F", "qcow2", at("over-q.qcow2")]);
    qemuIo(at("over-q.qcow2"), ["write -P 9 5M 64k"]);
    qemuImg(["create", "-q", "-f", "qcow2", "-o", "compat=0.10", at("v2.qcow2"), "10M"]);
    qemuIo(at("v2.qcow2"), ["write -P 9 5M 64k"]);
    qemuImg(["create", "-q", "-f", "qcow2", at("bitmaps.qcow2"), "64M"]);
    qemuImg(["bitmap", "--add", at("bitmaps.qcow2"), "b1"]);
    qemuImg(["bitmap", "--add", "-g", "512", at("bitmaps.qcow2"), "a-much-longer-bitmap-name-for-the-directory"]);
    qemuImg(["bitmap", "--add", "-g", "2M", at("bitmaps.qcow2"), "c"]);
    qemuIo(at("bitmaps.qcow2"), ["write -P 1 0 1M"]);
    qemuImg(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", at("small-clusters.qcow2"), "32M"]);
    qemuIo(at("small-clusters.qcow2"), ["write -P 2 12k 4k", "write -P 3 1M 200k", "write -c -P 4 8M 4k"]);
    qemuImg(["create", "-q", "-f", "qcow2", "-u", "-b", "missing", "-F", "qcow2", at("broken.qcow2"), "1M"]);
    writeFileSync(at("junk.qcow2"), "not an image");
    // A raw file with data where qemu-io did not put it (random bytes, a hole before them).
    qemuImg(["create", "-q", "-f", "raw", at("dd.raw"), "10M"]);
    const fd = openSync(at("dd.raw"), "r+");
    writeSync(fd, randomBytes(rng(5), 1 << 20), 0, 1 << 20, 2050 * 1024);
    closeSync(fd);
    qemuImg(["convert", "-O", "raw", at("small-clusters.qcow2"), at("converted.raw")]);
    // Images made by our create, measured by both.
    const quiet = (): void => undefined;
    await create(["-q", "-f", "qcow2", "-o", "preallocation=metadata", at("ours-pm.qcow2"), "32M"], quiet, quiet);
    qemuIo(at("ours-pm.qcow2"), ["write -P 6 7M 4k"]);
    await create(["-q", "-f", "raw", at("ours.raw"), "5M"], quiet, quiet);
    await create(["-q", "-f", "raw", "-o", "preallocation=full", at("ours-full.raw"), "1M"], quiet, quiet);
    // Snapshots of different contents and sizes.
    qemuImg(["create", "-q", "-f", "qcow2", at("snaps.qcow2"), "16M"]);
    qemuIo(at("snaps.qcow2"), ["write -P 1 0 3M"]);
    qemuImg(["snapshot", "-c", "small", at("snaps.qcow2")]);
    qemuImg(["resize", "-q", at("snaps.qcow2"), "64M"]);
    qemuIo(at("snaps.qcow2"), ["write -P 2 40M 5M", "write -c -P 3 8M 1M"]);
    qemuImg(["snapshot", "-c", "big", at("snaps.qcow2")]);
    qemuIo(at("snaps.qcow2"), ["write -z 0 64M"]);
  });

  async function compare(args: string[]): Promise<void> {
    const resolved = args.map((a) => (a.startsWith("@") ? at(a.slice(1)) : a));
    let theirs = spawnSync("qemu-img", ["measure", ...resolved], { encoding: "utf8" });
    // qemu 7.2 calibrates PBKDF2 to size a LUKS area, and that fails now and then on a busy machine.
    for (let i = 0; i < 30 && theirs.stderr.includes("Unable to get accurate CPU usage"); i++) {
      theirs = spawnSync("qemu-img", ["measure", ...resolved], { encoding: "utf8" });
    }
    const mine = await ours(resolved);
    expect(mine.stdout).toBe(theirs.stdout);
    expect(mine.stderr).toBe(theirs.stderr.replaceAll("qemu-img", "qcow2-img"));
    expect(mine.status).toBe(theirs.status);
  }

  const cases = [
    "--size 10G -O qcow2",
    "--size 10G -O qcow2 --output=json",
    "--size 10G -O raw",
    "--size 10G -O raw --output=json",
    "--size 10G",
    "--size 1000",
    "--size 0 -O qcow2",
    "--size 1000 -O qcow2",
    "--size 1G -O qcow2 -o cluster_size=4k",
    "--size 1G -O qcow2 -o cluster_size=4k -o refcount_bits=1",
    "--size 1G -O qcow2 -o compat=0.10 --output=json",
    "--size 1G -O qcow2 -o preallocation=metadata",
    "--size 1G -O qcow2 -o preallocation=full",
    "--size 1G -O qcow2 -o preallocation=falloc",
    "--size 1G -O qcow2 -o extended_l2=on",
    "--size 1P -O qcow2 -o extended_l2=on",
    "--size 1G -O qcow2 -o size=5G",
    "--size 1000 -O raw -o size=5G",
    "--size 1G -O qcow2 -o backing_file=x,data_file=y,encryption=on,compression_type=zstd",
    // Refusals, in qemu's words.
    "--size 1G -O qcow2 -o help",
    "--size 1G -O qcow2 -o compat=v3",
    "--size 1G -O qcow2 -o compat=0.10,refcount_bits=8",
    "--size 1G -O qcow2 -o refcount_bits=3",
    "--size 1G -O qcow2 -o cluster_size=1000",
    "--size 1P -O qcow2 -o cluster_size=512",
    "--size 1G -O qcow2 -o preallocation=bogus",
    "--size 1G -O qcow2 -o extended_l2=on,cluster_size=4k",
    "--size 1G -O qcow2 -o foo=bar",
    "--size 1G -O qcow2 -o lazy_refcounts=maybe",
    "--size 1000 -O raw -o cluster_size=4k",
    "--size 1G -O qcow2 -o ,",
    "--size 1G -O qcow2 --output=xml",
    "--size abc -O qcow2",
    "--size 9E -O qcow2",
    "--size 1G -O qcow2 -f qcow2",
    "--size 1G @q.qcow2 -O qcow2",
    "-O qcow2",
    "-O qcow2 -o size=5G",
    "-O qcow2 @a @b",
    "-O qcow2 @nonexistent",
    "-O qcow2 @broken.qcow2",
    "-O qcow2 -f qcow2 @junk.qcow2",
    "-O qcow2 -f foo @q.qcow2",
    "-O vmdk --size 1G",
    "-O qed --size 1G",
    "-O bochs --size 1G",
    "-O foo --size 1G",
    "-O foo @q.qcow2",
    // Sources.
    "@sparse.raw -O qcow2 --output=json",
    "-f raw @sparse.raw -O qcow2",
    "-f raw @sparse.raw -O raw --output=json",
    "@q.qcow2 -O qcow2 --output=json",
    "@q.qcow2 -O qcow2",
    "@q.qcow2 -O raw --output=json",
    "@q.qcow2",
    "@q.qcow2 -O qcow2 -o compat=0.10",
    "@q.qcow2 -O qcow2 -o cluster_size=2M,refcount_bits=64",
    "@q.qcow2 -O qcow2 -o extended_l2=on,cluster_size=32k",
    // (Not with clusters smaller than q.qcow2's: qemu-io's write of 100k leaves the rest of its
    // cluster fallocated, which lseek calls a hole until someone reads it into the page cache.)
    "@q.qcow2 -O qcow2 -o preallocation=full",
    "@pm.qcow2 -O qcow2",
    "@pm.qcow2 -O qcow2 -o cluster_size=4k",
    "-f raw @pm.qcow2 -O qcow2",
    "@full.raw -O qcow2",
    "@data.raw -O qcow2",
    "@data.raw -O qcow2 -o cluster_size=4k",
    "@over-raw.qcow2 -O qcow2 --output=json",
    "@over-raw.qcow2 -O qcow2 -o cluster_size=512",
    "@over-q.qcow2 -O qcow2 --output=json",
    "@over-q.qcow2 -O qcow2 -o backing_file=x",
    "@v2.qcow2 -O qcow2",
    "@v2.qcow2 -O qcow2 --output=json",
    "@bitmaps.qcow2 -O qcow2 --output=json",
    "@bitmaps.qcow2 -O qcow2",
    "@bitmaps.qcow2 -O qcow2 -o cluster_size=4k",
    "@bitmaps.qcow2 -O qcow2 -o cluster_size=2M",
    "@bitmaps.qcow2 -O qcow2 -o compat=0.10",
    "@bitmaps.qcow2 -O raw",
    "@small-clusters.qcow2 -O qcow2",
    "@small-clusters.qcow2 -O qcow2 -o cluster_size=512 --output=json",
    "@dd.raw -O qcow2",
    "@dd.raw -O qcow2 -o cluster_size=2M",
    "@converted.raw -O qcow2",
    "@ours-pm.qcow2 -O qcow2",
    "@ours.raw -O qcow2",
    "@ours-full.raw -O qcow2 --output=json",
    // Encryption: a LUKS image also holds its key slots.
    "--size 1G -O qcow2 --object secret,id=s,data=x -o encrypt.format=luks,encrypt.key-secret=s",
    "--size 1G -O qcow2 -o encrypt.format=luks,encrypt.key-secret=s",
    "--size 1G -O qcow2 -o encrypt.format=luks",
    "--size 1G -O qcow2 -o encrypt.format=aes",
    "--size 1G -O qcow2 --object foo,id=x",
    // -l: a snapshot instead of the active disk.
    "-l small @snaps.qcow2 -O qcow2",
    "-l 1 @snaps.qcow2 -O qcow2 --output=json",
    "-l snapshot.name=big @snaps.qcow2 -O qcow2",
    "-l snapshot.id=2 @snaps.qcow2 -O raw",
    "-l snapshot.id=1,snapshot.name=small @snaps.qcow2 -O qcow2 -o cluster_size=4k",
    "-l snapshot.id=1,snapshot.name=big @snaps.qcow2 -O qcow2",
    "-l nope @snaps.qcow2 -O qcow2",
    "-l snapshot.foo=1 @snaps.qcow2 -O qcow2",
    "-l small @sparse.raw -O qcow2",
    "-l small --size 1G -O qcow2",
    "@snaps.qcow2 -O qcow2",
  ];

  // (qemu calibrates PBKDF2 for seconds to size a LUKS area.)
  it.each(cases)("%s", async (line) => {
    await compare(line.split(" "));
  }, 60_000);

  it("--size over a seeded sweep of qcow2 options", async () => {
    const rand = rng(42);
    const pick = <T>(xs: T[]): T => xs[Math.floor(rand() * xs.length)]!;
    const sizes = ["0", "1", "512", "1000", "65535", "65536", "65537", "1M", "100M", "1G", "1.5G", "10G", "100G", "1T", "16T", "100T", "1P", "4P", "123456789"];
    for (let i = 0; i < 150; i++) {
      const opts = [
        `cluster_size=${pick(["512", "1k", "4k", "16k", "64k", "256k", "2M"])}`,
        `refcount_bits=${pick(["1", "2", "4", "8", "16", "32", "64"])}`,
        `preallocation=${pick(["off", "metadata", "full", "falloc"])}`,
      ];
      if (rand() < 0.25) opts.push("extended_l2=on");
      if (rand() < 0.2) opts.push("compat=0.10");
      const args = ["-O", "qcow2", "-o", opts.join(","), "--size", pick(sizes), ...(rand() < 0.5 ? ["--output=json"] : [])];
      const theirs = spawnSync("qemu-img", ["measure", ...args], { encoding: "utf8" });
      const mine = await ours(args);
      expect({ args, ...mine }).toEqual({ args, stdout: theirs.stdout, stderr: theirs.stderr.replaceAll("qemu-img", "qcow2-img"), status: theirs.status });
    }
  });

  it("differs from qemu where only lseek(SEEK_DATA) can tell (documented)", async () => {
    // Fallocated blocks read as zeros and are holes to qemu, but count as allocated: we take the
    // file for fully written. Zeros written into a sparse raw file are data to qemu, holes to us.
    qemuImg(["create", "-q", "-f", "raw", "-o", "preallocation=falloc", at("falloc.raw"), "1M"]);
    qemuImg(["create", "-q", "-f", "raw", at("zeros.raw"), "100M"]);
    qemuIo(at("zeros.raw"), ["write -P 0 50M 1M"], ["-f", "raw"]);
    const required = async (file: string): Promise<[string, string]> => [
      qemuImg(["measure", "-O", "qcow2", at(file)]).split("\n")[0]!,
      (await ours(["-O", "qcow2", at(file)])).stdout.split("\n")[0]!,
    ];
    expect(await required("falloc.raw")).toEqual(["required size: 393216", "required size: 1376256"]);
    expect(await required("zeros.raw")).toEqual(["required size: 1441792", "required size: 393216"]);
  });
});
