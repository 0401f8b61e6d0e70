// Paths become backends through the registered platform (Node: files); backends pass through.

import type { BlockBackend } from "./backend.js";
import { platform } from "../platform.js";

/** A backend for a path (through the platform) or the backend itself. */
export async function resolveBackend(target: BlockBackend | string, readOnly: boolean, create = false): Promise<BlockBackend> {
  if (typeof target !== "string") return target;
  if (!platform.openFile) {
    throw new TypeError(
      `open: a path ("${target}") needs a file system; import from "qcow2-wasm/node", or pass a BlockBackend`,
    );
  }
  return platform.openFile(target, { readOnly, create });
}

