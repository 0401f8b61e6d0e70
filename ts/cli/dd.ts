// qcow2-img dd [-U] [-f fmt] [-O output_fmt] [bs=block_size] [count=blocks] [skip=blocks]
//   if=input of=output
//
// As qemu-img 7.2 img_dd: options parsed by getopt_long, then the operands in order (each
// checked as it comes), the input opened before the output format is looked at, the output
// created at the size qemu computes (count= counts from the start of the input, even with skip=;
// a skip past the end warns and creates an empty output), and qemu's messages and exit codes.
// The copy itself is ts/ops/dd.ts, in large pieces.

import fs from "node:fs";
import "../node.js";
import { dd as runDd, DdError, ddPlan } from "../ops/dd.js";
import { UsageError } from "./args.js";
import { qemuGetopt, type LongOption } from "./getopt.js";
import { describeOpenError, ImageView } from "./map.js";
import { cvtnumFull } from "./options.js";
import { errnoText, strerror } from "./errno.js";
import { localPath } from "./protocol.js";
import { imageSourceOrReport, requireSecret } from "./image-opts.js";
import { Qcow2Image } from "../image/qcow2-image.js";

export const DD_USAGE =
  "dd [--image-opts] [-U] [-f fmt] [-O output_fmt] [bs=block_size] [count=blocks] [skip=blocks] if=input of=output";

const INT_MAX = 0x7fffffffn;
const INT64_MAX = (1n << 63n) - 1n;

const LONG_OPTIONS: LongOption[] = [
  { name: "help", hasArg: false, short: "h" },
  { name: "object", hasArg: true },
  { name: "image-opts", hasArg: false },
  { name: "force-share", hasArg: false, short: "U" },
];

/** Formats qemu 7.2 knows but cannot create an image of ("Format driver '...' does not support image creation"). */
const NOT_CREATABLE = new Set([
  "blkdebug", "blklogwrites", "blkverify", "bochs", "cloop", "compress", "copy-before-write", "copy-on-read", "dmg",
  "ftp", "ftps", "http", "https", "null-aio", "null-co", "preallocate", "quorum", "replication", "snapshot-access",
  "throttle", "vvfat",
]);
/** Formats (and protocols) qemu 7.2 creates images of that this tool does not write. */
const OTHER_CREATABLE = new Set([
  "gluster", "host_cdrom", "host_device", "iscsi", "iser", "luks", "nbd", "nfs", "nvme", "parallels", "qcow", "qed",
  "rbd", "ssh", "vdi", "vhdx", "vmdk", "vpc",
]);

