// qcow2-img amend against qemu-img amend, each on its own copy of the same image: the same stdout
// (-o help, the -p meter), stderr and exit code; then, whether the amend succeeded or stopped part
// way, the same qemu-img info (parsed, filename and actual size aside), the same guest contents
// (qemu-img compare) and the same snapshot contents, and a clean qemu-img check of our copy.
// Fixtures come from qemu-img/qemu-io: data, zero clusters (plain, preallocated, unmapped),
// compressed clusters, a backing file, internal snapshots, lazy refcounts left dirty by a crash,
// persistent bitmaps, a v2 snapshot table without extra data, 512-byte clusters.

import { spawnSync } from "node:child_process";
import { copyFileSync, mkdirSync, openSync, readFileSync, readSync, writeFileSync, writeSync, closeSync } from "node:fs";
import path from "node:path";
import { beforeAll, expect, it } from "vitest";
import { amend } from "../../ts/cli/amend.js";
import { amend as amendImage, AmendError, type AmendOptions } from "../../ts/ops/amend.js";
import { CrashBackend } from "../helpers/crash-backend.js";
import { MemoryBackend } from "../../ts/io/memory.js";
import { runOurs, runQemuImg, type CliResult } from "../helpers/cli.js";
import { describeQemu, qemuImg, qemuIo, randomBytes, rng, tempDir } from "../helpers/qemu.js";

/** Files a fixture needs beside it (its backing chain). */
const COMPANIONS: Record<string, string[]> = {
  "overlay.qcow2": ["base.qcow2"],
  "overlay-snap.qcow2": ["base.qcow2"],
  "short-overlay.qcow2": ["long-base.qcow2"],
};

/** qemu-img info --output=json, parsed; the file's own name, its directory and its allocation set aside. */
function info(file: string): Record<string, unknown> {
  const r = JSON.parse(qemuImg(["info", "--output=json", file]).replaceAll(path.dirname(file), "DIR")) as Record<string, unknown>;
  delete r.filename;
  delete r["actual-size"];
  return r;
}

function snapshotNames(file: string): string[] {
  const r = JSON.parse(qemuImg(["info", "--output=json", file])) as { snapshots?: Array<{ name: string }> };
  return (r.snapshots ?? []).map((s) => s.name);
}

/** The guest contents of snapshot `name` as raw bytes. */
function snapshotBytes(file: string, name: string, out: string): Buffer {
  qemuImg(["convert", "-l", `snapshot.name=${name}`, "-O", "raw", file, out]);
  return readFileSync(out);
}

function checkStatus(file: string): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync("qemu-img", ["check", file], { encoding: "utf8" });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

