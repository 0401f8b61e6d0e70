// qcow2-img create [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]
//
// qemu-img's bdrv_img_create, step for step: the option table of the format (and of the file
// protocol beneath it) as QemuOpts parses it, the "Formatting ..." line printed from that table,
// the backing file opened for its size, then the format layer's checks (qcow2_co_create_opts,
// qcow2_co_create; raw through file-posix) with qemu's messages. What this project cannot make
// yet (encryption, external data files, extended L2, zstd, nocow) is refused by name.

import type { CreateOptions } from "../image/create.js";
import { strtosz as qemuStrtosz } from "./options.js";
import fs from "node:fs";
import { isQcow2Error } from "../errors.js";
import { MAX_BACKING_CHAIN_DEPTH, QCOW_MAGIC, QCOW_MAX_L1_SIZE } from "../format/constants.js";
import { readHeader, type Qcow2Header } from "../format/header.js";
import { readFully } from "../io/backend.js";
import { NodeFileBackend } from "../io/node-file.js";
import { Qcow2Image, type OpenOptions } from "../image/qcow2-image.js";
import type { CreateEncryption } from "../image/create.js";
import { OptionsError, parseObjects } from "./image-opts.js";
import { errnoText } from "./errno.js";
import type { Preallocation } from "../image/create.js";
import type { GuestDevice } from "../image/device.js";
import { parseArgs, UsageError } from "./args.js";
import { fullBackingPath, openDevice } from "./open.js";

export const CREATE_USAGE = "create [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]";

// ---------------------------------------------------------------------------------------------
// QemuOpts: qemu's option tables and its `-o key=value,...` parser (util/qemu-option.c)

export type OptionType = "str" | "bool" | "num" | "size";

export interface OptionDesc {
  name: string;
  type: OptionType;
  help: string;
  /** def_value_str: shown in the Formatting line when the option is not set. */
  def?: string;
}

/** block/qcow2.c QCOW_COMMON_OPTIONS: the tail of both the create and the amend tables. */
export const QCOW2_COMMON_OPTIONS: readonly OptionDesc[] = [
  { name: "size", type: "size", help: "Virtual disk size" },
  { name: "compat", type: "str", help: "Compatibility level (v2 [0.10] or v3 [1.1])" },
  { name: "backing_file", type: "str", help: "File name of a base image" },
  { name: "backing_fmt", type: "str", help: "Image format of the base image" },
  { name: "data_file", type: "str", help: "File name of an external data file" },
  { name: "data_file_raw", type: "bool", help: "The external data file must stay valid as a raw image" },
  { name: "lazy_refcounts", type: "bool", help: "Postpone refcount updates", def: "off" },
  { name: "refcount_bits", type: "num", help: "Width of a reference count entry in bits", def: "16" },
];

/** block/qcow2.c qcow2_create_opts, in table order (the Formatting line follows it). */
const QCOW2_OPTIONS: OptionDesc[] = [
  { name: "encryption", type: "bool", help: "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)" },
  { name: "encrypt.format", type: "str", help: "Encrypt the image, format choices: 'aes', 'luks'" },
  { name: "encrypt.key-secret", type: "str", help: "ID of secret providing qcow AES key or LUKS passphrase" },
  { name: "encrypt.cipher-alg", type: "str", help: "Name of encryption cipher algorithm" },
  { name: "encrypt.cipher-mode", type: "str", help: "Name of encryption cipher mode" },
  { name: "encrypt.ivgen-alg", type: "str", help: "Name of IV generator algorithm" },
  { name: "encrypt.ivgen-hash-alg", type: "str", help: "Name of IV generator hash algorithm" },
  { name: "encrypt.hash-alg", type: "str", help: "Name of encryption hash algorithm" },
  { name: "encrypt.iter-time", type: "num", help: "Time to spend in PBKDF in milliseconds" },
  { name: "cluster_size", type: "size", help: "qcow2 cluster size", def: "65536" },
  { name: "extended_l2", type: "bool", help: "Extended L2 tables", def: "off" },
  { name: "preallocation", type: "str", help: "Preallocation mode (allowed values: off, metadata, falloc, full)" },
  { name: "compression_type", type: "str", help: "Compression method used for image cluster compression", def: "zlib" },
  ...QCOW2_COMMON_OPTIONS,
];

/** block/raw-format.c raw_create_opts. */
const RAW_OPTIONS: OptionDesc[] = [{ name: "size", type: "size", help: "Virtual disk size" }];

