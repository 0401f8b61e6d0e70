// qcow2-img measure [--output=human|json] [-O fmt] [-o options] [-f fmt] [--size N | filename]
//
// qemu-img's img_measure with block/qcow2.c qcow2_measure and qcow2_calc_prealloc_size (and
// block/raw-format.c raw_measure): the size of every piece of metadata a fully allocated image
// needs, plus the data clusters a converted copy of the source would hold.
//
// Where qemu asks the file system for holes (lseek SEEK_DATA on a raw file, or under a qcow2 image
// it takes for metadata-preallocated), Node has no such call: a 4 KiB block counts as a hole when it
// reads as zeros, unless the file's allocated size says it is fully allocated (see rawDataRuns).

import fs from "node:fs";
import { AUTOCLEAR_BITMAPS, QCOW_MAX_L1_SIZE } from "../format/constants.js";
import { readFully } from "../io/backend.js";
import type { GuestDevice } from "../image/device.js";
import { Qcow2Image } from "../image/qcow2-image.js";
import { parseArgs } from "./args.js";
import { parseSnapshotParam, type SnapshotParam } from "./snapshot-param.js";
import { luksAreaLength } from "../format/luks.js";
import { OptionsError, parseObjects } from "./image-opts.js";
import { Qcow2ErrorCode, isQcow2Error } from "../errors.js";
import {
  clusterSizeError,
  createOptionTable,
  imageSizeArgument,
  isQemuDriver,
  isValidOptionList,
  openImage,
  OptionError,
  parseOptions,
  reportLines,
  type OptionSet,
} from "./create.js";

export const MEASURE_USAGE = "measure [--output=ofmt] [-O output_fmt] [-o options] [--size N | [-f fmt] filename]";

/** qemu formats that can be created but have no measure callback. */
const NO_MEASURE = new Set(["qcow", "qed", "vdi", "vhdx", "vmdk", "vpc", "parallels", "file"]);

/** What qemu's BlockMeasureInfo says. */
export interface MeasureInfo {
  required: bigint;
  fullyAllocated: bigint;
  bitmaps?: bigint;
}

class MeasureFailure extends Error {}

function roundUp(v: bigint, to: bigint): bigint {
  return ((v + to - 1n) / to) * to;
}

function divRoundUp(v: bigint, by: bigint): bigint {
  return (v + by - 1n) / by;
}

/** qcow2_refcount_metadata_size: refcount table and blocks covering `clusters` and themselves. */
export function refcountMetadataSize(clusters: bigint, clusterSize: bigint, refcountOrder: number): bigint {
  const blocksPerTableCluster = clusterSize / 8n;
  const refcountsPerBlock = (clusterSize * 8n) >> BigInt(refcountOrder);
  let table = 0n;
  let blocks = 0n;
  let n = 0n;
  let last: bigint;
  do {
    last = n;
    blocks = divRoundUp(clusters + table + blocks, refcountsPerBlock);
    table = divRoundUp(blocks, blocksPerTableCluster);
    n = clusters + blocks + table;
  } while (n !== last);
  return (blocks + table) * clusterSize;
}

/** qcow2_calc_prealloc_size: the file size of an image with every cluster allocated. */
export function qcow2PreallocSize(totalSize: bigint, clusterSize: bigint, refcountOrder: number, extendedL2: boolean): bigint {
  const aligned = roundUp(totalSize, clusterSize);
  const l2eSize = extendedL2 ? 16n : 8n;
  let meta = clusterSize; // header
  const nl2e = roundUp(aligned / clusterSize, clusterSize / l2eSize);
  meta += nl2e * l2eSize;
  const nl1e = roundUp((nl2e * l2eSize) / clusterSize, clusterSize / 8n);
  meta += nl1e * 8n;
  meta += refcountMetadataSize((meta + aligned) / clusterSize, clusterSize, refcountOrder);
  return meta + aligned;
}

/** block/raw-format.c raw_measure. */
export function measureRaw(options: OptionSet, source: GuestDevice | undefined): MeasureInfo {
  const required = source ? roundUp(BigInt(source.virtualSize), 512n) : roundUp((options.get("size")?.value as bigint | undefined) ?? 0n, 512n);
  return { required, fullyAllocated: required };
}