describeQemu("qcow2-img amend", () => {
  const dir = tempDir("qcow2-cliamend-");
  const fixtures = path.join(dir, "fixtures");
  const o = path.join(dir, "o");
  const q = path.join(dir, "q");
  const f = (name: string): string => path.join(fixtures, name);

  beforeAll(() => {
    for (const d of [fixtures, o, q]) mkdirSync(d, { recursive: true });
    const rand = rng(11);
    const src = f("random.src");
    writeFileSync(src, randomBytes(rand, 4 << 20));
    // Zero clusters of every kind: preallocated (data then zeroed), plain, unmapped (-u).
    qemuImg(["create", "-f", "qcow2", f("zeros.qcow2"), "4M"]);
    qemuIo(f("zeros.qcow2"), [`write -s ${src} 0 1M`, "write -z 256k 128k", "write -z -u 512k 64k", "write -z 2M 128k", `write -s ${src} 3M 100k`]);
    // Compressed clusters (several share a host cluster), plus zero clusters over some of them.
    writeFileSync(f("half.raw"), Buffer.concat([Buffer.from(randomBytes(rand, 1 << 20)), Buffer.alloc(1 << 20, 0x41), Buffer.alloc(2 << 20)]));
    qemuImg(["convert", "-c", "-f", "raw", "-O", "qcow2", f("half.raw"), f("compressed.qcow2")]);
    qemuIo(f("compressed.qcow2"), ["write -z 1M 128k", `write -s ${src} 3M 64k`]);
    // Snapshots: data, a snapshot, data written over part of it, another snapshot.
    qemuImg(["create", "-f", "qcow2", f("snap.qcow2"), "4M"]);
    qemuIo(f("snap.qcow2"), [`write -s ${src} 0 1M`, "write -z 1536k 64k"]);
    qemuImg(["snapshot", "-c", "s1", f("snap.qcow2")]);
    qemuIo(f("snap.qcow2"), ["write -P 0x5a 512k 1M", "write -z 2M 64k"]);
    qemuImg(["snapshot", "-c", "s2", f("snap.qcow2")]);
    qemuIo(f("snap.qcow2"), ["write -P 0x6b 3M 64k"]);
    // Zero clusters written over clusters a snapshot shares (qemu's downgrade zeroes them in place).
    qemuImg(["create", "-f", "qcow2", f("snap-zero.qcow2"), "4M"]);
    qemuIo(f("snap-zero.qcow2"), [`write -s ${src} 0 256k`, "write -z 128k 64k"]);
    qemuImg(["snapshot", "-c", "s1", f("snap-zero.qcow2")]);
    qemuIo(f("snap-zero.qcow2"), ["write -z 1M 64k", "write -z 64k 64k"]);
    // A backing file and overlays with zero clusters (a downgrade must allocate those).
    qemuImg(["create", "-f", "qcow2", f("base.qcow2"), "4M"]);
    qemuIo(f("base.qcow2"), ["write -P 0x33 0 4M"]);
    qemuImg(["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", f("overlay.qcow2")]);
    qemuIo(f("overlay.qcow2"), ["write -P 0x11 0 256k", "write -z 512k 128k", "write -z 128k 64k", "write -z -u 2M 64k"]);
    qemuImg(["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", f("overlay-snap.qcow2")]);
    qemuIo(f("overlay-snap.qcow2"), ["write -P 0x11 0 256k", "write -z 512k 128k"]);
    qemuImg(["snapshot", "-c", "s1", f("overlay-snap.qcow2")]);
    qemuIo(f("overlay-snap.qcow2"), ["write -z 1M 64k", "write -z 3M 128k"]);
    // A backing file longer than its overlay: growing the overlay must not uncover it.
    qemuImg(["create", "-f", "qcow2", f("long-base.qcow2"), "8M"]);
    qemuIo(f("long-base.qcow2"), ["write -P 0x44 0 8M"]);
    qemuImg(["create", "-f", "qcow2", "-b", "long-base.qcow2", "-F", "qcow2", f("short-overlay.qcow2"), "4M"]);
    qemuIo(f("short-overlay.qcow2"), ["write -P 0x55 1000 5000"]);
    // v2 images.
    qemuImg(["create", "-f", "qcow2", "-o", "compat=0.10", f("v2.qcow2"), "4M"]);
    qemuIo(f("v2.qcow2"), [`write -s ${src} 0 1M`, "write -z 1M 128k"]);
    qemuImg(["create", "-f", "qcow2", "-o", "compat=0.10", f("v2-snap.qcow2"), "4M"]);
    qemuIo(f("v2-snap.qcow2"), [`write -s ${src} 0 1M`]);
    qemuImg(["snapshot", "-c", "s1", f("v2-snap.qcow2")]);
    copyFileSync(f("v2-snap.qcow2"), f("v2-legacy-snap.qcow2"));
    stripSnapshotExtraData(f("v2-legacy-snap.qcow2"));
    // Lazy refcounts: clean, and left dirty by a crash mid-write.
    qemuImg(["create", "-f", "qcow2", "-o", "lazy_refcounts=on", f("lazy.qcow2"), "4M"]);
    qemuIo(f("lazy.qcow2"), [`write -s ${src} 0 512k`]);
    qemuImg(["create", "-f", "qcow2", "-o", "lazy_refcounts=on", f("dirty.qcow2"), "4M"]);
    spawnSync("qemu-io", ["-c", `write -s ${src} 0 256k`, "-c", "write -z 512k 64k", "-c", "sigraise 9", f("dirty.qcow2")]);
    // Other refcount widths, small clusters, bitmaps.
    qemuImg(["create", "-f", "qcow2", "-o", "refcount_bits=8", f("rc8.qcow2"), "4M"]);
    qemuIo(f("rc8.qcow2"), [`write -s ${src} 0 1M`, "write -z 1M 64k"]);
    qemuImg(["create", "-f", "qcow2", "-o", "cluster_size=512", f("c512.qcow2"), "4M"]);
    qemuIo(f("c512.qcow2"), [`write -s ${src} 0 3M`, "write -z 1M 64k"]);
    qemuImg(["snapshot", "-c", "s1", f("c512.qcow2")]);
    qemuIo(f("c512.qcow2"), ["write -P 0x77 2M 100k"]);
    // 512-byte clusters over more than the 8 MiB one refcount table cluster covers at 16 bits.
    qemuImg(["create", "-f", "qcow2", "-o", "cluster_size=512", f("c512-big.qcow2"), "16M"]);
    qemuIo(f("c512-big.qcow2"), ["write -P 0x21 0 8150k"]);
    // Compressed streams packed many to a host cluster, far into the file: a narrower refcount
    // width fails only after new refcount blocks were taken, which must be given back.
    qemuImg(["create", "-f", "qcow2", "-o", "cluster_size=512", f("c512-late.qcow2"), "4M"]);
    qemuIo(f("c512-late.qcow2"), [`write -s ${src} 0 3M`, "write -c -P 0x11 3M 64k"]);
    qemuImg(["create", "-f", "qcow2", f("bitmap.qcow2"), "4M"]);
    qemuIo(f("bitmap.qcow2"), [`write -s ${src} 0 1M`]);
    qemuImg(["bitmap", "--add", f("bitmap.qcow2"), "b1"]);
    qemuImg(["create", "-f", "qcow2", "-u", "-b", "missing.qcow2", "-F", "qcow2", f("orphan.qcow2"), "4M"]);
    // An autoclear bit qemu does not know (bit 5): opening for writing clears it.
    qemuImg(["create", "-f", "qcow2", f("autoclear.qcow2"), "4M"]);
    qemuIo(f("autoclear.qcow2"), [`write -s ${src} 0 64k`]);
    patchBytes(f("autoclear.qcow2"), 95, [0x20]);
    qemuImg(["create", "-f", "raw", f("disk.raw"), "1M"]);
    writeFileSync(f("junk.qcow2"), "not an image at all");
  }, 120_000);

  /**
   * Run our amend and qemu's on copies of `image` (every "@" in args stands for the copy), compare
   * what they print, then the images they leave (`snapshots`: also compare snapshot contents;
   * `unchanged`: an image qemu-img cannot open, which must be left as it was).
   */
  async function both(image: string | undefined, args: string[], opts: { snapshots?: boolean; unchanged?: boolean } = {}): Promise<CliResult> {
    const mine = image === undefined ? "" : path.join(o, image);
    const theirs = image === undefined ? "" : path.join(q, image);
    if (image !== undefined) {
      for (const name of [image, ...(COMPANIONS[image] ?? [])]) {
        copyFileSync(f(name), path.join(o, name));
        copyFileSync(f(name), path.join(q, name));
      }
    }
    const a = await runOurs(amend, args.map((x) => x.replaceAll("@", mine)));
    const b = runQemuImg("amend", args.map((x) => x.replaceAll("@", theirs)));
    const label = { image, args };
    const norm = (r: CliResult, file: string): CliResult => ({
      ...r,
      stderr: file ? r.stderr.replaceAll(file, "FILE").replaceAll(path.dirname(file), "DIR") : r.stderr,
    });
    expect({ ...label, ...norm(a, mine) }).toEqual({ ...label, ...norm(b, theirs) });
    if (image === undefined || !image.endsWith(".qcow2") || opts.unchanged) {
      if (image !== undefined) expect({ ...label, unchanged: readFileSync(mine).equals(readFileSync(f(image))) }).toEqual({ ...label, unchanged: true });
      return a;
    }
    expect({ ...label, info: info(mine) }).toEqual({ ...label, info: info(theirs) });
    expect({ ...label, check: checkStatus(mine).status }).toEqual({ ...label, check: 0 });
    const verdict = spawnSync("qemu-img", ["compare", mine, theirs], { encoding: "utf8" });
    expect({ ...label, compare: verdict.stdout }).toEqual({ ...label, compare: "Images are identical.\n" });
    if (opts.snapshots) {
      for (const name of snapshotNames(theirs)) {
        const same = snapshotBytes(mine, name, path.join(dir, "o.raw")).equals(snapshotBytes(theirs, name, path.join(dir, "q.raw")));
        expect({ ...label, snapshot: name, same }).toEqual({ ...label, snapshot: name, same: true });
      }
    }
    return a;
  }

  it("prints qemu's amend option help, for a named format before opening anything", async () => {
    for (const args of [
      ["-f", "qcow2", "-o", "help", "@"],
      ["-f", "qcow2", "-o", "help"],
      ["-o", "help", "@"],
      ["-o", "?", "@"],
      ["-o", "compat=1.1", "-o", "help", "-f", "qcow2"],
      ["-o", "compat=1.1,help", "-f", "qcow2", "x", "y"],
      ["-p", "-f", "qcow2", "-o", "help"],
      ["-f", "luks", "-o", "help"],
      ["-f", "raw", "-o", "help"],
      ["-f", "vmdk", "-o", "help"],
      ["-f", "nosuchformat", "-o", "help"],
    ]) {
      await both("zeros.qcow2", args);
    }
    const help = await both("zeros.qcow2", ["-o", "help", "@"]);
    expect(help.stdout).toContain("Amend options for 'qcow2':\n  backing_file=<str>     - File name of a base image\n");
    await both("disk.raw", ["-o", "help", "@"]);
    await both(undefined, ["-o", "help", "/nonexistent/x.qcow2"]);
  }, 300_000);

  it("fails as qemu-img does on bad arguments, formats and files", async () => {
    mkdirSync(path.join(dir, "a-directory"), { recursive: true });
    for (const args of [
      [],
      ["@"],
      ["-o", "compat=1.1"],
      ["-o", "compat=1.1", "@", "@"],
      ["-o", "", "@"],
      ["-o", ",compat=1.1", "@"],
      ["-o", "compat=1.1,", "@"],
      ["-x", "-o", "compat=1.1", "@"],
      ["-qx", "-o", "compat=1.1", "@"],
      ["--bogus", "-o", "compat=1.1", "@"],
      ["@", "-o"],
      ["-t", "nosuchmode", "-o", "compat=1.1", "@"],
      ["-f", "nosuchformat", "-o", "compat=1.1", "@"],
      ["-f", "qcow2", "-o", "compat=1.1", path.join(fixtures, "missing.qcow2")],
      ["-o", "compat=1.1", path.join(dir, "a-directory")],
      ["-p", "-o", "compat=1.1"],
    ]) {
      await both("zeros.qcow2", args);
    }
    await both("junk.qcow2", ["-f", "qcow2", "-o", "compat=1.1", "@"], { unchanged: true });
    await both("orphan.qcow2", ["-o", "compat=0.10", "@"], { unchanged: true });
    await both("orphan.qcow2", ["-o", "help", "@"], { unchanged: true });
    // Raw images: probed (with qemu's warning) or named, raw has no amend.
    await both("disk.raw", ["-o", "compat=1.1", "@"]);
    await both("disk.raw", ["-f", "raw", "-o", "compat=1.1", "@"]);
    await both("disk.raw", ["-f", "qcow2", "-o", "compat=1.1", "@"]);
    // Cache modes qemu knows, -q, --force and a secret object change nothing here.
    for (const args of [["-t", "none"], ["-t", "off"], ["-t", "unsafe"], ["-q"], ["--force"], ["--object", "secret,id=sec0,data=x"]]) {
      await both("zeros.qcow2", [...args, "-o", "lazy_refcounts=on", "@"]);
    }
  }, 300_000);

  it("refuses every option qemu cannot amend, with qemu's message and hint", async () => {
    const refused = [
      "cluster_size=4096",
      "cluster_size=abc",
      "preallocation=metadata",
      "encryption=on",
      "encrypt.format=luks",
      "encrypt.key-secret=sec0",
      "encrypt.cipher-alg=aes-128",
      "encrypt.cipher-mode=cbc",
      "encrypt.ivgen-alg=plain64",
      "encrypt.ivgen-hash-alg=sha256",
      "encrypt.hash-alg=sha256",
      "extended_l2=on",
      "compression_type=zstd",
      "compression_type=zlib",
      "nocow=on",
      "extent_size_hint=1M",
      "foo=bar",
      "cluster_size=4096,foo=1",
      "foo=1,cluster_size=4096",
      "compat=1.1,cluster_size=4096",
      // Options qemu amends only on images with encryption or an external data file.
      "encrypt.keyslot=1",
      "encrypt.state=active",
      "encrypt.old-secret=a",
      "encrypt.new-secret=b",
      "encrypt.iter-time=10",
      "data_file=x.raw",
      "data_file=",
      "data_file_raw=on",
      // The first problem in qemu's option order is the one reported.
      "refcount_bits=3,compat=1.2",
      "data_file=x,compat=9",
      "refcount_bits=3,data_file_raw=on",
      "encrypt.keyslot=1,compat=1.2",
    ];
    for (const option of refused) {
      const r = await both("zeros.qcow2", ["-o", option, "@"]);
      expect(r.status, option).toBe(1);
    }
    const r = await both("zeros.qcow2", ["-o", "preallocation=full", "@"]);
    expect(r.stderr).toBe("qemu-img: Invalid parameter 'preallocation'\nThis option is only supported for image creation\n");
    // data_file_raw=off is accepted (it is off without a data file).
    expect((await both("zeros.qcow2", ["-o", "data_file_raw=off", "@"])).status).toBe(0);
  }, 300_000);

  it("refuses bad values as qemu-img does", async () => {
    for (const option of [
      "compat=1.2",
      "compat=",
      "compat=0.9",
      "refcount_bits=3",
      "refcount_bits=128",
      "refcount_bits=0",
      "refcount_bits=-16",
      "refcount_bits=abc",
      "refcount_bits=18446744073709551615",
      "refcount_bits=18446744073709551616",
      "lazy_refcounts=maybe",
      "data_file_raw=2",
      "size=abc",
      "size=-1",
      "size=1",
      "size=1000",
      "size=9E",
      "size=8E",
      "size=7E",
      "size=18446744073709551615",
      "size=18446744073709551616",
    ]) {
      const r = await both("zeros.qcow2", ["-o", option, "@"]);
      expect(r.status, option).toBe(1);
    }
    // qemu keeps refcount_bits in an int: 2^32 + 16 is 16, octal and hex are numbers too.
    for (const option of ["refcount_bits=4294967312", "refcount_bits=0x10", "refcount_bits=010", "refcount_bits= 8", "size=0"]) {
      expect((await both("zeros.qcow2", ["-o", option, "@"])).status, option).toBe(0);
    }
  }, 300_000);

  it("downgrades to compat=0.10 as qemu-img does: zero clusters expanded, v3 features dropped", async () => {
    for (const image of ["zeros.qcow2", "compressed.qcow2", "overlay.qcow2", "lazy.qcow2", "dirty.qcow2", "snap.qcow2", "overlay-snap.qcow2"]) {
      const r = await both(image, ["-o", "compat=0.10", "@"], { snapshots: true });
      expect(r.status, image).toBe(0);
      expect((info(path.join(o, image))["format-specific"] as { data: { compat: string } }).data.compat).toBe("0.10");
    }
    // Spelled v2, combined with other options, twice, or -p.
    await both("zeros.qcow2", ["-o", "compat=v2", "@"]);
    await both("zeros.qcow2", ["-o", "compat=1.1,compat=0.10", "@"]);
    await both("lazy.qcow2", ["-o", "compat=0.10,lazy_refcounts=off", "@"]);
    await both("snap.qcow2", ["-p", "-o", "compat=0.10", "@"], { snapshots: true });
    await both("overlay.qcow2", ["-p", "-o", "compat=0.10,size=4M", "@"]);
    // What stops a downgrade, after what came before it in qemu's order was done.
    for (const [image, option] of [
      ["rc8.qcow2", "compat=0.10"],
      ["zeros.qcow2", "compat=0.10,refcount_bits=8"],
      ["zeros.qcow2", "compat=0.10,lazy_refcounts=on"],
      ["snap.qcow2", "size=8M,compat=0.10"],
      ["snap.qcow2", "size=2M,compat=0.10"],
    ] as const) {
      expect((await both(image, ["-o", option, "@"], { snapshots: true })).status, `${image} ${option}`).toBe(1);
    }
    // A refcount width of 16 first, then the downgrade.
    expect((await both("rc8.qcow2", ["-o", "compat=0.10,refcount_bits=16", "@"])).status).toBe(0);
  }, 300_000);

  it("keeps a snapshot's data where qemu's downgrade zeroes a cluster it shares", async () => {
    const mine = path.join(o, "snap-zero.qcow2");
    const theirs = path.join(q, "snap-zero.qcow2");
    copyFileSync(f("snap-zero.qcow2"), mine);
    copyFileSync(f("snap-zero.qcow2"), theirs);
    const before = snapshotBytes(f("snap-zero.qcow2"), "s1", path.join(dir, "before.raw"));
    const a = await runOurs(amend, ["-o", "compat=0.10", mine]);
    const b = runQemuImg("amend", ["-o", "compat=0.10", theirs]);
    expect(a).toEqual(b);
    expect(info(mine)).toEqual(info(theirs));
    expect(spawnSync("qemu-img", ["compare", mine, theirs], { encoding: "utf8" }).stdout).toBe("Images are identical.\n");
    expect(checkStatus(mine)).toMatchObject({ status: 0 });
    expect(snapshotBytes(mine, "s1", path.join(dir, "after.raw")).equals(before)).toBe(true);
    // qemu 7.2 destroys the snapshot's data there and leaves OFLAG_COPIED errors.
    expect(checkStatus(theirs).status).toBe(2);
    expect(snapshotBytes(theirs, "s1", path.join(dir, "qemu.raw")).equals(before)).toBe(false);
  }, 300_000);

  it("upgrades to compat=1.1, rewriting a v2 snapshot table without extra data", async () => {
    for (const image of ["v2.qcow2", "v2-snap.qcow2", "v2-legacy-snap.qcow2"]) {
      expect((await both(image, ["-o", "compat=1.1", "@"], { snapshots: true })).status, image).toBe(0);
      expect((await both(image, ["-p", "-o", "compat=v3", "@"], { snapshots: true })).status, image).toBe(0);
    }
    for (const option of ["compat=1.1,lazy_refcounts=on", "compat=1.1,refcount_bits=1", "compat=1.1,refcount_bits=64,lazy_refcounts=on", "compat=1.1,size=8M"]) {
      expect((await both("v2.qcow2", ["-o", option, "@"])).status, option).toBe(0);
    }
    // v2 refuses what needs v3, and resizing with snapshots.
    for (const [image, option] of [
      ["v2.qcow2", "lazy_refcounts=on"],
      ["v2.qcow2", "refcount_bits=8"],
      ["v2-snap.qcow2", "size=8M"],
      ["v2-snap.qcow2", "size=4M"],
    ] as const) {
      expect((await both(image, ["-o", option, "@"])).status, `${image} ${option}`).toBe(1);
    }
    for (const option of ["lazy_refcounts=off", "refcount_bits=16", "data_file_raw=off", "compat=0.10", "size=8M"]) {
      expect((await both("v2.qcow2", ["-o", option, "@"])).status, option).toBe(0);
    }
  }, 300_000);

  it("changes the refcount width, snapshots' refcounts included, as qemu-img does", async () => {
    for (const bits of [1, 2, 4, 8, 32, 64]) {
      expect((await both("zeros.qcow2", ["-o", `refcount_bits=${bits}`, "@"])).status, `${bits}`).toBe(0);
    }
    for (const [image, bits] of [
      ["snap.qcow2", 8],
      ["snap.qcow2", 64],
      ["snap.qcow2", 2],
      ["overlay-snap.qcow2", 8],
      ["c512.qcow2", 64],
      ["c512.qcow2", 2],
      ["compressed.qcow2", 8],
      ["compressed.qcow2", 32],
      ["bitmap.qcow2", 8],
      ["dirty.qcow2", 64],
    ] as const) {
      expect((await both(image, ["-o", `refcount_bits=${bits}`, "@"], { snapshots: true })).status, `${image} ${bits}`).toBe(0);
    }
    // Back to 16 from 8; 1 bit where snapshots or compressed clusters share clusters fails.
    expect((await both("rc8.qcow2", ["-o", "refcount_bits=16", "@"])).status).toBe(0);
    for (const [image, bits] of [
      ["snap.qcow2", 1],
      ["compressed.qcow2", 1],
      ["c512.qcow2", 1],
      ["c512-late.qcow2", 4],
    ] as const) {
      const r = await both(image, ["-o", `refcount_bits=${bits}`, "@"], { snapshots: true });
      expect(r.status, image).toBe(1);
      expect(r.stderr).toMatch(/^qemu-img: Cannot decrease refcount entry width to \d bits: Cluster at offset 0x[0-9a-f]+ has a refcount of \d+\n$/);
    }
    expect(readFileSync(path.join(o, "c512-late.qcow2")).equals(readFileSync(path.join(q, "c512-late.qcow2")))).toBe(true);
    // The progress meter walks the refcount table as qemu's does.
    await both("snap.qcow2", ["-p", "-o", "refcount_bits=8", "@"]);
    await both("c512.qcow2", ["-p", "-o", "refcount_bits=64", "@"]);
    await both("c512-big.qcow2", ["-p", "-o", "refcount_bits=64", "@"]);
    await both("c512-big.qcow2", ["-o", "refcount_bits=1", "@"]);
    await both("snap.qcow2", ["-p", "-o", "refcount_bits=4,lazy_refcounts=on", "@"]);
  }, 300_000);

  it("turns lazy refcounts on and off", async () => {
    await both("zeros.qcow2", ["-o", "lazy_refcounts=on", "@"]);
    await both("zeros.qcow2", ["-o", "lazy_refcounts", "@"]);
    await both("zeros.qcow2", ["-o", "lazy_refcounts=off", "@"]);
    await both("lazy.qcow2", ["-o", "lazy_refcounts=off", "@"]);
    await both("lazy.qcow2", ["-o", "nolazy_refcounts", "@"]);
    await both("lazy.qcow2", ["-p", "-o", "lazy_refcounts=on", "@"]);
    // A dirty image is repaired first, with qemu's diagnostics on stderr.
    const r = await both("dirty.qcow2", ["-o", "lazy_refcounts=off", "@"]);
    expect(r.stderr).toContain("Rebuilding refcount structure\n");
    expect(info(path.join(o, "dirty.qcow2"))["dirty-flag"]).toBe(false);
  }, 300_000);

  it("grows and shrinks images as qemu-img amend -o size does", async () => {
    for (const [image, size] of [
      ["zeros.qcow2", "8M"],
      ["zeros.qcow2", "2M"],
      ["zeros.qcow2", "1536"],
      ["zeros.qcow2", "4M"],
      ["zeros.qcow2", "1G"],
      ["c512.qcow2", "1G"],
      ["c512.qcow2", "1M"],
      ["snap.qcow2", "8M"],
      ["snap.qcow2", "3M"],
      ["compressed.qcow2", "2M"],
      ["short-overlay.qcow2", "6M"],
      ["overlay.qcow2", "1M"],
      ["lazy.qcow2", "16M"],
      ["zeros.qcow2", "0x600000"],
      ["zeros.qcow2", "5.5M"],
    ] as const) {
      expect((await both(image, ["-o", `size=${size}`, "@"], { snapshots: true })).status, `${image} ${size}`).toBe(0);
    }
  }, 300_000);

  it("accepts the backing file and format only as they are", async () => {
    for (const [image, option] of [
      ["overlay.qcow2", "backing_file=base.qcow2,backing_fmt=qcow2"],
      ["overlay.qcow2", "backing_file=base.qcow2"],
      ["overlay.qcow2", "backing_fmt=qcow2"],
      ["overlay.qcow2", "backing_file=other.qcow2,backing_fmt=qcow2"],
      ["overlay.qcow2", "backing_file=base.qcow2,backing_fmt=raw"],
      ["overlay.qcow2", "backing_file="],
      ["zeros.qcow2", "backing_file=base.qcow2,backing_fmt=qcow2"],
      ["zeros.qcow2", "backing_fmt=raw"],
      // The backing file is refused after the refcount width changed, as in qemu.
      ["overlay.qcow2", "refcount_bits=8,backing_file=x"],
    ] as const) {
      await both(image, ["-o", option, "@"]);
    }
    await both("overlay.qcow2", ["-p", "-o", "refcount_bits=8,backing_file=x", "@"]);
    const r = await both("overlay.qcow2", ["-o", "backing_file=new.qcow2,backing_fmt=qcow2", "@"]);
    expect(r.stderr).toBe("qemu-img: Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.\n");
  }, 300_000);

  it("refuses by name what this project cannot amend yet, leaving the image as it was", async () => {
    // qemu keeps a bitmaps extension in the v2 header it writes; here the downgrade is refused.
    const image = path.join(o, "bitmap.qcow2");
    copyFileSync(f("bitmap.qcow2"), image);
    const r = await runOurs(amend, ["-o", "compat=0.10", image]);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/persistent bitmaps.*not supported yet/);
    expect(readFileSync(image).equals(readFileSync(f("bitmap.qcow2")))).toBe(true);
    // qemu resizes the bitmaps with the image; that is not done here yet.
    const grow = await runOurs(amend, ["-o", "size=8M", image]);
    expect(grow.status).toBe(1);
    expect(grow.stderr).toMatch(/persistent bitmaps is not supported yet/);
    expect(info(image)["virtual-size"]).toBe(4 << 20);
    // Encrypted images: the keyslot options by name, anything else at open.
    const enc = path.join(o, "enc.qcow2");
    // (Legacy AES: a LUKS header's PBKDF timing makes qemu-img create flaky on a loaded machine.)
    qemuImg(["create", "-f", "qcow2", "--object", "secret,id=s0,data=pw", "-o", "encrypt.format=aes,encrypt.key-secret=s0", enc, "1M"]);
    const slot = await runOurs(amend, ["--object", "secret,id=s1,data=new", "-o", "encrypt.new-secret=s1,encrypt.keyslot=1", enc]);
    expect(slot).toMatchObject({ status: 1 });
    expect(slot.stderr).toMatch(/encrypt\.(new-secret|keyslot).* not supported yet/);
    const compat = await runOurs(amend, ["-o", "compat=0.10", enc]);
    expect(compat.status).toBe(1);
    expect(compat.stderr).toMatch(/not supported yet/);
    // An external data file.
    const ext = path.join(o, "ext.qcow2");
    qemuImg(["create", "-f", "qcow2", "-o", `data_file=${path.join(o, "ext.data")}`, ext, "1M"]);
    const data = await runOurs(amend, ["-o", `data_file=${path.join(o, "other.data")}`, ext]);
    expect(data.status).toBe(1);
    expect(data.stderr).toMatch(/external data file.*not supported yet/);
    // --image-opts.
    const opts = await runOurs(amend, ["--image-opts", "-o", "compat=0.10", `driver=qcow2,file.filename=${image}`]);
    expect(opts).toMatchObject({ status: 1, stderr: "qemu-img: --image-opts is not supported yet\n" });
  }, 300_000);

  it("clears unknown autoclear bits as qemu's open for writing does, even when the amend then fails", async () => {
    for (const args of [["-o", "compat=9"], ["-o", "foo=1"], ["-o", "help"], ["-o", "lazy_refcounts=on"], ["-f", "qcow2", "-o", "help"]]) {
      await both("autoclear.qcow2", [...args, "@"]);
      const header = (file: string): Buffer => readFileSync(file).subarray(0, 512);
      expect({ args, header: header(path.join(o, "autoclear.qcow2")) }).toEqual({ args, header: header(path.join(q, "autoclear.qcow2")) });
    }
  }, 60_000);

  it("leaves no corruption and the same guest contents when a crash cuts an amend short at any write", async () => {
    const crashDir = path.join(dir, "crash");
    mkdirSync(crashDir, { recursive: true });
    copyFileSync(f("base.qcow2"), path.join(crashDir, "base.qcow2"));
    const pick = rng(7);
    const cases: Array<[string, AmendOptions, number]> = [
      ["snap.qcow2", { refcountBits: 8 }, 1],
      ["snap.qcow2", { refcountBits: 2, lazyRefcounts: true }, 1],
      ["c512.qcow2", { refcountBits: 64 }, 9],
      ["zeros.qcow2", { compat: "0.10" }, 1],
      ["overlay-snap.qcow2", { compat: "0.10" }, 1],
      ["snap-zero.qcow2", { compat: "0.10" }, 1],
      ["v2-legacy-snap.qcow2", { compat: "1.1", refcountBits: 32 }, 1],
      ["zeros.qcow2", { size: 1 << 30 }, 1],
    ];
    for (const [image, options, step] of cases) {
      const initial = new Uint8Array(readFileSync(f(image)));
      const file = path.join(crashDir, image);
      const counter = new CrashBackend(initial, Number.MAX_SAFE_INTEGER, file);
      await amendImage(counter, options);
      const total = counter.writeCount;
      expect(total, image).toBeGreaterThan(1);
      for (let crashAt = 1; crashAt <= total; crashAt += step) {
        const backend = new CrashBackend(initial, crashAt, file);
        await expect(amendImage(backend, options)).rejects.toThrow();
        const disk = backend.afterCrash(pick, crashAt % 2 === 0 ? 0 : 0.5);
        writeFileSync(file, disk);
        const r = spawnSync("qemu-img", ["check", "--output=json", file], { encoding: "utf8" });
        const label = { image, options, crashAt };
        expect({ ...label, status: r.status === 0 || r.status === 3 ? "clean or leaks" : r.stderr }).toEqual({ ...label, status: "clean or leaks" });
        const same = spawnSync("qemu-img", ["compare", file, f(image)], { encoding: "utf8" });
        // A crash after the size changed: the grown part reads as zeros.
        const identical = same.stdout.replace("Warning: Image size mismatch!\n", "");
        expect({ ...label, compare: identical }).toEqual({ ...label, compare: "Images are identical.\n" });
      }
    }
  }, 600_000);

  it("is a library call on any backend, with typed options", async () => {
    const backend = new MemoryBackend(new Uint8Array(readFileSync(f("snap.qcow2"))));
    const steps: number[] = [];
    await amendImage(backend, { refcountBits: 4, lazyRefcounts: true, onProgress: (done, total) => steps.push(done / total) });
    expect(steps.length).toBeGreaterThan(3);
    expect(steps.at(-1)).toBe(1);
    await expect(amendImage(backend, { refcountBits: 3 })).rejects.toThrow(RangeError);
    await expect(amendImage(backend, { compat: "2.0" })).rejects.toThrow("Unknown compatibility level 2.0");
    await expect(amendImage(backend, { backingFile: "x" })).rejects.toThrow(AmendError);
    await amendImage(backend, { compat: "0.10", refcountBits: 16 });
    const out = path.join(o, "lib.qcow2");
    writeFileSync(out, backend.bytes());
    expect(checkStatus(out).status).toBe(0);
    const data = info(out);
    expect(data["format-specific"]).toEqual({ type: "qcow2", data: { compat: "0.10", "compression-type": "zlib", "refcount-bits": 16 } });
    expect(spawnSync("qemu-img", ["compare", out, f("snap.qcow2")], { encoding: "utf8" }).stdout).toBe("Images are identical.\n");
  }, 60_000);
});