/** block/file-posix.c raw_create_opts: the protocol layer under every format. */
const FILE_OPTIONS: OptionDesc[] = [
  { name: "size", type: "size", help: "Virtual disk size" },
  { name: "nocow", type: "bool", help: "Turn off copy-on-write (valid only on btrfs)" },
  { name: "preallocation", type: "str", help: "Preallocation mode (allowed values: off, falloc, full)" },
  { name: "extent_size_hint", type: "size", help: "Extent size hint for the image file, 0 to disable" },
];

export type TargetFormat = "qcow2" | "raw";

/** The format's option table followed by the protocol's (qemu_opts_append: first name wins). */
export function createOptionTable(format: TargetFormat, withProtocol = true): OptionDesc[] {
  const out: OptionDesc[] = [];
  for (const d of [...(format === "qcow2" ? QCOW2_OPTIONS : RAW_OPTIONS), ...(withProtocol ? FILE_OPTIONS : [])]) {
    if (!out.some((o) => o.name === d.name)) out.push(d);
  }
  return out;
}

/** qemu_opts_print_help: one line per option, sorted. */
export function optionHelp(table: OptionDesc[]): string {
  const types: Record<OptionType, string> = { str: "str", bool: "bool (on/off)", num: "num", size: "size" };
  const lines = table.map((d) => {
    const head = `  ${d.name}=<${types[d.type]}>`;
    return `${head.padEnd(24)} - ${d.help}`;
  });
  lines.sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
  return lines.map((l) => l + "\n").join("");
}

/** A failure with qemu's message and, as qemu's error hints, extra lines printed after it. */
export class OptionError extends Error {
  override name = "OptionError";
  readonly hint: string;
  constructor(message: string, hint = "") {
    super(message);
    this.hint = hint;
  }
}

export interface OptionValue {
  /** The text as given (bare "key" is "on", "nokey" is "off"). */
  text: string;
  /** Parsed: bigint for num/size (as qemu's uint64), boolean for bool, string for str. */
  value: bigint | boolean | string;
}

/** Set options, the last setting of each winning as in qemu_opt_find. */
export type OptionSet = Map<string, OptionValue>;

const U64 = 2n ** 64n;
const INT64_MAX = 2n ** 63n - 1n;

/** qemu's view of a uint64 printed with PRId64. */
export function asInt64(v: bigint): bigint {
  return v > INT64_MAX ? v - U64 : v;
}

/** qemu_strtosz as create uses it: the value, "range" past 2^64 - 1, undefined when not a size. */
function strtosz(text: string): bigint | "range" | undefined {
  const r = qemuStrtosz(text);
  return r.ok ? r.value : r.error === "range" ? "range" : undefined;
}

/** qemu_strtou64(s, base 0): "range" past 2^64 - 1, negatives wrap as strtoull does. */
function strtou64(text: string): bigint | "range" | undefined {
  const m = /^\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)$/.exec(text);
  if (!m) return undefined;
  const digits = m[2]!;
  const magnitude = /^0[0-7]+$/.test(digits) ? BigInt(`0o${digits.slice(1)}`) : BigInt(digits);
  if (magnitude >= U64) return "range";
  return m[1] === "-" && magnitude !== 0n ? U64 - magnitude : magnitude;
}

/** qemu_strtoi64(s, base 0), as the QAPI keyval visitor reads an int. */
export function strtoi64(text: string): bigint | undefined {
  const m = /^\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)$/.exec(text);
  if (!m) return undefined;
  const digits = m[2]!;
  const magnitude = /^0[0-7]+$/.test(digits) ? BigInt(`0o${digits.slice(1)}`) : BigInt(digits);
  const value = m[1] === "-" ? -magnitude : magnitude;
  return value > INT64_MAX || value < -INT64_MAX - 1n ? undefined : value;
}

/** qapi_bool_parse. */
function parseBool(text: string): boolean | undefined {
  if (["on", "yes", "true", "y"].includes(text)) return true;
  if (["off", "no", "false", "n"].includes(text)) return false;
  return undefined;
}

const SIZE_HINT = "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.\n";

/** qemu_opt_parse for one option of the table. */
function parseOptionValue(desc: OptionDesc, text: string): bigint | boolean | string {
  switch (desc.type) {
    case "str":
      return text;
    case "bool": {
      const b = parseBool(text);
      if (b === undefined) throw new OptionError(`Parameter '${desc.name}' expects 'on' or 'off'`);
      return b;
    }
    case "num": {
      const n = strtou64(text);
      if (n === "range") throw new OptionError(`Value '${text}' is too large for parameter '${desc.name}'`);
      if (n === undefined) throw new OptionError(`Parameter '${desc.name}' expects a number`);
      return n;
    }
    case "size": {
      const n = strtosz(text);
      if (n === "range") throw new OptionError(`Value '${text}' is out of range for parameter '${desc.name}'`);
      if (n === undefined) throw new OptionError(`Parameter '${desc.name}' expects a non-negative number below 2^64`, SIZE_HINT);
      return n;
    }
  }
}