/** block/qcow2.c qcow2_measure. */
/** The clusters a LUKS area of the -o encrypt.* options takes (0 without LUKS). */
function luksPayloadSize(options: OptionSet, clusterSize: bigint): bigint {
  if (options.get("encrypt.format")?.text !== "luks") return 0n;
  const aes256 = (options.get("encrypt.cipher-alg")?.text ?? "aes-256") === "aes-256";
  const xts = (options.get("encrypt.cipher-mode")?.text ?? "xts") === "xts";
  const keyBytes = (aes256 ? 32 : 16) * (xts ? 2 : 1);
  return roundUp(BigInt(luksAreaLength(keyBytes)), clusterSize);
}

export async function measureQcow2(options: OptionSet, source: GuestDevice | undefined): Promise<MeasureInfo> {
  const extendedL2 = options.get("extended_l2")?.value === true;
  const clusterSize = (options.get("cluster_size")?.value as bigint | undefined) ?? 65536n;
  const csError = clusterSizeError(clusterSize, extendedL2);
  if (csError) throw new MeasureFailure(csError);
  const compat = options.get("compat")?.text;
  let version = 3;
  if (compat === "0.10") version = 2;
  else if (compat !== undefined && compat !== "1.1") throw new MeasureFailure(`Invalid compatibility level: '${compat}'`);
  const refcountBits = (options.get("refcount_bits")?.value as bigint | undefined) ?? 16n;
  if (refcountBits > 64n || refcountBits === 0n || (refcountBits & (refcountBits - 1n)) !== 0n) {
    throw new MeasureFailure("Refcount width must be a power of two and may not exceed 64 bits");
  }
  if (version < 3 && refcountBits !== 16n) {
    throw new MeasureFailure("Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)");
  }
  const prealloc = options.get("preallocation")?.text ?? "off";
  if (!["off", "metadata", "falloc", "full"].includes(prealloc)) throw new MeasureFailure(`invalid parameter value: ${prealloc}`);
  const hasBackingFile = options.has("backing_file");
  if (options.get("encrypt.format")?.text === "luks" && !options.has("encrypt.key-secret")) {
    // qemu sizes the LUKS area through qcrypto_block_calculate_payload_offset, which wants the secret named.
    throw new MeasureFailure("Parameter 'encrypt.key-secret' is required for cipher");
  }

  let virtualSize = roundUp((options.get("size")?.value as bigint | undefined) ?? 0n, clusterSize);
  const l2eSize = extendedL2 ? 16n : 8n;
  const l2Tables = divRoundUp(virtualSize / clusterSize, clusterSize / l2eSize);
  // One L1 entry (8 bytes) per L2 table.
  if (l2Tables * 8n > BigInt(QCOW_MAX_L1_SIZE)) throw new MeasureFailure("The image size is too large (try using a larger cluster size)");

  let required = 0n;
  if (source) {
    // bdrv_getlength counts whole sectors.
    const ssize = roundUp(BigInt(source.virtualSize), 512n);
    virtualSize = roundUp(ssize, clusterSize);
    // With a backing file the new image may share nothing with the source: every cluster counts.
    required = hasBackingFile ? virtualSize : (await dataClusters(source, Number(clusterSize))) * clusterSize;
  }
  if (prealloc === "full" || prealloc === "falloc") required = virtualSize;

  const refcountOrder = refcountBits.toString(2).length - 1;
  const fullyAllocated = qcow2PreallocSize(virtualSize, clusterSize, refcountOrder, extendedL2);
  // qcow2_measure: a LUKS image also holds its key slots, in whole clusters.
  const luks = luksPayloadSize(options, clusterSize);
  const info: MeasureInfo = { required: fullyAllocated + luks - virtualSize + required, fullyAllocated: fullyAllocated + luks };
  if (version >= 3 && source instanceof Qcow2Image && source.header.version >= 3) {
    info.bitmaps = await persistentBitmapsSize(source, clusterSize);
  }
  return info;
}

// ---------------------------------------------------------------------------------------------
// What of the source holds data (bdrv_block_status_above, as qcow2_measure counts it)

