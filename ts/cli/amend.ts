// qcow2-img amend [--object objectdef] [--image-opts] [-p] [-q] [-f fmt] [-t cache] [--force] -o options filename
//
// qemu-img 7.2 img_amend step for step: the options (-o, repeated ones joined), -o help for a
// named format before anything is opened, the image opened for writing (its backing chain too),
// the options parsed against qcow2's amend table (an option only the creation table knows gets
// qemu's "only supported for image creation" hint), then the amend itself (ops/amend.ts) with
// qemu's progress meter. What this project cannot do yet (encrypted images and their encrypt.*
// key slot options, external data files, --image-opts) is refused by name.

import "../node.js";
import { percent2 } from "../check/check.js";
import { Qcow2Error } from "../errors.js";
import { amend as amendImage, AmendError, prepareForWriting, type AmendOptions } from "../ops/amend.js";
import { UsageError } from "./args.js";
import { qemuGetopt } from "./getopt.js";
import {
  createOptionTable,
  hasHelpOption,
  isQemuDriver,
  isValidOptionList,
  openImage,
  OptionError,
  optionHelp,
  parseOptions,
  splitOptions,
  type OptionDesc,
  type OptionSet,
  QCOW2_COMMON_OPTIONS,
} from "./create.js";
import { describeOpenError, probeFormat, resolveFormat } from "./map.js";

export const AMEND_USAGE = "amend [--object objectdef] [--image-opts] [-p] [-q] [-f fmt] [-t cache] [--force] -o options filename";

/** crypto/block-luks.c's amend options (qcow2 takes them with an "encrypt." prefix). */
const LUKS_AMEND_OPTIONS: OptionDesc[] = [
  { name: "state", type: "str", help: "Select new state of affected keyslots (active/inactive)" },
  { name: "keyslot", type: "num", help: "Select a single keyslot to modify explicitly" },
  { name: "old-secret", type: "str", help: "Select all keyslots that match this password" },
  { name: "new-secret", type: "str", help: "New secret to set in the matching keyslots. Empty string to erase" },
  { name: "iter-time", type: "num", help: "Time to spend in PBKDF in milliseconds" },
];

/** block/qcow2.c qcow2_amend_opts, in table order (the order qcow2_amend_options reads them in). */
const QCOW2_AMEND_OPTIONS: OptionDesc[] = [
  ...LUKS_AMEND_OPTIONS.map((d) => ({ ...d, name: `encrypt.${d.name}` })),
  ...QCOW2_COMMON_OPTIONS,
];

/** bdrv_parse_cache_mode's names. */
const CACHE_MODES = new Set(["none", "off", "writeback", "writethrough", "directsync", "unsafe"]);

/** qemu's progress meter (util/qemu-progress.c) as img_amend sets it up: stdout, 1% steps. */
class Progress {
  private current = 0;
  private lastPrint = 0;

  constructor(
    private readonly enabled: boolean,
    private readonly out: (text: string) => void,
  ) {}

  /** qemu_progress_print(value, 0): an absolute position in percent (a C float). */
  print(value: number): void {
    if (!this.enabled) return;
    const f = Math.fround;
    let current = f(value);
    if (current > 100) current = 100;
    this.current = current;
    if (current > f(this.lastPrint + 1) || current < f(this.lastPrint - 1) || current === 0 || current === 100) {
      this.lastPrint = current;
      this.out(`    (${percent2(current)}/100%)\r`);
    }
  }

  /** amend_status_cb: `100.f * offset / total_work_size` in float arithmetic. */
  status(done: number, total: number): void {
    const f = Math.fround;
    this.print(f(f(100 * f(done)) / f(total)));
  }

  end(): void {
    if (this.enabled) this.out("\n");
  }
}

interface AmendArgs {
  optionText: string;
  fmt?: string;
  cache: string;
  progress: boolean;
  quiet: boolean;
  imageOpts: boolean;
  positional: string[];
}

