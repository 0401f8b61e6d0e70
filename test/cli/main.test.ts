// The tool's entry: qemu-img commands not built yet say so, unknown ones are refused like qemu-img.

import { spawnSync } from "node:child_process";
import path from "node:path";
import { expect, it } from "vitest";

const CLI = path.join(import.meta.dirname, "..", "..", "build", "cli", "main.js");

it("refuses the qemu-img commands still to come with a clear message, exit 1", () => {
  for (const name of ["bitmap"]) {
    const r = spawnSync(process.execPath, [CLI, name, "-l", "x.qcow2"], { encoding: "utf8" });
    expect({ name, status: r.status, stderr: r.stderr }).toEqual({ name, status: 1, stderr: `qcow2-img: the '${name}' command is not supported yet\n` });
  }
});

it("refuses an unknown command as qemu-img does", () => {
  const r = spawnSync(process.execPath, [CLI, "frobnicate"], { encoding: "utf8" });
  expect(r.status).toBe(1);
  expect(r.stderr).toBe("qcow2-img: Command not found: frobnicate\nTry 'qcow2-img --help' for more information\n");
});