/** Counts target clusters holding any data; ranges must come in increasing order. */
class ClusterCounter {
  count = 0n;
  private last = -1;
  constructor(private readonly clusterSize: number) {}

  add(start: number, end: number): void {
    if (end <= start) return;
    let first = Math.floor(start / this.clusterSize);
    const lastCluster = Math.floor((end - 1) / this.clusterSize);
    if (first <= this.last) first = this.last + 1;
    if (lastCluster >= first) {
      this.count += BigInt(lastCluster - first + 1);
      this.last = lastCluster;
    }
  }
}

type Runs = Array<[number, number]>;

const BLOCK = 4096;
const CHUNK = 1 << 20;

function isZero(bytes: Uint8Array): boolean {
  if (bytes.byteOffset % 4 !== 0 || bytes.length < 64) {
    for (let i = 0; i < bytes.length; i++) if (bytes[i] !== 0) return false;
    return true;
  }
  const words = new Uint32Array(bytes.buffer, bytes.byteOffset, bytes.length >> 2);
  for (let i = 0; i < words.length; i++) if (words[i] !== 0) return false;
  for (let i = words.length << 2; i < bytes.length; i++) if (bytes[i] !== 0) return false;
  return true;
}

/** Ranges of [start, end) whose `piece`-sized blocks (from `start`) are not all zero. */
async function nonZeroRuns(read: (dst: Uint8Array, pos: number) => Promise<void>, start: number, end: number, piece: number): Promise<Runs> {
  const runs: Runs = [];
  const buf = new Uint8Array(Math.max(piece, Math.floor(CHUNK / piece) * piece));
  for (let pos = start; pos < end; pos += buf.length) {
    const n = Math.min(buf.length, end - pos);
    await read(buf.subarray(0, n), pos);
    for (let off = 0; off < n; off += piece) {
      if (isZero(buf.subarray(off, Math.min(n, off + piece)))) continue;
      const s = pos + off;
      const e = Math.min(end, s + piece);
      const prev = runs[runs.length - 1];
      if (prev && prev[1] === s) prev[1] = e;
      else runs.push([s, e]);
    }
  }
  return runs;
}

/**
 * Where a raw file holds data as lseek(SEEK_DATA) would say: nothing when nothing is allocated,
 * everything when every block is, else the blocks that are not all zeros — and the first block,
 * which qemu (and our create) write when they make a raw file, when the file has more allocated
 * than its non-zero blocks.
 */
async function rawDataRuns(device: GuestDevice): Promise<Runs> {
  const size = device.virtualSize;
  let allocated: number;
  try {
    allocated = (await fs.promises.stat(device.name)).blocks * 512;
  } catch {
    return size > 0 ? [[0, size]] : [];
  }
  if (allocated === 0 || size === 0) return [];
  if (allocated >= Math.ceil(size / BLOCK) * BLOCK) return [[0, size]];
  const runs = await nonZeroRuns((dst, pos) => device.readInto(dst, pos), 0, size, BLOCK);
  const nonZero = runs.reduce((sum, [s, e]) => sum + Math.ceil(e / BLOCK) - Math.floor(s / BLOCK), 0) * BLOCK;
  if (allocated > nonZero && (runs.length === 0 || runs[0]![0] > 0)) runs.unshift([0, Math.min(size, BLOCK)]);
  return runs;
}

