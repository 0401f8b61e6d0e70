// qemu-img's --object secret,… and --image-opts driver=…,file.filename=…,encrypt.key-secret=…:
// where an encrypted image's passphrase comes from. Objects are parsed as QemuOpts (commas doubled
// to escape them); an image given by options names its file, its format and the secret to use.

import fs from "node:fs";
import { qdictOrder } from "../ops/qemu-json.js";

/** A command-line failure with the text qemu-img prints (without the program name). */
export class OptionsError extends Error {
  override name = "OptionsError";
}

/** "a=1,b=2" with ",," standing for a comma, as QemuOpts reads it; a bare item has no value. */
export function splitKeyValues(text: string): Array<{ key: string; value: string | undefined }> {
  const items: string[] = [];
  let current = "";
  for (let i = 0; i < text.length; i++) {
    if (text[i] === "," && text[i + 1] === ",") {
      current += ",";
      i++;
    } else if (text[i] === ",") {
      items.push(current);
      current = "";
    } else {
      current += text[i];
    }
  }
  items.push(current);
  return items
    .filter((item) => item !== "")
    .map((item) => {
      const eq = item.indexOf("=");
      return eq < 0 ? { key: item, value: undefined } : { key: item.slice(0, eq), value: item.slice(eq + 1) };
    });
}

/** The secrets `--object secret,id=…,data=…|file=…[,format=raw|base64]` defines, by id. */
export async function parseObjects(objects: readonly string[]): Promise<Map<string, Uint8Array>> {
  const secrets = new Map<string, Uint8Array>();
  for (const text of objects) {
    const items = splitKeyValues(text);
    const fields = new Map<string, string>();
    let type: string | undefined;
    items.forEach(({ key, value }, i) => {
      if (i === 0 && value === undefined) type = key;
      else fields.set(key, value ?? "on");
    });
    type ??= fields.get("qom-type");
    fields.delete("qom-type");
    if (type === undefined) throw new OptionsError("Parameter 'qom-type' is missing");
    if (type !== "secret") throw new OptionsError(`Parameter 'qom-type' does not accept value '${type}'`);
    const id = fields.get("id");
    if (id === undefined) throw new OptionsError("Parameter 'id' is missing");
    for (const key of fields.keys()) {
      if (key === "keyid" || key === "iv") throw new OptionsError(`Encrypted secrets ('${key}') are not supported yet`);
      if (!["id", "data", "file", "format"].includes(key)) throw new OptionsError(`Parameter '${key}' is unexpected`);
    }
    const format = fields.get("format") ?? "raw";
    if (format !== "raw" && format !== "base64") throw new OptionsError(`Parameter 'format' does not accept value '${format}'`);
    const data = fields.get("data");
    const file = fields.get("file");
    if (data !== undefined && file !== undefined) throw new OptionsError("'file' and 'data' are mutually exclusive");
    if (data === undefined && file === undefined) throw new OptionsError("Either 'file' or 'data' must be provided");
    let bytes: Uint8Array;
    if (file !== undefined) {
      try {
        bytes = new Uint8Array(await fs.promises.readFile(file));
      } catch (e) {
        const why = (e as NodeJS.ErrnoException).code === "ENOENT" ? "No such file or directory" : (e as Error).message;
        throw new OptionsError(`Unable to read ${file}: Failed to open file “${file}”: ${why}`);
      }
    } else {
      bytes = new TextEncoder().encode(data);
    }
    if (format === "base64") {
      const text = new TextDecoder().decode(bytes);
      if (!/^[A-Za-z0-9+/]*={0,2}$/.test(text) || text.length % 4 !== 0) throw new OptionsError("Invalid base64 data");
      bytes = new Uint8Array(Buffer.from(text, "base64"));
    }
    if (secrets.has(id)) throw new OptionsError(`attempt to add duplicate property '${id}' to object (type 'container')`);
    secrets.set(id, bytes);
  }
  return secrets;
}

/** An image named by --image-opts. */
export interface ImageOpts {
  /** The file to open. */
  file: string;
  format: "qcow2" | "raw" | undefined;
  /** The id of the secret holding the passphrase. */
  keySecret: string | undefined;
  /** encrypt.format when given: it must match the header's. */
  encryptFormat: "aes" | "luks" | undefined;
  /** How qemu names the image in messages and check's JSON: the option string itself. */
  text: string;
}