export async function amend(argv: string[], out: (text: string) => void, err: (text: string) => void): Promise<number> {
  const parsed = qemuGetopt("amend", argv, ":ho:f:t:pq", [
    { name: "help", hasArg: false, short: "h" },
    { name: "object", hasArg: true },
    { name: "image-opts", hasArg: false },
    { name: "force", hasArg: false },
  ]);
  const lists: string[] = [];
  const args: AmendArgs = { optionText: "", cache: "writeback", progress: false, quiet: false, imageOpts: false, positional: parsed.positional };
  // Acted on in the order given, as qemu's getopt loop does.
  for (const { name, value } of parsed.options) {
    switch (name) {
      case "h":
        out(`usage: qcow2-img ${AMEND_USAGE}\n`);
        return 0;
      case "o":
        if (!isValidOptionList(value!)) {
          err(`qcow2-img: Invalid option list: ${value}\n`);
          return 1;
        }
        lists.push(value!);
        break;
      case "f":
        args.fmt = value!;
        break;
      case "t":
        args.cache = value!;
        break;
      case "p":
        args.progress = true;
        break;
      case "q":
        args.quiet = true;
        break;
      case "image-opts":
        args.imageOpts = true;
        break;
      // --object (a secret only encrypted images use) and --force (key slot changes) change nothing here.
    }
  }
  if (parsed.error) throw parsed.error;
  if (lists.length === 0) throw new UsageError("Must specify options (-o)");
  args.optionText = lists.join(",");
  const progress = new Progress(args.progress && !args.quiet, out);
  try {
    return await run(args, progress, out, err);
  } finally {
    progress.end();
  }
}

async function run(args: AmendArgs, progress: Progress, out: (text: string) => void, err: (text: string) => void): Promise<number> {
  const { fmt, optionText } = args;
  if (fmt !== undefined && hasHelpOption(optionText)) return printHelp(fmt, out, err);
  if (args.positional.length !== 1) {
    err("qcow2-img: Expecting one image file name\n");
    return 1;
  }
  const file = args.positional[0]!;
  if (!CACHE_MODES.has(args.cache)) {
    err(`qcow2-img: Invalid cache option: ${args.cache}\n`);
    return 1;
  }
  if (args.imageOpts) {
    err("qcow2-img: --image-opts is not supported yet\n");
    return 1;
  }

  // img_open for writing: the format (probed unless -f), then the image and its backing chain.
  let format: "qcow2" | "raw";
  try {
    const given = resolveFormat(fmt);
    const probed = await probeFormat(file, true);
    format = given ?? probed;
  } catch (e) {
    err(`qcow2-img: ${describeOpenError(file, e)}\n`);
    return 1;
  }
  if (fmt === undefined && format === "raw") {
    err(
      `WARNING: Image format was not specified for '${file}' and probing guessed raw.\n` +
        "         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n" +
        "         Specify the 'raw' format explicitly to remove the restrictions.\n",
    );
  }
  if (format === "raw") {
    err("qcow2-img: Format driver 'raw' does not support option amendment\n");
    return 1;
  }
  try {
    // The chain first, for qemu's messages about it; then what opening for writing does.
    const device = await openImage(file, "qcow2");
    await device.close();
    // An encrypted image with encrypt.* options: the refusal names the option.
    const encrypt = splitOptions(optionText).find(([name]) => name.startsWith("encrypt."));
    await prepareForWriting(file, {
      ...(encrypt ? { encrypt: { [encrypt[0].slice("encrypt.".length)]: encrypt[1] } } : {}),
      onDiagnostic: (line) => err(`${line}\n`),
    });
  } catch (e) {
    if (e instanceof AmendError) {
      err(`qcow2-img: ${e.message}\n`);
      return 1;
    }
    err(`qcow2-img: Could not open '${file}': ${e instanceof Error ? e.message : String(e)}\n`);
    return 1;
  }

  if (hasHelpOption(optionText)) return printHelp("qcow2", out, err);

  let opts: OptionSet;
  try {
    opts = parseOptions(optionText, QCOW2_AMEND_OPTIONS);
  } catch (e) {
    if (!(e instanceof OptionError)) throw e;
    let hint = e.hint;
    try {
      // qemu tries the creation options too, to say why the option is not taken.
      parseOptions(optionText, [...QCOW2_AMEND_OPTIONS, ...createOptionTable("qcow2", false)]);
      hint += "This option is only supported for image creation\n";
    } catch {
      // Not a creation option either: the first message alone.
    }
    err(`qcow2-img: ${e.message}\n${hint}`);
    return 1;
  }

  progress.print(0);
  let failure: unknown;
  try {
    await amendImage(file, {
      ...amendOptions(opts),
      onProgress: (done, total) => progress.status(done, total),
      onDiagnostic: (line) => err(`${line}\n`),
    });
  } catch (e) {
    failure = e;
  }
  progress.print(100);
  if (failure === undefined) return 0;
  if (failure instanceof AmendError) err(`qcow2-img: ${failure.message}\n${failure.hint}`);
  else if (failure instanceof Qcow2Error || failure instanceof RangeError) err(`qcow2-img: ${failure.message}\n`);
  else throw failure;
  return 1;
}

