// qcow2-img rebase against qemu-img rebase on two copies of the same files: the same stdout
// (progress included), stderr and exit code; then the same guest contents through the new chain
// (qemu-img compare), the same backing fields in qemu-img info, and a clean qemu-img check of our
// copy. Chains of two and three images with data at odd offsets, zero clusters, backing files
// shorter and longer than the overlay, raw backing files, cluster sizes from 512 B to 2 MiB, v2
// images, unsafe mode, errors, and a seeded random run of safe rebases.

import { spawnSync } from "node:child_process";
import { copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import path from "node:path";
import { beforeAll, expect, it } from "vitest";
import { rebase } from "../../ts/cli/rebase.js";
import { runOurs, runQemuImg, type CliResult } from "../helpers/cli.js";
import { describeQemu, qemuImg, qemuIo, randomBytes, rng, tempDir } from "../helpers/qemu.js";

interface BackingFields {
  "backing-filename"?: string;
  "full-backing-filename"?: string;
  "backing-filename-format"?: string;
  "virtual-size": number;
}

/** An image opened without its backing file (qemu's json: syntax). */
function alone(file: string): string {
  return `json:${JSON.stringify({ driver: "qcow2", backing: null, file: { driver: "file", filename: file } })}`;
}

function backingFields(file: string, dir: string): BackingFields {
  const info = JSON.parse(qemuImg(["info", "-U", "--output=json", "-f", "qcow2", file])) as BackingFields;
  const full = info["full-backing-filename"];
  return {
    "virtual-size": info["virtual-size"],
    ...(info["backing-filename"] !== undefined ? { "backing-filename": info["backing-filename"].replaceAll(dir, "DIR") } : {}),
    ...(full !== undefined ? { "full-backing-filename": full.replaceAll(dir, "DIR") } : {}),
    ...(info["backing-filename-format"] !== undefined ? { "backing-filename-format": info["backing-filename-format"] } : {}),
  };
}

describeQemu("qcow2-img rebase", () => {
  const dir = tempDir("qcow2-clirebase-");
  const fixtures = path.join(dir, "fixtures");
  const f = (name: string): string => path.join(fixtures, name);
  let caseNumber = 0;

  beforeAll(() => {
    mkdirSync(fixtures);
    const rand = rng(21);
    const src = path.join(dir, "random.src");
    writeFileSync(src, randomBytes(rand, 4 << 20));
    const create = (name: string, size: string, extra: string[] = []): void => {
      qemuImg(["create", "-f", "qcow2", ...extra, f(name), size]);
    };
    // base <- mid <- top, 64 KiB clusters: data at cluster edges and inside clusters, zero clusters.
    create("base.qcow2", "4M");
    qemuIo(f("base.qcow2"), [`write -s ${src} 0 1M`, "write -P 0x12 1536k 100k", "write -c -P 0x14 2560k 64k", "write -z 3M 64k", "write -P 0x13 3700k 300k"]);
    create("mid.qcow2", "4M", ["-b", "base.qcow2", "-F", "qcow2"]);
    qemuIo(f("mid.qcow2"), ["write -P 0x22 512k 1M", "write -P 0x23 3000k 5000", "write -z 3700k 4k"]);
    create("top.qcow2", "4M", ["-b", "mid.qcow2", "-F", "qcow2"]);
    qemuIo(f("top.qcow2"), ["write -P 0x33 1000 3000", "write -P 0x34 2M 64k", "write -z 3584k 64k"]);
    // New backing files: partly equal to the old chain, shorter, raw, of another cluster size.
    create("other.qcow2", "4M", ["-o", "cluster_size=4096"]);
    qemuIo(f("other.qcow2"), [`write -s ${src} 0 256k`, "write -P 0x22 700k 300k", "write -P 0x44 2M 1M"]);
    create("short.qcow2", "1M");
    qemuIo(f("short.qcow2"), ["write -P 0x55 0 1M"]);
    create("long.qcow2", "8M");
    qemuIo(f("long.qcow2"), ["write -P 0x66 3M 5M"]);
    writeFileSync(f("other.raw"), Buffer.concat([Buffer.alloc(1 << 20, 0x77), readFileSync(src).subarray(0, (2 << 20) + 1000)]));
    // An overlay longer than its backing file.
    create("tall.qcow2", "4M", ["-b", "short.qcow2", "-F", "qcow2"]);
    qemuIo(f("tall.qcow2"), ["write -P 0x88 900k 200k", "write -P 0x89 3M 4096"]);
    // v2, 512-byte clusters, over a v2 base.
    create("b2.qcow2", "2M", ["-o", "compat=0.10,cluster_size=512"]);
    qemuIo(f("b2.qcow2"), [`write -s ${src} 0 700k`, "write -P 0x91 1M 333k"]);
    create("t2.qcow2", "2M", ["-o", "compat=0.10,cluster_size=512", "-b", "b2.qcow2", "-F", "qcow2"]);
    qemuIo(f("t2.qcow2"), ["write -P 0x92 100k 1000", "write -P 0x93 1500k 64k"]);
    // 2 MiB clusters over 64 KiB ones; 4 KiB clusters.
    create("big.qcow2", "4M", ["-o", "cluster_size=2M", "-b", "mid.qcow2", "-F", "qcow2"]);
    qemuIo(f("big.qcow2"), ["write -P 0xa1 10k 20k"]);
    create("small.qcow2", "4M", ["-o", "cluster_size=4096", "-b", "mid.qcow2", "-F", "qcow2"]);
    qemuIo(f("small.qcow2"), ["write -P 0xb1 5000 10000", "write -z 1M 8k"]);
    // Wider images: many pieces for the progress meter, and a size that is not a multiple of 2 MiB.
    create("widebase.qcow2", "41M");
    qemuIo(f("widebase.qcow2"), ["write -P 0xc1 0 3M", "write -P 0xc2 20M 5M", "write -P 0xc3 39M 2M"]);
    create("wide.qcow2", "41M", ["-b", "widebase.qcow2", "-F", "qcow2"]);
    qemuIo(f("wide.qcow2"), ["write -P 0xc4 1M 4k", "write -P 0xc5 22M 3M", "write -z 40M 64k"]);
    // A raw file to refuse, and an image whose header has little room left.
    qemuImg(["create", "-f", "raw", f("disk.raw"), "1M"]);
    create("tiny.qcow2", "1M", ["-o", "cluster_size=512"]);
    // qcow2 magic, then garbage: an unsupported version.
    writeFileSync(f("junk.qcow2"), Buffer.concat([Buffer.from([0x51, 0x46, 0x49, 0xfb]), Buffer.from(randomBytes(rand, 96))]));
  }, 120_000);

  /** A fresh directory holding copies of every file of `from` (the fixtures). */
  function copies(from = fixtures): string {
    const where = path.join(dir, `case${++caseNumber}`);
    mkdirSync(where);
    for (const name of readdirSync(from)) copyFileSync(path.join(from, name), path.join(where, name));
    return where;
  }

  /**
   * Run our rebase and qemu's on separate copies (file names relative to each copy's directory
   * through `$`), compare their output, then what the image reads and says about its backing file.
   */
  async function both(image: string, args: string[], options: { from?: string } = {}): Promise<{ ours: CliResult; qemuChangedGuest: boolean }> {
    const from = options.from ?? fixtures;
    const a = copies(from);
    const b = copies(from);
    const expand = (where: string): string[] => [...args.map((x) => x.replaceAll("$", where)), path.join(where, image)];
    const mine = await runOurs(rebase, expand(a));
    const qemus = runQemuImg("rebase", expand(b));
    const label = { image, args };
    const norm = (r: CliResult, where: string): CliResult => ({ ...r, stderr: r.stderr.replaceAll(where, "DIR"), stdout: r.stdout });
    expect({ ...label, ...norm(mine, a) }).toEqual({ ...label, ...norm(qemus, b) });
    const ourFile = path.join(a, image);
    const theirFile = path.join(b, image);
    let qemuChangedGuest = false;
    if (image.endsWith(".qcow2") && existsSync(theirFile)) {
      expect({ ...label, info: backingFields(ourFile, a) }).toEqual({ ...label, info: backingFields(theirFile, b) });
      // Through the new chain where it opens, else the images alone.
      const chained = spawnSync("qemu-img", ["info", "--backing-chain", theirFile]).status === 0;
      const same = (x: string, y: string): string => {
        const pair = chained ? ["-f", "qcow2", "-F", "qcow2", x, y] : [alone(x), alone(y)];
        const r = spawnSync("qemu-img", ["compare", ...pair], { encoding: "utf8" });
        return r.stdout + r.stderr;
      };
      const identical = "Images are identical.\n";
      if (chained) {
        // What the guest read before the rebase is what it reads now.
        expect({ ...label, before: same(path.join(from, image), ourFile) }).toEqual({ ...label, before: identical });
        qemuChangedGuest = same(path.join(from, image), theirFile) !== identical;
      }
      if (!qemuChangedGuest) expect({ ...label, compare: same(ourFile, theirFile) }).toEqual({ ...label, compare: identical });
      const check = spawnSync("qemu-img", ["check", alone(ourFile)], { encoding: "utf8" });
      expect({ ...label, check: check.status, out: check.stdout }).toMatchObject({ ...label, check: 0 });
    }
    const result = { ours: mine, qemuChangedGuest };
    rmSync(a, { recursive: true });
    rmSync(b, { recursive: true });
    return result;
  }

  it("rebases safely onto another image of the chain, another image, a raw file, or none", async () => {
    const cases: Array<[string, string[]]> = [
      ["top.qcow2", ["-b", "base.qcow2", "-F", "qcow2"]],
      ["top.qcow2", ["-b", "mid.qcow2", "-F", "qcow2"]],
      ["top.qcow2", ["-b", "other.qcow2", "-F", "qcow2"]],
      ["top.qcow2", ["-b", "$/other.qcow2", "-F", "qcow2"]],
      ["top.qcow2", ["-b", "short.qcow2", "-F", "qcow2"]],
      ["top.qcow2", ["-b", "long.qcow2", "-F", "qcow2"]],
      ["top.qcow2", ["-b", "tall.qcow2", "-F", "qcow2"]],
      ["top.qcow2", ["-b", "other.raw", "-F", "raw"]],
      ["top.qcow2", ["-b", "other.qcow2"]],
      ["top.qcow2", ["-b", ""]],
      ["mid.qcow2", ["-b", "", "-F", "qcow2"]],
      ["mid.qcow2", ["-b", "other.qcow2", "-F", "qcow2", "-q"]],
      ["tall.qcow2", ["-b", "long.qcow2", "-F", "qcow2"]],
      ["tall.qcow2", ["-b", "other.raw", "-F", "raw"]],
      ["tall.qcow2", ["-b", ""]],
      ["t2.qcow2", ["-b", "other.qcow2", "-F", "qcow2"]],
      ["t2.qcow2", ["-b", ""]],
      ["big.qcow2", ["-b", "other.qcow2", "-F", "qcow2"]],
      ["big.qcow2", ["-b", "base.qcow2", "-F", "qcow2"]],
      ["small.qcow2", ["-b", "short.qcow2", "-F", "qcow2"]],
      ["small.qcow2", ["-b", "base.qcow2", "-F", "qcow2", "-U", "-t", "none", "-T", "writethrough"]],
      ["other.qcow2", ["-b", "base.qcow2", "-F", "qcow2"]],
    ];
    for (const [image, args] of cases) expect((await both(image, args)).qemuChangedGuest, `${image} ${args.join(" ")}`).toBe(false);
  }, 120_000);

  it("keeps the guest's zeros where qemu-img 7.2 lets the new backing file show through (v2, no old backing)", async () => {
    // qemu 7.2 "writes zeros" into a v2 image without a backing file by discarding the clusters, so
    // after the rebase the new backing file's data shows there. The zeros are written as data here.
    const r = await both("b2.qcow2", ["-b", "other.qcow2", "-F", "qcow2"]);
    expect(r.ours.status).toBe(0);
    expect(r.qemuChangedGuest).toBe(true);
  }, 60_000);

  it("reuses an image of the chain whatever -F says, as qemu-img does", async () => {
    const r = await both("top.qcow2", ["-b", "base.qcow2", "-F", "vmdk"]);
    expect(r.ours.status).toBe(0);
  }, 120_000);

  it("prints qemu-img's progress with -p", async () => {
    for (const [image, args] of [
      ["top.qcow2", ["-p", "-b", "other.qcow2", "-F", "qcow2"]],
      ["top.qcow2", ["-p", "-b", "base.qcow2", "-F", "qcow2"]],
      ["t2.qcow2", ["-p", "-b", ""]],
      ["wide.qcow2", ["-p", "-b", ""]],
      ["wide.qcow2", ["-p", "-b", "other.qcow2", "-F", "qcow2"]],
      ["wide.qcow2", ["-p", "-b", "widebase.qcow2", "-F", "qcow2"]],
      ["small.qcow2", ["-p", "-q", "-b", "", "-F", "qcow2"]],
      ["top.qcow2", ["-p", "-u", "-b", "x.qcow2", "-F", "qcow2"]],
      ["top.qcow2", ["-p", "-b", "nothere.qcow2", "-F", "qcow2"]],
      ["top.qcow2", ["-p", "-b", "short.qcow2"]],
    ] as Array<[string, string[]]>) {
      await both(image, args);
    }
  }, 120_000);

  it("changes only the header in unsafe mode, byte for byte as qemu-img", async () => {
    for (const [image, args] of [
      ["top.qcow2", ["-u", "-b", "nothere.qcow2", "-F", "qcow2"]],
      ["top.qcow2", ["-u", "-b", "other.qcow2", "-F", "qcow2"]],
      ["top.qcow2", ["-u", "-b", "sub/../base.qcow2", "-F", "raw"]],
      ["top.qcow2", ["-u"]],
      ["top.qcow2", ["-u", "-b", ""]],
      ["top.qcow2", ["-u", "-b", "x.qcow2"]],
      ["t2.qcow2", ["-u", "-b", "other.qcow2", "-F", "qcow2"]],
      ["t2.qcow2", ["-u"]],
      ["tiny.qcow2", ["-u", "-b", "b".repeat(300), "-F", "qcow2"]],
      ["tiny.qcow2", ["-u", "-b", "b".repeat(420), "-F", "qcow2"]],
      ["other.qcow2", ["-u", "-b", "a".repeat(1023), "-F", "qcow2"]],
      ["other.qcow2", ["-u", "-b", "a".repeat(1024), "-F", "qcow2"]],
    ] as Array<[string, string[]]>) {
      const a = copies();
      const b = copies();
      const mine = await runOurs(rebase, [...args, path.join(a, image)]);
      const qemus = runQemuImg("rebase", [...args, path.join(b, image)]);
      const label = { image, args: args.map((x) => (x.length > 40 ? `${x.slice(0, 10)}...(${x.length})` : x)) };
      const norm = (r: CliResult, where: string): CliResult => ({ ...r, stderr: r.stderr.replaceAll(where, "DIR") });
      expect({ ...label, ...norm(mine, a) }).toEqual({ ...label, ...norm(qemus, b) });
      // The header cluster, as qemu writes it (the guest data is not touched).
      const cluster = image === "tiny.qcow2" ? 512 : image === "other.qcow2" ? 4096 : image === "t2.qcow2" ? 512 : 65536;
      const head = (file: string): string => readFileSync(file).subarray(0, cluster).toString("hex");
      expect({ ...label, header: head(path.join(a, image)) }).toEqual({ ...label, header: head(path.join(b, image)) });
      expect(readFileSync(path.join(a, image)).subarray(cluster).equals(readFileSync(f(image)).subarray(cluster))).toBe(true);
      const check = spawnSync("qemu-img", ["check", alone(path.join(a, image))], { encoding: "utf8" });
      expect({ ...label, check: check.stdout.split("\n")[0] }).toEqual({ ...label, check: "No errors were found on the image." });
      rmSync(a, { recursive: true });
      rmSync(b, { recursive: true });
    }
  }, 120_000);

  it("fails as qemu-img does", async () => {
    const cases: Array<[string, string[]]> = [
      ["top.qcow2", []],
      ["top.qcow2", ["-F", "qcow2"]],
      ["top.qcow2", ["-b", "nothere.qcow2", "-F", "qcow2"]],
      ["top.qcow2", ["-b", "sub/nothere.qcow2"]],
      ["top.qcow2", ["-b", "disk.raw", "-F", "qcow2"]],
      ["top.qcow2", ["-b", "junk.qcow2", "-F", "qcow2"]],
      ["top.qcow2", ["-b", "base.qcow2", "-F", "foo"]],
      ["top.qcow2", ["-t", "bogus", "-b", "base.qcow2", "-F", "qcow2"]],
      ["top.qcow2", ["-T", "bogus", "-b", "base.qcow2", "-F", "qcow2"]],
      ["top.qcow2", ["-f", "foo", "-u", "-b", "x", "-F", "qcow2"]],
      ["top.qcow2", ["-x", "-b", "base.qcow2"]],
      ["top.qcow2", ["-b", "base.qcow2", "-F", "qcow2", "-qx"]],
      ["top.qcow2", ["--nosuch", "-b", "base.qcow2"]],
      ["top.qcow2", ["-b", "base.qcow2", "-F", "qcow2", "extra"]],
      ["top.qcow2", ["-b"]],
      ["nothere.qcow2", ["-b", "base.qcow2", "-F", "qcow2"]],
      ["nothere.qcow2", ["-f", "foo", "-u", "-b", "x"]],
      ["disk.raw", ["-b", "base.qcow2", "-F", "qcow2"]],
      ["disk.raw", ["-f", "raw", "-b", ""]],
      ["disk.raw", ["-f", "raw", "-u"]],
      ["disk.raw", ["-p", "-f", "raw", "-b", "base.qcow2"]],
      ["base.qcow2", ["-f", "raw", "-u", "-b", "x", "-F", "qcow2"]],
    ];
    for (const [image, args] of cases) {
      const r = await both(image, args);
      expect(r.ours.status, `${image} ${args.join(" ")}`).toBe(1);
    }
  }, 120_000);

  it("reports a missing backing file of the image as qemu-img does", async () => {
    const a = copies();
    const b = copies();
    for (const where of [a, b]) rmSync(path.join(where, "base.qcow2"));
    const args = (where: string): string[] => ["-b", "", path.join(where, "top.qcow2")];
    const mine = await runOurs(rebase, args(a));
    const qemus = runQemuImg("rebase", args(b));
    expect({ ...mine, stderr: mine.stderr.replaceAll(a, "DIR") }).toEqual({ ...qemus, stderr: qemus.stderr.replaceAll(b, "DIR") });
    expect(mine.status).toBe(1);
  }, 120_000);

  it("matches qemu-img on random chains (seeded)", async () => {
    const rand = rng(2024);
    const pick = <T>(xs: T[]): T => xs[Math.floor(rand() * xs.length)]!;
    const sizes = [1 << 20, 3 << 20, (4 << 20) + 512 * 7];
    // Rounds where qemu-img kept the guest's contents (see the v2 test above) are compared with it.
    let comparedWithQemu = 0;
    for (let round = 0; round < 6; round++) {
      const where = path.join(dir, `rnd${round}`);
      mkdirSync(where);
      const g = (name: string): string => path.join(where, name);
      const writes = (file: string, size: number, count: number): void => {
        const cmds: string[] = [];
        for (let i = 0; i < count; i++) {
          const len = Math.min(size - 512, 512 * (1 + Math.floor(rand() * (rand() < 0.5 ? 16 : 600))));
          const off = 512 * Math.floor((rand() * (size - len)) / 512);
          cmds.push(rand() < 0.2 ? `write -z ${off} ${len}` : `write -P ${1 + Math.floor(rand() * 250)} ${off} ${len}`);
        }
        qemuIo(file, cmds);
      };
      const layers = 1 + Math.floor(rand() * 3);
      let below: string | undefined;
      for (let l = 0; l < layers; l++) {
        const size = pick(sizes);
        const cs = pick(["512", "4096", "65536"]);
        const compat = pick(["1.1", "1.1", "0.10"]);
        qemuImg(["create", "-f", "qcow2", "-o", `cluster_size=${cs},compat=${compat}`, ...(below ? ["-b", below, "-F", "qcow2"] : []), g(`l${l}.qcow2`), String(size)]);
        writes(g(`l${l}.qcow2`), size, 2 + Math.floor(rand() * 10));
        below = `l${l}.qcow2`;
      }
      const sizeOf = (file: string): number => (JSON.parse(qemuImg(["info", "--output=json", file])) as { "virtual-size": number })["virtual-size"];
      const newSize = pick(sizes);
      qemuImg(["create", "-f", "qcow2", "-o", `cluster_size=${pick(["4096", "65536"])}`, g("new.qcow2"), String(newSize)]);
      writes(g("new.qcow2"), newSize, 3 + Math.floor(rand() * 8));
      // Half the time the new backing file starts as a copy of the bottom image: mostly the same bytes.
      if (rand() < 0.5) {
        rmSync(g("new.qcow2"));
        qemuImg(["convert", "-O", "qcow2", "-o", "cluster_size=4096", g("l0.qcow2"), g("new.qcow2")]);
        writes(g("new.qcow2"), sizeOf(g("new.qcow2")), 1 + Math.floor(rand() * 4));
      }
      const target = pick(["new.qcow2", "", "l0.qcow2"]);
      const r = await both(`l${layers - 1}.qcow2`, ["-b", target, "-F", "qcow2"], { from: where });
      expect(r.ours.status).toBe(0);
      if (!r.qemuChangedGuest) comparedWithQemu++;
    }
    expect(comparedWithQemu).toBeGreaterThanOrEqual(3);
  }, 300_000);
});