/** qcow2_detect_metadata_preallocation: more clusters in use than the file has allocated. */
async function looksMetadataPreallocated(image: Qcow2Image): Promise<boolean> {
  const backend = image.backend;
  if (!backend.allocatedSize) return false;
  const cs = image.clusterSize;
  const fileLength = await backend.size();
  const realClusters = Math.floor((await backend.allocatedSize()) / cs);
  const threshold = Math.max(Math.floor((realClusters * 10) / 9), realClusters + 2);
  const endCluster = Math.ceil(fileLength / cs);
  const h = image.header;
  const table = new Uint8Array(h.refcountTableClusters * cs);
  await readFully(backend, table, h.refcountTableOffset);
  const tdv = new DataView(table.buffer);
  const bits = 2 ** h.refcountOrder;
  const perBlock = (cs * 8) / bits;
  const block = new Uint8Array(cs);
  let count = 0;
  for (let i = 0; i < table.length / 8 && i * perBlock < endCluster; i++) {
    // REFT_OFFSET_MASK: the low 9 bits are reserved.
    const offset = tdv.getUint32(i * 8) * 0x100000000 + ((tdv.getUint32(i * 8 + 4) & ~0x1ff) >>> 0);
    if (offset === 0) continue;
    await readFully(backend, block, offset);
    const entries = Math.min(perBlock, endCluster - i * perBlock);
    for (let j = 0; j < entries; j++) {
      const bitPos = j * bits;
      let nonZero: boolean;
      if (bits < 8) nonZero = ((block[bitPos >> 3]! >> (bitPos & 7)) & ((1 << bits) - 1)) !== 0;
      else nonZero = !isZero(block.subarray(bitPos >> 3, (bitPos >> 3) + bits / 8));
      if (nonZero && ++count >= threshold) return true;
    }
  }
  return false;
}

/** A guest range of the source that holds data, or (with `layer`) reads as zeros from that layer's clusters. */
interface Piece {
  start: number;
  end: number;
  /** Set for zero-reading clusters of a layer qemu would ask the file system about. */
  layer?: number;
}

/**
 * Number of `clusterSize` clusters of the source holding data (not zero, not unallocated).
 *
 * For a qcow2 layer that qcow2_detect_metadata_preallocation flags, qemu asks the file system
 * whether each data cluster is a hole. Zero-reading clusters stand in for holes here, unless the
 * layer's file has enough allocated beyond its non-zero data to hold them all: small images trip
 * qemu's detection too, and their zero-filled clusters were really written.
 */
async function dataClusters(source: GuestDevice, clusterSize: number): Promise<bigint> {
  const counter = new ClusterCounter(clusterSize);
  if (!(source instanceof Qcow2Image)) {
    for (const [s, e] of await rawDataRuns(source)) counter.add(s, e);
    return counter.count;
  }
  const chain = source.chain();
  const preallocated = new Map<number, { nonZero: number; zero: number }>();
  const checked = new Set<number>();
  const rawRuns = new Map<number, Runs>();
  const pieces: Piece[] = [];
  for await (const e of source.extents()) {
    const end = e.start + e.length;
    if (e.kind === "zero" || e.kind === "unallocated") continue;
    if (e.kind === "compressed") {
      pieces.push({ start: e.start, end });
    } else if (e.kind === "data") {
      const layer = chain[e.depth] as Qcow2Image;
      if (!checked.has(e.depth)) {
        checked.add(e.depth);
        if (await looksMetadataPreallocated(layer)) preallocated.set(e.depth, { nonZero: 0, zero: 0 });
      }
      const sums = preallocated.get(e.depth);
      if (!sums) {
        pieces.push({ start: e.start, end });
        continue;
      }
      const host = e.hostOffset!;
      const cs = layer.clusterSize;
      const piece = Math.min(BLOCK, cs);
      const buf = new Uint8Array(Math.max(cs, Math.floor(CHUNK / cs) * cs));
      for (let pos = 0; pos < e.length; pos += buf.length) {
        const n = Math.min(buf.length, e.length - pos);
        await readFully(layer.backend, buf.subarray(0, n), host + pos);
        for (let c = 0; c < n; c += cs) {
          const clusterEnd = Math.min(n, c + cs);
          const guest = e.start + pos;
          let any = false;
          for (let b = c; b < clusterEnd; b += piece) {
            if (isZero(buf.subarray(b, Math.min(clusterEnd, b + piece)))) continue;
            pieces.push({ start: guest + b, end: guest + Math.min(clusterEnd, b + piece) });
            any = true;
          }
          // Zeros beside data in one cluster were filled in when the cluster was allocated (qemu
          // zeroes that copy-on-write area with a write-zeroes request, a hole to lseek); a
          // cluster of zeros alone is a hole or a written one, which the allocated size decides.
          if (any) sums.nonZero += clusterEnd - c;
          else {
            pieces.push({ start: guest + c, end: guest + clusterEnd, layer: e.depth });
            sums.zero += clusterEnd - c;
          }
        }
      }
    } else {
      // A raw backing file: guest offsets are its offsets.
      let runs = rawRuns.get(e.depth);
      if (!runs) rawRuns.set(e.depth, (runs = await rawDataRuns(chain[e.depth]!)));
      for (const [s, t] of runs) if (t > e.start && s < end) pieces.push({ start: Math.max(s, e.start), end: Math.min(t, end) });
    }
  }
  const zeroIsData = new Set<number>();
  for (const [depth, sums] of preallocated) {
    const layer = chain[depth] as Qcow2Image;
    const allocated = (await layer.backend.allocatedSize?.()) ?? 0;
    if (allocated - sums.nonZero >= sums.zero) zeroIsData.add(depth);
  }
  for (const p of pieces) if (p.layer === undefined || zeroIsData.has(p.layer)) counter.add(p.start, p.end);
  return counter.count;
}

