// qcow2-img compare [-f fmt] [-F fmt] [-s] [-q] [-p] [-U] [-T cache] file1 file2
//
// qemu-img 7.2 img_compare, step for step: both images are walked by block status (the status of
// the whole backing chain, with qemu's flags), ranges where both read as zeros are skipped, others
// are read in pieces of at most 2 MiB and compared sector by sector; a mismatch is reported at the
// start of the first differing 512-byte sector of the piece. With different sizes, the tail of
// the longer image must read as zeros. -s also requires equal sizes and equal block status flags
// (EOF included, as qemu compares the whole status word).
// Exit codes: 0 identical, 1 different, 2 open error, 3 block status error, 4 read error.

import "../node.js";
import type { Extent } from "../image/device.js";
import { Qcow2Image } from "../image/qcow2-image.js";
import { parseArgs, UsageError } from "./args.js";
import { describeOpenError, ImageView } from "./map.js";
import { CACHE_MODES } from "./options.js";
import { imageSource, OptionsError, requireSecret, type ImageSource } from "./image-opts.js";

export const COMPARE_USAGE = "compare [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [-U] filename1 filename2";

// qemu's BDRV_BLOCK_* flags.
const BLOCK_DATA = 0x01;
const BLOCK_ZERO = 0x02;
const BLOCK_OFFSET_VALID = 0x04;
const BLOCK_ALLOCATED = 0x10;
const BLOCK_EOF = 0x20;

/** qemu-img compare's IO_BUF_SIZE. */
const IO_BUF_SIZE = 2 * 1024 * 1024;
const SECTOR = 512;
/** Pieces compared with one memcmp before looking for the sector that differs. */
const SCAN_BLOCK = 64 * 1024;


interface Status {
  flags: number;
  length: number;
}

/** bdrv_block_status_above(bs, NULL, offset, bytes): the flags qemu returns for the chain at `offset`. */
async function statusAbove(view: ImageView, offset: number, bytes: number): Promise<Status> {
  const e: Extent = await view.blockStatus(offset, bytes);
  let flags: number;
  switch (e.kind) {
    case "data":
    case "backing":
      flags = BLOCK_DATA | BLOCK_OFFSET_VALID | BLOCK_ALLOCATED;
      break;
    case "compressed":
      flags = BLOCK_DATA | BLOCK_ALLOCATED;
      break;
    case "zero":
      flags = BLOCK_ZERO | BLOCK_ALLOCATED | (e.hostOffset !== undefined ? BLOCK_OFFSET_VALID : 0);
      break;
    case "unallocated": {
      // Past the end of a shorter backing file qemu synthesises zeros "allocated" in that file.
      const layer = view.layers[e.depth];
      const backing = layer instanceof Qcow2Image ? layer.backing : undefined;
      flags = backing !== undefined && e.start >= backing.virtualSize ? BLOCK_ZERO | BLOCK_ALLOCATED : BLOCK_ZERO;
      break;
    }
  }
  if (offset + e.length === view.virtualSize) flags |= BLOCK_EOF;
  return { flags, length: e.length };
}

/** Offset (from the start) of the first 512-byte sector where `a` and `b` differ, or -1. */
function firstDifferentSector(a: Buffer, b: Buffer, length: number): number {
  for (let block = 0; block < length; block += SCAN_BLOCK) {
    const end = Math.min(length, block + SCAN_BLOCK);
    if (a.compare(b, block, end, block, end) === 0) continue;
    for (let s = block; s < end; s += SECTOR) {
      const e = Math.min(end, s + SECTOR);
      if (a.compare(b, s, e, s, e) !== 0) return s;
    }
  }
  return -1;
}

/** qemu's float progress meter (util/qemu-progress.c), printed to stdout when -p is given. */
class Progress {
  private current = 0;
  private lastPrint = 0;
  constructor(
    private readonly enabled: boolean,
    private readonly out: (text: string) => void,
    private readonly minSkip = 2,
  ) {}

  print(delta: number, max: number): void {
    if (!this.enabled) return;
    const f = Math.fround;
    let current = max === 0 ? 0 : f(this.current + f(f(delta / 100) * max));
    if (current > 100) current = 100;
    this.current = current;
    if (current > f(this.lastPrint + this.minSkip) || current < f(this.lastPrint - this.minSkip) || current === 0 || current === 100) {
      this.lastPrint = current;
      this.out(`    (${current.toFixed(2).padStart(3)}/100%)\r`);
    }
  }

  end(): void {
    if (this.enabled) this.out("\n");
  }
}

/** `((float) chunk / progress_base) * 100` in C's float arithmetic. */
function percentOf(chunk: number, base: number): number {
  const f = Math.fround;
  return f(f(f(chunk) / f(base)) * 100);
}

class ReadError extends Error {}

