// qcow2-img bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval] [-i aio] [-n]
//   [--no-drain] [-o offset] [--pattern=pattern_byte] [-q] [-s buffer_size] [-S step_size]
//   [-t cache] [-U] [-w] filename
//
// As qemu-img 7.2 img_bench: its option parsing (getopt_long, values checked as they come), its
// messages and exit codes, its two-line report. The requests go to a Qcow2Image, or straight to the
// file for raw images, `depth` of them in flight (ts/ops/bench.ts).
//
// -i (aio engine), -n (native AIO) and -t (cache mode) pick how qemu talks to the host; there is
// no such choice here, so they are checked as qemu checks them (unknown values, aio=native without
// cache.direct are refused) and otherwise change nothing, except that -t writethrough/directsync
// flush after every write and -t unsafe drops flushes, as those modes do in qemu. -q and -U change
// nothing in qemu's output either. Where qemu 7.2 fails without a message this does not: on a
// zero-sized image (qemu divides by zero) every request goes to offset 0, as later qemu does; a
// depth qemu cannot allocate depth x buffer_size bytes for runs (qemu sends every request from
// the first of those buffers; this allocates only that one); -d 0 with requests to send, where
// qemu waits forever, is refused.

import "../node.js";
import { NodeFileBackend } from "../io/node-file.js";
import { Qcow2Image } from "../image/qcow2-image.js";
import { backendBenchTarget, bench as runBench, BenchError, imageBenchTarget, type BenchTarget } from "../ops/bench.js";
import { UsageError } from "./args.js";
import { qemuGetopt, type LongOption } from "./getopt.js";
import { describeOpenError, probeFormat, resolveFormat } from "./map.js";
import { cvtnumFull, strtoulMax } from "./options.js";
import { strerror } from "./errno.js";
import { localPath } from "./protocol.js";
import { OptionsError, parseImageOpts } from "./image-opts.js";

export const BENCH_USAGE =
  "bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval] [-i aio] [-n] [--no-drain] [-o offset] [--pattern=pattern] [-q] [-s buffer_size] [-S step_size] [-t cache] [-w] [-U] filename";

const INT_MAX = 0x7fffffff;
const INT64_MAX = (1n << 63n) - 1n;
const SECTOR = 512;

const LONG_OPTIONS: LongOption[] = [
  { name: "help", hasArg: false, short: "h" },
  { name: "flush-interval", hasArg: true },
  { name: "image-opts", hasArg: false },
  { name: "pattern", hasArg: true },
  { name: "no-drain", hasArg: false },
  { name: "force-share", hasArg: false, short: "U" },
];

/** bdrv_parse_cache_mode: whether the host cache is bypassed, writes are flushed, flushes are dropped. */
const CACHE_MODES: Record<string, { direct: boolean; writethrough: boolean; noFlush: boolean }> = {
  none: { direct: true, writethrough: false, noFlush: false },
  off: { direct: true, writethrough: false, noFlush: false },
  directsync: { direct: true, writethrough: true, noFlush: false },
  writeback: { direct: false, writethrough: false, noFlush: false },
  unsafe: { direct: false, writethrough: false, noFlush: true },
  writethrough: { direct: false, writethrough: true, noFlush: false },
};