/** qcow2_get_persistent_dirty_bitmap_size for the source's persistent bitmaps. */
async function persistentBitmapsSize(image: Qcow2Image, clusterSize: bigint): Promise<bigint> {
  const ext = image.header.extensions.bitmaps;
  // Without the autoclear bit a program without bitmap support touched the image: qemu drops them.
  if (!ext || (image.header.autoclearFeatures & BigInt(AUTOCLEAR_BITMAPS)) === 0n) return 0n;
  const dir = new Uint8Array(ext.bitmapDirectorySize);
  await readFully(image.backend, dir, ext.bitmapDirectoryOffset);
  const dv = new DataView(dir.buffer);
  let total = 0n;
  let dirSize = 0n;
  let pos = 0;
  for (let i = 0; i < ext.nbBitmaps && pos + 24 <= dir.length; i++) {
    const granularityBits = dv.getUint8(pos + 17);
    const nameSize = dv.getUint16(pos + 18);
    const extraSize = dv.getUint32(pos + 20);
    const bits = divRoundUp(BigInt(image.virtualSize), 1n << BigInt(granularityBits));
    const bytes = divRoundUp(bits, 8n);
    const clusters = divRoundUp(bytes, clusterSize);
    total += clusters * clusterSize + roundUp(clusters * 8n, clusterSize);
    dirSize += roundUp(24n + BigInt(nameSize), 8n);
    pos += Number(roundUp(BigInt(24 + extraSize + nameSize), 8n));
  }
  return total + roundUp(dirSize, clusterSize);
}

// ---------------------------------------------------------------------------------------------
// The command

export function formatMeasureHuman(info: MeasureInfo): string {
  let text = `required size: ${info.required}\nfully allocated size: ${info.fullyAllocated}\n`;
  if (info.bitmaps !== undefined) text += `bitmaps size: ${info.bitmaps}\n`;
  return text;
}

/** qemu 7.2's key order: bitmaps (when present), required, fully-allocated. */
export function formatMeasureJson(info: MeasureInfo): string {
  const lines: string[] = [];
  if (info.bitmaps !== undefined) lines.push(`    "bitmaps": ${info.bitmaps}`);
  lines.push(`    "required": ${info.required}`, `    "fully-allocated": ${info.fullyAllocated}`);
  return `{\n${lines.join(",\n")}\n}\n`;
}

