// qcow2-img check [-f fmt] [--output=human|json] [-r leaks|all] [-q] [-U] [-T cache] file

import { checkExitCode, checkImage, formatCheckHuman, formatCheckJson, type RepairMode } from "../check/check.js";
import { QCOW_MAGIC } from "../format/constants.js";
import { readHeader } from "../format/header.js";
import { refuseFeatures } from "../image/features.js";
import { readFully } from "../io/backend.js";
import { NodeFileBackend } from "../io/node-file.js";
import { parseArgs, UsageError } from "./args.js";
import { fullBackingPath, openDevice, parseFormat } from "./open.js";
import { CACHE_MODES } from "./options.js";
import { imageSource, OptionsError, requireSecret, type ImageSource } from "./image-opts.js";

export const CHECK_USAGE = "check [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-T src_cache] [-U] filename";

export async function check(argv: string[], out: (text: string) => void, err: (text: string) => void): Promise<number> {
  const args = parseArgs(argv, {
    withValue: ["-f", "--output", "-r", "-T", "--object"],
    flags: ["-q", "-U", "--force-share", "--image-opts", "-h", "--help"],
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
  const cache = args.values.get("-T") ?? "writeback";
  if (!CACHE_MODES.has(cache)) {
    err(`qcow2-img: Invalid source cache option: ${cache}\n`);
    return 1;
  }
  const quiet = args.flags.has("-q");
  const fmtArg = args.values.get("-f");
  let source: ImageSource;
  try {
    source = await imageSource(args.positional[0]!, {
      objects: args.all.get("--object") ?? [],
      imageOpts: args.flags.has("--image-opts"),
      format: fmtArg === undefined ? undefined : parseFormat(fmtArg),
    });
  } catch (e) {
    if (!(e instanceof OptionsError)) throw e;
    err(`qcow2-img: ${e.message}\n`);
    return 1;
  }
  const file = source.file;
  // Open as qemu-img does for a check: probe the format, read the header leniently (as qemu's
  // BDRV_O_CHECK), open the backing chain; what qemu refuses to open, we refuse.
  try {
    const format = source.format;
    const backend = await NodeFileBackend.open(file, { readOnly: true });
    try {
      const magic = new Uint8Array(4);
      await readFully(backend, magic, 0);
      const isQcow2 = new DataView(magic.buffer).getUint32(0) === QCOW_MAGIC;
      if (format === "raw" || (format === undefined && !isQcow2)) {
        err("qcow2-img: This image format does not support checks\n");
        return 63;
      }
      const header = await readHeader(backend, undefined, { check: true });
      refuseFeatures(header, file);
      requireSecret(source, header.cryptMethod);
      // A LUKS secret must open a key slot, as qemu's open checks.
      if (source.passphrase !== undefined && header.cryptMethod !== 0) (await (await import("../image/encryption.js")).openEncryption(backend, header, source.passphrase)).cipher.destroy();
      if (header.backingFile !== undefined && header.backingFile !== "") {
        const backingFormat = header.extensions.backingFormat;
        const backingPath = fullBackingPath(file, header.backingFile);
        try {
          const backing = await openDevice(backingPath, backingFormat === undefined ? undefined : parseFormat(backingFormat));
          await backing.close();
        } catch (e) {
          throw new Error(`Could not open backing file: ${(e as Error).message}`);
        }
      }
    } finally {
      await backend.close();
    }
  } catch (e) {
    err(e instanceof OptionsError ? `qcow2-img: ${e.message}\n` : `qcow2-img: Could not open '${source.name}': ${(e as Error).message}\n`);
    return 1;
  }
  const report = await checkImage(file, { repair, filename: source.name, onDiagnostic: (line) => err(line + "\n") });
  if (report.failure === undefined && !quiet) out(output === "json" ? formatCheckJson(report) : formatCheckHuman(report));
  const code = checkExitCode(report);
  if (code === 1) err(report.failure !== undefined ? `qcow2-img: Check failed: ${report.failure}\n` : "qcow2-img: Check failed\n");
  return code;
}