/** get_opt_value: text up to a single comma, ",," standing for a comma. Returns [value, next]. */
function optValue(s: string, i: number): [string, number] {
  let value = "";
  for (;;) {
    const comma = s.indexOf(",", i);
    if (comma < 0) return [value + s.slice(i), s.length];
    if (s[comma + 1] === ",") {
      value += s.slice(i, comma + 1);
      i = comma + 2;
      continue;
    }
    return [value + s.slice(i, comma), comma];
  }
}

/** The items of an option string as qemu's get_opt_name_value splits them: [name, value]. */
export function splitOptions(text: string): Array<[string, string]> {
  const out: Array<[string, string]> = [];
  let i = 0;
  while (i < text.length) {
    const rest = text.slice(i);
    const len = rest.search(/[=,]/);
    const end = len < 0 ? rest.length : len;
    let name: string;
    let value: string;
    if (rest[end] !== "=") {
      // A bare word is a flag: "key" is key=on, "nokey" is key=off.
      name = rest.slice(0, end);
      if (name.startsWith("no")) {
        name = name.slice(2);
        value = "off";
      } else {
        value = "on";
      }
      i += end;
    } else {
      name = rest.slice(0, end);
      [value, i] = optValue(text, i + end + 1);
    }
    if (text[i] === ",") i++;
    out.push([name, value]);
  }
  return out;
}

/** qemu_opts_do_parse into `into` (later settings replace earlier ones). */
export function parseOptions(text: string, table: OptionDesc[], into: OptionSet = new Map()): OptionSet {
  for (const [name, text_] of splitOptions(text)) {
    if (name === "id") continue;
    const desc = table.find((d) => d.name === name);
    if (!desc) throw new OptionError(`Invalid parameter '${name}'`);
    into.set(name, { text: text_, value: parseOptionValue(desc, text_) });
  }
  return into;
}

/** qemu-img's is_valid_option_list: not empty, no leading comma, no unpaired trailing comma. */
export function isValidOptionList(text: string): boolean {
  if (text === "" || text.startsWith(",")) return false;
  const trailing = text.length - text.replace(/,+$/, "").length;
  return trailing % 2 === 0;
}

/** has_help_option: an item that is exactly "help" or "?". */
export function hasHelpOption(text: string): boolean {
  let i = 0;
  while (i < text.length) {
    const [item, next] = optValue(text, i);
    if (item === "help" || item === "?") return true;
    i = next < text.length ? next + 1 : next;
  }
  return false;
}

/** qemu_opts_print: set options and defaults in table order, strings with commas doubled. */
export function formatOptions(options: OptionSet, table: OptionDesc[]): string {
  const parts: string[] = [];
  for (const d of table) {
    const opt = options.get(d.name);
    if (opt === undefined && d.def === undefined) continue;
    if (d.type === "str") parts.push(`${d.name}=${(opt?.text ?? d.def!).replaceAll(",", ",,")}`);
    else if (opt !== undefined && (d.type === "size" || d.type === "num")) parts.push(`${d.name}=${asInt64(opt.value as bigint)}`);
    else parts.push(`${d.name}=${opt?.text ?? d.def!}`);
  }
  return parts.join(" ");
}

/** The options this project cannot honour yet, refused by name rather than ignored. */
export function unsupportedOption(options: OptionSet): string | undefined {
  for (const [name, opt] of options) {
    if (name === "encrypt.ivgen-hash-alg") return name;
    if (name === "data_file") return name;
    if ((name === "extended_l2" || name === "nocow") && opt.value === true) return `${name}=on`;
    if (name === "compression_type" && opt.text === "zstd") return `${name}=zstd`;
  }
  return undefined;
}

// ---------------------------------------------------------------------------------------------
// Formats qemu knows that this project does not write.

/** qemu 7.2's BlockdevDriver names (what a qcow2 header's backing format may say). */
const QEMU_DRIVERS = new Set(
  (
    "blkdebug blklogwrites blkreplay blkverify bochs cloop compress copy-before-write copy-on-read dmg file " +
    "snapshot-access ftp ftps gluster host_cdrom host_device http https iscsi iser luks nbd nfs null-aio null-co nvme " +
    "parallels preallocate qcow qcow2 qed quorum raw rbd replication ssh throttle vdi vhdx vmdk vpc vvfat"
  ).split(" "),
);

