// qcow2-img snapshot and the snapshot parts of qcow2-img info, against qemu-img on copies of the
// same images: the same stdout, stderr and exit code; after -c/-a/-d the same snapshot table (dates
// aside), the same guest contents at every snapshot, and qemu-img check clean on our copy.

import { execFileSync } from "node:child_process";
import { copyFileSync, readFileSync } from "node:fs";
import path from "node:path";
import { beforeAll, expect, it } from "vitest";
import { convert } from "../../ts/cli/convert.js";
import { info } from "../../ts/cli/info.js";
import { snapshot } from "../../ts/cli/snapshot.js";
import { runOurs, runQemuImg } from "../helpers/cli.js";
import { describeQemu, qemuImg, qemuIo, tempDir } from "../helpers/qemu.js";

interface Listed {
  id: string;
  name: string;
  "vm-state-size": number;
  "date-sec": number;
  "vm-clock-sec": number;
  icount?: number;
}

function table(file: string): Array<Omit<Listed, "date-sec">> {
  const parsed = JSON.parse(qemuImg(["info", "--output=json", file])) as { snapshots?: Listed[] };
  return (parsed.snapshots ?? []).map(({ "date-sec": _, "date-nsec": __, ...rest }: Listed & { "date-nsec"?: number }) => rest);
}

function contents(dir: string, file: string, name?: string): Buffer {
  const out = path.join(dir, "out.raw");
  execFileSync("qemu-img", ["convert", ...(name === undefined ? [] : ["-l", `snapshot.name=${name}`]), "-O", "raw", file, out]);
  return readFileSync(out);
}

function checkClean(file: string): Record<string, number> {
  const r = JSON.parse(qemuImg(["check", "--output=json", file])) as Record<string, number>;
  return { corruptions: r.corruptions ?? 0, leaks: r.leaks ?? 0, errors: r["check-errors"] ?? 0 };
}

