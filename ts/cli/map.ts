// qcow2-img map [-f fmt] [--output=human|json] [--start-offset=N] [--max-length=N] [-U] file
//
// Also what map, compare and resize share: qemu's size syntax (qemu_strtosz, cvtnum), its open
// errors, and qemu's view of an opened image: raw files are sized in whole sectors and report
// their holes (qemu asks the file system with SEEK_DATA/SEEK_HOLE; Node cannot, so the holes are
// found from the allocated block count and the blocks that hold data), and each layer of a
// backing chain is named as qemu names it (path_combine, no normalisation).

import fs from "node:fs";
import "../node.js";
import { Qcow2Error, Qcow2ErrorCode } from "../errors.js";
import { QCOW_MAGIC } from "../format/constants.js";
import { readClipped, RawDevice, type Extent, type GuestDevice } from "../image/device.js";
import { Qcow2Image } from "../image/qcow2-image.js";
import { formatMapHumanRow, MAP_HUMAN_HEADER, mapEntries, mapEntryJson, type MapEntry } from "../ops/map.js";
import { parseArgs, UsageError } from "./args.js";
import { openDevice } from "./open.js";
import { errnoText } from "./errno.js";
import { imageSourceOrReport, OptionsError, requireSecret } from "./image-opts.js";
import { cvtnum } from "./options.js";

export const MAP_USAGE = "map [-f fmt] [--output=ofmt] [--start-offset=offset] [--max-length=len] [-U] filename";

const SECTOR = 512;
const INT64_MIN = -(1n << 63n);
const INT64_MAX = (1n << 63n) - 1n;
/** Formats qemu-img knows but this tool does not open. */
const OTHER_QEMU_FORMATS = new Set([
  "vmdk", "vdi", "vpc", "vhdx", "qed", "qcow", "luks", "parallels", "dmg", "bochs", "cloop", "vvfat",
  "file", "host_device", "host_cdrom", "nbd", "ssh", "http", "https", "blkdebug", "null-co", "null-aio",
]);


/** A `-f` value: qcow2 or raw, an error qemu would print for anything else. */
export function resolveFormat(value: string | undefined): "qcow2" | "raw" | undefined {
  if (value === undefined || value === "qcow2" || value === "raw") return value;
  if (OTHER_QEMU_FORMATS.has(value)) throw new Qcow2Error(Qcow2ErrorCode.NOT_SUPPORTED, `qcow2-img opens only qcow2 and raw images, not ${value}`);
  throw new Qcow2Error(Qcow2ErrorCode.NOT_SUPPORTED, `Unknown driver '${value}'`);
}


/** qemu's "Could not open 'F': ..." for an error met while opening `file`. */
export function describeOpenError(file: string, e: unknown): string {
  if ((e as NodeJS.ErrnoException).code === "NOT_REGULAR") return `Could not open '${file}': 'file' driver requires '${file}' to be a regular file`;
  if (!(e instanceof Qcow2Error) || e.code === Qcow2ErrorCode.IO_ERROR) {
    // The system's reason, as file-posix words it, wherever it sits in the cause chain.
    const text = errnoText(e);
    if (text !== undefined) return `Could not open '${file}': Could not open '${file}': ${text}`;
  }
  if (e instanceof Qcow2Error && e.code === Qcow2ErrorCode.BAD_MAGIC) return `Could not open '${file}': Image is not in qcow2 format`;
  return `Could not open '${file}': ${e instanceof Error ? e.message : String(e)}`;
}

/** qemu's probe, for the two formats here: the qcow2 magic, else raw. */
export async function probeFormat(file: string, writable: boolean): Promise<"qcow2" | "raw"> {
  const handle = await openRegular(file, writable);
  try {
    const magic = new Uint8Array(4);
    const { bytesRead } = await handle.read(magic, 0, 4, 0);
    return bytesRead === 4 && new DataView(magic.buffer).getUint32(0) === QCOW_MAGIC ? "qcow2" : "raw";
  } finally {
    await handle.close();
  }
}

