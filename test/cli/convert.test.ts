// qcow2-img convert against qemu-img convert with the same arguments: the outputs read the same
// (compare), raw outputs are byte-identical, qcow2 outputs check clean and map the same way, and
// errors give qemu's exit codes and messages.

import { spawnSync } from "node:child_process";
import { readFileSync } from "node:fs";
import path from "node:path";
import { expect, it } from "vitest";
import "../../ts/node.js";
import { convert } from "../../ts/cli/convert.js";
import { runOurs, type CliResult } from "../helpers/cli.js";
import { describeQemu, qemuImg, qemuIo, allocationLayout, tempDir } from "../helpers/qemu.js";

function run(argv: string[]): Promise<CliResult> {
  return runOurs(convert, argv, { qemuNames: false });
}


describeQemu("qcow2-img convert", () => {
  const dir = tempDir("qcow2-cliconvert-");
  const at = (n: string) => path.join(dir, n);
  const src = at("src.qcow2");
  qemuImg(["create", "-f", "qcow2", src, "16M"]);
  qemuIo(src, ["write -P 0x11 0 1M", "write -z 1M 64k", "write -c -P 0x33 4M 64k", "write -P 0x44 9M 12k"]);
  const base = at("base.qcow2");
  qemuImg(["create", "-f", "qcow2", base, "16M"]);
  qemuIo(base, ["write -P 0x55 0 2M"]);
  const top = at("top.qcow2");
  qemuImg(["create", "-f", "qcow2", "-b", base, "-F", "qcow2", top]);
  qemuIo(top, ["write -P 0x66 1M 64k"]);

  const cases: Array<[string, string[], "raw" | "qcow2"]> = [
    ["default raw", [src], "raw"],
    ["qcow2", ["-O", "qcow2", src], "qcow2"],
    ["compressed", ["-c", "-O", "qcow2", src], "qcow2"],
    ["fully allocated", ["-S", "0", "-O", "qcow2", src], "qcow2"],
    ["v2, 4 KiB clusters", ["-O", "qcow2", "-o", "compat=0.10,cluster_size=4k", src], "qcow2"],
    ["chain flattened", ["-O", "qcow2", top], "qcow2"],
    ["kept on a backing file", ["-O", "qcow2", "-B", base, "-F", "qcow2", top], "qcow2"],
    ["two sources", ["-O", "qcow2", src, top], "qcow2"],
    ["quiet with progress", ["-q", "-p", "-O", "qcow2", src], "qcow2"],
  ];
  for (const [name, args, fmt] of cases) {
    it(name, async () => {
      const mine = at(`${name.replaceAll(/\W+/g, "-")}.ours`);
      const theirs = at(`${name.replaceAll(/\W+/g, "-")}.qemu`);
      const ours = await run([...args, mine]);
      const q = spawnSync("qemu-img", ["convert", ...args, theirs], { encoding: "utf8" });
      expect({ status: ours.status, stdout: ours.stdout, stderr: ours.stderr }).toEqual({ status: q.status, stdout: q.stdout, stderr: q.stderr });
      expect(spawnSync("qemu-img", ["compare", "-f", fmt, "-F", fmt, mine, theirs]).status).toBe(0);
      if (fmt === "raw") expect(readFileSync(mine).equals(readFileSync(theirs))).toBe(true);
      else {
        expect(spawnSync("qemu-img", ["check", mine]).status).toBe(0);
        expect(allocationLayout(mine)).toEqual(allocationLayout(theirs));
        const info = (f: string) => JSON.parse(qemuImg(["info", "--output=json", f])) as Record<string, unknown>;
        const pick = (i: Record<string, unknown>) => ({ size: i["virtual-size"], cluster: i["cluster-size"], backing: i["backing-filename"], spec: i["format-specific"] });
        expect(pick(info(mine))).toEqual(pick(info(theirs)));
      }
    });
  }

  it("-p prints qemu's progress line and ends it", async () => {
    const ours = await run(["-p", "-O", "qcow2", src, at("progress.ours")]);
    expect(ours.stdout.startsWith("    (0.00/100%)\r")).toBe(true);
    expect(ours.stdout.endsWith("    (100.00/100%)\r\n")).toBe(true);
    expect(ours.stdout).toMatch(/^(    \(\d+\.\d\d\/100%\)\r)+\n$/);
  });

  it("-n writes into an image qemu made, leaving its options", async () => {
    const target = at("existing.qcow2");
    qemuImg(["create", "-f", "qcow2", "-o", "cluster_size=4096", target, "16M"]);
    qemuIo(target, ["write -P 0xee 0 16M"]);
    expect((await run(["-n", "-O", "qcow2", src, target])).status).toBe(0);
    expect(spawnSync("qemu-img", ["compare", src, target]).status).toBe(0);
    expect(spawnSync("qemu-img", ["check", target]).status).toBe(0);
  });

  it("refuses what qemu-img refuses, with its exit code and message", async () => {
    for (const args of [
      ["-c", "-O", "raw", src, at("x.raw")],
      ["--target-is-zero", "-O", "qcow2", src, at("x.qcow2")],
      ["-S", "1000", src, at("x.raw")],
      ["-O", "qcow2", "-o", "cluster_size=3000", src, at("y.qcow2")],
      ["-O", "qcow2", "-o", "bogus=1", src, at("z.qcow2")],
    ]) {
      const ours = await run(args);
      const q = spawnSync("qemu-img", ["convert", ...args], { encoding: "utf8" });
      expect({ args, status: ours.status, stderr: ours.stderr.replaceAll("qcow2-img:", "qemu-img:") }).toEqual({ args, status: q.status, stderr: q.stderr });
    }
  });
});