export async function measure(argv: string[], out: (text: string) => void, err: (text: string) => void): Promise<number> {
  const args = parseArgs(argv, {
    withValue: ["-f", "-O", "-o", "-l", "--output", "--size", "--object"],
    flags: ["-U", "--force-share", "-h", "--help"],
  });
  if (args.flags.has("-h") || args.flags.has("--help")) {
    out(`usage: qcow2-img ${MEASURE_USAGE}\n`);
    return 0;
  }
  const fail = (message: string): number => {
    err(reportLines(message));
    return 1;
  };
  let secrets: Map<string, Uint8Array>;
  try {
    secrets = await parseObjects(args.all.get("--object") ?? []);
  } catch (e) {
    if (!(e instanceof OptionsError)) throw e;
    return fail(e.message);
  }
  for (const o of args.all.get("-o") ?? []) if (!isValidOptionList(o)) return fail(`Invalid option list: ${o}`);
  const output = args.values.get("--output") ?? "human";
  if (output !== "human" && output !== "json") return fail("--output must be used with human or json as argument.");
  let size: bigint | undefined;
  const sizeText = args.values.get("--size");
  if (sizeText !== undefined) {
    const v = imageSizeArgument(sizeText);
    if (typeof v === "string") return fail(v);
    size = v;
  }
  if (args.positional.length > 1) return fail("At most one filename argument is allowed.");
  const filename = args.positional[0];
  const fmtArg = args.values.get("-f");
  const snapshot = args.values.get("-l");
  if (filename === undefined && (fmtArg !== undefined || snapshot !== undefined)) return fail("--image-opts, -f, and -l require a filename argument.");
  if (filename !== undefined && size !== undefined) return fail("--size N cannot be used together with a filename.");
  if (filename === undefined && size === undefined) return fail("Either --size N or one filename must be specified.");
  let which: SnapshotParam | undefined;
  if (snapshot !== undefined) {
    const parsed = parseSnapshotParam(snapshot);
    if ("error" in parsed) return fail(parsed.error);
    which = parsed.which;
  }

  let source: GuestDevice | undefined;
  if (filename !== undefined) {
    try {
      source = await openSource(filename, fmtArg);
    } catch (e) {
      return fail(`Could not open '${filename}': ${(e as Error).message}`);
    }
    if (which !== undefined) {
      // qemu opens the image, then loads the snapshot in its place (bdrv_snapshot_load_tmp).
      const isQcow2 = source instanceof Qcow2Image;
      await source.close();
      source = undefined;
      if (!isQcow2) return fail("Failed to load snapshot: Block format 'raw' used by device '' does not support temporarily loading internal snapshots");
      try {
        source = await openImage(filename, "qcow2", { snapshot: which, snapshotAtCurrentSize: true });
      } catch (e) {
        if (isQcow2Error(e, Qcow2ErrorCode.NOT_FOUND)) return fail("Failed to load snapshot: Can't find snapshot");
        return fail(`Failed to load snapshot: ${(e as Error).message}`);
      }
    }
  }
  try {
    const outFmt = args.values.get("-O") ?? "raw";
    if (outFmt !== "qcow2" && outFmt !== "raw") {
      if (outFmt === "luks") return fail(`Format 'luks' is not supported yet`);
      if (NO_MEASURE.has(outFmt)) return fail(`Block driver '${outFmt}' does not support size measurement`);
      if (isQemuDriver(outFmt)) return fail(`Format driver '${outFmt}' does not support image creation`);
      return fail(`Unknown file format '${outFmt}'`);
    }
    let options: OptionSet;
    try {
      options = parseOptions((args.all.get("-o") ?? []).join(","), createOptionTable(outFmt));
    } catch (e) {
      if (!(e instanceof OptionError)) throw e;
      err(`qcow2-img: ${e.message}\n${e.hint}`);
      return fail(`Invalid options for file format '${outFmt}'`);
    }
    if (size !== undefined) options.set("size", { text: String(size), value: size });
    const keySecret = options.get("encrypt.key-secret")?.text;
    if (options.get("encrypt.format")?.text === "luks" && keySecret !== undefined && !secrets.has(keySecret)) return fail(`No secret with id '${keySecret}'`);
    let info: MeasureInfo;
    try {
      info = outFmt === "raw" ? measureRaw(options, source) : await measureQcow2(options, source);
    } catch (e) {
      if (e instanceof MeasureFailure) return fail(e.message);
      throw e;
    }
    out(output === "json" ? formatMeasureJson(info) : formatMeasureHuman(info));
    return 0;
  } finally {
    await source?.close();
  }
}

async function openSource(filename: string, fmtArg: string | undefined): Promise<GuestDevice> {
  if (fmtArg !== undefined && fmtArg !== "qcow2" && fmtArg !== "raw") {
    throw new Error(isQemuDriver(fmtArg) ? `Format '${fmtArg}' is not supported (qcow2 and raw only)` : `Unknown driver '${fmtArg}'`);
  }
  return openImage(filename, fmtArg);
}
