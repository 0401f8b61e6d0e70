// qcow2-img snapshot [-q] [-U] [-l | -a snapshot | -c snapshot | -d snapshot] filename
//
// As qemu-img 7.2 img_snapshot: -l (the default when nothing else is asked) lists, -c creates with
// the current time, -a applies by id or name, -d deletes by name only (bdrv_snapshot_find matches
// names), and at most one of them is given. A raw image has no snapshots: -l lists nothing.

import "../node.js";
import { Qcow2Error, Qcow2ErrorCode } from "../errors.js";
import { NodeFileBackend } from "../io/node-file.js";
import { Qcow2Image } from "../image/qcow2-image.js";
import { formatSnapshotList, qemuSnapshotInfo } from "../ops/info.js";
import { UsageError } from "./args.js";
import { qemuGetopt } from "./getopt.js";
import { describeOpenError, probeFormat } from "./map.js";
import { imageSourceOrReport, requireSecret } from "./image-opts.js";

export const SNAPSHOT_USAGE = "snapshot [--object objectdef] [--image-opts] [-U] [-q] [-l | -a snapshot | -c snapshot | -d snapshot] filename";

type Action = { kind: "list" } | { kind: "create" | "apply" | "delete"; name: string };

/** The errno qemu would report for a failure of ours, as "-N (text)". */
function errnoText(e: unknown): string {
  const code = e instanceof Qcow2Error ? e.code : undefined;
  switch (code) {
    case Qcow2ErrorCode.NOT_SUPPORTED:
      return "-95 (Operation not supported)";
    case Qcow2ErrorCode.ALREADY_EXISTS:
      return "-17 (File exists)";
    case Qcow2ErrorCode.NOT_FOUND:
      return "-2 (No such file or directory)";
    case Qcow2ErrorCode.CORRUPT:
    case Qcow2ErrorCode.IO_ERROR:
      return "-5 (Input/output error)";
    default:
      return "-22 (Invalid argument)";
  }
}

export async function snapshot(argv: string[], out: (text: string) => void, err: (text: string) => void): Promise<number> {
  const parsed = qemuGetopt("snapshot", argv, ":la:c:d:hqU", [
    { name: "help", hasArg: false, short: "h" },
    { name: "object", hasArg: true, val: "object" },
    { name: "image-opts", hasArg: false, val: "image-opts" },
    { name: "force-share", hasArg: false, short: "U" },
  ]);
  let action: Action | undefined;
  const objects: string[] = [];
  let imageOpts = false;
  for (const { name, value } of parsed.options) {
    switch (name) {
      case "h":
        out(`usage: qcow2-img ${SNAPSHOT_USAGE}\n`);
        return 0;
      case "l":
      case "a":
      case "c":
      case "d":
        if (action) throw new UsageError("Cannot mix '-l', '-a', '-c', '-d'");
        action = name === "l" ? { kind: "list" } : { kind: name === "a" ? "apply" : name === "c" ? "create" : "delete", name: value! };
        break;
      case "q":
      case "U":
        // Nothing to be quiet about; snapshots never share the image with a VM here.
        break;
      case "object":
        objects.push(value!);
        break;
      case "image-opts":
        imageOpts = true;
        break;
    }
  }
  if (parsed.error) throw parsed.error;
  if (parsed.positional.length !== 1) throw new UsageError("Expecting one image file name");
  const writable = action !== undefined && action.kind !== "list";
  const source = await imageSourceOrReport(parsed.positional[0]!, { objects, imageOpts, formatArg: undefined }, err);
  if (!source) return 1;
  const file = source.file;

  let format: "qcow2" | "raw";
  try {
    format = source.format ?? (await probeFormat(file, writable));
  } catch (e) {
    err(`qcow2-img: ${describeOpenError(source.name, e)}\n`);
    return 1;
  }
  if (format === "raw") {
    const warning =
      `WARNING: Image format was not specified for '${file}' and probing guessed raw.\n` +
      "         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n" +
      "         Specify the 'raw' format explicitly to remove the restrictions.\n";
    // qemu warns at every writable open, and applying a snapshot to raw reopens the file once more.
    if (writable) err(warning);
    if (action?.kind === "apply") err(warning);
    switch (action?.kind) {
      case "create":
        err(`qcow2-img: Could not create snapshot '${action.name}': -95 (Operation not supported)\n`);
        return 1;
      case "apply":
        err(`qcow2-img: Could not apply snapshot '${action.name}': Block driver does not support snapshots\n`);
        return 1;
      case "delete":
        err(`qcow2-img: Could not delete snapshot '${action.name}': snapshot not found\n`);
        return 1;
      default:
        return 0;
    }
  }

  let image: Qcow2Image;
  try {
    const backend = await NodeFileBackend.open(file, { readOnly: !writable });
    // Like qemu-img, which opens the image with its backing chain; snapshots never need it.
    image = await Qcow2Image.open(backend, { readOnly: !writable, backing: "none", ...(source.passphrase ? { passphrase: source.passphrase } : {}) });
  } catch (e) {
    err(`qcow2-img: ${describeOpenError(source.name, e)}\n`);
    return 1;
  }
  try {
    // qemu opens an encrypted image only with its secret, even to list its snapshots.
    requireSecret(source, image.header.cryptMethod);
  } catch (e) {
    await image.close();
    err(`qcow2-img: ${(e as Error).message}\n`);
    return 1;
  }
  let status = 0;
  try {
    switch (action?.kind) {
      case undefined:
        break;
      case "list": {
        const list = await image.snapshots.list();
        out(formatSnapshotList(list.map(qemuSnapshotInfo)));
        break;
      }
      case "create": {
        // qemu-img keeps the name in a 256-byte buffer, the date to the microsecond.
        const name = Buffer.from(action.name).subarray(0, 255).toString();
        const now = Date.now();
        try {
          await image.snapshots.create(name, { dateSec: Math.floor(now / 1000), dateNsec: (now % 1000) * 1_000_000 });
        } catch (e) {
          err(`qcow2-img: Could not create snapshot '${action.name}': ${errnoText(e)}\n`);
          status = 1;
        }
        break;
      }
      case "apply":
        try {
          await image.snapshots.apply(action.name);
        } catch (e) {
          const why = e instanceof Qcow2Error && e.code === Qcow2ErrorCode.NOT_FOUND ? "Failed to load snapshot: No such file or directory" : (e as Error).message;
          err(`qcow2-img: Could not apply snapshot '${action.name}': ${why}\n`);
          status = 1;
        }
        break;
      case "delete": {
        // qemu-img finds the snapshot by name, then deletes that one.
        const found = (await image.snapshots.list()).find((s) => s.name === action.name);
        if (!found) {
          err(`qcow2-img: Could not delete snapshot '${action.name}': snapshot not found\n`);
          status = 1;
          break;
        }
        try {
          await image.snapshots.delete({ id: found.id, name: found.name });
        } catch (e) {
          err(`qcow2-img: Could not delete snapshot '${action.name}': ${(e as Error).message}\n`);
          status = 1;
        }
        break;
      }
    }
  } finally {
    await image.close();
  }
  return status;
}
