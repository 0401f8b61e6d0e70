// qcow2-img rebase [-U] [-q] [-f fmt] [-t cache] [-T src_cache] [-p] [-u] -b backing_file [-F backing_fmt] filename
//
// As qemu-img 7.2 img_rebase, step for step: the progress meter starts before the image is opened;
// safe mode opens the old chain and the new backing file (an image of the old chain when the name
// resolves to one, whatever -F says), copies what differs (ts/ops/rebase.ts), then changes the
// header, which needs -F for a new backing file (after the copy: qemu copies, then refuses).
// -u opens no backing file at all. -t, -T and -U are checked and otherwise change nothing here.

import "../node.js";
import type { GuestDevice } from "../image/device.js";
import { Qcow2Image } from "../image/qcow2-image.js";
import { isQcow2Error, Qcow2ErrorCode } from "../errors.js";
import { copyForRebase, qemuLength, REBASE_BUFFER_SIZE, RebaseError } from "../ops/rebase.js";
import { UsageError } from "./args.js";
import { describeImageOpenError, findBackingImage } from "./backing-chain.js";
import { isQemuDriver } from "./create.js";
import { qemuGetopt, type LongOption } from "./getopt.js";
import { describeOpenError, probeFormat, qemuBackingName, resolveFormat } from "./map.js";
import { openDevice } from "./open.js";
import { QemuProgress } from "./qemu-progress.js";
import { CACHE_MODES } from "./options.js";
import { imageSourceOrReport } from "./image-opts.js";

export const REBASE_USAGE = "rebase [-U] [-q] [-f fmt] [-t cache] [-T src_cache] [-p] [-u] -b backing_file [-F backing_fmt] filename";

const LONG_OPTIONS: LongOption[] = [
  { name: "help", hasArg: false, short: "h" },
  { name: "object", hasArg: true },
  { name: "image-opts", hasArg: false },
  { name: "force-share", hasArg: false, short: "U" },
];

/** bdrv_parse_cache_mode's names. */

const PROBE_WARNING = (file: string): string =>
  `WARNING: Image format was not specified for '${file}' and probing guessed raw.\n` +
  "         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n" +
  "         Specify the 'raw' format explicitly to remove the restrictions.\n";

interface RebaseArgs {
  file: string;
  /** The image's passphrase (--object secret with --image-opts), and its name in messages. */
  passphrase?: Uint8Array;
  name?: string;
  fmt: string | undefined;
  backing: string | undefined;
  backingFmt: string | undefined;
  unsafe: boolean;
  cache: string;
  srcCache: string;
}

export async function rebase(argv: string[], out: (text: string) => void, err: (text: string) => void): Promise<number> {
  const parsed = qemuGetopt("rebase", argv, "hf:F:b:upt:T:qU", LONG_OPTIONS);
  let fmt: string | undefined;
  const objects: string[] = [];
  let imageOpts = false;
  let backingFmt: string | undefined;
  let backing: string | undefined;
  let unsafe = false;
  let progress = false;
  let quiet = false;
  let cache = "writeback";
  let srcCache = "writeback";
  for (const { name, value } of parsed.options) {
    switch (name) {
      case "h":
        out(`usage: qcow2-img ${REBASE_USAGE}\n`);
        return 0;
      case "f":
        fmt = value;
        break;
      case "F":
        backingFmt = value;
        break;
      case "b":
        backing = value;
        break;
      case "u":
        unsafe = true;
        break;
      case "p":
        progress = true;
        break;
      case "t":
        cache = value!;
        break;
      case "T":
        srcCache = value!;
        break;
      case "q":
        quiet = true;
        break;
      case "object":
        objects.push(value!);
        break;
      case "image-opts":
        imageOpts = true;
        break;
      default: // -U: no locks to share here
        break;
    }
  }
  if (parsed.error) throw parsed.error;
  if (quiet) progress = false;
  if (parsed.positional.length !== 1) throw new UsageError("Expecting one image file name");
  if (!unsafe && backing === undefined) throw new UsageError("Must specify backing file (-b) or use unsafe mode (-u)");
  const source = await imageSourceOrReport(parsed.positional[0]!, { objects, imageOpts, formatArg: fmt }, err);
  if (!source) return 1;
  const meter = new QemuProgress(progress, out, 2);
  meter.print(0, 100);
  try {
    return await run(
      {
        file: source.file,
        fmt: source.format ?? fmt,
        backing,
        backingFmt,
        unsafe,
        cache,
        srcCache,
        ...(source.passphrase ? { passphrase: source.passphrase } : {}),
        name: source.name,
      },
      meter,
      err,
    );
  } finally {
    meter.end();
  }
}

