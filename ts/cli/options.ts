// qemu-img's value syntax: sizes with binary suffixes (qemu_strtosz) and `-o key=value,...` option
// strings (QemuOpts, where ",," is a literal comma).

import { UsageError } from "./args.js";

const SUFFIXES: Record<string, number> = {
  b: 1,
  k: 2 ** 10,
  m: 2 ** 20,
  g: 2 ** 30,
  t: 2 ** 40,
  p: 2 ** 50,
  e: 2 ** 60,
};

const INT64_MAX = 2n ** 63n - 1n;

export const SIZE_HELP =
  "Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n" +
  "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.";

/**
 * A size as qemu-img reads one: an integer (decimal or 0x hex) or a decimal fraction followed by a
 * suffix (k, M, G, T, P, E; b for bytes; any case). `defaultUnit` applies without a suffix.
 * Returns undefined when the text is not a size; a bigint past INT64_MAX is reported as "range".
 */
export function parseSize(text: string, defaultUnit = 1): number | "range" | undefined {
  const m = /^\s*(0[xX][0-9a-fA-F]+|[0-9]+(?:\.[0-9]*)?|\.[0-9]+)([bBkKmMgGtTpPeE]?)$/.exec(text);
  if (!m) return undefined;
  const [, digits, suffix] = m as unknown as [string, string, string];
  const unit = suffix ? SUFFIXES[suffix.toLowerCase()]! : defaultUnit;
  const isHex = /^0[xX]/.test(digits);
  const dot = digits.indexOf(".");
  if (isHex) {
    if (suffix) return undefined;
    const value = BigInt(digits);
    return value > INT64_MAX ? "range" : Number(value);
  }
  if (dot >= 0) {
    // A fraction needs a suffix larger than a byte, as qemu_strtosz insists.
    if (!suffix || unit === 1) return undefined;
    const whole = BigInt(digits.slice(0, dot) || "0");
    const fraction = Number(`0${digits.slice(dot)}`);
    const total = whole * BigInt(unit) + BigInt(Math.floor(fraction * unit + 0.5));
    return total > INT64_MAX ? "range" : Number(total);
  }
  const total = BigInt(digits) * BigInt(unit);
  return total > INT64_MAX ? "range" : Number(total);
}

/** A size argument as `qemu-img create` takes it, with its messages. */
export function parseImageSize(text: string): number {
  const size = parseSize(text);
  if (size === undefined) throw new UsageError(SIZE_HELP);
  if (size === "range") throw new UsageError("Invalid image size specified. Must be between 0 and 9223372036854775807.");
  return size;
}

/** `-o` options in order: "a=1,b=x,,y" → [["a","1"],["b","x,y"]]; a bare word is ["word", undefined]. */
export function parseOptionString(text: string): Array<[string, string | undefined]> {
  const out: Array<[string, string | undefined]> = [];
  let i = 0;
  while (i < text.length) {
    let key = "";
    while (i < text.length && text[i] !== "=" && text[i] !== ",") key += text[i++];
    let value: string | undefined;
    if (text[i] === "=") {
      i++;
      value = "";
      while (i < text.length) {
        if (text[i] === ",") {
          if (text[i + 1] === ",") {
            value += ",";
            i += 2;
            continue;
          }
          break;
        }
        value += text[i++];
      }
    }
    if (text[i] === ",") i++;
    if (key !== "" || value !== undefined) out.push([key, value]);
  }
  return out;
}

/** Merge repeated `-o` flags as qemu-img does (later ones appended after a comma). */
export function joinOptionStrings(values: string[]): string {
  return values.join(",");
}
