// qcow2-img resize against qemu-img resize on two copies of each image: the same stdout, stderr
// and exit code; when it succeeds the same virtual size, a clean qemu-img check of our copy, and
// qemu-img compare finding our copy and qemu's identical. qcow2 v2/v3 of several cluster sizes,
// with a backing file, compressed clusters and snapshots; raw files; relative and invalid sizes.

import { execFileSync, spawnSync } from "node:child_process";
import { copyFileSync, mkdirSync, statSync, writeFileSync } from "node:fs";
import path from "node:path";
import { beforeAll, expect, it } from "vitest";
import { UsageError } from "../../ts/cli/args.js";
import { strtosz } from "../../ts/cli/options.js";
import { resize } from "../../ts/cli/resize.js";
import { runOurs, runQemuImg, type CliResult } from "../helpers/cli.js";
import { describeQemu, qemuImg, qemuIo, randomBytes, rng, tempDir } from "../helpers/qemu.js";

type Result = CliResult;

async function ours(args: string[]): Promise<Result> {
  return runOurs(resize, args);
}

function theirs(args: string[]): Result {
  return runQemuImg("resize", args);
}

/** The virtual size qemu-img reads from an image. */
function virtualSize(file: string, format: string): number {
  return (JSON.parse(qemuImg(["info", "--output=json", "-f", format, file])) as { "virtual-size": number })["virtual-size"];
}

