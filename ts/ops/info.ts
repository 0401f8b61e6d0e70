// `info`: the facts qemu-img info prints, in its JSON shape (QAPI ImageInfo) and its human layout.

import type { GuestDevice } from "../image/device.js";
import { Qcow2Image } from "../image/qcow2-image.js";

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
  "format-specific"?: { type: "qcow2"; data: Record<string, unknown> };
}

export interface InfoOptions {
  /** How to show the image's name (qemu shows the path it was given). */
  filename?: string;
  /** Allocated bytes of the file, where the platform can tell. */
  actualSize?: number;
  /** Full (resolved) name of the backing file, where the platform can tell. */
  fullBackingFilename?: string;
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
  // qemu-img 7.2's order (its QDict's), which its human output follows too.
  const data: Record<string, unknown> = { compat: info.compat, "compression-type": info.compressionType };
  if (info.version === 3) data["lazy-refcounts"] = info.lazyRefcounts;
  data["refcount-bits"] = info.refcountBits;
  if (info.encryption !== "none") data.encrypt = { format: info.encryption };
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
  const data = info["format-specific"]?.data;
  if (data) {
    lines.push("Format specific information:");
    for (const [key, value] of Object.entries(data)) {
      if (key === "encrypt") {
        lines.push("    encrypt:");
        for (const [k, v] of Object.entries(value as Record<string, unknown>)) lines.push(`        ${k}: ${String(v)}`);
        continue;
      }
      lines.push(`    ${HUMAN_KEYS[key] ?? key}: ${String(value)}`);
    }
  }
  return lines.join("\n") + "\n";
}
