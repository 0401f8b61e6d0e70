// A small getopt for qemu-img style command lines: short flags, --long and --long=value.

export interface OptionSpec {
  /** Flags taking a value: "-f", "--output". */
  withValue: string[];
  /** Flags without a value: "-U", "--backing-chain". */
  flags: string[];
}

export interface ParsedArgs {
  /** The last value of each flag. */
  values: Map<string, string>;
  /** Every value of each flag, in order (qemu-img joins repeated -o flags). */
  all: Map<string, string[]>;
  flags: Set<string>;
  positional: string[];
}

export class UsageError extends Error {
  override name = "UsageError";
}

export function parseArgs(argv: string[], spec: OptionSpec): ParsedArgs {
  const out: ParsedArgs = { values: new Map(), all: new Map(), flags: new Set(), positional: [] };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === "--") {
      out.positional.push(...argv.slice(i + 1));
      break;
    }
    if (!arg.startsWith("-") || arg === "-") {
      out.positional.push(arg);
      continue;
    }
    const eq = arg.startsWith("--") ? arg.indexOf("=") : -1;
    const name = eq > 0 ? arg.slice(0, eq) : arg.startsWith("--") ? arg : arg.slice(0, 2);
    if (spec.withValue.includes(name)) {
      let value: string | undefined;
      if (eq > 0) value = arg.slice(eq + 1);
      else if (!arg.startsWith("--") && arg.length > 2) value = arg.slice(2);
      else value = argv[++i];
      if (value === undefined) throw new UsageError(`option '${name}' requires an argument`);
      out.values.set(name, value);
      out.all.set(name, [...(out.all.get(name) ?? []), value]);
    } else if (spec.flags.includes(name) && (eq < 0 || !arg.startsWith("--"))) {
      out.flags.add(name);
      if (!arg.startsWith("--") && arg.length > 2) {
        // Bundled short flags: -qU
        for (const c of arg.slice(2)) {
          const f = `-${c}`;
          if (!spec.flags.includes(f)) throw new UsageError(`invalid option -- '${c}'`);
          out.flags.add(f);
        }
      }
    } else {
      throw new UsageError(arg.startsWith("--") ? `unrecognized option '${arg}'` : `invalid option -- '${arg.slice(1, 2)}'`);
    }
  }
  return out;
}