describeQemu("qcow2-img resize", () => {
  const dir = tempDir("qcow2-cliresize-");
  const at = (name: string): string => path.join(dir, name);
  const fixtures = path.join(dir, "fixtures");

  beforeAll(() => {
    mkdirSync(fixtures);
    const f = (name: string): string => path.join(fixtures, name);
    const rand = rng(5);
    const src = f("random.src");
    writeFileSync(src, randomBytes(rand, 3 << 20));
    const fill = (file: string, extra: string[] = []): void => {
      qemuIo(file, [`write -s ${src} 0 1M`, `write -s ${src} 1536k 700k`, "write -z 2560k 128k", `write -s ${src} 3M 64k`], extra);
    };
    qemuImg(["create", "-f", "qcow2", f("v3.qcow2"), "4M"]);
    fill(f("v3.qcow2"));
    qemuImg(["create", "-f", "qcow2", "-o", "compat=0.10,cluster_size=512", f("v2-512.qcow2"), "4M"]);
    qemuIo(f("v2-512.qcow2"), [`write -s ${src} 0 1M`, `write -s ${src} 3M 64k`]);
    qemuImg(["create", "-f", "qcow2", "-o", "cluster_size=4096", f("c4k.qcow2"), "4M"]);
    fill(f("c4k.qcow2"));
    qemuImg(["create", "-f", "qcow2", "-o", "cluster_size=2M", f("c2m.qcow2"), "4M"]);
    fill(f("c2m.qcow2"));
    qemuImg(["create", "-f", "qcow2", f("compressed.qcow2"), "4M"]);
    qemuIo(f("compressed.qcow2"), ["write -c -P 0x41 0 256k", "write -c -P 0x42 3M 128k"]);
    qemuImg(["create", "-f", "qcow2", f("snap.qcow2"), "4M"]);
    fill(f("snap.qcow2"));
    qemuImg(["snapshot", "-c", "s1", f("snap.qcow2")]);
    qemuImg(["create", "-f", "qcow2", "-o", "compat=0.10", f("snap-v2.qcow2"), "4M"]);
    qemuImg(["snapshot", "-c", "s1", f("snap-v2.qcow2")]);
    // A backing file longer than its overlay: growing must not uncover it.
    qemuImg(["create", "-f", "qcow2", f("base.qcow2"), "8M"]);
    qemuIo(f("base.qcow2"), ["write -P 0x33 0 8M"]);
    qemuImg(["create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "base.qcow2", "-F", "qcow2", f("overlay.qcow2"), "2M"]);
    qemuIo(f("overlay.qcow2"), ["write -P 0x44 1000 5000"]);
    qemuImg(["create", "-f", "raw", f("disk.raw"), "4M"]);
    fill(f("disk.raw"), ["-f", "raw"]);
    writeFileSync(f("odd.raw"), randomBytes(rand, 1000));
  });

  /** Run both tools on fresh copies of `image`; compare their output and, on success, the images. */
  async function both(image: string, args: string[], options: { format?: string; compareStderr?: boolean } = {}): Promise<Result> {
    const format = options.format ?? (image.endsWith(".raw") ? "raw" : "qcow2");
    const ext = path.extname(image);
    const mine = at(`ours${ext}`);
    const qemus = at(`qemu${ext}`);
    for (const copy of [mine, qemus]) copyFileSync(path.join(fixtures, image), copy);
    if (image === "overlay.qcow2") {
      // The copies need their backing file beside them.
      copyFileSync(path.join(fixtures, "base.qcow2"), at("base.qcow2"));
    }
    const a = await ours([...args.slice(0, -1), mine, args[args.length - 1]!]);
    const b = theirs([...args.slice(0, -1), qemus, args[args.length - 1]!]);
    const name = (r: Result, file: string): Result => ({ ...r, stderr: r.stderr.replaceAll(file, "FILE") });
    const label = { image, args };
    if (options.compareStderr === false) {
      expect({ ...label, stdout: a.stdout, status: a.status }).toEqual({ ...label, stdout: b.stdout, status: b.status });
    } else {
      expect({ ...label, ...name(a, mine) }).toEqual({ ...label, ...name(b, qemus) });
    }
    if (b.status === 0) {
      expect({ ...label, size: virtualSize(mine, format) }).toEqual({ ...label, size: virtualSize(qemus, format) });
      if (format === "qcow2") {
        expect(spawnSync("qemu-img", ["check", mine], { encoding: "utf8" }).status, `${image} ${args.join(" ")}: check`).toBe(0);
      } else {
        expect(statSync(mine).size).toBe(statSync(qemus).size);
      }
      const verdict = spawnSync("qemu-img", ["compare", "-f", format, "-F", format, mine, qemus], { encoding: "utf8" });
      expect({ ...label, compare: verdict.stdout }).toEqual({ ...label, compare: "Images are identical.\n" });
    }
    return a;
  }

  it("grows and shrinks qcow2 images of every kind as qemu-img does", async () => {
    const images = ["v3.qcow2", "v2-512.qcow2", "c4k.qcow2", "c2m.qcow2", "compressed.qcow2", "snap.qcow2"];
    const sizes = [["+1M"], ["1G"], ["--shrink", "2M"], ["--shrink", "-1M"], ["--shrink", "3000k"], ["--shrink", "1536"], ["+0"]];
    for (const image of images) {
      for (const size of sizes) {
        const r = await both(image, size);
        expect(r.status, `${image} ${size.join(" ")}`).toBe(0);
        expect(r.stdout).toBe("Image resized.\n");
      }
    }
  });

  it("keeps a longer backing file hidden when an overlay grows, and shrinks overlays", async () => {
    for (const size of [["6M"], ["--shrink", "1M"], ["+3M"], ["-q", "8M"]]) {
      expect((await both("overlay.qcow2", size)).status).toBe(0);
    }
  });

  it("refuses to shrink without --shrink, to shrink with preallocation, and sizes qemu refuses", async () => {
    const refused = [
      ["3M"],
      ["-1M"],
      ["1.5k"],
      ["0"],
      ["-4M"],
      ["--shrink", "-5M"],
      ["--shrink", "1025"],
      ["+1000"],
      ["--shrink", "--preallocation=full", "1M"],
      ["--preallocation=bogus", "8M"],
      ["abc"],
      ["5MB"],
      ["1e3"],
      [".5M"],
      ["--5"],
      ["99999999999999999999"],
      ["+99999999999999999999"],
      ["16E"],
      ["8E"],
      ["+8E"],
      ["18446744073709551615"],
      ["1E"],
    ];
    for (const size of refused) {
      const r = await both("v3.qcow2", size);
      expect(r.status, size.join(" ")).toBe(1);
    }
    const r = await both("snap-v2.qcow2", ["8M"]);
    expect(r.stderr).toBe("qemu-img: Can't resize a v2 image which has snapshots\n");
  });

  it("accepts qemu's size syntax: suffixes, fractions, hex, whitespace", async () => {
    for (const size of [" 5M", "0x600000", "0x1400k", "5.5M", "6000.k", "+1.25M", "5242880b", "6m"]) {
      expect((await both("v3.qcow2", [size])).status, size).toBe(0);
    }
  });

  it("resizes raw files by truncating, with qemu's rounding, warnings and preallocation", async () => {
    const cases: Array<[string, string[]]> = [
      ["disk.raw", ["-f", "raw", "+1000"]],
      ["disk.raw", ["-f", "raw", "--shrink", "1000"]],
      ["disk.raw", ["--shrink", "777"]],
      ["disk.raw", ["999"]],
      ["disk.raw", ["8M"]],
      ["disk.raw", ["-f", "raw", "0"]],
      ["disk.raw", ["-f", "raw", "--preallocation=full", "6M"]],
      ["disk.raw", ["-f", "raw", "--preallocation=metadata", "6M"]],
      ["disk.raw", ["-f", "raw", "--preallocation=full", "4M"]],
      ["disk.raw", ["-f", "raw", "20T"]],
      ["odd.raw", ["-f", "raw", "+0"]],
      ["odd.raw", ["-f", "raw", "--shrink", "-512"]],
    ];
    for (const [image, args] of cases) await both(image, args);
    // qemu reserves "falloc" space with fallocate(); we write zeros: same size and bytes.
    await both("disk.raw", ["-f", "raw", "--preallocation=falloc", "6M"]);
  });

  it("fails as qemu-img does on bad arguments, formats and files", async () => {
    mkdirSync(at("a-directory"), { recursive: true });
    for (const argv of [[], ["1M"], [at("a-directory"), "1M"], [at("missing.qcow2"), "1M"], ["-f", "nosuchformat", at("missing.qcow2"), "1M"], [at("x"), at("y"), "1M"], ["--bogus", at("x"), "1M"]]) {
      expect({ argv, ...(await ours(argv)) }).toEqual({ argv, ...theirs(argv) });
    }
    // -f qcow2 on a raw file
    await both("disk.raw", ["-f", "qcow2", "8M"], { format: "raw" });
  });

  it("parses sizes exactly as qemu_strtosz", () => {
    const cases: Array<[string, bigint | "invalid" | "range"]> = [
      ["0", 0n],
      ["1k", 1024n],
      ["1.5M", 1572864n],
      ["0.5k", 512n],
      ["1.0009765625k", 1025n],
      ["0x10", 16n],
      ["0x1k", 1024n],
      ["5.", 5n],
      ["5.k", 5120n],
      ["  +7", 7n],
      ["1e", 1n << 60n],
      ["15E", 15n << 60n],
      ["18446744073709551615", (1n << 64n) - 1n],
      ["16E", "range"],
      ["18446744073709551616", "range"],
      ["18446744073709551616k", "invalid"],
      ["0x10000000000000000", "range"],
      ["17E", "range"],
      ["18446744073709551616x", "invalid"],
      ["16Ex", "invalid"],
      ["1.5", "invalid"],
      ["1.5b", "invalid"],
      [".5k", "invalid"],
      ["0x", "invalid"],
      ["0x1.5k", "invalid"],
      ["1.5e3k", "invalid"],
      ["-1", "invalid"],
      ["", "invalid"],
      ["1 k", "invalid"],
    ];
    for (const [text, want] of cases) {
      const r = strtosz(text);
      expect({ text, got: r.ok ? r.value : r.error }).toEqual({ text, got: want });
    }
    expect(strtosz("0x1k")).toEqual({ ok: true, value: 1024n, hexSuffix: true });
  });

  it("leaves images qemu-img can still use after growing past the L1 table and back", async () => {
    const file = at("grow.qcow2");
    qemuImg(["create", "-f", "qcow2", "-o", "cluster_size=512", file, "1M"]);
    qemuIo(file, ["write -P 9 0 1M"]);
    expect((await ours([file, "+64M"])).status).toBe(0);
    expect((await ours(["--shrink", file, "512k"])).status).toBe(0);
    expect(execFileSync("qemu-img", ["check", file], { encoding: "utf8" })).toContain("No errors were found on the image.");
    expect(virtualSize(file, "qcow2")).toBe(512 * 1024);
  });
});