/** qemu formats with image creation, other than the two this project writes. */
export const OTHER_CREATE_FORMATS = new Set(["qcow", "qed", "vdi", "vhdx", "vmdk", "vpc", "parallels", "luks", "file"]);

export function isQemuDriver(name: string): boolean {
  return QEMU_DRIVERS.has(name);
}

/** strerror for the errno codes a file open or truncate can meet, else the message. */
export function strerror(cause: unknown): string {
  return errnoText(cause) ?? (cause instanceof Error ? cause.message : String(cause));
}

function findCode(cause: unknown): string | undefined {
  for (let c: unknown = cause, depth = 0; c instanceof Error && depth < 5; c = (c as Error & { cause?: unknown }).cause, depth++) {
    const code = (c as NodeJS.ErrnoException).code;
    if (typeof code === "string" && /^E[A-Z]+$/.test(code)) return code;
  }
  return undefined;
}

// ---------------------------------------------------------------------------------------------
// The command

export class CreateFailure extends Error {
  readonly hint: string;
  constructor(message: string, hint = "") {
    super(message);
    this.hint = hint;
  }
}

const SIZE_SYNTAX =
  "Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n" +
  "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.";

/** cvtnum("image size", text), its two kinds of failure with qemu's lines. */
export function imageSizeArgument(text: string): bigint | string {
  const v = strtosz(text);
  if (v === undefined) return SIZE_SYNTAX;
  if (v === "range" || v > INT64_MAX) return "Invalid image size specified. Must be between 0 and 9223372036854775807.";
  return v;
}

/** Prefix every line of a message as qemu's error_report does for each call. */
export function reportLines(message: string): string {
  return message
    .split("\n")
    .map((l) => `qcow2-img: ${l}\n`)
    .join("");
}

export async function create(argv: string[], out: (text: string) => void, err: (text: string) => void): Promise<number> {
  const args = parseArgs(argv, { withValue: ["-f", "-o", "-b", "-F", "--object"], flags: ["-q", "-u", "-h", "--help"] });
  if (args.flags.has("-h") || args.flags.has("--help")) {
    out(`usage: qcow2-img ${CREATE_USAGE}\n`);
    return 0;
  }
  for (const o of args.all.get("-o") ?? []) {
    if (!isValidOptionList(o)) {
      err(`qcow2-img: Invalid option list: ${o}\n`);
      return 1;
    }
  }
  const fmt = args.values.get("-f") ?? "raw";
  const optionText = (args.all.get("-o") ?? []).join(",");
  const filename = args.positional[0];

  if (optionText !== "" && hasHelpOption(optionText)) {
    if (fmt !== "qcow2" && fmt !== "raw") {
      err(`qcow2-img: ${OTHER_CREATE_FORMATS.has(fmt) ? `Format '${fmt}' is not supported (qcow2 and raw only)` : `Unknown file format '${fmt}'`}\n`);
      return 1;
    }
    const table = createOptionTable(fmt, filename !== undefined);
    if (filename !== undefined) out(`Supported options:\n${optionHelp(table)}`);
    else {
      out(`Supported ${fmt} options:\n${optionHelp(table)}`);
      out("\nThe protocol level may support further options.\nSpecify the target filename to include those options.\n");
    }
    return 0;
  }
  if (filename === undefined) throw new UsageError("Expecting image file name");
  let secrets: Map<string, Uint8Array>;
  try {
    secrets = await parseObjects(args.all.get("--object") ?? []);
  } catch (e) {
    if (!(e instanceof OptionsError)) throw e;
    err(`qcow2-img: ${e.message}\n`);
    return 1;
  }

  let imgSize: bigint | undefined;
  if (args.positional.length > 1) {
    const size = imageSizeArgument(args.positional[1]!);
    if (typeof size === "string") {
      err(reportLines(size));
      return 1;
    }
    imgSize = size;
  }
  if (args.positional.length > 2) throw new UsageError(`Unexpected argument: ${args.positional[2]}`);

  try {
    await imgCreate({
      filename,
      fmt,
      options: optionText === "" ? undefined : optionText,
      size: imgSize,
      backingFile: args.values.get("-b"),
      backingFormat: args.values.get("-F"),
      unsafe: args.flags.has("-u"),
      quiet: args.flags.has("-q"),
      out,
      secrets,
    });
  } catch (e) {
    if (e instanceof CreateFailure || e instanceof OptionError) {
      err(`qcow2-img: ${filename}: ${e.message}\n${e.hint}`);
      return 1;
    }
    throw e;
  }
  return 0;
}