export async function dd(argv: string[], out: (text: string) => void, err: (text: string) => void): Promise<number> {
  let outFormat = "raw";
  let fmt: string | undefined;
  let forceShare = false;
  const objects: string[] = [];
  let imageOpts = false;
  const parsed = qemuGetopt("dd", argv, "hf:O:U", LONG_OPTIONS);
  for (const { name, value } of parsed.options) {
    switch (name) {
      case "h":
        out(`usage: qcow2-img ${DD_USAGE}\n`);
        return 0;
      case "O":
        outFormat = value!;
        break;
      case "f":
        fmt = value!;
        break;
      case "U":
        forceShare = true;
        break;
      case "object":
        objects.push(value!);
        break;
      case "image-opts":
        imageOpts = true;
        break;
    }
  }
  if (parsed.error) throw parsed.error;

  let blockSize = 512;
  let count: bigint | undefined;
  let skip: bigint | undefined;
  let input: string | undefined;
  let output: string | undefined;
  for (const operand of parsed.positional) {
    const eq = operand.indexOf("=");
    const name = eq < 0 ? operand : operand.slice(0, eq);
    const value = operand.slice(eq + 1);
    if (eq < 0 || !["bs", "count", "if", "of", "skip"].includes(name)) {
      err(`qcow2-img: unrecognized operand ${name}\n`);
      return 1;
    }
    if (name === "bs") {
      const v = cvtnumFull("bs", value, 1n, INT_MAX, err);
      if (v === undefined) return 1;
      blockSize = Number(v);
    } else if (name === "count" || name === "skip") {
      const v = cvtnumFull(name, value, 0n, INT64_MAX, err);
      if (v === undefined) return 1;
      if (name === "count") count = v;
      else skip = v;
    } else if (name === "if") {
      input = value;
    } else {
      output = value;
    }
  }
  if (input === undefined || output === undefined) {
    err("qcow2-img: Must specify both input and output files\n");
    return 1;
  }

  // With --image-opts the input (only) is an option string naming the file and its secret.
  const inSource = await imageSourceOrReport(input, { objects, imageOpts, formatArg: fmt }, err);
  if (!inSource) return 1;
  const inPath = localPath(inSource.file, true);
  if (!inPath.ok) {
    err(`qcow2-img: ${inPath.message}\n`);
    return 1;
  }
  if (inPath.path === "") {
    err(`qcow2-img: Could not open '${input}': The 'file' block driver requires a file name\n`);
    return 1;
  }
  let source: ImageView;
  try {
    source = await ImageView.open(inPath.path, inSource.format ?? fmt, { rawHoles: false, ...(inSource.passphrase ? { passphrase: inSource.passphrase } : {}) });
    if (source.top instanceof Qcow2Image) {
      try {
        requireSecret({ ...inSource, name: input === inSource.file ? input : inSource.name }, source.top.header.cryptMethod);
      } catch (e) {
        await source.close();
        err(`qcow2-img: ${(e as Error).message}\n`);
        return 1;
      }
    }
  } catch (e) {
    err(`qcow2-img: ${describeOpenError(inPath.path, e).replace(`Could not open '${inPath.path}'`, `Could not open '${input}'`)}\n`);
    return 1;
  }
  try {
    if (!["raw", "file", "qcow2"].includes(outFormat) && !NOT_CREATABLE.has(outFormat) && !OTHER_CREATABLE.has(outFormat)) {
      err("qcow2-img: Unknown file format\n");
      return 1;
    }
    const outPath = localPath(output, false);
    if (!outPath.ok) {
      err(`qcow2-img: ${outPath.message}\n`);
      return 1;
    }
    if (NOT_CREATABLE.has(outFormat)) {
      err(`qcow2-img: Format driver '${outFormat}' does not support image creation\n`);
      return 1;
    }
    if (OTHER_CREATABLE.has(outFormat)) {
      err(`qcow2-img: qcow2-img writes only raw and qcow2 images, not ${outFormat}\n`);
      return 1;
    }
    // qemu's 'file' driver writes the bytes as they are: a raw image.
    const format: "raw" | "qcow2" = outFormat === "qcow2" ? "qcow2" : "raw";
    if (!forceShare && source.format === "qcow2" && sameFile(inPath.path, outPath.path)) {
      // qemu holds the input's write lock, so creating the output over it fails.
      err(`qcow2-img: ${output}: error while creating output image: Failed to get "write" lock\n`);
      err(`Is another process using the image [${output}]?\n`);
      return 1;
    }
    const options = {
      format,
      blockSize,
      inputSize: source.virtualSize,
      ...(count !== undefined ? { count } : {}),
      ...(skip !== undefined ? { skip } : {}),
    };
    const plan = ddPlan(source.virtualSize, options);
    try {
      await runDd(source, outPath.path, options);
    } catch (e) {
      if (!(e instanceof DdError)) throw e;
      if (e.op === "create") {
        const errno = errnoText(e);
        const why = errno === undefined ? strerror(e.cause) : `Could not create '${outPath.path}': ${errno}`;
        err(`qcow2-img: ${output}: error while creating output image: ${why}\n`);
      } else if (e.op === "read") {
        err(`qcow2-img: error while reading from input image file: ${strerror(e.cause)}\n`);
      } else {
        err(`qcow2-img: error while writing to output image file: ${strerror(e.cause)}\n`);
      }
      return 1;
    }
    // An empty output, as dd(1) makes: qemu says so but succeeds.
    if (plan.skipPastEnd) err(`qcow2-img: ${input}: cannot skip to specified offset\n`);
    return 0;
  } finally {
    await source.close().catch(() => undefined);
  }
}

/** Whether two names are one existing file. */
function sameFile(a: string, b: string): boolean {
  try {
    const x = fs.statSync(a);
    const y = fs.statSync(b);
    return x.dev === y.dev && x.ino === y.ino;
  } catch {
    return false;
  }
}
