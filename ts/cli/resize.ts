// qcow2-img resize [--shrink] [-f fmt] [-q] [--preallocation=mode] file [+|-]size
//
// As qemu-img 7.2 img_resize: the size is always the last argument (so "-1G" is not an option),
// sizes are parsed by qemu_strtosz (up to 2^64 - 1, then used as a signed 64-bit number), any
// shrink needs --shrink, and a raw file's current size is its length rounded up to a sector.

import fs from "node:fs";
import "../node.js";
import { Qcow2Image } from "../image/qcow2-image.js";
import { parseArgs, UsageError } from "./args.js";
import { describeOpenError, probeFormat, resolveFormat } from "./map.js";
import { strtosz } from "./options.js";
import { imageSourceOrReport, requireSecret, type ImageSource } from "./image-opts.js";

export const RESIZE_USAGE = "resize [-f fmt] [--preallocation=prealloc] [-q] [--shrink] filename [+ | -]size";

const SECTOR = 512;
/** qemu's QCOW_MAX_L1_SIZE: an L1 table past 32 MiB is refused (EFBIG). */
const MAX_L1_BYTES = 32 * 1024 * 1024;
const ZERO_CHUNK = 1 << 20;

const PREALLOC_MODES = ["off", "metadata", "falloc", "full"] as const;
type Prealloc = (typeof PREALLOC_MODES)[number];

export async function resize(argv: string[], out: (text: string) => void, err: (text: string) => void): Promise<number> {
  if (argv.length === 1 && (argv[0] === "-h" || argv[0] === "--help")) {
    out(`usage: qcow2-img ${RESIZE_USAGE}\n`);
    return 0;
  }
  // The size is taken off the end first, so that a negative size is not read as an option.
  if (argv.length < 2) throw new UsageError("Not enough arguments");
  let sizeText = argv[argv.length - 1]!;
  const args = parseArgs(argv.slice(0, -1), {
    withValue: ["-f", "--preallocation", "--object"],
    flags: ["-q", "--shrink", "--image-opts", "-h", "--help"],
  });
  if (args.flags.has("-h") || args.flags.has("--help")) {
    out(`usage: qcow2-img ${RESIZE_USAGE}\n`);
    return 0;
  }
  let prealloc: Prealloc = "off";
  const preallocArg = args.values.get("--preallocation");
  if (preallocArg !== undefined) {
    if (!(PREALLOC_MODES as readonly string[]).includes(preallocArg)) {
      err(`qcow2-img: Invalid preallocation mode '${preallocArg}'\n`);
      return 1;
    }
    prealloc = preallocArg as Prealloc;
  }
  if (args.positional.length !== 1) throw new UsageError("Expecting image file name and size");
  const source = await imageSourceOrReport(
    args.positional[0]!,
    { objects: args.all.get("--object") ?? [], imageOpts: args.flags.has("--image-opts"), formatArg: args.values.get("-f") },
    err,
  );
  if (!source) return 1;
  const file = source.file;
  const quiet = args.flags.has("-q");
  const shrink = args.flags.has("--shrink");

  let relative = 0n;
  if (sizeText.startsWith("+")) relative = 1n;
  else if (sizeText.startsWith("-")) relative = -1n;
  if (relative !== 0n) sizeText = sizeText.slice(1);
  const parsed = strtosz(sizeText);
  if (!parsed.ok) {
    err(
      parsed.error === "range"
        ? `qcow2-img: Value '${sizeText}' is out of range for parameter 'size'\n`
        : "qcow2-img: Parameter 'size' expects a non-negative number below 2^64\n" +
            "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n" +
            "and exabytes, respectively.\n",
    );
    return 1;
  }
  if (parsed.hexSuffix) err(`qcow2-img: warning: Using a multiplier suffix on hex numbers is deprecated: ${sizeText}\n`);
  // qemu keeps the parsed size in an int64_t: 2^63 and above wrap to negative numbers.
  const n = BigInt.asIntN(64, parsed.value);

  let format: "qcow2" | "raw";
  try {
    format = source.format ?? resolveFormat(args.values.get("-f")) ?? (await probeFormat(file, true));
  } catch (e) {
    err(`qcow2-img: ${describeOpenError(file, e)}\n`);
    return 1;
  }
  if (args.values.get("-f") === undefined && source.format === undefined && format === "raw") {
    err(
      `WARNING: Image format was not specified for '${file}' and probing guessed raw.\n` +
        "         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n" +
        "         Specify the 'raw' format explicitly to remove the restrictions.\n",
    );
  }
  const target = format === "raw" ? await openRaw(file, err) : await openQcow2(source, err);
  if (!target) return 1;
  let code = 1;
  try {
    const current = BigInt(target.currentSize);
    const total = BigInt.asIntN(64, relative === 0n ? n : current + relative * n);
    if (total <= 0n) {
      err("qcow2-img: New image size must be positive\n");
      return 1;
    }
    if (total <= current && prealloc !== "off") {
      err("qcow2-img: Preallocation can only be used for growing images\n");
      return 1;
    }
    if (total < current && !shrink) {
      err("qcow2-img: Use the --shrink option to perform a shrink operation.\n");
      err(
        "qcow2-img: warning: Shrinking an image will delete all data beyond the shrunken image's end. " +
          "Before performing such an operation, make sure there is no important data there.\n",
      );
      return 1;
    }
    const failure = await target.truncate(total, prealloc);
    if (failure !== undefined) {
      err(`qcow2-img: ${failure}\n`);
      return 1;
    }
    if (!quiet) out("Image resized.\n");
    code = 0;
  } finally {
    const closeFailure = await target.close();
    if (closeFailure !== undefined) {
      err(`qcow2-img: ${closeFailure}\n`);
      code = 1;
    }
  }
  return code;
}