async function openRegular(file: string, writable: boolean): Promise<fs.promises.FileHandle> {
  const handle = await fs.promises.open(file, writable ? "r+" : "r");
  const stat = await handle.stat();
  if (!stat.isFile() && !stat.isBlockDevice()) {
    await handle.close();
    throw Object.assign(new Error(`${file} is not a regular file`), { code: "NOT_REGULAR" });
  }
  return handle;
}

/**
 * Where a raw file holds data: runs of [start, next start) over [0, fileSize), alternating or not.
 * Exact when the file has no holes, is all holes, or its data blocks are exactly those that
 * hold non-zero bytes (plus a zero first block, which qemu-img create allocates).
 */
export class RawExtents {
  private constructor(
    readonly fileSize: number,
    private readonly starts: number[],
    private readonly data: boolean[],
  ) {}

  static uniform(fileSize: number, data: boolean): RawExtents {
    return new RawExtents(fileSize, fileSize > 0 ? [0] : [], fileSize > 0 ? [data] : []);
  }

  static async scan(file: string): Promise<RawExtents> {
    const handle = await fs.promises.open(file, "r");
    try {
      const stat = await handle.stat();
      const size = stat.size;
      const block = stat.blksize >= SECTOR && stat.blksize <= 1 << 20 && (stat.blksize & (stat.blksize - 1)) === 0 ? stat.blksize : 4096;
      const blocks = Math.ceil(size / block);
      const allocated = stat.blocks * 512;
      if (size === 0 || allocated >= blocks * block) return RawExtents.uniform(size, true);
      if (allocated === 0) return RawExtents.uniform(size, false);
      const starts: number[] = [];
      const data: boolean[] = [];
      const push = (start: number, isData: boolean): void => {
        if (data.length > 0 && data[data.length - 1] === isData) return;
        starts.push(start);
        data.push(isData);
      };
      const chunk = Math.max(block, Math.floor((4 << 20) / block) * block);
      const buf = Buffer.alloc(chunk);
      const zeros = Buffer.alloc(chunk);
      let dataBlocks = 0;
      for (let pos = 0; pos < size; pos += chunk) {
        const want = Math.min(chunk, size - pos);
        let got = 0;
        while (got < want) {
          const { bytesRead } = await handle.read(buf, got, want - got, pos + got);
          if (bytesRead === 0) break;
          got += bytesRead;
        }
        buf.fill(0, got, want);
        if (buf.compare(zeros, 0, want, 0, want) === 0) {
          push(pos, false);
          continue;
        }
        for (let off = 0; off < want; off += block) {
          const end = Math.min(want, off + block);
          const isData = buf.compare(zeros, 0, end - off, off, end) !== 0;
          if (isData) dataBlocks++;
          push(pos + off, isData);
        }
      }
      // One allocated block unaccounted for and a zero first block: qemu-img create's first block.
      if (Math.round(allocated / block) - dataBlocks >= 1 && data[0] === false) {
        if (starts.length > 1 && starts[1] === block) {
          data[0] = true; // the next run is data: merge
          starts.splice(1, 1);
          data.splice(1, 1);
        } else {
          starts.splice(1, 0, Math.min(block, size));
          data.splice(0, 0, true);
          if (starts[1] === size) {
            starts.pop();
            data.pop();
          }
        }
      }
      return new RawExtents(size, starts, data);
    } finally {
      await handle.close();
    }
  }

  /** The run holding `offset` (< fileSize): whether it is data, and where it ends. */
  find(offset: number): { data: boolean; end: number } {
    let lo = 0;
    let hi = this.starts.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (this.starts[mid]! <= offset) lo = mid;
      else hi = mid - 1;
    }
    return { data: this.data[lo]!, end: lo + 1 < this.starts.length ? this.starts[lo + 1]! : this.fileSize };
  }
}

/** qemu's path_combine: a relative backing name is appended to the image name's directory part. */
export function qemuBackingName(imageName: string, backingFile: string): string {
  if (backingFile.startsWith("/")) return backingFile;
  return imageName.slice(0, imageName.lastIndexOf("/") + 1) + backingFile;
}

