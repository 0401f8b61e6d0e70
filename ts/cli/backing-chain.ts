// What rebase and commit need from qemu's block layer beyond opening one image: bdrv_find_backing_image
// (which image of a chain a name means), and the open errors qemu reports for a chain whose
// backing file is missing ("Could not open backing file: ..." once per level).

import fs from "node:fs";
import { isQcow2Error, Qcow2ErrorCode } from "../errors.js";
import { readHeader } from "../format/header.js";
import { NodeFileBackend } from "../io/node-file.js";
import { Qcow2Image } from "../image/qcow2-image.js";
import { describeOpenError, qemuBackingName } from "./map.js";

/** qemu's path_has_protocol: a ':' before any '/'. */
export function hasProtocol(name: string): boolean {
  const stop = name.search(/[:/]/);
  return stop >= 0 && name[stop] === ":";
}

/** bdrv_dirname of a file: its name up to and including the last '/', or "". */
function dirPart(name: string): string {
  return name.slice(0, name.lastIndexOf("/") + 1);
}

function realpath(name: string): string | undefined {
  try {
    return fs.realpathSync.native(name);
  } catch {
    return undefined;
  }
}

/**
 * bdrv_find_backing_image: the depth (1 = the backing file of `top`) of the image that `name`
 * means, or undefined. A relative `name` is taken relative to each overlay's directory in turn and
 * compared, as canonical paths, with that overlay's backing file; names with a protocol prefix are
 * compared as strings. `topName` is the top image's name as given on the command line.
 */
export function findBackingImage(top: Qcow2Image, topName: string, name: string): number | undefined {
  const layers = top.chain();
  let layerName = topName;
  for (let depth = 0; depth + 1 < layers.length; depth++) {
    const layer = layers[depth];
    if (!(layer instanceof Qcow2Image)) break;
    const stored = layer.header.backingFile ?? "";
    const full = qemuBackingName(layerName, stored);
    if (hasProtocol(name) || hasProtocol(stored)) {
      if (name === stored || name === full) return depth + 1;
    } else {
      const wanted = realpath(name.startsWith("/") ? name : dirPart(layerName) + name);
      if (wanted !== undefined && wanted === realpath(full)) return depth + 1;
    }
    layerName = full;
  }
  return undefined;
}

/** The name qemu gives each image of the chain: the top as given, the rest by path_combine. */
export function chainNames(top: Qcow2Image, topName: string): string[] {
  const names = [topName];
  const layers = top.chain();
  for (let depth = 1; depth < layers.length; depth++) {
    const above = layers[depth - 1] as Qcow2Image;
    names.push(qemuBackingName(names[depth - 1]!, above.header.backingFile ?? ""));
  }
  return names;
}

/** Why `file` (a qcow2 image) could not be opened, as qemu's "Could not open 'F': ..." puts it. */
export async function describeImageOpenError(file: string, e: unknown): Promise<string> {
  if (isQcow2Error(e, Qcow2ErrorCode.BAD_BACKING)) {
    const missing = await findMissingBacking(file);
    if (missing) {
      const inner = describeOpenError(missing.name, missing.error).replace(/^Could not open '.*?': (?=Could not open)/s, "");
      return `Could not open '${file}': ${"Could not open backing file: ".repeat(missing.depth)}${inner}`;
    }
  }
  if (isQcow2Error(e, Qcow2ErrorCode.UNSUPPORTED_VERSION)) {
    const version = /version (\d+)/.exec(e.message)?.[1];
    if (version !== undefined) return `Could not open '${file}': Unsupported qcow2 version ${version}`;
  }
  return describeOpenError(file, e);
}

/** Follow the backing file names from `file` down to the first one that cannot be opened. */
async function findMissingBacking(file: string): Promise<{ name: string; depth: number; error: unknown } | undefined> {
  let name = file;
  for (let depth = 1; depth <= 64; depth++) {
    let backingFile: string | undefined;
    try {
      const backend = await NodeFileBackend.open(name, { readOnly: true });
      try {
        backingFile = (await readHeader(backend, await backend.size())).backingFile;
      } finally {
        await backend.close();
      }
    } catch {
      return undefined;
    }
    if (backingFile === undefined) return undefined;
    const next = qemuBackingName(name, backingFile);
    try {
      await (await fs.promises.open(next, "r")).close();
    } catch (error) {
      return { name: next, depth, error };
    }
    name = next;
  }
  return undefined;
}
