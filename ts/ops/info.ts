// `info`: the facts qemu-img info prints, in its JSON shape (QAPI ImageInfo) and its human layout.

import type { GuestDevice } from "../image/device.js";
import { Qcow2Image } from "../image/qcow2-image.js";
import type { SnapshotInfo } from "../image/snapshots.js";

export interface QemuImageInfo {
  filename: string;
  format: string;
  "virtual-size": number;
  "actual-size"?: number;
  "dirty-flag": boolean;
  "cluster-size"?: number;
  encrypted?: true;
  "backing-filename"?: string;
  "full-backing-filename"?: string;
  "backing-filename-format"?: string;
  snapshots?: QemuSnapshotInfo[];
  "format-specific"?: { type: "qcow2"; data: Record<string, unknown> };
}

export interface InfoOptions {
  /** How to show the image's name (qemu shows the path it was given). */
  filename?: string;
  /** Allocated bytes of the file, where the platform can tell. */
  actualSize?: number;
  /** Full (resolved) name of the backing file, where the platform can tell. */
  fullBackingFilename?: string;
  /** The image's internal snapshots (qemu shows them when there are any). */
  snapshots?: readonly SnapshotInfo[];
  /** format-specific.data.encrypt in full (a LUKS image's luksInfo); `{format}` when not given. */
  encrypt?: Record<string, unknown>;
}

export function imageInfo(device: GuestDevice, options: InfoOptions = {}): QemuImageInfo {
  const out: QemuImageInfo = {
    filename: options.filename ?? device.name,
    format: device.format,
    "virtual-size": device.virtualSize,
    "dirty-flag": false,
  };
  if (options.actualSize !== undefined) out["actual-size"] = options.actualSize;
  if (!(device instanceof Qcow2Image)) return out;
  const info = device.info();
  out["dirty-flag"] = info.dirty;
  out["cluster-size"] = info.clusterSize;
  if (info.encryption !== "none") out.encrypted = true;
  if (info.backingFile !== undefined) {
    out["backing-filename"] = info.backingFile;
    out["full-backing-filename"] = options.fullBackingFilename ?? info.backingFile;
    if (info.backingFormat !== undefined) out["backing-filename-format"] = info.backingFormat;
  }
  if (options.snapshots && options.snapshots.length > 0) out.snapshots = options.snapshots.map(qemuSnapshotInfo);
  // qemu-img 7.2's order (its QDict's), which its human output follows too.
  const data: Record<string, unknown> = { compat: info.compat, "compression-type": info.compressionType };
  if (info.version === 3) data["lazy-refcounts"] = info.lazyRefcounts;
  data["refcount-bits"] = info.refcountBits;
  if (info.encryption !== "none") data.encrypt = options.encrypt ?? { format: info.encryption };
  if (info.dataFile !== undefined) {
    data["data-file"] = info.dataFile;
    data["data-file-raw"] = info.dataFileRaw;
  }
  if (info.version === 3) {
    data.corrupt = info.corrupt;
    data["extended-l2"] = info.extendedL2;
  }
  out["format-specific"] = { type: "qcow2", data };
  return out;
}

/** qemu's size_to_str: three significant digits and a binary unit ("196 KiB", "1.5 GiB"). */
export function sizeToStr(bytes: number): string {
  const suffixes = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
  const scaled = bytes / (1000 / 1024);
  const exponent = scaled === 0 ? 0 : Math.floor(Math.log2(scaled)) + 1;
  const i = Math.max(0, Math.min(6, Math.floor((exponent - 1) / 10)));
  const value = bytes / 2 ** (i * 10);
  return `${Number(value.toPrecision(3))} ${suffixes[i]}B`;
}

const HUMAN_KEYS: Record<string, string> = {
  compat: "compat",
  "compression-type": "compression type",
  "lazy-refcounts": "lazy refcounts",
  "refcount-bits": "refcount bits",
  corrupt: "corrupt",
  "extended-l2": "extended l2",
  "data-file": "data file",
  "data-file-raw": "data file raw",
};

/** qemu's dump_qobject: nested objects indented by 4, list items as "[i]:", dashes in keys as spaces. */
function dumpValue(lines: string[], key: string, value: unknown, indent: number): void {
  const pad = " ".repeat(indent);
  if (Array.isArray(value)) {
    lines.push(`${pad}${key}:`);
    value.forEach((item, i) => dumpValue(lines, `[${i}]`, item, indent + 4));
  } else if (value !== null && typeof value === "object") {
    lines.push(`${pad}${key}:`);
    for (const [k, v] of Object.entries(value as Record<string, unknown>)) dumpValue(lines, k.replaceAll("-", " "), v, indent + 4);
  } else {
    lines.push(`${pad}${key}: ${String(value)}`);
  }
}