export interface ImageViewOptions {
  /** Find the holes of raw files (map and strict compare); otherwise a raw file is all data. */
  rawHoles: boolean;
  /** The passphrase of an encrypted image. */
  passphrase?: Uint8Array;
}

/**
 * An image as qemu-img sees it when it reads one: its size in whole sectors, the chain with
 * qemu's file names, and block status where raw layers report their holes as zero extents.
 */
export class ImageView implements GuestDevice {
  readonly format: "qcow2" | "raw";
  readonly name: string;
  readonly virtualSize: number;
  /** The top image first, then its backing files. */
  readonly layers: GuestDevice[];
  /** qemu's file name of each layer, as map prints it. */
  readonly fileNames: string[];
  readonly top: GuestDevice;
  private readonly rawExtents = new Map<number, Promise<RawExtents>>();
  private readonly options: ImageViewOptions;

  private constructor(file: string, top: GuestDevice, options: ImageViewOptions) {
    this.top = top;
    this.name = file;
    this.format = top.format;
    this.options = options;
    this.layers = top instanceof Qcow2Image ? top.chain() : [top];
    this.fileNames = [file];
    for (let d = 1; d < this.layers.length; d++) {
      const above = this.layers[d - 1] as Qcow2Image;
      this.fileNames.push(qemuBackingName(this.fileNames[d - 1]!, above.header.backingFile ?? ""));
    }
    this.virtualSize = top instanceof RawDevice ? Math.ceil(top.virtualSize / SECTOR) * SECTOR : Math.floor(top.virtualSize / SECTOR) * SECTOR;
  }

  static async open(file: string, format: string | undefined, options: ImageViewOptions): Promise<ImageView> {
    const fmt = resolveFormat(format);
    await (await openRegular(file, false)).close();
    const device = await openDevice(file, fmt, options.passphrase !== undefined ? { passphrase: options.passphrase } : {});
    return new ImageView(file, device, options);
  }

  readInto(dst: Uint8Array, guestOffset: number): Promise<void> {
    return readClipped(this.top, dst, guestOffset);
  }

  async blockStatus(guestOffset: number, maxLength: number): Promise<Extent> {
    const length = Math.min(maxLength, this.virtualSize - guestOffset);
    if (this.top instanceof RawDevice) return this.rawStatus(0, guestOffset, length);
    const e = await this.top.blockStatus(guestOffset, length);
    if (e.kind === "backing" && this.layers[e.depth] instanceof RawDevice) return this.rawStatus(e.depth, e.start, e.length);
    // qemu gives no host offset for encrypted data: the file holds ciphertext there.
    const layer = this.layers[e.depth];
    if (layer instanceof Qcow2Image && layer.header.cryptMethod !== 0 && e.kind === "data") delete e.hostOffset;
    return e;
  }

  /** A raw layer's data or hole run at `offset`; past the end of the file (the sector's tail), a hole. */
  private async rawStatus(depth: number, offset: number, length: number): Promise<Extent> {
    const layer = this.layers[depth]!;
    let extents = this.rawExtents.get(depth);
    if (!extents) {
      extents = this.options.rawHoles ? RawExtents.scan(layer.name) : Promise.resolve(RawExtents.uniform(layer.virtualSize, true));
      this.rawExtents.set(depth, extents);
    }
    const runs = await extents;
    if (offset >= runs.fileSize) return { start: offset, length, kind: "zero", hostOffset: offset, depth };
    const run = runs.find(offset);
    return { start: offset, length: Math.min(length, run.end - offset), kind: run.data ? "backing" : "zero", hostOffset: offset, depth };
  }

  close(): Promise<void> {
    return this.top.close();
  }
}

/** Output written in pieces of about 64 KiB: a map can have millions of lines. */
function buffered(out: (text: string) => void): { write(text: string): void; flush(): void } {
  let pending = "";
  return {
    write(text) {
      pending += text;
      if (pending.length >= 1 << 16) {
        out(pending);
        pending = "";
      }
    },
    flush() {
      if (pending) out(pending);
      pending = "";
    },
  };
}