/** Overwrite bytes of a file at `offset`. */
function patchBytes(file: string, offset: number, bytes: number[]): void {
  const fd = openSync(file, "r+");
  try {
    writeSync(fd, Buffer.from(bytes), 0, bytes.length, offset);
  } finally {
    closeSync(fd);
  }
}

/** Rewrite the first snapshot entry of a v2 image without extra data, as qemu before 1.1 wrote them. */
function stripSnapshotExtraData(file: string): void {
  const fd = openSync(file, "r+");
  try {
    const header = Buffer.alloc(72);
    readSync(fd, header, 0, 72, 0);
    const offset = Number(header.readBigUInt64BE(64));
    const entry = Buffer.alloc(4096);
    readSync(fd, entry, 0, entry.length, offset);
    const idSize = entry.readUInt16BE(12);
    const nameSize = entry.readUInt16BE(14);
    const extraSize = entry.readUInt32BE(36);
    const fixed = Buffer.from(entry.subarray(0, 40));
    fixed.writeUInt32BE(0, 36);
    const strings = entry.subarray(40 + extraSize, 40 + extraSize + idSize + nameSize);
    const rewritten = Buffer.concat([fixed, strings]);
    const padded = Buffer.concat([rewritten, Buffer.alloc((8 - (rewritten.length % 8)) % 8 + extraSize)]);
    writeSync(fd, padded, 0, padded.length, offset);
  } finally {
    closeSync(fd);
  }
}
