// qcow2-img bench against qemu-img bench on copies of the same images: the same exit code and
// stderr, the same first line ("Sending N read requests, ...") and flush line, the timing line in
// qemu's format, for many argument combinations and every refusal qemu makes; after -w runs, the
// image ours wrote holds what qemu's -w run left in its copy (qemu-img compare) and checks clean.
// No timing is compared. The engine's flush arithmetic is checked against qemu's bench_cb rules.

import { spawnSync } from "node:child_process";
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { beforeAll, describe, expect, it } from "vitest";
import { bench } from "../../ts/cli/bench.js";
import { bench as runBench, BenchError, type BenchTarget } from "../../ts/ops/bench.js";
import { runOurs, runQemuImg, type CliResult } from "../helpers/cli.js";
import { breakCompressedCluster, describeQemu, qemuImg, qemuIo, randomBytes, rng, tempDir } from "../helpers/qemu.js";

const RUN_LINE = /^Run completed in \d+\.\d{3} seconds\.$/;

describeQemu("qcow2-img bench", () => {
  const dir = tempDir("qcow2-clibench-");
  const at = (name: string): string => path.join(dir, name);
  const fixtures = path.join(dir, "fixtures");
  const fixture = (name: string): string => path.join(fixtures, name);

  beforeAll(() => {
    mkdirSync(fixtures);
    const rand = rng(31);
    const src = path.join(fixtures, "random.src");
    writeFileSync(src, randomBytes(rand, 2 << 20));
    // Data, a zero cluster, compressed clusters and holes.
    qemuImg(["create", "-f", "qcow2", fixture("data.qcow2"), "8M"]);
    qemuIo(fixture("data.qcow2"), [`write -s ${src} 0 2M`, "write -z 1M 64k", "write -c -P 0x5a 4M 256k", `write -s ${src} 6M 1M`]);
    qemuImg(["create", "-f", "qcow2", fixture("small.qcow2"), "1M"]);
    qemuImg(["convert", "-O", "qcow2", "-o", "compat=0.10,cluster_size=512", fixture("data.qcow2"), fixture("v2-512.qcow2")]);
    // An overlay with 4 KiB clusters over a base it partly covers.
    qemuImg(["create", "-f", "qcow2", fixture("base.qcow2"), "4M"]);
    qemuIo(fixture("base.qcow2"), [`write -s ${src} 0 4M`]);
    qemuImg(["create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "base.qcow2", "-F", "qcow2", fixture("overlay.qcow2"), "6M"]);
    qemuIo(fixture("overlay.qcow2"), ["write -P 0x44 1000 5000"]);
    qemuImg(["convert", "-O", "raw", fixture("data.qcow2"), fixture("data.raw")]);
    writeFileSync(fixture("odd.raw"), randomBytes(rand, 1000));
    writeFileSync(fixture("r512.raw"), randomBytes(rand, 512));
    mkdirSync(at("a-directory"));
    qemuImg(["create", "-f", "qcow2", fixture("bad-compressed.qcow2"), "1M"]);
    qemuIo(fixture("bad-compressed.qcow2"), ["write -c -P 0x5a 0 64k"]);
    breakCompressedCluster(fixture("bad-compressed.qcow2"));
  });

  /**
   * Run both tools on their own copy of `image` (@FILE in `args` stands for it; appended unless
   * there, or unless @NOFILE is). The same exit code, stderr and report; after a successful -w run, the same contents.
   */
  async function both(image: string, args: string[]): Promise<CliResult> {
    const ext = path.extname(image);
    const mine = at(`ours${ext}`);
    const qemus = at(`qemu${ext}`);
    for (const copy of [mine, qemus]) copyFileSync(fixture(image), copy);
    if (image === "overlay.qcow2") copyFileSync(fixture("base.qcow2"), at("base.qcow2"));
    const withFile = args.includes("@NOFILE") ? args.filter((a) => a !== "@NOFILE") : args.some((a) => a.includes("@FILE")) ? args : [...args, "@FILE"];
    const sub = (file: string): string[] => withFile.map((a) => a.replaceAll("@FILE", file).replaceAll("@DIR", dir));
    const a = await runOurs(bench, sub(mine));
    const b = runQemuImg("bench", sub(qemus));
    const label = { image, args };
    const norm = (r: CliResult, file: string): CliResult => {
      const lines = r.stdout.split("\n");
      const last = lines.length >= 2 ? lines[lines.length - 2]! : "";
      // The timing differs; its format must not.
      if (RUN_LINE.test(last)) lines[lines.length - 2] = "Run completed in X seconds.";
      return { status: r.status, stdout: lines.join("\n"), stderr: r.stderr.replaceAll(file, "@FILE").replaceAll(dir, "@DIR") };
    };
    expect({ ...label, ...norm(a, mine) }).toEqual({ ...label, ...norm(b, qemus) });
    if (b.status === 0 && withFile.includes("-w")) {
      if (ext === ".raw") {
        expect(readFileSync(mine).equals(readFileSync(qemus)), `${image} ${args.join(" ")}: bytes`).toBe(true);
      } else {
        const verdict = spawnSync("qemu-img", ["compare", "-f", "qcow2", "-F", "qcow2", mine, qemus], { encoding: "utf8" });
        expect({ ...label, compare: verdict.stdout }).toEqual({ ...label, compare: "Images are identical.\n" });
        const check = spawnSync("qemu-img", ["check", mine], { encoding: "utf8" });
        expect({ ...label, check: check.status, out: check.stdout }).toMatchObject({ ...label, check: 0 });
      }
    }
    return a;
  }

  it("reads as qemu-img bench does, with its report", async () => {
    const cases = [
      ["-c", "1000", "-d", "4"],
      ["-c", "0x10", "-d", "4"],
      ["-c", "010", "-d", "4"],
      ["-c", " 5", "-d", "4"],
      ["-c", "+5", "-d", "4"],
      ["-c", "-0"],
      ["-c", "-18446744073709551615"],
      ["-c", "0"],
      ["-c", "0", "-d", "0"],
      ["-s", "0", "-c", "3"],
      ["-c", "300", "-S", "5000", "-o", "1021k", "-s", "512"],
      ["-c", "2", "-o", "1020k"],
      ["-c", "1", "-o", "0x1k"],
      ["-c", "100", "-d", "1", "-S", "999"],
      ["-c", "50", "-s", "64k", "-S", "3", "-d", "7"],
      ["--pattern=0xff", "-c", "1"],
      ["-i", "io_uring", "-c", "1"],
      ["-i", "threads", "-c", "1"],
      ["-t", "none", "-c", "1"],
      ["-n", "-t", "none", "-c", "1"],
      ["-i", "native", "-t", "off", "-c", "1"],
      ["-t", "directsync", "-n", "-c", "1"],
      ["-t", "unsafe", "-c", "1"],
      ["-q", "-c", "1"],
      ["--no", "-c", "1"],
      ["--no-drain", "-c", "1"],
      ["-U", "--force-share", "-c", "1"],
      ["-f", "qcow2", "-c", "1"],
      ["-f", "raw", "-c", "4", "-d", "2"],
      ["@FILE", "-c", "3", "-d", "2"],
      ["-qUc", "7", "-d2"],
      ["--pattern", "3", "-c", "1"],
      ["-c1", "-s1k", "-S2k", "-o1k"],
    ];
    for (const c of cases) expect((await both("small.qcow2", c)).status, c.join(" ")).toBe(0);
    // Steps that never reach past the end of an 8 MiB image with these buffer sizes.
    for (const c of [["-c", "20000", "-s", "512", "-S", "1236992"], ["-c", "200", "-s", "1M", "-S", "0"], ["-c", "3000", "-o", "1000", "-s", "1000", "-S", "1232896"]]) {
      expect((await both("data.qcow2", c)).status, c.join(" ")).toBe(0);
      expect((await both("data.raw", ["-f", "raw", ...c])).status, c.join(" ")).toBe(0);
    }
    expect((await both("overlay.qcow2", ["-c", "2000", "-S", "3333", "-s", "1"])).status).toBe(0);
    expect((await both("odd.raw", ["-c", "3", "-s", "24"])).status).toBe(0);
  }, 120_000);

  it("leaves what qemu-img bench -w leaves, and a clean image", async () => {
    const cases = [
      ["-w", "-c", "2000"],
      ["-w", "-c", "3000", "-o", "1000", "-S", "1232896", "-s", "1000", "--pattern=0xab"],
      ["-w", "-c", "500", "-d", "16", "--flush-interval=16"],
      ["-w", "-c", "500", "-d", "8", "--flush-interval=100", "--no-drain"],
      ["-w", "-c", "200", "-t", "writethrough", "--pattern=7"],
      ["-w", "-c", "200", "-t", "unsafe", "-o", "3M", "--pattern=8"],
      ["-w", "-c", "100", "-s", "64k", "-S", "192k", "--pattern=0x5a"],
      ["-w", "-c", "5", "-s", "0"],
      ["-w", "-c", "50", "-s", "3", "-S", "7", "-o", "1000", "--pattern=1"],
      ["-w", "-c", "40", "-d", "1", "-s", "70000", "-S", "130000", "--pattern=2"],
    ];
    for (const image of ["data.qcow2", "v2-512.qcow2", "overlay.qcow2"]) {
      for (const c of cases) expect((await both(image, c)).status, `${image} ${c.join(" ")}`).toBe(0);
    }
    for (const c of cases.slice(0, 3)) {
      expect((await both("data.raw", ["-f", "raw", ...c])).status).toBe(0);
      expect((await both("data.raw", c)).status).toBe(0); // probed: qemu's warning about raw
    }
    // Past the end of a raw file, in its last sector: the file grows to it.
    expect((await both("odd.raw", ["-f", "raw", "-c", "1", "-o", "512", "-s", "512", "-w", "--pattern=1"])).status).toBe(0);
  }, 180_000);

  it("fails a request outside the image as qemu-img does, after its first line", async () => {
    const cases: Array<[string, string[]]> = [
      ["small.qcow2", ["-c", "2", "-o", "1M"]],
      ["small.qcow2", ["-c", "1", "-o", "1021k"]],
      ["small.qcow2", ["-c", "1", "-s", "2M"]],
      ["small.qcow2", ["-c", "1", "-o", "9223372036854775807"]],
      ["small.qcow2", ["-w", "-c", "1", "-o", "1M", "-s", "1"]],
      ["r512.raw", ["-f", "raw", "-c", "2", "-s", "512", "-o", "512", "-w", "--pattern=0"]],
      ["odd.raw", ["-f", "raw", "-c", "1", "-o", "1000"]],
      ["bad-compressed.qcow2", ["-c", "1"]],
    ];
    for (const [image, c] of cases) {
      const r = await both(image, c);
      expect(r.status).toBe(1);
      expect(r.stderr).toMatch(/Failed request: Input\/output error\n$/);
    }
  }, 60_000);

  it("refuses options, values and files as qemu-img does", async () => {
    const cases = [
      ["-x"],
      ["-xw"],
      ["-wx"],
      ["-c"],
      ["@FILE", "-c"],
      ["-c", "abc"],
      ["-c", "-1"],
      ["-c", "2147483648"],
      ["-c", "0x"],
      ["-c", "08"],
      ["-c", ""],
      ["-c", "1k"],
      ["-c", "-18446744073709551616"],
      ["-d", "abc"],
      ["-d", "-5"],
      ["-s", "abc"],
      ["-s", "3G"],
      ["-s", "0x10G"],
      ["-S", "3G"],
      ["-S", "x"],
      ["-o", "x"],
      ["-o", "-1"],
      ["-o", "9223372036854775808"],
      ["--pattern=256"],
      ["--pattern=-1"],
      ["--pattern=a"],
      ["--pattern"],
      ["--flush-interval=10"],
      ["-w", "--flush-interval=10"],
      ["-w", "--flush-interval=abc"],
      ["-w", "-d", "4", "--flush-interval=3"],
      ["-t", "foo"],
      ["-t", "toString"],
      ["-i", "foo"],
      ["-i", "Native"],
      ["-i", "native"],
      ["-n"],
      ["-n", "-t", "none", "-t", "writeback"],
      ["-i", "native", "-i", "threads"],
      ["--f"],
      ["--help=3"],
      ["--no-drain=1"],
      ["-c", "abc", "-x"],
      ["-x", "-c", "abc"],
      ["-t", "foo", "-c", "abc"],
      ["@FILE", "second"],
      ["@NOFILE"],
      ["@NOFILE", "-c", "1"],
      ["-f", "foo"],
      ["-f", "foo", "-n"],
      ["-n", "@DIR/missing"],
      ["-f", "vmdk", "@DIR/missing"],
      ["@DIR/missing"],
      ["-w", "@DIR/missing"],
      ["@DIR/a-directory"],
      ["-w", "@DIR/a-directory"],
      ["@NOFILE", ""],
      ["@NOFILE", "foo:bar"],
      ["@NOFILE", "-w", "file:@DIR/missing"],
    ];
    for (const c of cases) expect((await both("small.qcow2", c)).status, c.join(" ")).not.toBe(0);
    expect((await both("odd.raw", ["-f", "qcow2"])).status).toBe(1);
  }, 60_000);

  it("runs where qemu 7.2 crashes or hangs, and says why where it refuses", async () => {
    qemuImg(["create", "-f", "qcow2", at("empty.qcow2"), "0"]);
    const none = await runOurs(bench, ["-c", "2", at("empty.qcow2")]);
    expect(none).toEqual({
      status: 1,
      stdout: "Sending 2 read requests, 4096 bytes each, 64 in parallel (starting at offset 0, step size 4096)\n",
      stderr: "qemu-img: Failed request: Input/output error\n",
    });
    const zero = await runOurs(bench, ["-c", "2", "-s", "0", at("empty.qcow2")]);
    expect(zero.status).toBe(0);
    const huge = await runOurs(bench, ["-c", "1", "-d", "2147483647", "-s", "0", at("empty.qcow2")]);
    expect(huge.stdout).toMatch(/^Sending 1 read requests, 0 bytes each, 2147483647 in parallel/);
    expect(await runOurs(bench, ["-c", "2", "-d", "0", at("empty.qcow2")])).toEqual({
      status: 1,
      stdout: "",
      stderr: "qemu-img: A queue depth of 0 cannot send 2 requests\n",
    });
    copyFileSync(fixture("small.qcow2"), at("help.qcow2"));
    const help = await runOurs(bench, ["-h", at("help.qcow2")], { qemuNames: false });
    expect(help.stdout).toMatch(/^usage: qcow2-img bench \[-c count\]/);
  });
});

describe("bench engine", () => {
  /** A device that completes in issue order and records what it was asked. */
  function recorder(size: number): BenchTarget & { log: string[]; inFlight: number; maxInFlight: number; flushedWhileBusy: boolean } {
    const t = {
      size,
      log: [] as string[],
      inFlight: 0,
      maxInFlight: 0,
      flushedWhileBusy: false,
      async read(dst: Uint8Array, offset: number): Promise<void> {
        t.log.push(`r${offset}+${dst.length}`);
        t.inFlight++;
        t.maxInFlight = Math.max(t.maxInFlight, t.inFlight);
        await Promise.resolve();
        t.inFlight--;
      },
      async write(src: Uint8Array, offset: number): Promise<void> {
        t.log.push(`w${offset}+${src.length}:${src[0]}`);
        t.inFlight++;
        t.maxInFlight = Math.max(t.maxInFlight, t.inFlight);
        await Promise.resolve();
        t.inFlight--;
      },
      async flush(): Promise<void> {
        if (t.inFlight > 0) t.flushedWhileBusy = true;
        t.log.push("f");
        await Promise.resolve();
      },
    };
    return t;
  }

  it("keeps depth requests in flight, stepping and wrapping as qemu does", async () => {
    const t = recorder(10_000);
    const r = await runBench(t, { count: 7, depth: 3, bufferSize: 1000, step: 3000, offset: 2000 });
    expect(r.requests).toBe(7);
    expect(t.maxInFlight).toBe(3);
    expect(t.log).toEqual(["r2000+1000", "r5000+1000", "r8000+1000", "r1000+1000", "r4000+1000", "r7000+1000", "r0+1000"]);
  });

  it("flushes when the requests left to send are a multiple of the interval", async () => {
    // Drained: one flush per multiple (90, 80, ..., 10, 0), none with a request in flight.
    const drained = recorder(1 << 20);
    expect((await runBench(drained, { count: 100, depth: 4, write: true, flushInterval: 10 })).flushes).toBe(10);
    expect(drained.flushedWhileBusy).toBe(false);
    expect(drained.log.filter((x) => x === "f").length).toBe(10);
    // Not drained: every completion that sees a multiple flushes (9, then 4 as the last 4 finish).
    const undrained = recorder(1 << 20);
    expect((await runBench(undrained, { count: 100, depth: 4, write: true, flushInterval: 10, drainOnFlush: false })).flushes).toBe(13);
    // Writethrough: a flush after every write; unsafe: none at all.
    const wt = recorder(1 << 20);
    await runBench(wt, { count: 20, depth: 4, write: true, writethrough: true, pattern: 9 });
    expect(wt.log.filter((x) => x === "f").length).toBe(20);
    expect(wt.log.filter((x) => x.startsWith("w")).every((x) => x.endsWith(":9"))).toBe(true);
    const unsafe = recorder(1 << 20);
    await runBench(unsafe, { count: 20, depth: 4, write: true, flushInterval: 4, noFlush: true });
    expect(unsafe.log.includes("f")).toBe(false);
  });

  it("fails with EIO outside the device and waits for the requests still running", async () => {
    const t = recorder(8192);
    const run = runBench(t, { count: 5, depth: 4, bufferSize: 4096, offset: 4097 });
    await expect(run).rejects.toThrow(BenchError);
    await expect(run).rejects.toMatchObject({ kind: "request", reason: "Input/output error" });
    expect(t.inFlight).toBe(0);
  });
});
