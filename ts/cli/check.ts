// qcow2-img check [-f fmt] [--output=human|json] [-r leaks|all] [-q] [-U] [-T cache] file

import { checkExitCode, checkImage, formatCheckHuman, formatCheckJson, type RepairMode } from "../check/check.js";
import { Qcow2Image } from "../image/qcow2-image.js";
import { parseArgs, UsageError } from "./args.js";
import { openDevice, parseFormat } from "./open.js";

export const CHECK_USAGE = "check [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-T src_cache] [-U] filename";

export async function check(argv: string[], out: (text: string) => void, err: (text: string) => void): Promise<number> {
  const args = parseArgs(argv, {
    withValue: ["-f", "--output", "-r", "-T", "--object", "--image-opts"],
    flags: ["-q", "-U", "--force-share", "-h", "--help"],
  });
  if (args.flags.has("-h") || args.flags.has("--help")) {
    out(`usage: qcow2-img ${CHECK_USAGE}\n`);
    return 0;
  }
  if (args.positional.length !== 1) throw new UsageError("Expecting one image file name");
  const output = args.values.get("--output") ?? "human";
  if (output !== "human" && output !== "json") throw new UsageError("--output must be used with human or json as argument.");
  const r = args.values.get("-r");
  let repair: RepairMode = "none";
  if (r !== undefined) {
    if (r !== "leaks" && r !== "all") throw new UsageError(`Unknown option value for -r (expecting 'leaks' or 'all'): ${r}`);
    repair = r;
  }
  const quiet = args.flags.has("-q");
  const file = args.positional[0]!;
  const fmtArg = args.values.get("-f");
  // Open as qemu-img does (format probe, backing chain) so what it refuses, we refuse.
  let device;
  try {
    device = await openDevice(file, fmtArg === undefined ? undefined : parseFormat(fmtArg));
  } catch (e) {
    err(`qcow2-img: Could not open '${file}': ${(e as Error).message}\n`);
    return 1;
  }
  const isQcow2 = device instanceof Qcow2Image;
  await device.close();
  if (!isQcow2) {
    err("qcow2-img: This image format does not support checks\n");
    return 63;
  }
  const report = await checkImage(file, { repair, onDiagnostic: (line) => err(line + "\n") });
  if (report.failure === undefined && !quiet) out(output === "json" ? formatCheckJson(report) : formatCheckHuman(report));
  const code = checkExitCode(report);
  if (code === 1) err(report.failure !== undefined ? `qcow2-img: Check failed: ${report.failure}\n` : "qcow2-img: Check failed\n");
  return code;
}
