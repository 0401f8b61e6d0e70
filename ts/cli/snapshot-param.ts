// qemu-img's -l argument (convert, measure): "snapshot.id=ID,snapshot.name=NAME" parsed as
// QemuOpts (commas doubled to escape them), or else one id or name, looked up id first.

import { splitKeyValues } from "./image-opts.js";

export type SnapshotParam = string | { id?: string; name?: string };

/** The snapshot -l names, or the error lines (without program name) qemu-img prints when it cannot parse it. */
export function parseSnapshotParam(text: string): { which: SnapshotParam } | { error: string } {
  if (!text.startsWith("snapshot.")) return { which: text };
  const which: { id?: string; name?: string } = {};
  for (const { key, value: given } of splitKeyValues(text)) {
    const value = given ?? "on";
    if (key === "snapshot.id") which.id = value;
    else if (key === "snapshot.name") which.name = value;
    else return { error: `Invalid parameter '${key}'\nFailed in parsing snapshot param '${text}'` };
  }
  return { which };
}
