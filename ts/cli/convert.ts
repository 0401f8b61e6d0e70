// qcow2-img convert [-f fmt] [-O raw|qcow2] [-c] [-p] [-q] [-o opts] [-B backing [-F fmt]] [-n]
//   [-S size] [-m N] [-W] [-l snapshot] [--target-is-zero] [-U] src... dst

import { NodeFileBackend } from "../io/node-file.js";
import { RawDevice, type GuestDevice } from "../image/device.js";
import { Qcow2Image } from "../image/qcow2-image.js";
import { readFully } from "../io/backend.js";
import { QCOW_MAGIC } from "../format/constants.js";
import { convert as convertImages } from "../ops/convert.js";
import { parseArgs, UsageError } from "./args.js";
import type { CreateOptions } from "../image/create.js";
import { createOptionTable, hasHelpOption, optionHelp, parseOptions, qcow2Settings, unsupportedOption } from "./create.js";
import { fullBackingPath, openDevice, parseFormat, type ImageFormat } from "./open.js";
import { strtosz } from "./options.js";
import { parseSnapshotParam, type SnapshotParam } from "./snapshot-param.js";
import { imageSource, OptionsError, parseObjects, requireSecret, type ImageSource } from "./image-opts.js";
import { Qcow2ErrorCode, isQcow2Error } from "../errors.js";
import type { OpenOptions } from "../image/qcow2-image.js";

export const CONVERT_USAGE =
  "convert [-c] [-p] [-q] [-n] [-f fmt] [-O output_fmt] [-B backing_file [-F backing_fmt]] [-o options] [-l snapshot_param] [-S sparse_size] [-m num_coroutines] [-W] [--target-is-zero] filename [filename2 [...]] output_filename";

/**
 * Source reads of at least this many bytes (data chunks, runs of compressed streams) go to the
 * thread pool, so they run ahead of the writes; headers and tables are read synchronously.
 */
const ASYNC_READS_FROM = 256 * 1024;

/** qemu's bdrv_snapshot_load_tmp refusal for a format without snapshots. */
class SnapshotLoadError extends Error {}

/** openDevice, with large reads on the thread pool; a snapshot or a passphrase as asked. */
async function openSource(file: string, format: ImageFormat | undefined, open: Pick<OpenOptions, "snapshot" | "snapshotAtCurrentSize" | "passphrase"> = {}): Promise<GuestDevice> {
  const backend = await NodeFileBackend.open(file, { readOnly: true, asyncFrom: ASYNC_READS_FROM });
  try {
    let fmt = format;
    if (fmt === undefined) {
      const magic = new Uint8Array(4);
      await readFully(backend, magic, 0);
      fmt = new DataView(magic.buffer).getUint32(0) === QCOW_MAGIC ? "qcow2" : "raw";
    }
    if (fmt === "raw") {
      if (open.snapshot !== undefined) throw new SnapshotLoadError("Block format 'raw' used by device '' does not support temporarily loading internal snapshots");
      return await RawDevice.open(backend);
    }
    return await Qcow2Image.open(backend, open);
  } catch (e) {
    await backend.close().catch(() => undefined);
    throw e;
  }
}

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
    flags: ["-c", "-p", "-q", "-n", "-W", "-U", "-C", "--force-share", "--target-is-zero", "--image-opts", "-h", "--help"],
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
  let snapshot: SnapshotParam | undefined;
  if (args.values.has("-l")) {
    const parsed = parseSnapshotParam(args.values.get("-l")!);
    if ("error" in parsed) {
      err(parsed.error.split("\n").map((line) => `qcow2-img: ${line}\n`).join(""));
      return 1;
    }
    snapshot = parsed.which;
    if (files.length > 1) {
      err("qcow2-img: No support for concatenating multiple snapshot\n");
      return 1;
    }
  }
  let secrets: Map<string, Uint8Array>;
  try {
    secrets = await parseObjects(args.all.get("--object") ?? []);
  } catch (e) {
    if (!(e instanceof OptionsError)) throw e;
    err(`qcow2-img: ${e.message}\n`);
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
      let source: ImageSource | undefined;
      try {
        // With --image-opts each source is an option string naming the file and its secret.
        source = await imageSource(file, { objects: args.all.get("--object") ?? [], imageOpts: args.flags.has("--image-opts"), format: inFormat });
        const device = await openSource(source.file, source.format, {
          ...(snapshot !== undefined ? { snapshot, snapshotAtCurrentSize: true } : {}),
          ...(source.passphrase !== undefined ? { passphrase: source.passphrase } : {}),
        });
        sources.push(device);
        if (device instanceof Qcow2Image) requireSecret(source, device.header.cryptMethod);
      } catch (e) {
        if (e instanceof OptionsError) {
          err(`qcow2-img: ${e.message}\n`);
          return 1;
        }
        if (snapshot !== undefined && (e instanceof SnapshotLoadError || isQcow2Error(e, Qcow2ErrorCode.NOT_FOUND))) {
          err(`qcow2-img: Failed to load snapshot: ${e instanceof SnapshotLoadError ? e.message : "Can't find snapshot"}\n`);
          return 1;
        }
        if (source !== undefined && source.name !== file) {
          err(`qcow2-img: Could not open '${source.name}': ${(e as Error).message}\n`);
          return 1;
        }
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
        create = qcow2Settings(optionSet, secrets).options;
      } catch (e) {
        err(`qcow2-img: ${target}: error while converting qcow2: ${(e as Error).message}\n`);
        return 1;
      }
    }
    const progress = args.flags.has("-p") && !quiet ? new Progress(out) : undefined;
    progress?.show(0);
    // Writes are synchronous: this thread stays busy with the longest step (the kernel copying
    // into the target) while the next chunks are read on the thread pool (bench/convert.mjs).
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