interface ImgCreateRequest {
  filename: string;
  fmt: string;
  options: string | undefined;
  size: bigint | undefined;
  backingFile: string | undefined;
  backingFormat: string | undefined;
  unsafe: boolean;
  quiet: boolean;
  out: (text: string) => void;
  /** Secrets from --object, by id. */
  secrets: Map<string, Uint8Array>;
}

/** block.c bdrv_img_create. */
async function imgCreate(r: ImgCreateRequest): Promise<void> {
  if (r.fmt !== "qcow2" && r.fmt !== "raw") {
    if (OTHER_CREATE_FORMATS.has(r.fmt)) throw new CreateFailure(`Format '${r.fmt}' is not supported (qcow2 and raw only)`);
    throw new CreateFailure(`Unknown file format '${r.fmt}'`);
  }
  const fmt: TargetFormat = r.fmt;
  const table = createOptionTable(fmt);
  const opts: OptionSet = r.options === undefined ? new Map() : parseOptions(r.options, table);

  const unsupported = unsupportedOption(opts);
  if (unsupported !== undefined) throw new CreateFailure(`Option '${unsupported}' is not supported yet`);

  if (!opts.has("size")) {
    // qemu sets size to (uint64) -1 when none is given, and that is what "no size" means below.
    const v = r.size ?? U64 - 1n;
    opts.set("size", { text: String(v), value: v });
  } else if (r.size !== undefined) {
    throw new CreateFailure("The image size must be specified only once");
  }
  if (r.backingFile !== undefined) {
    if (fmt === "raw") throw new CreateFailure(`Backing file not supported for file format '${fmt}'`);
    opts.set("backing_file", { text: r.backingFile, value: r.backingFile });
  }
  if (r.backingFormat !== undefined) {
    if (fmt === "raw") throw new CreateFailure(`Backing file format not supported for file format '${fmt}'`);
    opts.set("backing_fmt", { text: r.backingFormat, value: r.backingFormat });
  }
  const backingFile = opts.get("backing_file")?.text;
  if (backingFile !== undefined) {
    if (backingFile === r.filename) throw new CreateFailure("Error: Trying to create an image with the same filename as the backing file");
    if (backingFile === "") throw new CreateFailure("Expected backing file name, got empty string");
  }
  const backingFmt = opts.get("backing_fmt")?.text;

  let size = opts.get("size")!.value as bigint;
  if (backingFile !== undefined && !r.unsafe) {
    const full = fullBackingPath(r.filename, backingFile);
    const { format, virtualSize } = await probeBacking(full, backingFmt);
    if (backingFmt === undefined) {
      // qemu's hint has no newline after it.
      throw new CreateFailure("Backing file specified without backing format", `Detected format of ${format}.`);
    }
    if (size === U64 - 1n) {
      // bdrv_getlength counts whole sectors.
      size = ((BigInt(virtualSize) + 511n) / 512n) * 512n;
      opts.set("size", { text: String(size), value: size });
    }
  } else if (backingFile !== undefined && backingFmt === undefined) {
    throw new CreateFailure("Backing file specified without backing format");
  }
  if (size === U64 - 1n) throw new CreateFailure("Image creation needs a size parameter");

  if (!r.quiet) r.out(`Formatting '${r.filename}', fmt=${fmt} ${formatOptions(opts, table)}\n`);

  if (fmt === "raw") await createRaw(r.filename, opts);
  else await createQcow2(r.filename, opts, r.secrets);
}

/** Open the backing file as qemu does for its size (and to detect its format). */
async function probeBacking(full: string, format: string | undefined): Promise<{ format: string; virtualSize: number }> {
  const hint = "Could not open backing image.\n";
  if (format !== undefined && format !== "qcow2" && format !== "raw") {
    if (isQemuDriver(format)) throw new CreateFailure(`Backing format '${format}' is not supported (qcow2 and raw only)`, hint);
    throw new CreateFailure(`Unknown driver '${format}'`, hint);
  }
  try {
    const device = await openImage(full, format);
    const result = { format: device.format, virtualSize: device.virtualSize };
    await device.close();
    return result;
  } catch (e) {
    throw new CreateFailure((e as Error).message, hint);
  }
}

/**
 * Open an image and its backing chain with the messages of qemu's open path: a file that cannot
 * be opened ("Could not open 'f': No such file or directory"), a qcow2 that is not one, and each
 * level of a broken chain ("Could not open backing file: ...").
 */
