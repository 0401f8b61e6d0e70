// qcow2-img commit [-q] [-f fmt] [-t cache] [-b base] [-r rate_limit] [-d] [-p] filename
//
// As qemu-img 7.2 img_commit: the image is opened for writing with its chain, the base is the
// backing file or the image of the chain that -b names (bdrv_find_backing_image), the data goes
// into it (ts/ops/commit.ts), and the top is emptied afterwards unless -d or -b is given. -p shows
// the commit's progress from 0 to 100; qemu prints it as its job advances, so how many lines
// come in between differs from run to run (here: one per piece, at least 1 point apart).

import "../node.js";
import { Qcow2Image } from "../image/qcow2-image.js";
import { commit as commitImage } from "../ops/commit.js";
import { UsageError } from "./args.js";
import { describeImageOpenError, findBackingImage } from "./backing-chain.js";
import { qemuGetopt, type LongOption } from "./getopt.js";
import { describeOpenError, probeFormat, resolveFormat } from "./map.js";
import { CACHE_MODES, cvtnum } from "./options.js";
import { imageSourceOrReport } from "./image-opts.js";
import { QemuProgress } from "./qemu-progress.js";

export const COMMIT_USAGE = "commit [-q] [-f fmt] [-t cache] [-b base] [-r rate_limit] [-d] [-p] filename";

const LONG_OPTIONS: LongOption[] = [
  { name: "help", hasArg: false, short: "h" },
  { name: "object", hasArg: true },
  { name: "image-opts", hasArg: false },
];

export async function commit(argv: string[], out: (text: string) => void, err: (text: string) => void): Promise<number> {
  const parsed = qemuGetopt("commit", argv, "f:ht:b:dpqr:", LONG_OPTIONS);
  let fmt: string | undefined;
  const objects: string[] = [];
  let imageOpts = false;
  let cache = "writeback";
  let base: string | undefined;
  let drop = false;
  let progress = false;
  let quiet = false;
  let rateLimit = 0n;
  for (const { name, value } of parsed.options) {
    switch (name) {
      case "h":
        out(`usage: qcow2-img ${COMMIT_USAGE}\n`);
        return 0;
      case "f":
        fmt = value;
        break;
      case "t":
        cache = value!;
        break;
      case "b":
        base = value;
        // -b implies -d: the top is kept as it is.
        drop = true;
        break;
      case "d":
        drop = true;
        break;
      case "p":
        progress = true;
        break;
      case "q":
        quiet = true;
        break;
      case "r": {
        const rate = cvtnum("rate limit", value!, err);
        if (rate === undefined) return 1;
        rateLimit = rate;
        break;
      }
      case "object":
        objects.push(value!);
        break;
      case "image-opts":
        imageOpts = true;
        break;
    }
  }
  if (parsed.error) throw parsed.error;
  if (quiet) progress = false;
  if (parsed.positional.length !== 1) throw new UsageError("Expecting one image file name");
  const fail = (message: string): number => {
    err(`qcow2-img: ${message}\n`);
    return 1;
  };
  const source = await imageSourceOrReport(parsed.positional[0]!, { objects, imageOpts, formatArg: fmt }, err);
  if (!source) return 1;
  const file = source.file;
  fmt = source.format ?? fmt;
  if (!CACHE_MODES.has(cache)) return fail(`Invalid cache option: ${cache}`);

  let format: "qcow2" | "raw";
  try {
    // An unknown -f is refused before the file is looked at, as qemu's driver lookup comes first.
    const forced = resolveFormat(fmt);
    const probed = await probeFormat(file, true);
    format = forced ?? probed;
  } catch (e) {
    return fail(describeOpenError(file, e));
  }
  if (fmt === undefined && format === "raw") {
    err(
      `WARNING: Image format was not specified for '${file}' and probing guessed raw.\n` +
        "         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n" +
        "         Specify the 'raw' format explicitly to remove the restrictions.\n",
    );
  }
  let image: Qcow2Image | undefined;
  if (format === "qcow2") {
    try {
      image = await Qcow2Image.open(file, { readOnly: false, ...(source.passphrase ? { passphrase: source.passphrase } : {}) });
    } catch (e) {
      return fail(await describeImageOpenError(source.name, e));
    }
    if (image.header.cryptMethod !== 0 && source.passphrase === undefined) {
      await image.close();
      return fail(`Could not open '${source.name}': Parameter 'encrypt.key-secret' is required for cipher`);
    }
  }
  const meter = new QemuProgress(progress, out, 1);
  meter.print(0, 100);
  let failure: string | undefined;
  try {
    let baseDepth: number | undefined;
    if (base !== undefined) {
      baseDepth = image ? findBackingImage(image, file, base) : undefined;
      if (baseDepth === undefined) failure = `Did not find '${base}' in the backing chain of '${file}'`;
    } else if (image?.backing) {
      baseDepth = 1;
    } else {
      failure = "Image does not have a backing file";
    }
    if (failure === undefined) {
      try {
        await commitImage(image!, {
          baseDepth: baseDepth!,
          emptyTop: !drop,
          rateLimit: Number(rateLimit),
          onProgress: (done, total) => meter.print(total === 0 ? 0 : Math.fround(Math.fround(done / total) * 100), 0),
        });
        meter.print(100, 0);
      } catch (e) {
        failure = e instanceof Error ? e.message : String(e);
      }
    }
  } finally {
    await image?.close().catch(() => undefined);
    meter.end();
  }
  if (failure !== undefined) return fail(failure);
  if (!quiet) out("Image committed.\n");
  return 0;
}
