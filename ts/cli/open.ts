// Opening a named file as qemu-img does: probe the format unless -f says it.

import path from "node:path";
import { Qcow2Error, Qcow2ErrorCode } from "../errors.js";
import { NodeFileBackend } from "../io/node-file.js";
import { readFully } from "../io/backend.js";
import { QCOW_MAGIC } from "../format/constants.js";
import { RawDevice, type GuestDevice } from "../image/device.js";
import { Qcow2Image, type OpenOptions } from "../image/qcow2-image.js";

export type ImageFormat = "qcow2" | "raw";

export function parseFormat(value: string): ImageFormat {
  if (value === "qcow2" || value === "raw") return value;
  throw new Qcow2Error(Qcow2ErrorCode.NOT_SUPPORTED, `Unknown file format '${value}'`);
}

export async function openDevice(
  file: string,
  format: ImageFormat | undefined,
  options: OpenOptions = {},
): Promise<GuestDevice> {
  const backend = await NodeFileBackend.open(file, { readOnly: true });
  let fmt = format;
  if (fmt === undefined) {
    const magic = new Uint8Array(4);
    await readFully(backend, magic, 0);
    fmt = new DataView(magic.buffer).getUint32(0) === QCOW_MAGIC ? "qcow2" : "raw";
  }
  if (fmt === "raw") return RawDevice.open(backend);
  return Qcow2Image.open(backend, options);
}

/** qemu's path_combine: a relative backing name is relative to the directory of the image. */
export function fullBackingPath(imageFile: string, backingFile: string): string {
  if (path.isAbsolute(backingFile)) return backingFile;
  const dir = path.dirname(imageFile);
  return dir === "." && !imageFile.startsWith("./") ? backingFile : path.join(dir, backingFile);
}
