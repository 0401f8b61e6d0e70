// qemu-img's option parsing: glibc getopt_long over an option string that starts with ':' (so
// getopt itself prints nothing), arguments permuted so that options may follow the operands, long
// options matched by unique prefix. qemu-img reports what getopt returns with the argument it
// stopped at (argv[optind - 1]): "unrecognized option '-x'", "missing argument for option '-b'".

import { UsageError } from "./args.js";

export interface LongOption {
  name: string;
  hasArg: boolean;
  /** The short letter it stands for ("U" for --force-share); without one it is reported by `val` or its name. */
  short?: string;
  /** What it is reported as when not by `short`. */
  val?: string;
}

export type GetoptEvent =
  | { kind: "option"; opt: string; arg?: string }
  /** An option getopt does not know, or a long option given a value it does not take; `arg` as qemu names it. */
  | { kind: "unrecognized"; opt?: undefined; arg: string }
  /** An option whose value is missing; `arg` as qemu names it. */
  | { kind: "missing"; opt?: undefined; arg: string }
  | { kind: "end"; opt?: undefined; arg?: undefined };

/**
 * glibc getopt_long in its default (permuting) mode, one option per next() call, as qemu-img's
 * loops call it. `argv` includes the command name (qemu's argv[0]); `optstring` is qemu's, leading
 * ':' included or not (errors are always returned, never printed).
 */
export class Getopt {
  /** The arguments, permuted as getopt leaves them (options first, then the operands). */
  readonly argv: string[];
  private readonly shortopts: string;
  private readonly longopts: LongOption[];
  private optind = 1;
  private nextchar = "";
  private firstNonopt = 1;
  private lastNonopt = 1;
  private done = false;

  constructor(argv: string[], optstring: string, longopts: LongOption[] = []) {
    this.argv = [...argv];
    this.shortopts = optstring.startsWith(":") ? optstring.slice(1) : optstring;
    this.longopts = longopts;
  }

  /** The operands, once next() has returned "end" (getopt's argv[optind..argc)). */
  operands(): string[] {
    return this.argv.slice(this.optind);
  }

  /** glibc's exchange(): the skipped operands move after the options that followed them. */
  private exchange(): void {
    const { argv, firstNonopt, lastNonopt, optind } = this;
    const nonopts = argv.slice(firstNonopt, lastNonopt);
    const opts = argv.slice(lastNonopt, optind);
    argv.splice(firstNonopt, optind - firstNonopt, ...opts, ...nonopts);
    this.firstNonopt += optind - lastNonopt;
    this.lastNonopt = optind;
  }

  next(): GetoptEvent {
    if (this.done) return { kind: "end" };
    const argv = this.argv;
    const argc = argv.length;
    const isOperand = (a: string): boolean => a[0] !== "-" || a.length === 1;
    const named = (kind: "unrecognized" | "missing"): GetoptEvent => ({ kind, arg: argv[this.optind - 1]! });
    if (this.nextchar === "") {
      if (this.lastNonopt > this.optind) this.lastNonopt = this.optind;
      if (this.firstNonopt > this.optind) this.firstNonopt = this.optind;
      if (this.firstNonopt !== this.lastNonopt && this.lastNonopt !== this.optind) this.exchange();
      else if (this.lastNonopt !== this.optind) this.firstNonopt = this.optind;
      while (this.optind < argc && isOperand(argv[this.optind]!)) this.optind++;
      this.lastNonopt = this.optind;
      if (this.optind !== argc && argv[this.optind] === "--") {
        this.optind++;
        if (this.firstNonopt !== this.lastNonopt && this.lastNonopt !== this.optind) this.exchange();
        else if (this.firstNonopt === this.lastNonopt) this.firstNonopt = this.optind;
        this.lastNonopt = argc;
        this.optind = argc;
      }
      if (this.optind === argc) {
        if (this.firstNonopt !== this.lastNonopt) this.optind = this.firstNonopt;
        this.done = true;
        return { kind: "end" };
      }
      const arg = argv[this.optind]!;
      if (arg.startsWith("--")) return this.longOption(arg);
      this.nextchar = arg.slice(1);
    }
    const c = this.nextchar[0]!;
    this.nextchar = this.nextchar.slice(1);
    if (this.nextchar === "") this.optind++;
    const at = c === ":" || c === ";" ? -1 : this.shortopts.indexOf(c);
    if (at < 0) return named("unrecognized");
    if (this.shortopts[at + 1] !== ":") return { kind: "option", opt: c };
    if (this.shortopts[at + 2] === ":") {
      // An optional argument: only when attached ("-ovalue").
      const value = this.nextchar;
      if (value !== "") this.optind++;
      this.nextchar = "";
      return value !== "" ? { kind: "option", opt: c, arg: value } : { kind: "option", opt: c };
    }
    let value: string;
    if (this.nextchar !== "") {
      value = this.nextchar;
      this.optind++;
    } else if (this.optind === argc) {
      return named("missing");
    } else {
      value = argv[this.optind++]!;
    }
    this.nextchar = "";
    return { kind: "option", opt: c, arg: value };
  }

  private longOption(arg: string): GetoptEvent {
    const argv = this.argv;
    const eq = arg.indexOf("=");
    const name = arg.slice(2, eq < 0 ? undefined : eq);
    const exact = this.longopts.find((o) => o.name === name);
    const prefixed = this.longopts.filter((o) => o.name.startsWith(name));
    const option = exact ?? (prefixed.length === 1 ? prefixed[0] : undefined);
    this.optind++;
    this.nextchar = "";
    if (!option) return { kind: "unrecognized", arg: argv[this.optind - 1]! };
    if (eq >= 0) {
      if (!option.hasArg) return { kind: "unrecognized", arg: argv[this.optind - 1]! };
      return { kind: "option", opt: reported(option), arg: arg.slice(eq + 1) };
    }
    if (!option.hasArg) return { kind: "option", opt: reported(option) };
    if (this.optind >= argv.length) return { kind: "missing", arg: argv[this.optind - 1]! };
    return { kind: "option", opt: reported(option), arg: argv[this.optind++]! };
  }
}

function reported(option: LongOption): string {
  return option.short ?? option.val ?? option.name;
}

export interface GetoptResult {
  /** Options in the order given: the short letter, or the long option's `val` or name. */
  options: Array<{ name: string; value?: string }>;
  /** The operands (getopt's argv[optind..argc) once it is done). */
  positional: string[];
  /** The first error getopt met; the options before it are in `options`, as qemu-img acts on them first. */
  error?: UsageError;
}

/**
 * The whole getopt loop at once for `command` (argv without the command name; `shortopts` with or
 * without qemu's leading ':'). Callers act on `options` in order, then throw `error` if set.
 */
export function qemuGetopt(command: string, argv: string[], shortopts: string, longopts: LongOption[]): GetoptResult {
  const getopt = new Getopt([command, ...argv], shortopts, longopts);
  const result: GetoptResult = { options: [], positional: [] };
  for (let e = getopt.next(); e.kind !== "end"; e = getopt.next()) {
    if (e.kind === "unrecognized") {
      result.error = new UsageError(`unrecognized option '${e.arg}'`);
      return result;
    }
    if (e.kind === "missing") {
      result.error = new UsageError(`missing argument for option '${e.arg}'`);
      return result;
    }
    result.options.push({ name: e.opt, ...(e.arg !== undefined ? { value: e.arg } : {}) });
  }
  result.positional = getopt.operands();
  return result;
}