export async function bench(argv: string[], out: (text: string) => void, err: (text: string) => void): Promise<number> {
  let count = 75000;
  let depth = 64;
  let offset = 0n;
  let bufferSize = 4096;
  let step = 0;
  let pattern = 0;
  let flushInterval = 0;
  let drainOnFlush = true;
  let isWrite = false;
  let fmt: string | undefined;
  let imageOpts = false;
  let nativeAio = false;
  let cache = CACHE_MODES.writeback!;

  const parsed = qemuGetopt("bench", argv, "hc:d:f:ni:o:qs:S:t:wU", LONG_OPTIONS);
  for (const option of parsed.options) {
    const arg = option.value ?? "";
    switch (option.name) {
      case "h":
        out(
          `usage: qcow2-img ${BENCH_USAGE}\n` +
            "-i, -n and -t are checked as qemu-img checks them but choose nothing here (no AIO engine, no host\n" +
            "cache mode), except that -t writethrough/directsync flush every write and -t unsafe drops flushes.\n",
        );
        return 0;
      case "c": {
        const v = strtoulMax(arg, INT_MAX);
        if (v === undefined) return fail(err, "Invalid request count specified");
        count = v;
        break;
      }
      case "d": {
        const v = strtoulMax(arg, INT_MAX);
        if (v === undefined) return fail(err, "Invalid queue depth specified");
        depth = v;
        break;
      }
      case "f":
        fmt = arg;
        break;
      case "n":
        nativeAio = true;
        break;
      case "i":
        if (arg === "native") nativeAio = true;
        else if (arg !== "threads" && arg !== "io_uring") return fail(err, `Invalid aio option: ${arg}`);
        break;
      case "o": {
        const v = cvtnumFull("offset", arg, 0n, INT64_MAX, err);
        if (v === undefined) return 1;
        offset = v;
        break;
      }
      case "s": {
        const v = cvtnumFull("buffer size", arg, 0n, BigInt(INT_MAX), err);
        if (v === undefined) return 1;
        bufferSize = Number(v);
        break;
      }
      case "S": {
        const v = cvtnumFull("step_size", arg, 0n, BigInt(INT_MAX), err);
        if (v === undefined) return 1;
        step = Number(v);
        break;
      }
      case "t": {
        if (!Object.hasOwn(CACHE_MODES, arg)) return fail(err, "Invalid cache mode");
        cache = CACHE_MODES[arg]!;
        break;
      }
      case "w":
        isWrite = true;
        break;
      case "pattern": {
        const v = strtoulMax(arg, 0xff);
        if (v === undefined) return fail(err, "Invalid pattern byte specified");
        pattern = v;
        break;
      }
      case "flush-interval": {
        const v = strtoulMax(arg, INT_MAX);
        if (v === undefined) return fail(err, "Invalid flush interval specified");
        flushInterval = v;
        break;
      }
      case "no-drain":
        drainOnFlush = false;
        break;
      case "image-opts":
        imageOpts = true;
        break;
      default: // -q, -U: nothing to change here
        break;
    }
  }
  if (parsed.error) throw parsed.error;
  if (parsed.positional.length !== 1) throw new UsageError("Expecting one image file name");
  let file = parsed.positional[0]!;
  if (imageOpts) {
    // bench takes no --object: an image named by options carries no secret.
    try {
      if (fmt !== undefined) throw new OptionsError("--image-opts and --format are mutually exclusive");
      const opts = parseImageOpts(file);
      file = opts.file;
      fmt = opts.format;
    } catch (e) {
      if (!(e instanceof OptionsError)) throw e;
      return fail(err, e.message);
    }
  }
  if (!isWrite && flushInterval) return fail(err, "--flush-interval is only available in write tests");
  if (flushInterval && flushInterval < depth) return fail(err, "Flush interval can't be smaller than depth");
  // qemu-img would wait forever for requests it never sends.
  if (depth === 0 && count > 0) return fail(err, `A queue depth of 0 cannot send ${count} requests`);

  const opened = await open(file, fmt, isWrite, nativeAio && !cache.direct, err);
  if (!opened) return 1;
  const { target, close } = opened;
  let code = 1;
  try {
    const effectiveStep = step || bufferSize;
    out(
      `Sending ${count} ${isWrite ? "write" : "read"} requests, ${bufferSize} bytes each, ${depth} in parallel ` +
        `(starting at offset ${offset}, step size ${effectiveStep})\n`,
    );
    if (flushInterval) out(`Sending flush every ${flushInterval} requests\n`);
    let seconds: number;
    try {
      ({ seconds } = await runBench(target, {
        count,
        depth,
        bufferSize,
        step,
        offset: offset <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(offset) : offset,
        write: isWrite,
        pattern,
        flushInterval,
        drainOnFlush,
        writethrough: cache.writethrough,
        noFlush: cache.noFlush,
      }));
    } catch (e) {
      if (e instanceof BenchError) {
        const why = e.cause === undefined ? e.reason : strerror(e.cause);
        return fail(err, `${e.kind === "flush" ? "Failed flush request" : "Failed request"}: ${why}`);
      }
      throw e;
    }
    out(`Run completed in ${seconds.toFixed(3)} seconds.\n`);
    code = 0;
  } finally {
    try {
      await close();
    } catch (e) {
      err(`qcow2-img: ${e instanceof Error ? e.message : String(e)}\n`);
      code = 1;
    }
  }
  return code;
}

/** qemu's open error, the name as given outside and the file it stands for inside ("file:x"). */
function openError(name: string, file: string, e: unknown): string {
  return describeOpenError(file, e).replace(`Could not open '${file}'`, `Could not open '${name}'`);
}

function fail(err: (t: string) => void, message: string): number {
  err(`qcow2-img: ${message}\n`);
  return 1;
}

/** img_open for bench: the format probed unless given, read-write for -w; qemu's open errors. */
async function open(
  name: string,
  fmt: string | undefined,
  writable: boolean,
  nativeWithoutDirect: boolean,
  err: (t: string) => void,
): Promise<{ target: BenchTarget; close: () => Promise<void> } | undefined> {
  const local = localPath(name, true);
  if (!local.ok) {
    err(`qcow2-img: ${local.message}\n`);
    return undefined;
  }
  const file = local.path;
  if (file === "") {
    err(`qcow2-img: Could not open '${name}': The 'file' block driver requires a file name\n`);
    return undefined;
  }
  // As qemu: an unknown driver first, then the file itself, then the aio mode.
  let format: "qcow2" | "raw" | undefined;
  let unsupported: unknown;
  try {
    format = resolveFormat(fmt);
  } catch (e) {
    if (e instanceof Error && e.message.startsWith("Unknown driver")) {
      err(`qcow2-img: ${openError(name, file, e)}\n`);
      return undefined;
    }
    unsupported = e;
  }
  try {
    const probed = await probeFormat(file, writable);
    if (unsupported !== undefined) throw unsupported;
    format ??= probed;
  } catch (e) {
    err(`qcow2-img: ${openError(name, file, e)}\n`);
    return undefined;
  }
  if (nativeWithoutDirect) {
    err(`qcow2-img: Could not open '${file}': aio=native was specified, but it requires cache.direct=on, which was not specified.\n`);
    return undefined;
  }
  try {
    if (format === "qcow2") {
      const image = await Qcow2Image.open(file, { readOnly: !writable });
      if (image.header.cryptMethod !== 0) {
        // qemu opens an encrypted image only with its secret, which bench cannot be given.
        await image.close();
        err(`qcow2-img: Could not open '${name}': Parameter 'encrypt.key-secret' is required for cipher\n`);
        return undefined;
      }
      return { target: imageBenchTarget(image), close: () => image.close() };
    }
    const backend = await NodeFileBackend.open(file, { readOnly: !writable });
    const size = Math.ceil((await backend.size()) / SECTOR) * SECTOR;
    if (writable && fmt === undefined) {
      err(
        `WARNING: Image format was not specified for '${file}' and probing guessed raw.\n` +
          "         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n" +
          "         Specify the 'raw' format explicitly to remove the restrictions.\n",
      );
    }
    return { target: backendBenchTarget(backend, size), close: () => backend.close() };
  } catch (e) {
    err(`qcow2-img: ${openError(name, file, e)}\n`);
    return undefined;
  }
}