export async function compare(argv: string[], out: (text: string) => void, err: (text: string) => void): Promise<number> {
  const args = parseArgs(argv, {
    withValue: ["-f", "-F", "-T", "--object"],
    flags: ["-p", "-q", "-s", "-U", "--force-share", "--image-opts", "-h", "--help"],
  });
  if (args.flags.has("-h") || args.flags.has("--help")) {
    out(`usage: qcow2-img ${COMPARE_USAGE}\n`);
    return 0;
  }
  const quiet = args.flags.has("-q");
  const strict = args.flags.has("-s");
  const say = (text: string): void => {
    if (!quiet) out(text);
  };
  if (args.positional.length !== 2) throw new UsageError("Expecting two image file names");
  const [file1, file2] = args.positional as [string, string];
  const progress = new Progress(args.flags.has("-p") && !quiet, out);
  const cache = args.values.get("-T") ?? "writeback";
  if (!CACHE_MODES.has(cache)) {
    err(`qcow2-img: Invalid source cache option: ${cache}\n`);
    progress.end();
    return 2;
  }
  // Holes of raw files change only the block status (-s) and the pieces progress is counted in.
  const options = { rawHoles: strict || args.flags.has("-p") };
  // With --image-opts both names are option strings (qemu's img_open for each).
  const open = async (arg: string, fmt: string | undefined): Promise<ImageView | undefined> => {
    let source: ImageSource | undefined;
    let view: ImageView | undefined;
    try {
      source = await imageSource(arg, { objects: args.all.get("--object") ?? [], imageOpts: args.flags.has("--image-opts"), format: undefined });
      if (args.flags.has("--image-opts") && fmt !== undefined) throw new OptionsError("--image-opts and --format are mutually exclusive");
      view = await ImageView.open(source.file, source.format ?? fmt, { ...options, ...(source.passphrase ? { passphrase: source.passphrase } : {}) });
      if (view.top instanceof Qcow2Image) requireSecret(source, view.top.header.cryptMethod);
      return view;
    } catch (e) {
      await view?.close();
      err(e instanceof OptionsError ? `qcow2-img: ${e.message}\n` : `qcow2-img: ${describeOpenError(source?.name ?? arg, e)}\n`);
      progress.end();
      return undefined;
    }
  };
  const view1 = await open(file1, args.values.get("-f"));
  if (!view1) return 2;
  const view2 = await open(file2, args.values.get("-F"));
  if (!view2) {
    await view1.close();
    return 2;
  }
  try {
    return await run(view1, view2, { strict, say, err, progress });
  } finally {
    await view2.close().catch(() => undefined);
    await view1.close().catch(() => undefined);
    progress.end();
  }
}

interface RunContext {
  strict: boolean;
  say: (text: string) => void;
  err: (text: string) => void;
  progress: Progress;
}

async function run(view1: ImageView, view2: ImageView, ctx: RunContext): Promise<number> {
  const { strict, say, err, progress } = ctx;
  const size1 = view1.virtualSize;
  const size2 = view2.virtualSize;
  const total = Math.min(size1, size2);
  const progressBase = Math.max(size1, size2);
  const buf1 = Buffer.alloc(IO_BUF_SIZE);
  const buf2 = Buffer.alloc(IO_BUF_SIZE);
  const zeros = Buffer.alloc(IO_BUF_SIZE);

  const read = async (view: ImageView, buf: Buffer, offset: number, length: number): Promise<void> => {
    try {
      await view.readInto(buf.subarray(0, length), offset);
    } catch (e) {
      err(`qcow2-img: Error while reading offset ${offset} of ${view.name}: ${e instanceof Error ? e.message : String(e)}\n`);
      throw new ReadError();
    }
  };
  const status = async (view: ImageView, offset: number, bytes: number): Promise<Status | undefined> => {
    try {
      return await statusAbove(view, offset, bytes);
    } catch {
      err(`qcow2-img: Sector allocation test failed for ${view.name}\n`);
      return undefined;
    }
  };
  /** qemu's check_empty_sectors: 0 when the range reads as zeros, else the mismatch is reported. */
  const checkEmpty = async (view: ImageView, offset: number, length: number): Promise<number> => {
    await read(view, buf1, offset, length);
    const at = firstDifferentSector(buf1, zeros, length);
    if (at < 0) return 0;
    say(`Content mismatch at offset ${offset + at}!\n`);
    return 1;
  };

  progress.print(0, 100);
  if (strict && size1 !== size2) {
    say("Strict mode: Image size mismatch!\n");
    return 1;
  }
  try {
    let offset = 0;
    while (offset < total) {
      const s1 = await status(view1, offset, size1 - offset);
      if (!s1) return 3;
      const s2 = await status(view2, offset, size2 - offset);
      if (!s2) return 3;
      const allocated1 = (s1.flags & BLOCK_ALLOCATED) !== 0;
      const allocated2 = (s2.flags & BLOCK_ALLOCATED) !== 0;
      let chunk = Math.min(s1.length, s2.length);
      if (strict && s1.flags !== s2.flags) {
        say(`Strict mode: Offset ${offset} block status mismatch!\n`);
        return 1;
      }
      if (s1.flags & BLOCK_ZERO && s2.flags & BLOCK_ZERO) {
        // Both read as zeros.
      } else if (allocated1 === allocated2) {
        if (allocated1) {
          chunk = Math.min(chunk, IO_BUF_SIZE);
          await read(view1, buf1, offset, chunk);
          await read(view2, buf2, offset, chunk);
          const at = firstDifferentSector(buf1, buf2, chunk);
          if (at >= 0) {
            say(`Content mismatch at offset ${offset + at}!\n`);
            return 1;
          }
        }
      } else {
        chunk = Math.min(chunk, IO_BUF_SIZE);
        const code = await checkEmpty(allocated1 ? view1 : view2, offset, chunk);
        if (code) return code;
      }
      offset += chunk;
      progress.print(percentOf(chunk, progressBase), 100);
    }

    if (size1 !== size2) {
      say("Warning: Image size mismatch!\n");
      const over = size1 > size2 ? view1 : view2;
      while (offset < progressBase) {
        const s = await status(over, offset, progressBase - offset);
        if (!s) return 3;
        let chunk = s.length;
        if (s.flags & BLOCK_ALLOCATED && !(s.flags & BLOCK_ZERO)) {
          chunk = Math.min(chunk, IO_BUF_SIZE);
          const code = await checkEmpty(over, offset, chunk);
          if (code) return code;
        }
        offset += chunk;
        progress.print(percentOf(chunk, progressBase), 100);
      }
    }
  } catch (e) {
    if (e instanceof ReadError) return 4;
    throw e;
  }
  say("Images are identical.\n");
  return 0;
}
