// qcow2-img dd against qemu-img dd on the same inputs: the same stdout, stderr and exit code for
// every argument combination (operand and option errors, sizes in qemu's syntax, skips past the
// end, unknown and unsupported formats, files that cannot be opened or created); on success a raw
// output byte for byte qemu's, a qcow2 output that qemu-img compare finds identical to qemu's, with
// the same size and allocation, and that qemu-img check finds clean. Inputs: qcow2 v3 and v2 with
// data, zero and compressed clusters, a backing chain, raw files of odd size.

import { spawnSync } from "node:child_process";
import { copyFileSync, existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import path from "node:path";
import { beforeAll, expect, it } from "vitest";
import { dd } from "../../ts/cli/dd.js";
import { ddPlan } from "../../ts/ops/dd.js";
import { runOurs, runQemuImg, type CliResult } from "../helpers/cli.js";
import { allocationLayout, breakCompressedCluster, describeQemu, qemuImg, qemuIo, randomBytes, rng, tempDir } from "../helpers/qemu.js";

describeQemu("qcow2-img dd", () => {
  const dir = tempDir("qcow2-clidd-");
  const at = (name: string): string => path.join(dir, name);

  beforeAll(() => {
    const rand = rng(21);
    const src = at("random.src");
    writeFileSync(src, randomBytes(rand, 3 << 20));
    // Data, a zero cluster, a compressed cluster, a hole, data up to the end.
    qemuImg(["create", "-f", "qcow2", at("a.qcow2"), "4M"]);
    qemuIo(at("a.qcow2"), [`write -s ${src} 0 1M`, "write -z 512k 64k", "write -c -P 0x5a 1536k 64k", `write -s ${src} 3M 1M`]);
    qemuImg(["convert", "-O", "qcow2", "-o", "compat=0.10,cluster_size=512", at("a.qcow2"), at("a-v2.qcow2")]);
    // A chain whose base is shorter than the overlay.
    qemuImg(["create", "-f", "qcow2", at("base.qcow2"), "2M"]);
    qemuIo(at("base.qcow2"), [`write -s ${src} 0 2M`]);
    qemuImg(["create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "base.qcow2", "-F", "qcow2", at("top.qcow2"), "3M"]);
    qemuIo(at("top.qcow2"), ["write -P 0x44 1000 5000", "write -P 0x45 2047k 2k"]);
    writeFileSync(at("odd.raw"), randomBytes(rand, 100_000));
    writeFileSync(at("tiny.raw"), randomBytes(rand, 1000));
    qemuImg(["create", "-f", "raw", at("sparse.raw"), "1M"]);
    qemuIo(at("sparse.raw"), ["write -P 0x11 300k 7k"], ["-f", "raw"]);
    mkdirSync(at("a-directory"));
    // A compressed cluster whose stream no longer inflates.
    qemuImg(["create", "-f", "qcow2", at("bad-compressed.qcow2"), "1M"]);
    qemuIo(at("bad-compressed.qcow2"), ["write -c -P 0x5a 0 64k"]);
    breakCompressedCluster(at("bad-compressed.qcow2"));
  });

  /**
   * Run both tools with `args`, @IN standing for the input, @OUT for the output (each tool gets its
   * own) and @DIR for the directory; compare their output, then, when qemu succeeded, the images they wrote.
   */
  async function both(input: string, args: string[]): Promise<CliResult> {
    const mine = at("ours.out");
    const qemus = at("qemu.out");
    for (const f of [mine, qemus]) rmSync(f, { force: true });
    const sub = (out: string): string[] => args.map((a) => a.replaceAll("@IN", at(input)).replaceAll("@OUT", out).replaceAll("@DIR", dir));
    const a = await runOurs(dd, sub(mine));
    const b = runQemuImg("dd", sub(qemus));
    const norm = (r: CliResult, out: string): CliResult => ({ ...r, stderr: r.stderr.replaceAll(out, "@OUT").replaceAll(dir, "@DIR") });
    const label = { input, args };
    expect({ ...label, ...norm(a, mine) }).toEqual({ ...label, ...norm(b, qemus) });
    if (b.status === 0) {
      const format = outputFormat(args);
      if (format === "raw") {
        expect(readFileSync(mine).equals(readFileSync(qemus)), `${input} ${args.join(" ")}: bytes`).toBe(true);
      } else {
        const info = (f: string): number => (JSON.parse(qemuImg(["info", "--output=json", f])) as { "virtual-size": number })["virtual-size"];
        expect({ ...label, size: info(mine), layout: allocationLayout(mine) }).toEqual({ ...label, size: info(qemus), layout: allocationLayout(qemus) });
        const verdict = spawnSync("qemu-img", ["compare", "-f", "qcow2", "-F", "qcow2", mine, qemus], { encoding: "utf8" });
        expect({ ...label, compare: verdict.stdout }).toEqual({ ...label, compare: "Images are identical.\n" });
        expect(spawnSync("qemu-img", ["check", mine]).status, `${input} ${args.join(" ")}: check`).toBe(0);
      }
    } else {
      expect(existsSync(mine), `${input} ${args.join(" ")}: output left behind`).toBe(existsSync(qemus));
    }
    return a;
  }

  it("copies whole images to raw and qcow2 as qemu-img does", async () => {
    for (const input of ["a.qcow2", "a-v2.qcow2", "top.qcow2", "odd.raw", "tiny.raw", "sparse.raw"]) {
      const f = input.endsWith(".raw") ? ["-f", "raw"] : [];
      for (const out of [[], ["-O", "raw"], ["-O", "qcow2"]]) {
        expect((await both(input, [...f, ...out, "if=@IN", "of=@OUT"])).status).toBe(0);
      }
    }
  }, 120_000);

  it("copies the blocks bs=, count= and skip= select, with qemu's output size", async () => {
    const cases = [
      ["bs=64k"],
      ["bs=1M", "skip=3"],
      ["bs=4096", "count=100"],
      ["bs=1000", "count=7", "skip=2"],
      ["bs=1000", "count=2", "skip=7"],
      ["bs=3", "count=5"],
      ["bs=3", "count=5", "skip=1"],
      ["count=0"],
      ["count=0", "skip=0"],
      ["bs=1M", "count=9999999"],
      ["bs=777", "skip=1234"],
      ["bs=2147483647", "count=4294967298"],
      ["bs=65536", "count=9223372036854775807", "skip=2"],
      ["bs=1.5k", "count=0x2k"],
      ["bs=+512", "skip=3", "bs=1024"],
      ["bs=512b"],
      ["bs= 512", "count=\t3"],
      ["skip=9999"],
      ["bs=1M", "skip=4"],
      ["bs=1M", "skip=5"],
      ["bs=4096", "skip=9223372036854775807"],
    ];
    for (const input of ["a.qcow2", "odd.raw", "top.qcow2"]) {
      const f = input.endsWith(".raw") ? ["-f", "raw"] : [];
      for (const c of cases) {
        await both(input, [...f, ...c, "if=@IN", "of=@OUT"]);
        await both(input, [...f, "-O", "qcow2", ...c, "if=@IN", "of=@OUT"]);
      }
    }
  }, 120_000);

  it("takes options and operands in any order, the last of each operand winning", async () => {
    await both("a.qcow2", ["if=@IN", "of=@OUT", "-O", "qcow2", "bs=8k"]);
    await both("a.qcow2", ["of=nowhere", "if=@IN", "-U", "of=@OUT", "--", "count=3"]);
    await both("a.qcow2", ["--force-share", "if=@IN", "-Oqcow2", "of=@OUT"]);
    await both("a.qcow2", ["--force", "if=@IN", "of=@OUT"]);
    await both("odd.raw", ["-f", "qcow2", "-f", "raw", "if=@IN", "of=@OUT"]);
    await both("odd.raw", ["-O", "file", "-f", "raw", "if=@IN", "of=@OUT"]);
    // "file:" names the plain file driver.
    await both("a.qcow2", ["if=file:@IN", "of=file:@OUT", "-O", "qcow2"]);
    // A deprecated hex suffix: qemu warns and goes on.
    expect((await both("a.qcow2", ["if=@IN", "of=@OUT", "bs=0x10k", "count=0x2K"])).status).toBe(0);
  }, 120_000);

  it("refuses bad operands, options and sizes with qemu's messages", async () => {
    const cases = [
      [],
      ["-x"],
      ["-f"],
      ["-O"],
      ["--foo", "if=@IN", "of=@OUT"],
      ["--help=3"],
      ["if=@IN", "of=@OUT", "-Ux"],
      ["-xU", "if=@IN", "of=@OUT"],
      ["bs=512"],
      ["if=@IN"],
      ["of=@OUT"],
      ["if=@IN", "of=@OUT", "bs=0"],
      ["if=@IN", "of=@OUT", "bs=abc"],
      ["if=@IN", "of=@OUT", "bs=3G"],
      ["if=@IN", "of=@OUT", "bs=2147483648"],
      ["if=@IN", "of=@OUT", "bs=0x10kx"],
      ["if=@IN", "of=@OUT", "bs=0x1G0"],
      ["if=@IN", "of=@OUT", "bs=0x100000000k"],
      ["if=@IN", "of=@OUT", "bs=0xffffffffffffffffk"],
      ["if=@IN", "of=@OUT", "bs="],
      ["if=@IN", "of=@OUT", "bs=1e3"],
      ["if=@IN", "of=@OUT", "bs=-1"],
      ["if=@IN", "of=@OUT", "count=-1"],
      ["if=@IN", "of=@OUT", "count=9223372036854775808"],
      ["if=@IN", "of=@OUT", "count=99999999999999999999"],
      ["if=@IN", "of=@OUT", "count="],
      ["if=@IN", "of=@OUT", "skip=-0"],
      ["if=@IN", "of=@OUT", "skip=8E"],
      ["if=@IN", "of=@OUT", "foo=1"],
      ["if=@IN", "of=@OUT", "foo"],
      ["if=@IN", "of=@OUT", "=5"],
      ["if=@IN", "of=@OUT", "IF=x"],
      ["bs=0", "foo=1", "if=@IN", "of=@OUT"],
      ["foo=1", "bs=0", "if=@IN", "of=@OUT"],
      ["count=x", "-x", "if=@IN", "of=@OUT"],
    ];
    for (const c of cases) expect((await both("a.qcow2", c)).status, c.join(" ")).not.toBe(0);
  }, 120_000);

  it("fails as qemu-img does on files and formats it cannot use", async () => {
    const cases: Array<[string, string[]]> = [
      ["a.qcow2", ["if=@DIR/missing", "of=@OUT"]],
      ["a.qcow2", ["if=file:@DIR/missing", "of=@OUT"]],
      ["a.qcow2", ["if=", "of=@OUT"]],
      ["a.qcow2", ["if=@IN", "of="]],
      ["a.qcow2", ["if=@IN", "of=@DIR/no/such/dir"]],
      ["a.qcow2", ["if=@IN", "of=@DIR/a-directory"]],
      ["a.qcow2", ["if=@DIR/a-directory", "of=@OUT"]],
      ["a.qcow2", ["-O", "foo", "if=@IN", "of=@OUT"]],
      ["a.qcow2", ["-O", "dmg", "if=@IN", "of=@OUT"]],
      ["a.qcow2", ["-O", "vvfat", "if=@IN", "of=@OUT"]],
      ["a.qcow2", ["-O", "foo", "if=@DIR/missing", "of=@OUT"]],
      ["a.qcow2", ["-f", "foo", "if=@IN", "of=@OUT"]],
      ["odd.raw", ["-f", "qcow2", "if=@IN", "of=@OUT"]],
      ["a.qcow2", ["if=@IN", "of=foo:bar"]],
      ["a.qcow2", ["if=foo:bar", "of=@OUT"]],
      ["a.qcow2", ["if=@IN", "of=json:x"]],
      ["a.qcow2", ["if=@IN", "of=@IN"]],
      ["a.qcow2", ["-O", "qcow2", "if=@IN", "of=@IN"]],
      ["bad-compressed.qcow2", ["if=@IN", "of=@OUT"]],
      ["bad-compressed.qcow2", ["-O", "qcow2", "bs=4k", "skip=3", "if=@IN", "of=@OUT"]],
    ];
    for (const [input, args] of cases) expect((await both(input, args)).status, args.join(" ")).toBe(1);
    // qemu writes the formats below; this tool says it does not.
    for (const fmt of ["vmdk", "qed", "luks"]) {
      const r = await runOurs(dd, ["-O", fmt, `if=${at("a.qcow2")}`, `of=${at("ours.out")}`]);
      expect(r).toEqual({ stdout: "", stderr: `qemu-img: qemu-img writes only raw and qcow2 images, not ${fmt}\n`, status: 1 });
    }
  }, 120_000);

  it("writes the bytes qemu writes when input and output are one raw file", async () => {
    copyFileSync(at("tiny.raw"), at("same-ours.raw"));
    copyFileSync(at("tiny.raw"), at("same-qemu.raw"));
    const a = await runOurs(dd, ["-f", "raw", `if=${at("same-ours.raw")}`, `of=${at("same-ours.raw")}`]);
    const b = runQemuImg("dd", ["-f", "raw", `if=${at("same-qemu.raw")}`, `of=${at("same-qemu.raw")}`]);
    expect(a).toEqual(b);
    expect(readFileSync(at("same-ours.raw")).equals(readFileSync(at("same-qemu.raw")))).toBe(true);
  }, 120_000);
});

/** The -O value qemu-img would use (the last one; raw by default). */
function outputFormat(args: string[]): string {
  let format = "raw";
  for (let i = 0; i < args.length; i++) {
    if (args[i] === "-O") format = args[++i]!;
    else if (args[i]!.startsWith("-O")) format = args[i]!.slice(2);
  }
  return format === "qcow2" ? "qcow2" : "raw";
}

it("plans the copy with qemu 7.2's int64 arithmetic", () => {
  expect(ddPlan(4 << 20, {})).toEqual({ start: 0, end: 4 << 20, outputSize: 4 << 20, skipPastEnd: false });
  // count= is where the copy ends, counted from the start of the input, even with skip=.
  expect(ddPlan(10_000, { blockSize: 1000, count: 7n, skip: 2n })).toEqual({ start: 2000, end: 7000, outputSize: 5000, skipPastEnd: false });
  expect(ddPlan(10_000, { blockSize: 1000, count: 2n, skip: 7n })).toEqual({ start: 2000, end: 2000, outputSize: 0, skipPastEnd: true });
  expect(ddPlan(10_000, { blockSize: 1000, skip: 10n })).toEqual({ start: 10_000, end: 10_000, outputSize: 0, skipPastEnd: false });
  // count * bs past int64: no limit; skip * bs past int64: past the end.
  expect(ddPlan(10_000, { blockSize: 4096, count: 1n << 62n })).toMatchObject({ end: 10_000 });
  expect(ddPlan(10_000, { blockSize: 4096, skip: 1n << 62n })).toMatchObject({ skipPastEnd: true, outputSize: 0 });
  expect(() => ddPlan(1, { blockSize: 0 })).toThrow(RangeError);
  expect(() => ddPlan(1, { count: -1n })).toThrow(RangeError);
});
