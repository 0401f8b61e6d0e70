// qcow2-img commit against qemu-img commit on two copies of the same files: the same stdout,
// stderr and exit code (progress lines compared from first to last: qemu prints them as its job
// advances, a different number each run); then every image of the chain holds the same guest
// contents and virtual size in both copies, the top reads the same through its chain as before,
// was emptied unless -d or -b said not to, and qemu-img check finds our copies clean. Chains of two
// and three images, zero and compressed clusters, partial clusters, a top larger than its base,
// raw bases, cluster sizes from 512 B to 2 MiB, v2 images, and the errors qemu-img reports.

import { spawnSync } from "node:child_process";
import { copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import path from "node:path";
import { beforeAll, expect, it } from "vitest";
import { commit } from "../../ts/cli/commit.js";
import { runOurs, runQemuImg, type CliResult } from "../helpers/cli.js";
import { describeQemu, qemuImg, qemuIo, randomBytes, rng, tempDir } from "../helpers/qemu.js";

/** An image opened without its backing file (qemu's json: syntax). */
function alone(file: string): string {
  return `json:${JSON.stringify({ driver: "qcow2", backing: null, file: { driver: "file", filename: file } })}`;
}

function virtualSize(file: string): number {
  return (JSON.parse(qemuImg(["info", "-U", "--output=json", file])) as { "virtual-size": number })["virtual-size"];
}

/** What the top image maps itself, range by range. */
function ownLayout(file: string): string[] {
  const entries = JSON.parse(qemuImg(["map", "--output=json", alone(file)])) as Array<{ start: number; length: number; present: boolean; zero: boolean; data: boolean }>;
  return entries.filter((e) => e.present).map((e) => `${e.start}+${e.length}:${e.data ? "data" : "zero"}`);
}

/** qemu's progress lines as values, repeats dropped: the job prints a varying number of them. */
function progressValues(stdout: string): { values: number[]; rest: string } {
  const parts = stdout.split("\r");
  const values: number[] = [];
  let rest = "";
  for (const part of parts) {
    const m = /^ {4}\((\d+\.\d\d)\/100%\)$/.exec(part);
    if (m) {
      const v = Number(m[1]);
      if (values.at(-1) !== v) values.push(v);
    } else {
      rest += part;
    }
  }
  return { values, rest };
}

describeQemu("qcow2-img commit", () => {
  const dir = tempDir("qcow2-clicommit-");
  const fixtures = path.join(dir, "fixtures");
  const f = (name: string): string => path.join(fixtures, name);
  let caseNumber = 0;

  beforeAll(() => {
    mkdirSync(fixtures);
    const rand = rng(33);
    const src = path.join(dir, "random.src");
    writeFileSync(src, randomBytes(rand, 4 << 20));
    const create = (name: string, size: string, extra: string[] = []): void => {
      qemuImg(["create", "-f", "qcow2", ...extra, f(name), size]);
    };
    // base <- mid <- top, 64 KiB clusters.
    create("base.qcow2", "4M");
    qemuIo(f("base.qcow2"), [`write -s ${src} 0 1M`, "write -P 0x12 1536k 100k", "write -P 0x13 3M 1M"]);
    create("mid.qcow2", "4M", ["-b", "base.qcow2", "-F", "qcow2"]);
    qemuIo(f("mid.qcow2"), ["write -P 0x22 512k 1M", "write -P 0x23 3000k 5000", "write -z 3700k 4k"]);
    create("top.qcow2", "4M", ["-b", "mid.qcow2", "-F", "qcow2"]);
    qemuIo(f("top.qcow2"), ["write -P 0x33 1000 3000", "write -P 0x34 2M 64k", "write -z 3M 128k", "write -c -P 0x35 3584k 64k"]);
    // A base shorter than its overlay; the same over a raw base.
    create("short.qcow2", "1M");
    qemuIo(f("short.qcow2"), ["write -P 0x41 0 1M"]);
    create("tall.qcow2", "3M", ["-b", "short.qcow2", "-F", "qcow2"]);
    qemuIo(f("tall.qcow2"), ["write -P 0x42 2M 4k", "write -z 512k 64k", "write -P 0x43 900k 300k"]);
    qemuImg(["create", "-f", "raw", f("short.raw"), "1M"]);
    qemuIo(f("short.raw"), ["write -P 0x51 0 1M"], ["-f", "raw"]);
    create("rawtop.qcow2", "3M", ["-b", "short.raw", "-F", "raw"]);
    qemuIo(f("rawtop.qcow2"), ["write -P 0x52 2M 4k", "write -z 512k 64k", "write -P 0x53 900k 300k", "write -P 0x54 100 200"]);
    // v2 with 512-byte clusters under 4 KiB clusters; 2 MiB clusters under 64 KiB ones.
    create("v2base.qcow2", "2M", ["-o", "compat=0.10,cluster_size=512"]);
    qemuIo(f("v2base.qcow2"), [`write -s ${src} 0 700k`]);
    create("v2top.qcow2", "2M", ["-o", "compat=0.10,cluster_size=4096", "-b", "v2base.qcow2", "-F", "qcow2"]);
    qemuIo(f("v2top.qcow2"), ["write -P 0x61 100k 1000", "write -z 300k 8k", "write -P 0x62 1500k 64k"]);
    create("bigbase.qcow2", "4M", ["-o", "cluster_size=2M"]);
    qemuIo(f("bigbase.qcow2"), ["write -P 0x71 0 3M"]);
    create("bigtop.qcow2", "4M", ["-b", "bigbase.qcow2", "-F", "qcow2"]);
    qemuIo(f("bigtop.qcow2"), ["write -P 0x72 10k 20k", "write -z 2M 64k", "write -P 0x73 3M 70k"]);
    // A base with a backing file of its own: partial clusters of the base come from below it.
    create("under.qcow2", "2M");
    qemuIo(f("under.qcow2"), ["write -P 0x81 0 2M"]);
    create("over.qcow2", "2M", ["-o", "cluster_size=4096", "-b", "under.qcow2", "-F", "qcow2"]);
    qemuIo(f("over.qcow2"), ["write -P 0x82 8k 4k"]);
    create("overtop.qcow2", "2M", ["-b", "over.qcow2", "-F", "qcow2"]);
    qemuIo(f("overtop.qcow2"), ["write -P 0x83 1000 100", "write -z 1M 64k"]);
    // A top with an internal snapshot: emptying it keeps what the snapshot uses.
    create("snaptop.qcow2", "4M", ["-b", "base.qcow2", "-F", "qcow2"]);
    qemuIo(f("snaptop.qcow2"), ["write -P 0x91 0 1M"]);
    qemuImg(["snapshot", "-c", "s1", f("snaptop.qcow2")]);
    qemuIo(f("snaptop.qcow2"), ["write -P 0x92 512k 1M"]);
    // A top with nothing to commit, and a lone image.
    create("empty.qcow2", "4M", ["-b", "base.qcow2", "-F", "qcow2"]);
    create("lone.qcow2", "1M");
    qemuImg(["create", "-f", "raw", f("disk.raw"), "1M"]);
  }, 120_000);

  /** The files of the chain of fixture `image`, top first (nothing for a file that is not an image). */
  function chainOf(image: string): string[] {
    const r = spawnSync("qemu-img", ["info", "-U", "--backing-chain", "--output=json", f(image)], { encoding: "utf8" });
    if (r.status !== 0) return [];
    return (JSON.parse(r.stdout) as Array<{ filename: string }>).map((e) => path.basename(e.filename));
  }

  function copies(): string {
    const where = path.join(dir, `case${++caseNumber}`);
    mkdirSync(where);
    for (const name of readdirSync(fixtures)) copyFileSync(path.join(fixtures, name), path.join(where, name));
    return where;
  }

  /**
   * Our commit and qemu's on separate copies; `$` in the arguments stands for the copy's directory.
   * Returns our result and the two directories for further checks.
   */
  async function both(image: string, args: string[]): Promise<{ ours: CliResult; a: string; b: string }> {
    const a = copies();
    const b = copies();
    const expand = (where: string): string[] => [...args.map((x) => x.replaceAll("$", where)), path.join(where, image)];
    const mine = await runOurs(commit, expand(a));
    const qemus = runQemuImg("commit", expand(b));
    const label = { image, args };
    const norm = (r: CliResult, where: string): object => {
      const p = progressValues(r.stdout);
      // First and last progress values: what comes between depends on qemu's job timing.
      return { status: r.status, stderr: r.stderr.replaceAll(where, "DIR"), stdout: p.rest, progress: p.values.length ? [p.values[0], p.values.at(-1)] : [] };
    };
    expect({ ...label, ...norm(mine, a) }).toEqual({ ...label, ...norm(qemus, b) });
    const values = progressValues(mine.stdout).values;
    expect(values, "progress only moves forward").toEqual([...values].sort((x, y) => x - y));

    const identical = "Images are identical.\n";
    for (const name of chainOf(image)) {
      const ours = path.join(a, name);
      const theirs = path.join(b, name);
      const fileLabel = { ...label, name };
      if (name.endsWith(".raw")) {
        expect({ ...fileLabel, size: statSync(ours).size }).toEqual({ ...fileLabel, size: statSync(theirs).size });
        const r = spawnSync("qemu-img", ["compare", "-f", "raw", "-F", "raw", ours, theirs], { encoding: "utf8" });
        expect({ ...fileLabel, compare: r.stdout + r.stderr }).toEqual({ ...fileLabel, compare: identical });
        continue;
      }
      if (!name.endsWith(".qcow2")) continue;
      expect({ ...fileLabel, size: virtualSize(ours) }).toEqual({ ...fileLabel, size: virtualSize(theirs) });
      const own = spawnSync("qemu-img", ["compare", alone(ours), alone(theirs)], { encoding: "utf8" });
      expect({ ...fileLabel, alone: own.stdout + own.stderr }).toEqual({ ...fileLabel, alone: identical });
      const chained = spawnSync("qemu-img", ["compare", "-f", "qcow2", "-F", "qcow2", ours, theirs], { encoding: "utf8" });
      expect({ ...fileLabel, chained: chained.stdout + chained.stderr }).toEqual({ ...fileLabel, chained: identical });
      expect({ ...fileLabel, own: ownLayout(ours).length === 0 }).toEqual({ ...fileLabel, own: ownLayout(theirs).length === 0 });
      const check = spawnSync("qemu-img", ["check", alone(ours)], { encoding: "utf8" });
      expect({ ...fileLabel, check: check.status, out: check.stdout }).toMatchObject({ ...fileLabel, check: 0 });
    }
    if (existsSync(path.join(a, image)) && image.endsWith(".qcow2") && mine.status === 0) {
      // The top reads what it read before.
      const r = spawnSync("qemu-img", ["compare", "-f", "qcow2", "-F", "qcow2", f(image), path.join(a, image)], { encoding: "utf8" });
      expect({ ...label, before: r.stdout + r.stderr }).toEqual({ ...label, before: identical });
    }
    return { ours: mine, a, b };
  }

  it("commits into the backing file and empties the top, as qemu-img does", async () => {
    for (const image of ["top.qcow2", "mid.qcow2", "tall.qcow2", "rawtop.qcow2", "v2top.qcow2", "bigtop.qcow2", "overtop.qcow2", "empty.qcow2", "snaptop.qcow2"]) {
      const { ours, a } = await both(image, []);
      expect(ours.status, image).toBe(0);
      expect(ours.stdout).toBe("Image committed.\n");
      expect(ownLayout(path.join(a, image)), image).toEqual([]);
    }
    // The snapshot still reads what it did.
    const { a, b } = await both("snaptop.qcow2", []);
    const snapshot = (where: string): Buffer => {
      const out = path.join(where, "s1.raw");
      qemuImg(["convert", "-l", "s1", "-O", "raw", path.join(where, "snaptop.qcow2"), out]);
      return readFileSync(out);
    };
    expect(snapshot(a).equals(snapshot(b))).toBe(true);
  }, 180_000);

  it("keeps the top with -d, and with -b, which commits the images in between too", async () => {
    const cases: Array<[string, string[]]> = [
      ["top.qcow2", ["-d"]],
      ["top.qcow2", ["-b", "$/base.qcow2"]],
      ["top.qcow2", ["-b", "$/mid.qcow2"]],
      ["overtop.qcow2", ["-b", "$/under.qcow2"]],
      ["tall.qcow2", ["-d", "-q"]],
      ["top.qcow2", ["-q", "-t", "none", "-r", "100M"]],
    ];
    for (const [image, args] of cases) {
      const { ours, a } = await both(image, args);
      expect(ours.status, `${image} ${args.join(" ")}`).toBe(0);
      if (args.includes("-d") || args.includes("-b")) {
        expect(ownLayout(path.join(a, image))).toEqual(ownLayout(f(image)));
      }
    }
  }, 180_000);

  it("finds -b as qemu-img does: relative to each image's directory, by canonical path", async () => {
    for (const base of ["base.qcow2", "./mid.qcow2", "$/../CASE/base.qcow2", "mid.qcow2/../base.qcow2", "nothere.qcow2"]) {
      const a = copies();
      const b = copies();
      const arg = (where: string): string => base.replace("$", where).replace("CASE", path.basename(where));
      // Relative names are taken against the images' directory, not the working directory.
      const mine = await runOurs(commit, ["-b", arg(a), path.join(a, "top.qcow2")]);
      const qemus = runQemuImg("commit", ["-b", arg(b), path.join(b, "top.qcow2")]);
      expect({ base, ...mine, stderr: mine.stderr.replaceAll(a, "DIR") }).toEqual({ base, ...qemus, stderr: qemus.stderr.replaceAll(b, "DIR") });
      if (qemus.status === 0) {
        const r = spawnSync("qemu-img", ["compare", "-f", "qcow2", "-F", "qcow2", path.join(a, "base.qcow2"), path.join(b, "base.qcow2")], { encoding: "utf8" });
        expect({ base, compare: r.stdout }).toEqual({ base, compare: "Images are identical.\n" });
      }
    }
  }, 120_000);

  it("prints progress with -p from 0 to 100, nothing with -q", async () => {
    for (const [image, args] of [
      ["top.qcow2", ["-p"]],
      ["tall.qcow2", ["-p", "-d"]],
      ["empty.qcow2", ["-p"]],
      ["top.qcow2", ["-p", "-q"]],
      ["lone.qcow2", ["-p"]],
      ["top.qcow2", ["-p", "-b", "nothere"]],
    ] as Array<[string, string[]]>) {
      await both(image, args);
    }
  }, 120_000);

  it("fails as qemu-img does", async () => {
    const cases: Array<[string, string[]]> = [
      ["lone.qcow2", []],
      ["top.qcow2", ["-b", "nothere.qcow2"]],
      ["top.qcow2", ["-b", "top.qcow2"]],
      ["top.qcow2", ["-r", "abc"]],
      ["top.qcow2", ["-r", "-5"]],
      ["top.qcow2", ["-t", "bogus"]],
      ["top.qcow2", ["-p", "-t", "bogus"]],
      ["top.qcow2", ["-f", "foo"]],
      ["top.qcow2", ["-f", "raw"]],
      ["disk.raw", []],
      ["nothere.qcow2", []],
      ["nothere.qcow2", ["-f", "foo"]],
      ["top.qcow2", ["-x"]],
      ["top.qcow2", ["-qx"]],
      ["top.qcow2", ["--nosuch"]],
      ["top.qcow2", ["-b"]],
      ["top.qcow2", ["extra"]],
    ];
    for (const [image, args] of cases) {
      const { ours } = await both(image, args);
      expect(ours.status, `${image} ${args.join(" ")}`).toBe(1);
    }
  }, 180_000);

  it("reports a missing backing file as qemu-img does", async () => {
    const a = copies();
    const b = copies();
    for (const where of [a, b]) rmSync(path.join(where, "base.qcow2"));
    const mine = await runOurs(commit, [path.join(a, "top.qcow2")]);
    const qemus = runQemuImg("commit", [path.join(b, "top.qcow2")]);
    expect({ ...mine, stderr: mine.stderr.replaceAll(a, "DIR") }).toEqual({ ...qemus, stderr: qemus.stderr.replaceAll(b, "DIR") });
    expect(mine.status).toBe(1);
  }, 60_000);
});
