// qemu-img's -l argument (convert, measure): "snapshot.id=ID,snapshot.name=NAME" parsed as
// QemuOpts (commas doubled to escape them), or else one id or name, looked up id first.

export type SnapshotParam = string | { id?: string; name?: string };

/** The snapshot -l names, or the error lines (without program name) qemu-img prints when it cannot parse it. */
export function parseSnapshotParam(text: string): { which: SnapshotParam } | { error: string } {
  if (!text.startsWith("snapshot.")) return { which: text };
  const which: { id?: string; name?: string } = {};
  for (const part of splitOptions(text)) {
    const eq = part.indexOf("=");
    const key = eq < 0 ? part : part.slice(0, eq);
    const value = eq < 0 ? "on" : part.slice(eq + 1);
    if (key === "snapshot.id") which.id = value;
    else if (key === "snapshot.name") which.name = value;
    else return { error: `Invalid parameter '${key}'\nFailed in parsing snapshot param '${text}'` };
  }
  return { which };
}

function splitOptions(text: string): string[] {
  const parts: string[] = [];
  let current = "";
  for (let i = 0; i < text.length; i++) {
    if (text[i] === "," && text[i + 1] === ",") {
      current += ",";
      i++;
    } else if (text[i] === ",") {
      parts.push(current);
      current = "";
    } else {
      current += text[i];
    }
  }
  parts.push(current);
  return parts.filter((p) => p !== "");
}