async function run(args: RebaseArgs, meter: QemuProgress, err: (text: string) => void): Promise<number> {
  const { file, backing, backingFmt, unsafe } = args;
  const fail = (message: string): number => {
    err(`qcow2-img: ${message}\n`);
    return 1;
  };
  if (!CACHE_MODES.has(args.cache)) return fail(`Invalid cache option: ${args.cache}`);
  if (!CACHE_MODES.has(args.srcCache)) return fail(`Invalid source cache option: ${args.srcCache}`);

  let format: "qcow2" | "raw";
  try {
    // An unknown -f is refused before the file is looked at, as qemu's driver lookup comes first.
    const forced = resolveFormat(args.fmt);
    const probed = await probeFormat(file, true);
    format = forced ?? probed;
  } catch (e) {
    return fail(describeOpenError(file, e));
  }
  if (args.fmt === undefined && format === "raw") err(PROBE_WARNING(file));
  let image: Qcow2Image | undefined;
  if (format === "qcow2") {
    try {
      image = await Qcow2Image.open(file, { readOnly: false, backing: unsafe ? "none" : "open", ...(args.passphrase ? { passphrase: args.passphrase } : {}) });
    } catch (e) {
      return fail(await describeImageOpenError(args.name ?? file, e));
    }
    if (image.header.cryptMethod !== 0 && args.passphrase === undefined) {
      await image.close();
      return fail(`Could not open '${args.name ?? file}': Parameter 'encrypt.key-secret' is required for cipher`);
    }
  }
  let newBacking: GuestDevice | undefined;
  let ownNewBacking = false;
  try {
    if (backingFmt !== undefined && !isQemuDriver(backingFmt)) return fail(`Invalid format name: '${backingFmt}'`);

    if (!unsafe) {
      let prefixDepth: number | undefined;
      if (backing) {
        const realPath = qemuBackingName(file, backing);
        prefixDepth = image ? findBackingImage(image, file, realPath) : undefined;
        if (prefixDepth !== undefined) {
          newBacking = image!.chain()[prefixDepth];
        } else {
          try {
            newBacking = await openDevice(realPath, resolveFormat(backingFmt));
            ownNewBacking = true;
          } catch (e) {
            const inner = (await describeImageOpenError(realPath, e)).replace(/^Could not open '.*?': /s, "");
            return fail(`Could not open new backing file '${backing}': ${inner}`);
          }
        }
      }
      if (image) {
        const size = qemuLength(image);
        const f = Math.fround;
        // qemu: (float) 100 / (size / MIN(size, IO_BUF_SIZE)), the division in integers.
        const step = size === 0 ? 0 : f(100 / Math.floor(size / Math.min(size, REBASE_BUFFER_SIZE)));
        try {
          await copyForRebase(image, {
            ...(newBacking ? { newBacking } : {}),
            ...(prefixDepth !== undefined ? { prefixDepth } : {}),
            onStep: () => meter.print(step, 100),
          });
        } catch (e) {
          return fail(copyFailure(e));
        }
      }
    }

    const failure = await changeBackingFile(image, backing, backingFmt);
    meter.print(100, 0);
    if (failure !== undefined) return fail(`Could not change the backing file to '${backing ?? "(null)"}': ${failure}`);
    return 0;
  } finally {
    if (ownNewBacking) await newBacking?.close().catch(() => undefined);
    await image?.close().catch(() => undefined);
  }
}

/** qemu-img's words for a failed copy. */
function copyFailure(e: unknown): string {
  if (!(e instanceof RebaseError)) return e instanceof Error ? e.message : String(e);
  const cause = e.cause;
  const reason = ioReason(cause);
  switch (e.stage) {
    case "metadata":
      return `error while reading image metadata: ${reason}`;
    case "old-backing":
      return "error while reading from old backing file";
    case "new-backing":
      return "error while reading from new backing file";
    case "write":
      return `Error while writing to COW image: ${reason}`;
  }
}

function ioReason(e: unknown): string {
  for (let c: unknown = e; c instanceof Error; c = c.cause) {
    const code = (c as NodeJS.ErrnoException).code;
    if (code === "ENOSPC") return "No space left on device";
    if (code === "EIO") return "Input/output error";
    if (code === "EFBIG") return "File too large";
  }
  return e instanceof Error ? e.message : String(e);
}

/** bdrv_change_backing_file with require=true; qemu's strerror for a failure, undefined on success. */
async function changeBackingFile(image: Qcow2Image | undefined, backing: string | undefined, backingFmt: string | undefined): Promise<string | undefined> {
  if (backing && backingFmt === undefined) return "backing format must be specified";
  if (!image) return "Operation not supported";
  try {
    if (backing) await image.setBackingFile(backing, backingFmt);
    else await image.setBackingFile(undefined);
    return undefined;
  } catch (e) {
    if (isQcow2Error(e, Qcow2ErrorCode.LIMIT_EXCEEDED)) {
      return /cluster 0/.test(e.message) ? "No space left in the file header" : "Invalid argument";
    }
    if (isQcow2Error(e, Qcow2ErrorCode.NOT_SUPPORTED)) return "Invalid argument";
    return ioReason(e);
  }
}
