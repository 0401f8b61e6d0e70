// The command line on encrypted images, against qemu-img on the same files: info (LUKS fields in
// human and JSON form, --image-opts names), and --object/--image-opts parsing errors.

import { execFileSync } from "node:child_process";
import path from "node:path";
import { beforeAll, expect, it } from "vitest";
import { check } from "../../ts/cli/check.js";
import { compare } from "../../ts/cli/compare.js";
import { snapshot } from "../../ts/cli/snapshot.js";
import { resize } from "../../ts/cli/resize.js";
import { dd } from "../../ts/cli/dd.js";
import { bench } from "../../ts/cli/bench.js";
import { commit } from "../../ts/cli/commit.js";
import { rebase } from "../../ts/cli/rebase.js";
import { convert } from "../../ts/cli/convert.js";
import { copyFileSync, readFileSync } from "node:fs";
import { create } from "../../ts/cli/create.js";
import { map } from "../../ts/cli/map.js";
import { info } from "../../ts/cli/info.js";
import { runOurs, runQemuImg } from "../helpers/cli.js";
import { describeQemu, qemuCreateEncrypted, qemuImg, tempDir } from "../helpers/qemu.js";


describeQemu("qcow2-img on encrypted images", { timeout: 120_000 }, () => {
  const dir = tempDir("qcow2-clicrypt-");
  const luks = path.join(dir, "luks.qcow2");
  const luks128 = path.join(dir, "luks128.qcow2");
  const aes = path.join(dir, "aes.qcow2");
  const secret = ["--object", "secret,id=sec0,data=pw"];

  beforeAll(() => {
    qemuCreateEncrypted(["-q", "-f", "qcow2", ...secret, "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", luks, "1M"]);
    qemuCreateEncrypted([
      "-q", "-f", "qcow2", ...secret,
      "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,encrypt.hash-alg=sha1,encrypt.cipher-mode=cbc",
      luks128, "1M",
    ]);
    qemuImg(["create", "-q", "-f", "qcow2", ...secret, "-o", "encrypt.format=aes,encrypt.key-secret=sec0", aes, "1M"]);
  });

  it("info shows what qemu-img info shows", async () => {
    const cases: string[][] = [
      [luks],
      ["--output=json", luks],
      [luks128],
      ["--output=json", luks128],
      [aes],
      ["--output=json", aes],
      [...secret, "--image-opts", `driver=qcow2,file.filename=${luks},encrypt.key-secret=sec0`],
      [...secret, "--image-opts", "--output=json", `driver=qcow2,file.filename=${aes},encrypt.key-secret=sec0`],
      ["--image-opts", `driver=qcow2,file.filename=${aes},encrypt.key-secret=missing`],
      ["--object", "secret,data=x", aes],
      ["--object", "secret,id=a,data=x,file=/dev/null", aes],
      ["--object", "secret,id=a", aes],
      ["--object", "foo,id=a", aes],
      ["--object", "secret,id=a,data=x,format=hex", aes],
      ["--object", "secret,id=a,data=x,bogus=1", aes],
      ["--image-opts", `driver=qcow2,file.filename=${aes},bogus=1`],
      ["--image-opts", aes],
      ["--image-opts", "-f", "qcow2", `driver=qcow2,file.filename=${aes}`],
    ];
    for (const args of cases) {
      const ours = await runOurs(info, args);
      const theirs = runQemuImg("info", args);
      const strip = (t: string): string => t.replace(/^disk size: .*$/m, "").replace(/"actual-size": \d+,?\n\s*/g, "");
      if (args.includes("--output=json") && theirs.status === 0) {
        const parse = (t: string): unknown => {
          const v = JSON.parse(t) as Record<string, unknown>;
          delete v["actual-size"];
          return v;
        };
        expect({ args, json: parse(ours.stdout) }).toEqual({ args, json: parse(theirs.stdout) });
      } else {
        expect({ args, stdout: strip(ours.stdout), stderr: ours.stderr, status: ours.status }).toEqual({
          args,
          stdout: strip(theirs.stdout),
          stderr: theirs.stderr,
          status: theirs.status,
        });
      }
    }
  });

  it("check needs the secret as qemu-img does, and reports under the --image-opts name", async () => {
    const opts = (file: string, id = "sec0"): string => `driver=qcow2,file.filename=${file},encrypt.key-secret=${id}`;
    const cases: string[][] = [
      [luks],
      [aes],
      [...secret, "--image-opts", opts(luks)],
      [...secret, "--image-opts", "--output=json", opts(luks)],
      [...secret, "--image-opts", "--output=json", opts(aes)],
      ["--object", "secret,id=sec0,data=wrong", "--image-opts", opts(luks)],
      [...secret, "--image-opts", opts(luks, "other")],
    ];
    for (const args of cases) {
      const ours = await runOurs(check, args);
      const theirs = runQemuImg("check", args);
      expect({ args, ...ours }).toEqual({ args, ...theirs });
    }
  });

  it("map gives no host offsets for encrypted data, as qemu-img map", async () => {
    execFileSync("qemu-io", ["--object", "secret,id=sec0,data=pw", "--image-opts", `driver=qcow2,file.filename=${aes},encrypt.key-secret=sec0`, "-c", "write -P 1 0 64k", "-c", "write -z 128k 64k"], { stdio: "pipe" });
    const opts = `driver=qcow2,file.filename=${aes},encrypt.key-secret=sec0`;
    for (const args of [[...secret, "--image-opts", "--output=json", opts], [...secret, "--image-opts", opts], [aes], ["--output=json", aes]]) {
      const ours = await runOurs(map, args);
      const theirs = runQemuImg("map", args);
      expect({ args, ...ours }).toEqual({ args, ...theirs });
    }
  });

  it("create -o encrypt.*: images qemu opens with the secret, and qemu-img's errors", async () => {
    let n = 0;
    const cases: Array<{ args: string[]; ok: boolean }> = [
      { args: ["-f", "qcow2", ...secret, "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10"], ok: true },
      { args: ["-f", "qcow2", ...secret, "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.hash-alg=sha1"], ok: true },
      { args: ["-f", "qcow2", ...secret, "-o", "encrypt.format=aes,encrypt.key-secret=sec0"], ok: true },
      { args: ["-f", "qcow2", ...secret, "-o", "encryption=on,encrypt.key-secret=sec0"], ok: true },
      { args: ["-f", "qcow2", "-o", "encrypt.format=luks"], ok: false },
      { args: ["-f", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=nope"], ok: false },
      { args: ["-f", "qcow2", ...secret, "-o", "encrypt.format=xyz,encrypt.key-secret=sec0"], ok: false },
      { args: ["-f", "qcow2", ...secret, "-o", "encrypt.key-secret=sec0"], ok: false },
      { args: ["-f", "qcow2", "--object", "secret,id=sec0", "-o", "encrypt.format=aes,encrypt.key-secret=sec0"], ok: false },
    ];
    for (const { args, ok } of cases) {
      const a = path.join(dir, `c-ours-${n}.qcow2`);
      const b = path.join(dir, `c-qemu-${n++}.qcow2`);
      const ours = await runOurs(create, [...args, a, "1M"]);
      let theirs = runQemuImg("create", [...args, b, "1M"]);
      // qemu 7.2's PBKDF2 calibration fails now and then ("Unable to get accurate CPU usage").
      for (let i = 0; i < 30 && theirs.stderr.includes("Unable to get accurate CPU usage"); i++) theirs = runQemuImg("create", [...args, b, "1M"]);
      const norm = (t: string, f: string): string => t.replaceAll(f, "F");
      expect({ args, status: ours.status, stdout: norm(ours.stdout, a), stderr: norm(ours.stderr, a) }).toEqual({
        args,
        status: theirs.status,
        stdout: norm(theirs.stdout, b),
        stderr: norm(theirs.stderr, b),
      });
      if (!ok) continue;
      const opts = `driver=qcow2,file.filename=${a},encrypt.key-secret=sec0`;
      execFileSync("qemu-io", [...secret, "--image-opts", opts, "-c", "write -P 9 1000 70000"], { stdio: "pipe" });
      const check = JSON.parse(execFileSync("qemu-img", ["check", ...secret, "--image-opts", opts, "--output=json"], { encoding: "utf8" })) as Record<string, number>;
      expect({ args, corruptions: check.corruptions ?? 0, leaks: check.leaks ?? 0 }).toEqual({ args, corruptions: 0, leaks: 0 });
      const info = (f: string): unknown => {
        const d = (JSON.parse(qemuImg(["info", "--output=json", f])) as { "format-specific": { data: { encrypt: Record<string, unknown> } } })["format-specific"].data.encrypt;
        delete d.uuid;
        for (const slot of (d.slots as Array<Record<string, unknown>> | undefined) ?? []) delete slot.iters;
        delete d["master-key-iters"];
        return d;
      };
      expect({ args, encrypt: info(a) }).toEqual({ args, encrypt: info(b) });
    }
  }, 120_000);

  it("compare reads encrypted images through --image-opts, as qemu-img compare", async () => {
    const opts = (file: string, id = "sec0"): string => `driver=qcow2,file.filename=${file},encrypt.key-secret=${id}`;
    const plain = path.join(dir, "plain.qcow2");
    qemuImg(["convert", ...secret, "--image-opts", opts(aes), "-O", "qcow2", plain]);
    const cases: string[][] = [
      [...secret, "--image-opts", opts(aes), `driver=qcow2,file.filename=${plain}`],
      [...secret, "--image-opts", opts(aes), opts(luks)],
      [...secret, "--image-opts", "-s", opts(aes), opts(aes)],
      [aes, plain],
      [...secret, "--image-opts", opts(aes, "nope"), opts(aes)],
      ["--object", "secret,id=sec0,data=wrong", "--image-opts", `driver=qcow2,file.filename=${plain}`, opts(luks)],
    ];
    for (const args of cases) {
      const ours = await runOurs(compare, args);
      const theirs = runQemuImg("compare", args);
      expect({ args, ...ours }).toEqual({ args, ...theirs });
    }
  });

  it("convert from and to encrypted images, as qemu-img convert", async () => {
    const opts = (file: string): string => `driver=qcow2,file.filename=${file},encrypt.key-secret=sec0`;
    execFileSync("qemu-io", [...secret, "--image-opts", opts(luks), "-c", "write -P 7 4096 300000", "-c", "write -P 8 700k 100k"], { stdio: "pipe" });
    // Encrypted sources to raw: byte for byte what qemu reads.
    for (const src of [luks, aes]) {
      const a = path.join(dir, "conv-ours.raw");
      const b = path.join(dir, "conv-qemu.raw");
      const args = [...secret, "--image-opts", opts(src), "-O", "raw"];
      expect(await runOurs(convert, [...args, a])).toEqual(runQemuImg("convert", [...args, b]));
      expect(Buffer.compare(readFileSync(a), readFileSync(b))).toBe(0);
    }
    // Without the secret, or with a wrong one: qemu's errors.
    for (const args of [[luks, "-O", "raw"], ["--object", "secret,id=sec0,data=no", "--image-opts", opts(luks), "-O", "raw"]]) {
      const ours = await runOurs(convert, [...args, path.join(dir, "never.raw")]);
      const theirs = runQemuImg("convert", [...args, path.join(dir, "never.raw")]);
      expect({ args, ...ours }).toEqual({ args, ...theirs });
    }
    // To an encrypted target: qemu reads it with the secret, and it checks clean.
    const plain = path.join(dir, "plain-src.raw");
    qemuImg(["convert", ...secret, "--image-opts", opts(luks), "-O", "raw", plain]);
    for (const format of ["luks", "aes"]) {
      const target = path.join(dir, `conv-${format}.qcow2`);
      const ours = await runOurs(convert, [...secret, "-O", "qcow2", "-o", `encrypt.format=${format},encrypt.key-secret=sec0${format === "luks" ? ",encrypt.iter-time=10" : ""}`, plain, target]);
      expect(ours).toEqual({ stdout: "", stderr: "", status: 0 });
      const back = path.join(dir, "back.raw");
      qemuImg(["convert", ...secret, "--image-opts", opts(target), "-O", "raw", back]);
      expect(Buffer.compare(readFileSync(back), readFileSync(plain))).toBe(0);
      const check = JSON.parse(execFileSync("qemu-img", ["check", ...secret, "--image-opts", opts(target), "--output=json"], { encoding: "utf8" })) as Record<string, number>;
      expect({ corruptions: check.corruptions ?? 0, leaks: check.leaks ?? 0 }).toEqual({ corruptions: 0, leaks: 0 });
    }
  });

  it("snapshot works on encrypted images through --image-opts, as qemu-img snapshot", async () => {
    const opts = (file: string): string => `driver=qcow2,file.filename=${file},encrypt.key-secret=sec0`;
    const a = path.join(dir, "snap-ours.qcow2");
    const b = path.join(dir, "snap-qemu.qcow2");
    qemuImg(["create", "-q", "-f", "qcow2", ...secret, "-o", "encrypt.format=aes,encrypt.key-secret=sec0", a, "1M"]);
    execFileSync("qemu-io", [...secret, "--image-opts", opts(a), "-c", "write -P 3 0 100k"], { stdio: "pipe" });
    copyFileSync(a, b);
    for (const step of [["-c", "s1"], ["-l"], ["-a", "s1"], ["-d", "s1"], ["-l"]]) {
      const ours = await runOurs(snapshot, [...secret, "--image-opts", ...step, opts(a)]);
      const theirs = runQemuImg("snapshot", [...secret, "--image-opts", ...step, opts(b)]);
      const norm = (t: string): string => t.replace(/\d{4}-\d\d-\d\d \d\d:\d\d:\d\d/g, "DATE");
      expect({ step, status: ours.status, stdout: norm(ours.stdout), stderr: ours.stderr.replaceAll(a, "F") }).toEqual({
        step,
        status: theirs.status,
        stdout: norm(theirs.stdout),
        stderr: theirs.stderr.replaceAll(b, "F"),
      });
    }
    for (const args of [["-l", a], ["-c", "x", a]]) {
      const ours = await runOurs(snapshot, args);
      const theirs = runQemuImg("snapshot", args.map((x) => (x === a ? b : x)));
      expect({ args, status: ours.status, stderr: ours.stderr.replaceAll(a, "F") }).toEqual({ args, status: theirs.status, stderr: theirs.stderr.replaceAll(b, "F") });
    }
  });

  it("resize grows and shrinks encrypted images through --image-opts, as qemu-img resize", async () => {
    const opts = (file: string): string => `driver=qcow2,file.filename=${file},encrypt.key-secret=sec0`;
    for (const format of ["aes", "luks"]) {
      const a = path.join(dir, `resize-ours-${format}.qcow2`);
      const b = path.join(dir, `resize-qemu-${format}.qcow2`);
      qemuCreateEncrypted(["-q", "-f", "qcow2", ...secret, "-o", `encrypt.format=${format},encrypt.key-secret=sec0,cluster_size=4096${format === "luks" ? ",encrypt.iter-time=10" : ""}`, a, "1000k"]);
      execFileSync("qemu-io", [...secret, "--image-opts", opts(a), "-c", "write -P 5 0 1000k"], { stdio: "pipe" });
      copyFileSync(a, b);
      for (const size of ["+1M", "--shrink 1500k", "3001k"]) {
        const extra = size.split(" ");
        const ours = await runOurs(resize, [...secret, "--image-opts", ...extra.slice(0, -1), opts(a), extra.at(-1)!]);
        const theirs = runQemuImg("resize", [...secret, "--image-opts", ...extra.slice(0, -1), opts(b), extra.at(-1)!]);
        expect({ format, size, ...ours }).toEqual({ format, size, ...theirs });
        const read = (f: string): Buffer => {
          const out = path.join(dir, "resize-read.raw");
          qemuImg(["convert", ...secret, "--image-opts", opts(f), "-O", "raw", out]);
          return readFileSync(out);
        };
        expect({ format, size, same: Buffer.compare(read(a), read(b)) === 0 }).toEqual({ format, size, same: true });
      }
    }
    const plainArgs = [path.join(dir, "resize-ours-aes.qcow2"), "+1M"];
    const ours = await runOurs(resize, plainArgs);
    expect(ours).toEqual(runQemuImg("resize", plainArgs));
  });

  it("dd reads an encrypted input through --image-opts, as qemu-img dd", async () => {
    const opts = `driver=qcow2,file.filename=${luks},encrypt.key-secret=sec0`;
    const cases: Array<(out: string) => string[]> = [
      (o) => [...secret, "--image-opts", `if=${opts}`, `of=${o}`, "bs=64k", "count=3", "-O", "raw"],
      (o) => [...secret, "--image-opts", `if=${opts}`, `of=${o}`, "bs=4k", "skip=5", "-O", "qcow2"],
      (o) => [`if=${luks}`, `of=${o}`],
      (o) => ["--object", "secret,id=sec0,data=wrong", "--image-opts", `if=${opts}`, `of=${o}`],
    ];
    let n = 0;
    for (const make of cases) {
      const a = path.join(dir, `dd-ours-${n}.img`);
      const b = path.join(dir, `dd-qemu-${n++}.img`);
      const ours = await runOurs(dd, make(a));
      const theirs = runQemuImg("dd", make(b));
      const norm = (t: string, f: string): string => t.replaceAll(f, "F");
      expect({ n, status: ours.status, stdout: ours.stdout, stderr: norm(ours.stderr, a) }).toEqual({ n, status: theirs.status, stdout: theirs.stdout, stderr: norm(theirs.stderr, b) });
      if (theirs.status === 0) expect({ n, same: qemuImg(["compare", a, b]).includes("identical") }).toEqual({ n, same: true });
    }
  });

  it("bench refuses encrypted images (it takes no --object) and names images by --image-opts, as qemu-img bench", async () => {
    const plain = path.join(dir, "bench-plain.qcow2");
    qemuImg(["create", "-q", "-f", "qcow2", plain, "1M"]);
    for (const args of [["-c", "10", luks], ["-c", "10", "--image-opts", `driver=qcow2,file.filename=${plain}`], ["-c", "10", "--image-opts", "-f", "qcow2", `driver=qcow2,file.filename=${plain}`]]) {
      const ours = await runOurs(bench, args);
      const theirs = runQemuImg("bench", args);
      const first = (t: string): string => t.split("\n")[0]!;
      expect({ args, status: ours.status, stdout: first(ours.stdout), stderr: ours.stderr }).toEqual({ args, status: theirs.status, stdout: first(theirs.stdout), stderr: theirs.stderr });
    }
  });

  it("rebase and commit take --object and --image-opts, as qemu-img does", async () => {
    const make = (tag: string): { base: string; top: string } => {
      const base = path.join(dir, `rc-base-${tag}.qcow2`);
      const top = path.join(dir, `rc-top-${tag}.qcow2`);
      qemuImg(["create", "-q", "-f", "qcow2", base, "1M"]);
      execFileSync("qemu-io", ["-c", "write -P 1 0 512k", base], { stdio: "pipe" });
      qemuImg(["create", "-q", "-f", "qcow2", ...secret, "-o", "encrypt.format=aes,encrypt.key-secret=sec0", "-b", base, "-F", "qcow2", top]);
      execFileSync("qemu-io", [...secret, "--image-opts", `driver=qcow2,file.filename=${top},encrypt.key-secret=sec0`, "-c", "write -P 2 64k 64k"], { stdio: "pipe" });
      return { base, top };
    };
    const steps: Array<{ cmd: "rebase" | "commit"; args: (top: string) => string[] }> = [
      { cmd: "commit", args: (top) => [top] },
      { cmd: "commit", args: (top) => [...secret, "--image-opts", `driver=qcow2,file.filename=${top},encrypt.key-secret=sec0`] },
      { cmd: "rebase", args: (top) => [...secret, "--image-opts", "-u", "-b", "", `driver=qcow2,file.filename=${top},encrypt.key-secret=sec0`] },
      { cmd: "rebase", args: (top) => ["-u", "-b", "", top] },
    ];
    let n = 0;
    for (const step of steps) {
      const a = make(`a${n}`);
      const b = make(`b${n++}`);
      const ours = await runOurs(step.cmd === "commit" ? commit : rebase, step.args(a.top));
      const theirs = runQemuImg(step.cmd, step.args(b.top));
      const norm = (t: string, x: { base: string; top: string }): string => t.replaceAll(x.top, "TOP").replaceAll(x.base, "BASE");
      expect({ n, status: ours.status, stdout: norm(ours.stdout, a), stderr: norm(ours.stderr, a) }).toEqual({ n, status: theirs.status, stdout: norm(theirs.stdout, b), stderr: norm(theirs.stderr, b) });
      if (theirs.status === 0) {
        const read = (f: string): Buffer => {
          const out = path.join(dir, "rc.raw");
          qemuImg(["convert", "-O", "raw", f, out]);
          return readFileSync(out);
        };
        expect({ n, base: Buffer.compare(read(a.base), read(b.base)) === 0 }).toEqual({ n, base: true });
      }
    }
  });
});