export async function openImage(file: string, format: "qcow2" | "raw" | undefined, options: Pick<OpenOptions, "snapshot" | "snapshotAtCurrentSize"> = {}): Promise<GuestDevice> {
  await checkChain(file, format, 0);
  return openDevice(file, format, {
    ...options,
    resolveBacking: (backing, from) => NodeFileBackend.open(fullBackingPath(from, backing), { readOnly: true }),
  });
}

async function checkChain(file: string, format: string | undefined, depth: number): Promise<void> {
  let backend: NodeFileBackend;
  try {
    backend = await NodeFileBackend.open(file, { readOnly: true });
  } catch (e) {
    throw new Error(`Could not open '${file}': ${strerror(e)}`);
  }
  let header: Qcow2Header | undefined;
  try {
    const magic = new Uint8Array(4);
    const n = Math.min(4, await backend.size());
    await readFully(backend, magic.subarray(0, n), 0);
    const isQcow2 = n === 4 && new DataView(magic.buffer).getUint32(0) === QCOW_MAGIC;
    if (format === "qcow2" && !isQcow2) throw new Error("Image is not in qcow2 format");
    if (format === "qcow2" || (format === undefined && isQcow2)) header = await readHeader(backend);
  } finally {
    await backend.close();
  }
  if (header?.backingFile === undefined || header.backingFile === "") return;
  if (depth >= MAX_BACKING_CHAIN_DEPTH) return;
  const fmt = header.extensions.backingFormat;
  try {
    await checkChain(fullBackingPath(file, header.backingFile), fmt === "qcow2" || fmt === "raw" ? fmt : undefined, depth + 1);
  } catch (e) {
    throw new Error(`Could not open backing file: ${(e as Error).message}`);
  }
}

async function createRaw(filename: string, opts: OptionSet): Promise<void> {
  const preallocText = opts.get("preallocation")?.text ?? "off";
  if (!["off", "metadata", "falloc", "full"].includes(preallocText)) throw new CreateFailure(`invalid parameter value: ${preallocText}`);
  checkExtentSizeHint(opts);
  const requested = opts.get("size")!.value as bigint;
  const size = ((requested + 511n) / 512n) * 512n;
  let fd: fs.promises.FileHandle;
  try {
    fd = await fs.promises.open(filename, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_TRUNC, 0o644);
  } catch (e) {
    throw new CreateFailure(`Could not create '${filename}': ${strerror(e)}`);
  }
  try {
    if (preallocText === "metadata") throw new CreateFailure("Unsupported preallocation mode: metadata");
    if (size > BigInt(Number.MAX_SAFE_INTEGER)) throw new CreateFailure("The image size is too large for file format 'raw'");
    const n = Number(size);
    try {
      if (preallocText === "off") {
        await fd.truncate(n);
        // qemu's allocate_first_block: the first block is written so alignment probing finds it.
        if (n > 0) await fd.write(new Uint8Array(n < 4096 ? 512 : 4096), 0, undefined, 0);
      } else {
        // "full" writes zeros; "falloc" reserves the space, which without fallocate is the same.
        const chunk = new Uint8Array(Math.min(n, 1 << 20));
        for (let pos = 0; pos < n; pos += chunk.length) await fd.write(chunk, 0, Math.min(chunk.length, n - pos), pos);
      }
    } catch (e) {
      if (findCode(e) === "EFBIG" || findCode(e) === "EINVAL") throw new CreateFailure("The image size is too large for file format 'raw'");
      throw new CreateFailure(`Could not resize file: ${strerror(e)}`);
    }
  } finally {
    await fd.close();
  }
}

function checkExtentSizeHint(opts: OptionSet): void {
  const hint = opts.get("extent_size_hint");
  if (hint !== undefined && (hint.value as bigint) > 0xffffffffn) throw new CreateFailure("Extent size hint is too large");
}

