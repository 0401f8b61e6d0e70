// qcow2-img create against qemu-img create with the same arguments, each tool in its own copy of
// the same directory: stdout (the "Formatting ..." line, -o help), stderr and the exit code must be
// the same once the directory and the program name are set aside, and so must the files: byte for
// byte where our layout is qemu's, else clean under qemu-img check and described alike by qemu-img info.

import { spawnSync } from "node:child_process";
import { existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import path from "node:path";
import { beforeAll, expect, it } from "vitest";
import { UsageError } from "../../ts/cli/args.js";
import { create } from "../../ts/cli/create.js";
import { runOurs, type CliResult } from "../helpers/cli.js";
import { describeQemu, qemuImg, tempDir } from "../helpers/qemu.js";

/** What to expect of the file named by the first "@" argument. */
type Files = "same" | "clean";

async function ours(args: string[]): Promise<CliResult> {
  return runOurs(create, args, { qemuNames: false });
}

describeQemu("qcow2-img create", () => {
  const dir = tempDir("qcow2-clicreate-");
  const q = path.join(dir, "q") + "/";
  const o = path.join(dir, "o") + "/";

  beforeAll(() => {
    for (const d of [q, o]) {
      mkdirSync(path.join(d, "sub"), { recursive: true });
      mkdirSync(path.join(d, "adir"));
      qemuImg(["create", "-q", "-f", "qcow2", d + "base.qcow2", "20M"]);
      qemuImg(["create", "-q", "-f", "raw", d + "base.raw", "1000"]);
      qemuImg(["create", "-q", "-f", "qcow2", d + "sub/base.qcow2", "10M"]);
      qemuImg(["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", d + "chain.qcow2"]);
      qemuImg(["create", "-q", "-f", "qcow2", "-u", "-b", "missing", "-F", "qcow2", d + "broken.qcow2", "1M"]);
      qemuImg(["create", "-q", "-f", "qcow2", "-u", "-b", "broken.qcow2", "-F", "qcow2", d + "broken2.qcow2", "1M"]);
      writeFileSync(d + "junk.qcow2", "not an image");
      writeFileSync(d + "existing.qcow2", "old contents");
      writeFileSync(d + "existing2.qcow2", "old contents");
    }
  });

  const normalize = (text: string): string => text.replaceAll(q, "X/").replaceAll(o, "X/").replaceAll("qemu-img", "qcow2-img");

  async function compare(args: string[], files: Files): Promise<void> {
    const theirs = spawnSync("qemu-img", ["create", ...args.map((a) => a.replace("@", q))], { encoding: "utf8" });
    const mine = await ours(args.map((a) => a.replace("@", o)));
    expect(normalize(mine.stdout)).toBe(normalize(theirs.stdout));
    expect(normalize(mine.stderr)).toBe(normalize(theirs.stderr));
    expect(mine.status).toBe(theirs.status);
    const target = args.find((a) => a.startsWith("@"));
    if (target === undefined) return;
    const [qf, of] = [target.replace("@", q), target.replace("@", o)];
    expect(existsSync(of), "file exists").toBe(existsSync(qf));
    if (!existsSync(qf) || statSync(qf).isDirectory()) return;
    if (files === "same") {
      expect(Buffer.compare(readFileSync(of), readFileSync(qf)), "same bytes as qemu-img's").toBe(0);
      return;
    }
    const check = JSON.parse(qemuImg(["check", "--output=json", of])) as Record<string, number>;
    expect({ errors: check["check-errors"], corruptions: check.corruptions, leaks: check.leaks }).toEqual({ errors: 0, corruptions: undefined, leaks: undefined });
    const facts = (f: string): unknown => {
      const { "actual-size": _a, filename: _f, ...rest } = JSON.parse(qemuImg(["info", "--output=json", f])) as Record<string, unknown>;
      return rest;
    };
    expect(facts(of)).toEqual(facts(qf));
  }

  const cases: Array<[string, Files?]> = [
    // Images, and the Formatting line for each set of options.
    ["-f qcow2 @a1.qcow2 64M"],
    ["-f qcow2 @a2.qcow2 1000"],
    ["-f qcow2 @a3.qcow2 0"],
    ["-f qcow2 -o compat=0.10 @a4.qcow2 1M"],
    ["-f qcow2 -o compat=v2 @a5.qcow2 1M"],
    ["-f qcow2 -o compat=1.1 @a6.qcow2 1M"],
    ["-f qcow2 -o compat=v3,lazy_refcounts=on,refcount_bits=8,cluster_size=4k @a7.qcow2 1M"],
    ["-f qcow2 -o cluster_size=512 @a8.qcow2 100M"],
    ["-f qcow2 -o cluster_size=4096,refcount_bits=1 @a9.qcow2 10G"],
    ["-f qcow2 -o cluster_size=2M @a10.qcow2 1P"],
    ["-f qcow2 -o cluster_size=2M,refcount_bits=64 @a11.qcow2 1M"],
    ["-f qcow2 -o refcount_bits=64 @a12.qcow2 5G"],
    ["-f qcow2 -o refcount_bits=8,cluster_size=8k @a13.qcow2 3G"],
    ["-f qcow2 -o lazy_refcounts=on @a14.qcow2 64M"],
    ["-f qcow2 -o lazy_refcounts=true @a15.qcow2 1M"],
    ["-f qcow2 -o lazy_refcounts=y @a16.qcow2 1M"],
    ["-f qcow2 -o lazy_refcounts @a17.qcow2 1M"],
    ["-f qcow2 -o nolazy_refcounts @a18.qcow2 1M"],
    ["-f qcow2 -o refcount_bits=010 @a19.qcow2 1M"],
    ["-f qcow2 -o refcount_bits=0x10 @a20.qcow2 1M"],
    ["-f qcow2 -o cluster_size=0.5k @a21.qcow2 1M"],
    ["-f qcow2 -o cluster_size=+512 @a22.qcow2 1M"],
    ["-f qcow2 -o cluster_size=4k -o cluster_size=8k @a23.qcow2 5M"],
    ["-f qcow2 -o size=1M @a24.qcow2"],
    ["-f qcow2 -o size=1M,size=2M @a25.qcow2"],
    ["-f qcow2 -o size=0x100000 @a26.qcow2"],
    ["-f qcow2 -o encryption=off,data_file_raw=off,extended_l2=off,compression_type=zlib,nocow=off @a27.qcow2 1M"],
    ["-f qcow2 -o extent_size_hint=2M,id=x @a28.qcow2 1M"],
    ["-f qcow2 -o preallocation=off @a29.qcow2 1M"],
    ["-f qcow2 -o preallocation=metadata,compat=1.1 @a30.qcow2 64M"],
    ["-f qcow2 -o preallocation=metadata,cluster_size=4k @a31.qcow2 3M", "clean"],
    ["-f qcow2 -o preallocation=full @a32.qcow2 3M", "clean"],
    ["-f qcow2 -o preallocation=falloc,compat=0.10 @a33.qcow2 1M", "clean"],
    ["-f qcow2 -o cluster_size=512,refcount_bits=64 @a34.qcow2 1G", "clean"],
    ["-q -f qcow2 @a35.qcow2 5M"],
    ["-f qcow2 @a36.qcow2 +1M"],
    ["-f qcow2 @a37.qcow2 1.5G"],
    ["-f qcow2 @a,b.qcow2 1M"],
    ["-f qcow2 @a38.qcow2 1M -f raw"],
    ["-f qcow2 @existing.qcow2 1M"],
    // Backing files: the size from the backing file, names relative to the image, -u.
    ["-f qcow2 -b base.qcow2 -F qcow2 @b1.qcow2"],
    ["-f qcow2 -b base.raw -F raw @b2.qcow2"],
    ["-f qcow2 -b base.qcow2 -F raw @b3.qcow2"],
    ["-f qcow2 -b base.qcow2 -F qcow2 @b4.qcow2 50M"],
    ["-f qcow2 -b base.qcow2 -F qcow2 -o size=5M @b5.qcow2"],
    ["-f qcow2 -b base.qcow2 -F qcow2 @sub/b6.qcow2"],
    ["-f qcow2 -b sub/base.qcow2 -F qcow2 @sub/b7.qcow2"],
    ["-f qcow2 -b chain.qcow2 -F qcow2 -o compat=0.10 @b8.qcow2"],
    ["-f qcow2 -b base.qcow2 -F qcow2 -o backing_file=other @b9.qcow2"],
    ["-f qcow2 -o backing_file=base.qcow2 -o backing_fmt=qcow2 @b10.qcow2 5M"],
    ["-f qcow2 -b missing -F qcow2 -u @b11.qcow2 1M"],
    ["-f qcow2 -o backing_file=x,,y -F raw -u @b12.qcow2 1M"],
    ["-f qcow2 -u -b x -F vmdk @b13.qcow2 1M"],
    ["-f qcow2 -b missing @b14.qcow2 1M"],
    ["-f qcow2 -b missing -F qcow2 @b15.qcow2 1M"],
    ["-f qcow2 -b missing -F qcow2 -u @b16.qcow2"],
    ["-f qcow2 -b missing -u @b17.qcow2 1M"],
    ["-f qcow2 -b base.qcow2 @b18.qcow2"],
    ["-f qcow2 -b base.qcow2 -F foo @b19.qcow2"],
    ["-f qcow2 -u -b x -F foo @b20.qcow2 1M"],
    ["-f qcow2 -F raw @b21.qcow2 1M"],
    ["-f qcow2 -o backing_fmt=raw @b22.qcow2 1M"],
    ['-f qcow2 -b "" -F qcow2 @b23.qcow2 1M'],
    ["-f qcow2 -o backing_file=,backing_fmt=raw @b24.qcow2 1M"],
    ["-f qcow2 -b base.qcow2 -F qcow2 -o preallocation=metadata @b25.qcow2"],
    ["-f qcow2 -b broken.qcow2 -F qcow2 @b26.qcow2"],
    ["-f qcow2 -b broken2.qcow2 -F qcow2 @b27.qcow2"],
    ["-f qcow2 -b junk.qcow2 -F qcow2 @b28.qcow2"],
    ["-f qcow2 -b junk.qcow2 @b29.qcow2"],
    ["-f qcow2 -b junk.qcow2 -F raw @b30.qcow2"],
    // Raw images.
    ["-f raw @r1.raw 1M"],
    ["@r2.raw 1000"],
    ["-f raw -o size=1M @r3.raw"],
    ["-f raw -o preallocation=full @r4.raw 1000"],
    ["-f raw -o preallocation=falloc @r5.raw 1M"],
    ["-f raw -o preallocation=metadata @r6.raw 1M"],
    ["-f raw -o preallocation=bogus @r7.raw 1M"],
    ["-f raw -o extent_size_hint=8G @r8.raw 1M"],
    ["-f raw -o nocow=off,extent_size_hint=1M @r9.raw 1M"],
    ["-f raw -o cluster_size=4k @r10.raw 1M"],
    ["-f raw -b base @r11.raw 1M"],
    ["-f raw -F raw @r12.raw 1M"],
    ["-f raw @r13.raw 7E"],
    ["-f raw @r14.raw"],
    // What qemu refuses, in its words.
    ["-f qcow2 -o refcount_bits=3 @e1.qcow2 1M"],
    ["-f qcow2 -o refcount_bits=128 @e2.qcow2 1M"],
    ["-f qcow2 -o refcount_bits=0 @e3.qcow2 1M"],
    ["-f qcow2 -o refcount_bits=-16 @e4.qcow2 1M"],
    ["-f qcow2 -o refcount_bits=abc @e5.qcow2 1M"],
    ["-f qcow2 -o refcount_bits=99999999999999999999 @e6.qcow2 1M"],
    ["-f qcow2 -o refcount_bits=18446744073709551615 @e7.qcow2 1M"],
    ["-f qcow2 -o compat=0.5 @e8.qcow2 1M"],
    ["-f qcow2 -o compat= @e9.qcow2 1M"],
    ["-f qcow2 -o compat @e10.qcow2 1M"],
    ["-f qcow2 -o compat=0.10,lazy_refcounts=on @e11.qcow2 1M"],
    ["-f qcow2 -o compat=0.10,refcount_bits=8 @e12.qcow2 1M"],
    ["-f qcow2 -o cluster_size=abc @e13.qcow2 1M"],
    ["-f qcow2 -o cluster_size=1000 @e14.qcow2 1M"],
    ["-f qcow2 -o cluster_size=4M @e15.qcow2 1M"],
    ["-f qcow2 -o cluster_size=0 @e16.qcow2 1M"],
    ["-f qcow2 -o cluster_size=16E @e17.qcow2 1M"],
    ["-f qcow2 -o cluster_size=9E @e18.qcow2 1M"],
    ["-f qcow2 -o cluster_size=.5k @e19.qcow2 1M"],
    ["-f qcow2 -o cluster_size= @e20.qcow2 1M"],
    ["-f qcow2 -o lazy_refcounts=maybe @e21.qcow2 1M"],
    ["-f qcow2 -o lazy_refcounts=ON @e22.qcow2 1M"],
    ["-f qcow2 -o preallocation=bogus @e23.qcow2 1M"],
    ["-f qcow2 -o compression_type=lz4 @e24.qcow2 1M"],
    ["-f qcow2 -o data_file_raw=on @e25.qcow2 1M"],
    ["-f qcow2 -o foo=bar @e26.qcow2 1M"],
    ["-f qcow2 -o foo @e27.qcow2 1M"],
    ["-f qcow2 -o nocow @e28.qcow2 1M"],
    ["-f qcow2 -o extent_size_hint=abc @e29.qcow2 1M"],
    ["-f qcow2 -o extent_size_hint=8G @e30.qcow2 1M"],
    ["-f qcow2 -o size=1M @e31.qcow2 1M"],
    ["-f qcow2 -o size=abc @e32.qcow2"],
    ["-f qcow2 -o size=9E @e33.qcow2"],
    ["-f qcow2 @e34.qcow2"],
    ["-f qcow2 @e35.qcow2 1Q"],
    ["-f qcow2 @e36.qcow2 -- -5"],
    ["-f qcow2 @e37.qcow2 9E"],
    ["-f qcow2 @e38.qcow2 7E"],
    ["-f qcow2 -o cluster_size=512 @e39.qcow2 1P"],
    ["-f qcow2 -o preallocation=full,cluster_size=512 @e40.qcow2 1T"],
    ["-f qcow2 @e41.qcow2 1M extra"],
    ["-f qcow2"],
    ["-f vmdkx @e42 1M"],
    ["-f qcow2 -o refcount_bits=3 @existing2.qcow2 1M"],
    ["-f qcow2 -b e43.qcow2 -F qcow2 @e43.qcow2 1M"],
    ["-f qcow2 @nodir/e44.qcow2 1M"],
    ["-f raw @nodir/e45.raw 1M"],
    ["-f qcow2 @adir 1M"],
    ["-f raw @adir 1M"],
    ["-f qcow2 -o compat=0.5 @adir 1M"],
    ["-f qcow2 -o ,, @e46.qcow2 1M"],
    ['-f qcow2 -o "" @e47.qcow2 1M'],
    ["-f qcow2 -o cluster_size=4k, @e48.qcow2 1M"],
    ["-f qcow2 -o cluster_size=4k,, @e49.qcow2 1M"],
    // -o help.
    ["-f qcow2 -o help"],
    ["-f qcow2 -o ?"],
    ["-f qcow2 -o cluster_size=4k,help"],
    ["-f qcow2 -o foo=bar,help"],
    ["-o help"],
    ["-f raw -o help @h1.raw"],
    ["-f qcow2 -o help @h2.qcow2"],
    ["-f foo -o help"],
  ];

  // Arguments are split on spaces; "" is an empty argument.
  it.each(cases)("%s", async (line, files = "same") => {
    await compare(line.split(" ").map((a) => (a === '""' ? "" : a)), files);
  });

  it("leaves no file behind when qcow2 creation fails after the Formatting line, as qemu", async () => {
    for (const d of [q, o]) writeFileSync(d + "victim.qcow2", "data");
    await compare(["-f", "qcow2", "-o", "compat=0.5", "@victim.qcow2", "1M"], "same");
    expect(existsSync(o + "victim.qcow2")).toBe(false);
  });

  it("refuses by name the options it cannot honour yet, before touching the file", async () => {
    for (const [opts, name] of [
      ["encrypt.ivgen-hash-alg=sha256", "encrypt.ivgen-hash-alg"],
      ["data_file=x.data", "data_file"],
      ["extended_l2=on", "extended_l2=on"],
      ["compression_type=zstd", "compression_type=zstd"],
      ["nocow=on", "nocow=on"],
    ]) {
      const r = await ours(["-f", "qcow2", "-o", opts!, o + "refused.qcow2", "1M"]);
      expect(r).toEqual({ stdout: "", stderr: `qcow2-img: ${o}refused.qcow2: Option '${name}' is not supported yet\n`, status: 1 });
      expect(existsSync(o + "refused.qcow2")).toBe(false);
    }
    for (const fmt of ["vmdk", "vdi", "qed"]) {
      const r = await ours(["-f", fmt, o + "refused.img", "1M"]);
      expect(r.stderr).toBe(`qcow2-img: ${o}refused.img: Format '${fmt}' is not supported (qcow2 and raw only)\n`);
    }
    const r = await ours(["-f", "qcow2", "-b", "base.qcow2", "-F", "vmdk", o + "refused.qcow2"]);
    expect(r.stderr).toBe(`qcow2-img: ${o}refused.qcow2: Backing format 'vmdk' is not supported (qcow2 and raw only)\nCould not open backing image.\n`);
  });

  it("raw files are allocated as qemu-img leaves them (first block written, or all for full)", async () => {
    for (const [name, opts] of [["al1.raw", []], ["al2.raw", ["-o", "preallocation=full"]]] as const) {
      await compare(["-f", "raw", ...opts, `@${name}`, "3M"], "same");
      expect(statSync(o + name).blocks).toBe(statSync(q + name).blocks);
    }
  });
});