interface ResizeTarget {
  /** qemu's blk_getlength: for raw, the file length rounded up to a sector. */
  currentSize: number;
  /** Resize; returns qemu's error message on failure. */
  truncate(newSize: bigint, prealloc: Prealloc): Promise<string | undefined>;
  close(): Promise<string | undefined>;
}

function reason(e: unknown): string {
  const cause = (e as { cause?: unknown }).cause;
  const code = (cause as NodeJS.ErrnoException | undefined)?.code ?? (e as NodeJS.ErrnoException).code;
  if (code === "EFBIG") return "File too large";
  if (code === "ENOSPC") return "No space left on device";
  if (code === "EIO") return "Input/output error";
  return e instanceof Error ? e.message : String(e);
}

async function openRaw(file: string, err: (t: string) => void): Promise<ResizeTarget | undefined> {
  let handle: fs.promises.FileHandle;
  let fileSize: number;
  try {
    handle = await fs.promises.open(file, "r+");
    fileSize = (await handle.stat()).size;
  } catch (e) {
    err(`qcow2-img: ${describeOpenError(file, e)}\n`);
    return undefined;
  }
  return {
    currentSize: Math.ceil(fileSize / SECTOR) * SECTOR,
    async truncate(newSize, prealloc) {
      if (prealloc === "metadata") return "Unsupported preallocation mode: metadata";
      if (newSize > BigInt(Number.MAX_SAFE_INTEGER)) return "Could not resize file: File too large";
      const size = Number(newSize);
      try {
        await handle.truncate(size);
      } catch (e) {
        return `Could not resize file: ${reason(e)}`;
      }
      if (prealloc === "full" || prealloc === "falloc") {
        // qemu writes zeros for "full"; "falloc" reserves the space (here written as zeros too).
        const zeros = new Uint8Array(ZERO_CHUNK);
        try {
          for (let pos = fileSize; pos < size; pos += ZERO_CHUNK) {
            const n = Math.min(ZERO_CHUNK, size - pos);
            await handle.write(zeros, 0, n, pos);
          }
        } catch (e) {
          return `Could not resize file: ${reason(e)}`;
        }
      }
      return undefined;
    },
    async close() {
      try {
        await handle.close();
        return undefined;
      } catch (e) {
        return reason(e);
      }
    },
  };
}

async function openQcow2(source: ImageSource, err: (t: string) => void): Promise<ResizeTarget | undefined> {
  let image: Qcow2Image;
  try {
    image = await Qcow2Image.open(source.file, { readOnly: false, ...(source.passphrase ? { passphrase: source.passphrase } : {}) });
  } catch (e) {
    err(`qcow2-img: ${describeOpenError(source.name, e)}\n`);
    return undefined;
  }
  try {
    requireSecret(source, image.header.cryptMethod);
  } catch (e) {
    await image.close();
    err(`qcow2-img: ${(e as Error).message}\n`);
    return undefined;
  }
  const header = image.header;
  return {
    currentSize: Math.floor(header.size / SECTOR) * SECTOR,
    async truncate(newSize, prealloc) {
      if (newSize % BigInt(SECTOR) !== 0n) return `The new size must be a multiple of ${SECTOR}`;
      if (header.nbSnapshots > 0 && header.version < 3) return "Can't resize a v2 image which has snapshots";
      if (header.extensions.bitmaps && header.extensions.bitmaps.nbBitmaps > 0) {
        return "qcow2-img cannot resize an image with persistent bitmaps yet";
      }
      const size = newSize;
      const old = BigInt(header.size);
      if (size < old) {
        if (prealloc !== "off") return "Preallocation can't be used for shrinking an image";
      } else {
        const clusterSize = BigInt(image.clusterSize);
        const l1Span = clusterSize * (clusterSize / 8n);
        const l1Entries = (size + l1Span - 1n) / l1Span;
        if (l1Entries * 8n > BigInt(MAX_L1_BYTES)) return "Failed to grow the L1 table: File too large";
        if (prealloc !== "off") return `Preallocation mode '${prealloc}' is not supported for qcow2 images by qcow2-img`;
      }
      try {
        await image.resize(Number(size), { shrink: true });
      } catch (e) {
        return `Failed to resize the image: ${reason(e)}`;
      }
      return undefined;
    },
    async close() {
      try {
        await image.close();
        return undefined;
      } catch (e) {
        return reason(e);
      }
    },
  };
}
