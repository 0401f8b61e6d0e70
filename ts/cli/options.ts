// qemu-img's size syntax (util/cutils.c qemu_strtosz and qemu-img's cvtnum), shared by every
// command that takes a size.

const UINT64_MAX = 2n ** 64n - 1n;
const INT64_MAX = 2n ** 63n - 1n;

const SUFFIX_SHIFT: Record<string, bigint> = { B: 0n, K: 10n, M: 20n, G: 30n, T: 40n, P: 50n, E: 60n };

export type StrtoszResult = { ok: true; value: bigint; hexSuffix: boolean } | { ok: false; error: "invalid" | "range" };

/**
 * qemu_strtosz (util/cutils.c do_strtosz, QEMU 7.2): decimal or 0x hex, an optional decimal
 * fraction (not with hex, and only with a suffix above bytes), an optional B/K/M/G/T/P/E suffix
 * in any case; leading whitespace and "+" are accepted, "-" is not. Values up to 2^64 - 1.
 * `hexSuffix` is set where qemu warns that a suffix on a hex number is deprecated.
 */
export function strtosz(text: string): StrtoszResult {
  const invalid: StrtoszResult = { ok: false, error: "invalid" };
  // An out-of-range number is reported as such only when nothing follows where qemu stopped.
  const range = (end: number): StrtoszResult => (end === text.length ? { ok: false, error: "range" } : invalid);
  const lead = /^[ \t\n\v\f\r]*([+-]?)([0-9]+)/.exec(text);
  if (!lead) return invalid;
  let value = BigInt(lead[2]!);
  let pos = lead[0].length;
  if (value > UINT64_MAX) return range(pos);
  if (lead[1] === "-") return invalid;
  let hex = false;
  let fraction = 0n; // 0.64 fixed point, as qemu keeps it
  if (value === 0n && (text[pos] === "x" || text[pos] === "X")) {
    const h = /^[ \t\n\v\f\r]*\+?0[xX]([0-9a-fA-F]+)/.exec(text);
    if (!h) return invalid; // strtoull stops at the "x": trailing garbage
    value = BigInt("0x" + h[1]!);
    pos = h[0].length;
    if (value > UINT64_MAX) return range(pos);
    if (text[pos] === ".") return invalid;
    hex = true;
  } else if (text[pos] === ".") {
    const f = /^\.([0-9]+)([eE][+-]?[0-9]+)?/.exec(text.slice(pos));
    if (f && f[2] !== undefined) return invalid; // an exponent makes the whole input invalid
    if (f) {
      const scaled = Number(`0.${f[1]}`) * 2 ** 64;
      fraction = scaled >= 2 ** 64 ? UINT64_MAX : BigInt(Math.trunc(scaled));
      pos += f[0].length;
    } else {
      pos += 1; // "5." and "5.k": no fraction digits
    }
  }
  const shift = SUFFIX_SHIFT[(text[pos] ?? "").toUpperCase()];
  if (shift !== undefined) pos++;
  if (shift === undefined || shift === 0n) {
    if (fraction !== 0n) return invalid;
  } else {
    // 64.64 fixed point times the unit, the fraction rounded half up.
    const frac = fraction << shift;
    value = (value << shift) + (frac >> 64n) + ((frac >> 63n) & 1n);
    if (value > UINT64_MAX) return range(pos);
  }
  if (pos !== text.length) return invalid;
  return { ok: true, value, hexSuffix: hex && shift !== undefined };
}

/** qemu-img's cvtnum: a size for an option such as --start-offset, or the error lines qemu prints. */
export function cvtnum(name: string, text: string, err: (t: string) => void): bigint | undefined {
  const r = strtosz(text);
  if (!r.ok && r.error === "invalid") {
    err(`qcow2-img: Invalid ${name} specified. You may use k, M, G, T, P or E suffixes for\n`);
    err("qcow2-img: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.\n");
    return undefined;
  }
  if (!r.ok || r.value > INT64_MAX) {
    err(`qcow2-img: Invalid ${name} specified. Must be between 0 and ${INT64_MAX}.\n`);
    return undefined;
  }
  if (r.hexSuffix) err(`qcow2-img: warning: Using a multiplier suffix on hex numbers is deprecated: ${text}\n`);
  return r.value;
}

/**
 * Where qemu_strtosz warns that a suffix on a hex number is deprecated: a hex number that parsed
 * (even when the rest of the text is then refused) followed by a suffix that is not a hex digit.
 */
function warnsHexSuffix(text: string): boolean {
  const m = /^[ \t\n\v\f\r]*\+?0[xX]([0-9a-fA-F]+)[kKmMgGtTpP]/.exec(text);
  return m !== null && BigInt("0x" + m[1]!) <= UINT64_MAX;
}

/**
 * qemu-img's cvtnum_full: a size between `min` and `max`, or undefined after qemu's error lines
 * (the deprecation warning for a hex suffix comes first, as qemu prints it while parsing).
 */
export function cvtnumFull(name: string, text: string, min: bigint, max: bigint, err: (t: string) => void): bigint | undefined {
  if (warnsHexSuffix(text)) err(`qcow2-img: warning: Using a multiplier suffix on hex numbers is deprecated: ${text}\n`);
  const r = strtosz(text);
  if (!r.ok && r.error === "invalid") {
    err(`qcow2-img: Invalid ${name} specified. You may use k, M, G, T, P or E suffixes for\n`);
    err("qcow2-img: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.\n");
    return undefined;
  }
  if (!r.ok || r.value > max || r.value < min) {
    err(`qcow2-img: Invalid ${name} specified. Must be between ${min} and ${max}.\n`);
    return undefined;
  }
  return r.value;
}

/**
 * qemu_strtoul(text, NULL, 0, &res) as qemu-img reads counts: C's strtoul in base 0 (0x hex,
 * leading 0 octal, leading white space, a sign, a negative number wrapping around 2^64), the
 * whole text used; then at most `max`. Undefined where qemu refuses the value.
 */
export function strtoulMax(text: string, max: number): number | undefined {
  const m = /^[ \t\n\v\f\r]*([+-]?)(?:0[xX]([0-9a-fA-F]+)|(0[0-7]*)|([1-9][0-9]*))$/.exec(text);
  if (!m) return undefined;
  const digits = m[2] !== undefined ? "0x" + m[2] : m[3] !== undefined ? (m[3].length > 1 ? "0o" + m[3].slice(1) : "0") : m[4]!;
  let value = BigInt(digits);
  if (value > UINT64_MAX) return undefined; // ERANGE
  if (m[1] === "-") value = (UINT64_MAX + 1n - value) & UINT64_MAX;
  return value <= BigInt(max) ? Number(value) : undefined;
}

/** The cache modes bdrv_parse_cache_mode accepts (-t / -T); they choose nothing here. */
export const CACHE_MODES: ReadonlySet<string> = new Set(["none", "off", "writeback", "writethrough", "directsync", "unsafe"]);
