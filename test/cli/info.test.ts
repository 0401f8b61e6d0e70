// qcow2-img info against qemu-img info: the same JSON (parsed) and the same human text.

import { execFileSync, spawnSync } from "node:child_process";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { beforeAll, expect, it } from "vitest";
import { describeQemu, qemuIo, tempDir } from "../helpers/qemu.js";

const cli = path.join(path.dirname(fileURLToPath(import.meta.url)), "..", "..", "build", "cli", "main.js");

function ours(args: string[], cwd: string): { stdout: string; stderr: string; status: number | null } {
  const r = spawnSync(process.execPath, [cli, ...args], { cwd, encoding: "utf8" });
  return { stdout: r.stdout, stderr: r.stderr, status: r.status };
}

function theirs(args: string[], cwd: string): string {
  return execFileSync("qemu-img", args, { cwd, encoding: "utf8" });
}

describeQemu("qcow2-img info", () => {
  const dir = tempDir("qcow2-cli-");
  const images = ["v3.qcow2", "v2.qcow2", "lazy.qcow2", "rb1.qcow2", "top.qcow2", "enc.qcow2", "base.raw"];

  beforeAll(() => {
    const run = (args: string[]) => execFileSync("qemu-img", args, { cwd: dir });
    run(["create", "-f", "qcow2", "v3.qcow2", "64M"]);
    run(["create", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4096", "v2.qcow2", "1G"]);
    run(["create", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=2M", "lazy.qcow2", "100G"]);
    run(["create", "-f", "qcow2", "-o", "refcount_bits=1,cluster_size=512", "rb1.qcow2", "1536K"]);
    run(["create", "-f", "raw", "base.raw", "10M"]);
    run(["create", "-f", "qcow2", "-b", "v3.qcow2", "-F", "qcow2", "mid.qcow2"]);
    run(["create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2", "100M"]);
    run(["create", "-f", "qcow2", "--object", "secret,id=s0,data=x", "-o", "encrypt.format=aes,encrypt.key-secret=s0", "enc.qcow2", "1M"]);
    qemuIo(path.join(dir, "v3.qcow2"), ["write -P 1 0 3M"]);
  });

  it("prints the same JSON as qemu-img info --output=json", () => {
    for (const f of images) {
      for (const name of [f, path.join(dir, f)]) {
        const r = ours(["info", "--output=json", name], dir);
        expect(r.status).toBe(0);
        expect({ f: name, info: JSON.parse(r.stdout) }).toEqual({ f: name, info: JSON.parse(theirs(["info", "--output=json", name], dir)) });
      }
    }
  });

  it("prints the same human text as qemu-img info", () => {
    for (const f of images) {
      expect({ f, text: ours(["info", f], dir).stdout }).toEqual({ f, text: theirs(["info", f], dir) });
    }
  });

  it("follows --backing-chain like qemu-img, in both output forms", () => {
    expect(ours(["info", "--backing-chain", "top.qcow2"], dir).stdout).toBe(theirs(["info", "--backing-chain", "top.qcow2"], dir));
    const json = JSON.parse(ours(["info", "--backing-chain", "--output=json", path.join(dir, "top.qcow2")], dir).stdout);
    expect(json).toEqual(JSON.parse(theirs(["info", "--backing-chain", "--output=json", path.join(dir, "top.qcow2")], dir)));
    expect(json).toHaveLength(3);
  });

  it("honours -f and fails like qemu-img on a missing file or a bad option", () => {
    expect(JSON.parse(ours(["info", "-f", "raw", "--output=json", "v3.qcow2"], dir).stdout)).toEqual(
      JSON.parse(theirs(["info", "-f", "raw", "--output=json", "v3.qcow2"], dir)),
    );
    const missing = ours(["info", "nope.qcow2"], dir);
    expect(missing.status).toBe(1);
    expect(missing.stderr).toMatch(/^qcow2-img: .*nope\.qcow2/);
    const bad = ours(["info", "--output=xml", "v3.qcow2"], dir);
    expect(bad.status).toBe(1);
    expect(bad.stderr).toMatch(/--output must be used with human or json/);
  });
});