/** The QAPI visitor's reading of the enum options (BlockdevCreateOptionsQcow2 field order). */
function qcow2Visit(opts: OptionSet): { version: 2 | 3; preallocation: Preallocation; refcountBits: bigint } {
  const compat = opts.get("compat")?.text;
  let version: 2 | 3 = 3;
  if (compat !== undefined) {
    const v = { "0.10": 2, "1.1": 3, v2: 2, v3: 3 }[compat];
    if (v === undefined) throw new CreateFailure(`Parameter 'version' does not accept value '${compat}'`);
    version = v as 2 | 3;
  }
  const backingFmt = opts.get("backing_fmt")?.text;
  if (backingFmt !== undefined && !isQemuDriver(backingFmt)) {
    throw new CreateFailure(`Parameter 'backing-fmt' does not accept value '${backingFmt}'`);
  }
  const prealloc = opts.get("preallocation")?.text ?? "off";
  if (!["off", "metadata", "falloc", "full"].includes(prealloc)) {
    throw new CreateFailure(`Parameter 'preallocation' does not accept value '${prealloc}'`);
  }
  let refcountBits = 16n;
  const rb = opts.get("refcount_bits");
  if (rb !== undefined) {
    const v = strtoi64(rb.text);
    if (v === undefined) throw new CreateFailure("Parameter 'refcount-bits' expects integer");
    refcountBits = v;
  }
  const compression = opts.get("compression_type")?.text ?? "zlib";
  if (compression !== "zlib" && compression !== "zstd") {
    throw new CreateFailure(`Parameter 'compression-type' does not accept value '${compression}'`);
  }
  return { version, preallocation: prealloc as Preallocation, refcountBits };
}

function isPowerOfTwo(v: bigint): boolean {
  return v > 0n && (v & (v - 1n)) === 0n;
}

/** validate_cluster_size. */
export function clusterSizeError(clusterSize: bigint, extendedL2: boolean): string | undefined {
  if (!isPowerOfTwo(clusterSize) || clusterSize < 512n || clusterSize > 2n * 1024n * 1024n) {
    return "Cluster size must be a power of two between 512 and 2048k";
  }
  if (extendedL2 && clusterSize < 16384n) return "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes";
  return undefined;
}

/** block/qcow2.c qcow2_co_create_opts + qcow2_co_create: the file first, the checks, then the image. */
async function createQcow2(filename: string, opts: OptionSet, secrets: Map<string, Uint8Array>): Promise<void> {
  checkExtentSizeHint(opts);
  try {
    const fd = await fs.promises.open(filename, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_TRUNC, 0o644);
    await fd.close();
  } catch (e) {
    throw new CreateFailure(`Could not create '${filename}': ${strerror(e)}`);
  }
  try {
    await formatQcow2(filename, opts, secrets);
  } catch (e) {
    // Like qemu, a failed creation leaves no file behind.
    await fs.promises.rm(filename, { force: true }).catch(() => undefined);
    throw e;
  }
}

/**
 * The qcow2 creation settings an option set asks for, checked as qemu checks them (its messages);
 * `size` in bytes, rounded up to 512. convert's -o goes through here too.
 */
export function qcow2Settings(opts: OptionSet, secrets: Map<string, Uint8Array> = new Map()): { size: number; options: Omit<CreateOptions, "size"> } {
  const { version, preallocation, refcountBits } = qcow2Visit(opts);
  const requested = opts.get("size")!.value as bigint;
  if (requested > INT64_MAX) throw new CreateFailure("Could not resize image: Image size cannot be negative");
  const size = ((requested + 511n) / 512n) * 512n;
  const clusterSize = (opts.get("cluster_size")?.value as bigint | undefined) ?? 65536n;
  const extendedL2 = opts.get("extended_l2")?.value === true;
  const lazyRefcounts = opts.get("lazy_refcounts")?.value === true;
  const backingFile = opts.get("backing_file")?.text;
  const backingFormat = opts.get("backing_fmt")?.text;
  const use = "(use version=v3 or greater)";

  if (extendedL2 && version < 3) throw new CreateFailure(`Extended L2 entries are only supported with compatibility level 1.1 and above ${use}`);
  const csError = clusterSizeError(clusterSize, extendedL2);
  if (csError) throw new CreateFailure(csError);
  if (backingFile !== undefined && preallocation !== "off" && !extendedL2) {
    throw new CreateFailure("Backing file and preallocation can only be used at the same time if extended_l2 is on");
  }
  if (backingFormat !== undefined && backingFile === undefined) throw new CreateFailure("Backing format cannot be used without backing file");
  if (version < 3 && lazyRefcounts) throw new CreateFailure(`Lazy refcounts only supported with compatibility level 1.1 and above ${use}`);
  if (refcountBits > 64n || !isPowerOfTwo(refcountBits)) throw new CreateFailure("Refcount width must be a power of two and may not exceed 64 bits");
  if (version < 3 && refcountBits !== 16n) {
    throw new CreateFailure(`Different refcount widths than 16 bits require compatibility level 1.1 or above ${use}`);
  }
  if (opts.get("data_file_raw")?.value === true) throw new CreateFailure("data-file-raw requires data-file");
  const compression = opts.get("compression_type")?.text ?? "zlib";
  if (compression !== "zlib" && version < 3) {
    throw new CreateFailure(`Non-zlib compression type is only supported with compatibility level 1.1 and above ${use}`);
  }
  // qcow2_grow_l1_table's limit, reported by bdrv_img_create for -EFBIG.
  const l1Entries = (size + clusterSize * (clusterSize / 8n) - 1n) / (clusterSize * (clusterSize / 8n));
  if (l1Entries * 8n > BigInt(QCOW_MAX_L1_SIZE)) {
    throw new CreateFailure("The image size is too large for file format 'qcow2' (try using a larger cluster size)");
  }
  if (size > BigInt(Number.MAX_SAFE_INTEGER)) throw new CreateFailure(`Option 'size' above 2^53 (${size}) is not supported yet`);
  const encryption = encryptionSettings(opts, secrets);
  if (encryption && preallocation !== "off") throw new CreateFailure(`Option 'preallocation=${preallocation}' with encryption is not supported yet`);

  return {
    size: Number(size),
    options: {
      version,
      clusterSize: Number(clusterSize),
      refcountBits: Number(refcountBits),
      lazyRefcounts,
      preallocation,
      ...(backingFile !== undefined ? { backingFile } : {}),
      ...(backingFormat !== undefined ? { backingFormat } : {}),
      ...(encryption ? { encryption } : {}),
    },
  };
}

