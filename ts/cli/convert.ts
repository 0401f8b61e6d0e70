// qcow2-img convert [-f fmt] [-O raw|qcow2] [-c] [-p] [-q] [-o opts] [-B backing [-F fmt]] [-n]
//   [-S size] [-m N] [-W] [-l snapshot] [--target-is-zero] [-U] src... dst

import { NodeFileBackend } from "../io/node-file.js";
import type { GuestDevice } from "../image/device.js";
import { convert as convertImages } from "../ops/convert.js";
import { parseArgs, UsageError } from "./args.js";
import type { CreateOptions } from "../image/create.js";
import { createOptionTable, hasHelpOption, optionHelp, parseOptions, qcow2Settings, unsupportedOption } from "./create.js";
import { fullBackingPath, openDevice, parseFormat } from "./open.js";
import { strtosz } from "./options.js";

export const CONVERT_USAGE =
  "convert [-c] [-p] [-q] [-n] [-f fmt] [-O output_fmt] [-B backing_file [-F backing_fmt]] [-o options] [-l snapshot_param] [-S sparse_size] [-m num_coroutines] [-W] [--target-is-zero] filename [filename2 [...]] output_filename";

/** qemu's progress line: "    (NN.NN/100%)\r", printed when it moved by at least 1%. */
class Progress {
  private last = -1;

  constructor(private readonly out: (text: string) => void) {}

  show(percent: number): void {
    if (this.last >= 0 && percent - this.last < 1 && percent < 100) return;
    this.last = percent;
    this.out(`    (${percent.toFixed(2)}/100%)\r`);
  }

  end(): void {
    this.out(`    (100.00/100%)\r\n`);
  }
}

export async function convert(argv: string[], out: (text: string) => void, err: (text: string) => void): Promise<number> {
  const args = parseArgs(argv, {
    withValue: ["-f", "-O", "-o", "-B", "-F", "-S", "-l", "-m", "-t", "-T", "-r", "--object"],
    flags: ["-c", "-p", "-q", "-n", "-W", "-U", "-C", "--force-share", "--target-is-zero", "-h", "--help"],
  });
  if (args.flags.has("-h") || args.flags.has("--help")) {
    out(`usage: qcow2-img ${CONVERT_USAGE}\n`);
    return 0;
  }
  if (args.positional.length < 2) throw new UsageError("Expecting image file name");
  const files = args.positional.slice(0, -1);
  const target = args.positional.at(-1)!;
  const outFormat = parseFormat(args.values.get("-O") ?? "raw");
  const inFormat = args.values.has("-f") ? parseFormat(args.values.get("-f")!) : undefined;
  const compress = args.flags.has("-c");
  const existing = args.flags.has("-n");
  const quiet = args.flags.has("-q");
  const targetIsZero = args.flags.has("--target-is-zero");
  if (args.values.has("-l")) {
    err("qcow2-img: converting from an internal snapshot (-l) is not supported yet\n");
    return 1;
  }
  if (compress && outFormat !== "qcow2") {
    err("qcow2-img: Compression not supported for this file format\n");
    return 1;
  }
  if (targetIsZero && !existing) {
    err("qcow2-img: --target-is-zero requires use of -n flag\n");
    return 1;
  }
  let sparseSize = 4096;
  if (args.values.has("-S")) {
    const s = strtosz(args.values.get("-S")!);
    if (!s.ok || s.value > 16n * 1024n * 1024n || s.value % 512n !== 0n) {
      err(
        "qcow2-img: Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. Select 0 to disable sparse detection (fully allocates output).\n",
      );
      return 1;
    }
    sparseSize = Number(s.value);
  }
  if (args.values.has("-m")) {
    const m = Number(args.values.get("-m"));
    if (!Number.isInteger(m) || m < 1 || m > 16) {
      err("qcow2-img: Invalid number of coroutines. Allowed number of coroutines is between 1 and 16\n");
      return 1;
    }
  }
  const backing = args.values.get("-B");
  if (args.values.has("-F") && backing === undefined) {
    err("qcow2-img: -F requires -B\n");
    return 1;
  }
  const optionText = (args.all.get("-o") ?? []).join(",");
  const table = createOptionTable(outFormat);
  if (optionText && hasHelpOption(optionText)) {
    out(optionHelp(table));
    return 0;
  }
  let optionSet;
  try {
    optionSet = parseOptions(optionText, table);
  } catch (e) {
    err(`qcow2-img: ${(e as Error).message}\n`);
    return 1;
  }
  const unsupported = unsupportedOption(optionSet);
  if (unsupported !== undefined) {
    err(`qcow2-img: Option '${unsupported}' is not supported yet\n`);
    return 1;
  }
  const sources: GuestDevice[] = [];
  try {
    for (const file of files) {
      try {
        sources.push(await openDevice(file, inFormat));
      } catch (e) {
        err(`qcow2-img: Could not open '${file}': ${(e as Error).message}\n`);
        return 1;
      }
    }
    if (backing !== undefined && outFormat === "qcow2" && !existing) {
      // The backing file must open, as qemu-img checks when creating the target.
      try {
        const fmt = args.values.get("-F");
        const b = await openDevice(fullBackingPath(target, backing), fmt === undefined ? undefined : parseFormat(fmt));
        await b.close();
      } catch (e) {
        err(`qcow2-img: Could not open backing file: ${(e as Error).message}\n`);
        return 1;
      }
    }
    let create: Omit<CreateOptions, "size"> | undefined;
    if (outFormat === "qcow2" && !existing) {
      const total = sources.reduce((n, d) => n + d.virtualSize, 0);
      optionSet.set("size", { text: String(total), value: BigInt(total) });
      if (backing !== undefined) {
        optionSet.set("backing_file", { text: backing, value: backing });
        const fmt = args.values.get("-F");
        if (fmt !== undefined) optionSet.set("backing_fmt", { text: fmt, value: fmt });
      }
      try {
        create = qcow2Settings(optionSet).options;
      } catch (e) {
        err(`qcow2-img: ${target}: error while converting qcow2: ${(e as Error).message}\n`);
        return 1;
      }
    }
    const progress = args.flags.has("-p") && !quiet ? new Progress(out) : undefined;
    progress?.show(0);
    // Synchronous file I/O: measured faster here than sending writes to the thread pool, whose
    // round trips cost more than the overlap with reads gains (bench/convert.mjs).
    const targetBackend = await NodeFileBackend.open(target, { readOnly: false, create: !existing });
    await convertImages(sources, targetBackend, {
      format: outFormat,
      ...(create ? { create } : {}),
      compress,
      sparseSize,
      existing,
      targetIsZero,
      topOnly: backing !== undefined,
      ...(progress ? { onProgress: (done: number, total: number) => progress.show(total ? (100 * done) / total : 100) } : {}),
    });
    progress?.end();
    return 0;
  } catch (e) {
    err(`qcow2-img: ${(e as Error).message}\n`);
    return 1;
  } finally {
    for (const s of sources) await s.close().catch(() => undefined);
  }
}