/** Parse `driver=qcow2,file.filename=F,encrypt.key-secret=ID` (qemu's error texts on failure). */
export function parseImageOpts(text: string): ImageOpts {
  const items = splitKeyValues(text);
  let file: string | undefined;
  let format: "qcow2" | "raw" | undefined;
  let keySecret: string | undefined;
  let encryptFormat: "aes" | "luks" | undefined;
  for (const { key, value } of items) {
    if (value === undefined) throw new OptionsError(`Could not open '${text}': Cannot find device='${text}' nor node-name='${text}'`);
    switch (key) {
      case "driver":
        if (value !== "qcow2" && value !== "raw") throw new OptionsError(`Could not open '${text}': Unknown driver '${value}'`);
        format = value;
        break;
      case "file.filename":
        file = value;
        break;
      case "file.driver":
        if (value !== "file") throw new OptionsError(`Could not open '${text}': only the 'file' protocol is supported, not '${value}'`);
        break;
      case "encrypt.key-secret":
        keySecret = value;
        break;
      case "encrypt.format":
        if (value !== "aes" && value !== "luks") throw new OptionsError(`Could not open '${text}': Parameter 'encrypt.format' does not accept value '${value}'`);
        encryptFormat = value;
        break;
      case "file":
        throw new OptionsError(`Could not open '${text}': Cannot find device='${value}' nor node-name='${value}'`);
      default:
        throw new OptionsError(`Could not open '${text}': Block format '${format ?? "qcow2"}' does not support the option '${key}'`);
    }
  }
  if (file === undefined) throw new OptionsError(`Could not open '${text}': Cannot find device='${text}' nor node-name='${text}'`);
  return { file, format, keySecret, encryptFormat, text };
}

/** The passphrase an image's options name, or undefined; qemu's error when the secret is missing. */
export function passphraseFor(opts: Pick<ImageOpts, "keySecret" | "text">, secrets: Map<string, Uint8Array>): Uint8Array | undefined {
  if (opts.keySecret === undefined) return undefined;
  const secret = secrets.get(opts.keySecret);
  if (!secret) throw new OptionsError(`Could not open '${opts.text}': No secret with id '${opts.keySecret}'`);
  return secret;
}

/** How qemu names an image opened from options (bdrv_refresh_filename): "json:{...}" in QDict order. */
export function jsonFilename(opts: ImageOpts): string {
  const top: Record<string, unknown> = {};
  if (opts.encryptFormat !== undefined) top["encrypt.format"] = opts.encryptFormat;
  if (opts.keySecret !== undefined) top["encrypt.key-secret"] = opts.keySecret;
  top.driver = opts.format ?? "qcow2";
  top.file = qdictOrder({ driver: "file", filename: opts.file });
  return `json:${qemuCompactJson(qdictOrder(top))}`;
}

/** qobject_to_json's compact form: ", " and ": " separators. */
function qemuCompactJson(value: unknown): string {
  if (value !== null && typeof value === "object") {
    return `{${Object.entries(value as Record<string, unknown>)
      .map(([k, v]) => `${JSON.stringify(k)}: ${qemuCompactJson(v)}`)
      .join(", ")}}`;
  }
  return JSON.stringify(value);
}

/** An image argument resolved: the file, its format if known, its passphrase if any, its name in messages. */
export interface ImageSource {
  file: string;
  format: "qcow2" | "raw" | undefined;
  passphrase: Uint8Array | undefined;
  /** How qemu names it in "Could not open" messages and check's JSON. */
  name: string;
  /** How qemu-img info names it. */
  displayName: string;
}

/**
 * The image a command names, with qemu's --object/--image-opts rules: with --image-opts the
 * argument is an option string naming the file, the format and the secret; without it, a file
 * name (and no secret). Throws OptionsError with qemu's text.
 */
export async function imageSource(
  arg: string,
  options: { objects: readonly string[]; imageOpts: boolean; format: "qcow2" | "raw" | undefined },
): Promise<ImageSource> {
  const secrets = await parseObjects(options.objects);
  if (!options.imageOpts) return { file: arg, format: options.format, passphrase: undefined, name: arg, displayName: arg };
  if (options.format !== undefined) throw new OptionsError("--image-opts and --format are mutually exclusive");
  const opts = parseImageOpts(arg);
  return { file: opts.file, format: opts.format, passphrase: passphraseFor(opts, secrets), name: opts.text, displayName: jsonFilename(opts) };
}

/** qemu opens an encrypted image for I/O only with its secret. */
export function requireSecret(source: ImageSource, cryptMethod: number): void {
  if (cryptMethod !== 0 && source.passphrase === undefined) {
    throw new OptionsError(`Could not open '${source.name}': Parameter 'encrypt.key-secret' is required for cipher`);
  }
}

/**
 * imageSource for a command line: `formatArg` is the -f given (qemu refuses it with --image-opts);
 * on a bad option qemu's error is printed and undefined returned.
 */
export async function imageSourceOrReport(
  arg: string,
  options: { objects: readonly string[]; imageOpts: boolean; formatArg: string | undefined },
  err: (text: string) => void,
): Promise<ImageSource | undefined> {
  try {
    if (options.imageOpts && options.formatArg !== undefined) throw new OptionsError("--image-opts and --format are mutually exclusive");
    return await imageSource(arg, { objects: options.objects, imageOpts: options.imageOpts, format: undefined });
  } catch (e) {
    if (!(e instanceof OptionsError)) throw e;
    err(`qcow2-img: ${e.message}\n`);
    return undefined;
  }
}