/** qcow2_co_create_opts' encryption options (-o encrypt.format=…,encrypt.key-secret=…, encryption=on). */
function encryptionSettings(opts: OptionSet, secrets: Map<string, Uint8Array>): CreateEncryption | undefined {
  let format = opts.get("encrypt.format")?.text;
  if (format === undefined && opts.get("encryption")?.value === true) format = "aes";
  const keySecret = opts.get("encrypt.key-secret")?.text;
  const luksOnly = ["encrypt.cipher-alg", "encrypt.cipher-mode", "encrypt.ivgen-alg", "encrypt.hash-alg", "encrypt.iter-time"];
  if (format === undefined) {
    if (keySecret !== undefined || luksOnly.some((k) => opts.has(k))) throw new CreateFailure("Parameter 'encrypt.format' is missing");
    return undefined;
  }
  if (format !== "aes" && format !== "luks") throw new CreateFailure(`Parameter 'format' does not accept value '${format}'`);
  if (keySecret === undefined) throw new CreateFailure("Parameter 'encrypt.key-secret' is required for cipher");
  const passphrase = secrets.get(keySecret);
  if (passphrase === undefined) throw new CreateFailure(`No secret with id '${keySecret}'`);
  const out: CreateEncryption = { format, passphrase };
  if (format === "aes") {
    const extra = luksOnly.find((k) => opts.has(k));
    if (extra !== undefined) throw new CreateFailure(`Parameter '${extra.slice("encrypt.".length)}' is unexpected`);
    return out;
  }
  const pick = <T extends string>(key: string, allowed: readonly T[]): T | undefined => {
    const v = opts.get(key)?.text;
    if (v === undefined) return undefined;
    if (!(allowed as readonly string[]).includes(v)) throw new CreateFailure(`Option '${key}=${v}' is not supported yet (${allowed.join(", ")})`);
    return v as T;
  };
  const cipherAlg = pick("encrypt.cipher-alg", ["aes-128", "aes-256"] as const);
  const cipherMode = pick("encrypt.cipher-mode", ["xts", "cbc"] as const);
  const ivgenAlg = pick("encrypt.ivgen-alg", ["plain64"] as const);
  const hashAlg = pick("encrypt.hash-alg", ["sha1", "sha256", "sha384", "sha512"] as const);
  const iterTime = opts.get("encrypt.iter-time")?.value as bigint | undefined;
  if (cipherAlg) out.cipherAlg = cipherAlg;
  if (cipherMode) out.cipherMode = cipherMode;
  if (ivgenAlg) out.ivgenAlg = ivgenAlg;
  if (hashAlg) out.hashAlg = hashAlg;
  if (iterTime !== undefined) out.iterTime = Number(iterTime);
  return out;
}

async function formatQcow2(filename: string, opts: OptionSet, secrets: Map<string, Uint8Array>): Promise<void> {
  const { size, options } = qcow2Settings(opts, secrets);
  const backend = await NodeFileBackend.open(filename, { readOnly: false, create: true });
  try {
    const image = await Qcow2Image.create(backend, { size, ...options, backing: "none" });
    await image.close();
  } catch (e) {
    await backend.close().catch(() => undefined);
    if (isQcow2Error(e) || e instanceof RangeError) throw new CreateFailure((e as Error).message);
    throw new CreateFailure(`Could not write the image: ${strerror(e)}`);
  }
}