describeQemu("qcow2-img snapshot", () => {
  const dir = tempDir("qcow2-clisnap-");
  const base = path.join(dir, "base.qcow2");
  const raw = path.join(dir, "disk.raw");
  let copies = 0;
  /** Two copies of `source`: ours and qemu's. */
  const pair = (source: string): [string, string] => {
    const n = copies++;
    const a = path.join(dir, `ours-${n}.qcow2`);
    const b = path.join(dir, `qemu-${n}.qcow2`);
    copyFileSync(source, a);
    copyFileSync(source, b);
    return [a, b];
  };

  beforeAll(() => {
    qemuImg(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", base, "2M"]);
    qemuIo(base, ["write -P 1 0 100k"]);
    qemuImg(["snapshot", "-c", "one", base]);
    qemuIo(base, ["write -P 2 50k 100k", "write -c -P 3 1M 64k"]);
    qemuImg(["snapshot", "-c", "two", base]);
    qemuImg(["snapshot", "-c", "", base]);
    qemuIo(base, ["write -z 0 8k", "write -P 4 1536k 4k"]);
    qemuImg(["snapshot", "-c", "two", base]);
    qemuImg(["create", "-q", "-f", "raw", raw, "1M"]);
  });

  it("lists like qemu-img, in human and in info's forms", async () => {
    for (const args of [["-l", base], [base, "-l"], ["-l", "-q", base], ["-lU", base], ["-l", raw]]) {
      expect({ args, ...(await runOurs(snapshot, args)) }).toEqual({ args, ...runQemuImg("snapshot", args) });
    }
    for (const args of [[base], ["--output=json", base]]) {
      const ours = await runOurs(info, args);
      const theirs = runQemuImg("info", args);
      if (args[0] === "--output=json") {
        const strip = (text: string): unknown => {
          const v = JSON.parse(text) as Record<string, unknown>;
          delete v["actual-size"];
          return v;
        };
        expect(strip(ours.stdout)).toEqual(strip(theirs.stdout));
      } else {
        const strip = (text: string): string => text.replace(/^disk size: .*$/m, "");
        expect(strip(ours.stdout)).toEqual(strip(theirs.stdout));
      }
    }
  });

  it("shows dates in local time, as qemu-img does", async () => {
    const saved = process.env.TZ;
    try {
      for (const tz of ["America/New_York", "Asia/Kolkata"]) {
        process.env.TZ = tz;
        const theirs = execFileSync("qemu-img", ["snapshot", "-l", base], { encoding: "utf8", env: { ...process.env, TZ: tz } });
        expect((await runOurs(snapshot, ["-l", base])).stdout).toBe(theirs);
      }
    } finally {
      if (saved === undefined) delete process.env.TZ;
      else process.env.TZ = saved;
    }
  });

  it("creates, applies and deletes as qemu-img does", async () => {
    const steps: string[][] = [
      ["-c", "new"],
      ["-a", "one"],
      ["-a", "2"],
      ["-a", "two"],
      ["-d", "two"],
      ["-d", "2"],
      ["-d", ""],
      ["-q", "-c", "quiet"],
      ["-a", "nope"],
      ["-d", "nope"],
      ["-c", "x".repeat(300)],
    ];
    const [ours, theirs] = pair(base);
    for (const step of steps) {
      const a = await runOurs(snapshot, [...step, ours]);
      const b = runQemuImg("snapshot", [...step, theirs]);
      const norm = (t: string): string => t.replaceAll(ours, "F").replaceAll(theirs, "F");
      expect({ step, status: a.status, stdout: a.stdout, stderr: norm(a.stderr) }).toEqual({ step, status: b.status, stdout: b.stdout, stderr: norm(b.stderr) });
      expect({ step, table: table(ours) }).toEqual({ step, table: table(theirs) });
      expect({ step, ...checkClean(ours) }).toEqual({ step, corruptions: 0, leaks: 0, errors: 0 });
      expect({ step, same: Buffer.compare(contents(dir, ours), contents(dir, theirs)) === 0 }).toEqual({ step, same: true });
      for (const sn of table(ours)) {
        if (sn.name === "" || table(ours).filter((s) => s.name === sn.name).length > 1) continue;
        expect({ step, sn: sn.name, same: Buffer.compare(contents(dir, ours, sn.name), contents(dir, theirs, sn.name)) === 0 }).toEqual({
          step,
          sn: sn.name,
          same: true,
        });
      }
    }
  });

  it("fails as qemu-img does on bad command lines and files", async () => {
    const [ours, theirs] = pair(base);
    const cases: Array<(f: string) => string[]> = [
      (f) => ["-c", "a", "-l", f],
      (f) => ["-l", "-d", "x", f],
      () => ["-c"],
      () => ["-l"],
      (f) => ["-l", f, f],
      (f) => ["-x", f],
      (f) => ["-f", "qcow2", "-l", f],
      () => ["-l", path.join(dir, "missing.qcow2")],
      () => ["-c", "s", raw],
      () => ["-a", "s", raw],
      () => ["-d", "s", raw],
    ];
    for (const make of cases) {
      const a = await runOurs(snapshot, make(ours));
      const b = runQemuImg("snapshot", make(theirs));
      const norm = (t: string): string => t.replaceAll(ours, "F").replaceAll(theirs, "F");
      expect({ args: make("F"), status: a.status, stdout: a.stdout, stderr: norm(a.stderr) }).toEqual({
        args: make("F"),
        status: b.status,
        stdout: b.stdout,
        stderr: norm(b.stderr),
      });
    }
  });

  it("convert -l reads a snapshot as qemu-img convert -l does", async () => {
    const raw = (name: string): string => path.join(dir, name);
    const cases: string[][] = [
      ["-l", "one", "-O", "raw"],
      ["-l", "3", "-O", "raw"],
      ["-l", "snapshot.name=one", "-O", "qcow2"],
      ["-l", "snapshot.id=2,snapshot.name=two", "-O", "raw"],
      ["-l", "snapshot.id=1,snapshot.name=two", "-O", "raw"],
      ["-l", "nope", "-O", "raw"],
      ["-l", "snapshot.foo=1", "-O", "raw"],
    ];
    let n = 0;
    for (const args of cases) {
      const a = raw(`l-ours-${n}.img`);
      const b = raw(`l-qemu-${n++}.img`);
      const ours = await runOurs(convert, [...args, base, a]);
      const theirs = runQemuImg("convert", [...args, base, b]);
      const norm = (t: string, f: string): string => t.replaceAll(f, "F");
      expect({ args, status: ours.status, stdout: ours.stdout, stderr: norm(ours.stderr, a) }).toEqual({
        args,
        status: theirs.status,
        stdout: theirs.stdout,
        stderr: norm(theirs.stderr, b),
      });
      if (theirs.status === 0) expect({ args, same: qemuImg(["compare", a, b]).includes("identical") }).toEqual({ args, same: true });
    }
    for (const args of [["-l", "one", "-O", "raw", base, base, raw("x.raw")], ["-l", "one", "-O", "raw", path.join(dir, "disk.raw"), raw("y.raw")]]) {
      const ours = await runOurs(convert, args);
      const theirs = runQemuImg("convert", args);
      expect({ args, ...ours }).toEqual({ args, ...theirs });
    }
  });
});