export function formatInfoHuman(info: QemuImageInfo): string {
  const lines = [
    `image: ${info.filename}`,
    `file format: ${info.format}`,
    `virtual size: ${sizeToStr(info["virtual-size"])} (${info["virtual-size"]} bytes)`,
    `disk size: ${info["actual-size"] === undefined ? "unavailable" : sizeToStr(info["actual-size"])}`,
  ];
  if (info.encrypted) lines.push("encrypted: yes");
  if (info["cluster-size"] !== undefined) lines.push(`cluster_size: ${info["cluster-size"]}`);
  if (info["dirty-flag"]) lines.push("cleanly shut down: no");
  if (info["backing-filename"] !== undefined) {
    const full = info["full-backing-filename"];
    lines.push(
      `backing file: ${info["backing-filename"]}` +
        (full !== undefined && full !== info["backing-filename"] ? ` (actual path: ${full})` : ""),
    );
    if (info["backing-filename-format"] !== undefined) lines.push(`backing file format: ${info["backing-filename-format"]}`);
  }
  let text = lines.join("\n") + "\n";
  if (info.snapshots) text += formatSnapshotList(info.snapshots);
  lines.length = 0;
  const data = info["format-specific"]?.data;
  if (data) {
    lines.push("Format specific information:");
    for (const [key, value] of Object.entries(data)) dumpValue(lines, HUMAN_KEYS[key] ?? key, value, 4);
  }
  return lines.length > 0 ? text + lines.join("\n") + "\n" : text;
}

/** One snapshot as qemu-img info --output=json shows it (QAPI SnapshotInfo). */
export interface QemuSnapshotInfo {
  id: string;
  name: string;
  "vm-state-size": number;
  "date-sec": number;
  "date-nsec": number;
  "vm-clock-sec": number;
  "vm-clock-nsec": number;
  icount?: number;
}

export function qemuSnapshotInfo(sn: SnapshotInfo): QemuSnapshotInfo {
  const out: QemuSnapshotInfo = {
    id: sn.id,
    name: sn.name,
    "vm-state-size": sn.vmStateSize,
    "date-sec": sn.dateSec,
    "date-nsec": sn.dateNsec,
    "vm-clock-sec": Math.floor(sn.vmClockNsec / 1e9),
    "vm-clock-nsec": sn.vmClockNsec % 1e9,
  };
  if (sn.icount !== undefined) out.icount = sn.icount;
  return out;
}

const pad2 = (n: number): string => String(n).padStart(2, "0");

/**
 * qemu's bdrv_snapshot_dump: the header line of the table, or one snapshot's line (the date in
 * local time, the VM clock as hh:mm:ss.mmm).
 */
export function snapshotLine(sn?: QemuSnapshotInfo): string {
  if (!sn) return `${"ID".padEnd(10)}${"TAG".padEnd(17)}${"VM SIZE".padStart(8)}${"DATE".padStart(20)}${"VM CLOCK".padStart(13)}${"ICOUNT".padStart(11)}`;
  const d = new Date(sn["date-sec"] * 1000);
  const date = `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())} ${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
  const secs = sn["vm-clock-sec"];
  const clock = `${pad2(Math.floor(secs / 3600))}:${pad2(Math.floor(secs / 60) % 60)}:${pad2(secs % 60)}.${String(Math.floor(sn["vm-clock-nsec"] / 1e6) % 1000).padStart(3, "0")}`;
  const icount = sn.icount === undefined ? "" : String(sn.icount);
  return `${sn.id.padEnd(9)} ${sn.name.padEnd(16)} ${sizeToStr(sn["vm-state-size"]).padStart(8)}${date.padStart(20)}${clock.padStart(13)}${icount.padStart(11)}`;
}

/** qemu-img's "Snapshot list:" block (empty when there are none). */
export function formatSnapshotList(snapshots: readonly QemuSnapshotInfo[]): string {
  if (snapshots.length === 0) return "";
  return ["Snapshot list:", snapshotLine(), ...snapshots.map((s) => snapshotLine(s))].join("\n") + "\n";
}