/** The library's options from qemu's parsed ones (numbers as qemu's C types take them). */
function amendOptions(opts: OptionSet): AmendOptions {
  const o: AmendOptions = {};
  const text = (name: string): string | undefined => opts.get(name)?.text;
  const num = (name: string): bigint | undefined => opts.get(name)?.value as bigint | undefined;
  const bool = (name: string): boolean | undefined => opts.get(name)?.value as boolean | undefined;
  if (opts.has("size")) o.size = num("size")!;
  if (opts.has("compat")) o.compat = text("compat")!;
  if (opts.has("backing_file")) o.backingFile = text("backing_file")!;
  if (opts.has("backing_fmt")) o.backingFormat = text("backing_fmt")!;
  if (opts.has("data_file")) o.dataFile = text("data_file")!;
  if (opts.has("data_file_raw")) o.dataFileRaw = bool("data_file_raw")!;
  if (opts.has("lazy_refcounts")) o.lazyRefcounts = bool("lazy_refcounts")!;
  // qemu keeps refcount_bits in an int: the uint64 is cut to 32 bits.
  if (opts.has("refcount_bits")) o.refcountBits = Number(BigInt.asIntN(32, num("refcount_bits")!));
  const encrypt: NonNullable<AmendOptions["encrypt"]> = {};
  if (opts.has("encrypt.state")) encrypt.state = text("encrypt.state")!;
  if (opts.has("encrypt.keyslot")) encrypt.keyslot = Number(num("encrypt.keyslot")!);
  if (opts.has("encrypt.old-secret")) encrypt.oldSecret = text("encrypt.old-secret")!;
  if (opts.has("encrypt.new-secret")) encrypt.newSecret = text("encrypt.new-secret")!;
  if (opts.has("encrypt.iter-time")) encrypt.iterTime = Number(num("encrypt.iter-time")!);
  if (Object.keys(encrypt).length > 0) o.encrypt = encrypt;
  return o;
}

/** print_amend_option_help. */
function printHelp(fmt: string, out: (text: string) => void, err: (text: string) => void): number {
  if (fmt === "qcow2" || fmt === "luks") {
    out(`Amend options for '${fmt}':\n${optionHelp(fmt === "qcow2" ? QCOW2_AMEND_OPTIONS : LUKS_AMEND_OPTIONS)}`);
    return 0;
  }
  err(isQemuDriver(fmt) ? `qcow2-img: Format driver '${fmt}' does not support option amendment\n` : `qcow2-img: Unknown file format '${fmt}'\n`);
  return 1;
}