export async function map(argv: string[], out: (text: string) => void, err: (text: string) => void): Promise<number> {
  const args = parseArgs(argv, {
    withValue: ["-f", "--output", "--start-offset", "--max-length", "--object"],
    flags: ["-U", "--force-share", "--image-opts", "-h", "--help"],
  });
  if (args.flags.has("-h") || args.flags.has("--help")) {
    out(`usage: qcow2-img ${MAP_USAGE}\n`);
    return 0;
  }
  let start = 0n;
  let maxLength: bigint | undefined;
  // As qemu-img parses them, in order: the first bad size stops it.
  for (const arg of argv) {
    const m = /^--(start-offset|max-length)(?:=(.*))?$/s.exec(arg);
    if (!m) continue;
    const name = m[1] === "start-offset" ? "--start-offset" : "--max-length";
    const values = args.all.get(name)!;
    const value = values.shift()!;
    const parsed = cvtnum(name === "--start-offset" ? "start offset" : "max length", value, err);
    if (parsed === undefined) return 1;
    if (name === "--start-offset") start = parsed;
    else maxLength = parsed;
  }
  if (args.positional.length !== 1) throw new UsageError("Expecting one image file name");
  const file = args.positional[0]!;
  const output = args.values.get("--output") ?? "human";
  if (output !== "human" && output !== "json") {
    err("qcow2-img: --output must be used with human or json as argument.\n");
    return 1;
  }
  const source = await imageSourceOrReport(
    file,
    { objects: args.all.get("--object") ?? [], imageOpts: args.flags.has("--image-opts"), formatArg: args.values.get("-f") },
    err,
  );
  if (!source) return 1;
  let view: ImageView;
  try {
    view = await ImageView.open(source.file, source.format ?? args.values.get("-f"), { rawHoles: true, ...(source.passphrase ? { passphrase: source.passphrase } : {}) });
    if (view.top instanceof Qcow2Image) requireSecret(source, view.top.header.cryptMethod);
  } catch (e) {
    if (view! !== undefined) await view.close();
    err(e instanceof OptionsError ? `qcow2-img: ${e.message}\n` : `qcow2-img: ${describeOpenError(source.name, e)}\n`);
    return 1;
  }
  const sink = buffered(out);
  const json = output === "json";
  sink.write(json ? "[" : MAP_HUMAN_HEADER);
  try {
    // qemu computes the end in int64_t: a sum past INT64_MAX wraps and maps nothing.
    let end = BigInt(view.virtualSize);
    if (maxLength !== undefined) {
      const limit = BigInt.asIntN(64, start + maxLength);
      if (limit < end) end = limit < INT64_MIN ? INT64_MIN : limit;
    }
    if (start >= end) {
      // qemu prints its zero-initialised entry starting at the requested offset.
      if (json) sink.write(`{ "start": ${start}, "length": 0, "depth": 0, "present": false, "zero": false, "data": false}`);
    } else {
      let first = true;
      const entries = mapEntries(view, { start: Number(start), length: Number(end - start) });
      for (;;) {
        let next: IteratorResult<MapEntry>;
        try {
          next = await entries.next();
        } catch (e) {
          sink.flush();
          err(`qcow2-img: Could not read file metadata: ${e instanceof Error ? e.message : String(e)}\n`);
          return 1;
        }
        if (next.done) break;
        const e = next.value;
        if (json) {
          sink.write((first ? "" : ",\n") + mapEntryJson(e));
        } else {
          if (e.data && e.offset === undefined) {
            sink.flush();
            err("qcow2-img: File contains external, encrypted or compressed clusters.\n");
            return 1;
          }
          if (e.data && !e.zero) sink.write(formatMapHumanRow(e, view.fileNames[e.depth] ?? source.file));
        }
        first = false;
      }
    }
    if (json) sink.write("]\n");
    sink.flush();
    return 0;
  } finally {
    await view.close();
  }
}
