// Running a qcow2-img command in-process and the same qemu-img command, for side-by-side tests.

import { spawnSync } from "node:child_process";
import "../../ts/node.js";
import { UsageError } from "../../ts/cli/args.js";
import type { Command } from "../../ts/cli/main-types.js";

export interface CliResult {
  stdout: string;
  stderr: string;
  status: number;
}

/**
 * Our command in-process, with main's handling of usage errors (qemu's error_exit); program
 * names in stderr made qemu's unless `qemuNames` is false.
 */
export async function runOurs(command: Command, args: string[], { qemuNames = true } = {}): Promise<CliResult> {
  let stdout = "";
  let stderr = "";
  let status: number;
  try {
    status = await command(args, (t) => (stdout += t), (t) => (stderr += t));
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    stderr += `qcow2-img: ${e.message}\nTry 'qcow2-img --help' for more information\n`;
    status = 1;
  }
  return { stdout, stderr: qemuNames ? stderr.replaceAll("qcow2-img", "qemu-img") : stderr, status };
}

/** `qemu-img <subcommand> args...`. */
export function runQemuImg(subcommand: string, args: string[]): CliResult {
  const r = spawnSync("qemu-img", [subcommand, ...args], { encoding: "utf8" });
  return { stdout: r.stdout, stderr: r.stderr, status: r.status ?? -1 };
}
