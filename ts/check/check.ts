// `check`: what `qemu-img check [-r leaks|all]` does, as a library call. The report carries
// qemu-img's fields with the same values, the same diagnostics in the same order, and is a pure
// function of the image bytes (DESIGN.md §6): the browser page and the CLI print the same thing.

import { Qcow2Error, Qcow2ErrorCode } from "../errors.js";
import type { BlockBackend } from "../io/backend.js";
import { readHeader, type Qcow2Header } from "../format/header.js";
import { refuseFeatures } from "../image/features.js";
import { resolveBackend } from "../io/resolve.js";
import { qdictOrder } from "../ops/qemu-json.js";
import { WasmCore, type WasmVariant } from "../wasm/core.js";
import { Refcounts } from "../image/refcounts.js";
import { encodeSnapshotTable, type SnapshotEntry } from "../format/snapshots.js";
import { writeRefcountTablePointer, writeSnapshotTablePointer } from "../format/header-update.js";
import {
  CheckAborted,
  FIX_ERRORS,
  FIX_LEAKS,
  RefcountCheck,
  emptyCounts,
  markCleanAfterRepair,
  readSnapshotsForCheck,
  type CheckCounts,
} from "./refcount-check.js";

export type { CheckCounts } from "./refcount-check.js";

/** `none` only reports; `leaks` frees leaked clusters; `all` also fixes errors (qemu's -r). */
export type RepairMode = "none" | "leaks" | "all";

export interface CheckOptions {
  repair?: RepairMode;
  /** Each diagnostic line as it is found (qemu-img prints them on stderr). */
  onDiagnostic?: (line: string) => void;
  /** The name reported as `filename` (default: the backend's name). */
  filename?: string;
  wasm?: WasmVariant;
  /** Bytes of tables read per batch (default 4 MiB); changes speed, never the report. */
  batchBytes?: number;
}

export interface CheckReport extends CheckCounts {
  filename: string;
  format: "qcow2";
  /** Every diagnostic, in the order qemu prints them. */
  diagnostics: string[];
  /** Set when the check could not complete (qemu-img: "Check failed: …"); counts are partial. */
  failure?: string;
}

function fixFlags(repair: RepairMode): number {
  if (repair === "all") return FIX_LEAKS | FIX_ERRORS;
  if (repair === "leaks") return FIX_LEAKS;
  if (repair === "none") return 0;
  throw new TypeError(`check: repair must be "none", "leaks" or "all", not ${JSON.stringify(repair)}`);
}

/** One qcow2_co_check_locked: snapshot table, refcounts and COPIED flags, then clean bits. */
async function checkPass(
  backend: BlockBackend,
  fix: number,
  options: CheckOptions,
  diag: (line: string) => void,
  header?: Qcow2Header,
): Promise<{ counts: CheckCounts; failure?: string }> {
  const counts = emptyCounts();
  const h = header ?? (await readHeader(backend, undefined, { check: true }));
  refuseFeatures(h, backend.name);
  try {
    const snapshots = await readSnapshotsForCheck(backend, h, counts, diag, fix);
    await RefcountCheck.run(
      backend,
      h,
      snapshots.entries,
      snapshots.bytes,
      { fix, diagnostic: diag, wasm: options.wasm, batchBytes: options.batchBytes },
      counts,
    );
    // qemu's qcow2_check_fixup_snapshot_table: with the refcounts sound, write the table anew.
    if (fix & FIX_ERRORS && snapshots.incomplete > 0 && counts.checkErrors === 0) {
      await rewriteSnapshotTable(backend, h, snapshots.entries, snapshots.bytes, options.wasm);
      counts.corruptionsFixed += snapshots.incomplete;
      counts.corruptions -= snapshots.incomplete;
    }
    if (fix) await markCleanAfterRepair(backend, h, counts);
    return { counts };
  } catch (err) {
    if (err instanceof CheckAborted) return { counts, failure: err.message };
    throw err;
  }
}

/**
 * Write the snapshot table again as qemu writes one (every entry with its full extra data), in new
 * clusters, then point the header at it and free the old one. The refcounts must be sound.
 */
async function rewriteSnapshotTable(backend: BlockBackend, h: Qcow2Header, entries: SnapshotEntry[], oldBytes: number, wasm?: WasmVariant): Promise<void> {
  const cs = 2 ** h.clusterBits;
  const refcounts = await Refcounts.open({
    backend,
    core: await WasmCore.create(wasm),
    clusterBits: h.clusterBits,
    refcountOrder: h.refcountOrder,
    tableOffset: h.refcountTableOffset,
    tableClusters: h.refcountTableClusters,
    cacheSize: 1 << 20,
    writeTablePointer: (tableOffset, tableClusters) => writeRefcountTablePointer(backend, h, tableOffset, tableClusters),
  });
  const bytes = encodeSnapshotTable(entries, h.size);
  const offset = bytes.length > 0 ? await refcounts.allocate(Math.ceil(bytes.length / cs)) : 0;
  await refcounts.writeBack();
  await backend.flush();
  if (bytes.length > 0) {
    await backend.write(bytes, offset);
    await backend.flush();
  }
  const oldOffset = h.snapshotsOffset;
  await writeSnapshotTablePointer(backend, h, entries.length, offset);
  if (oldOffset !== 0 && oldBytes > 0) {
    // Only what the refcounts count: a damaged old table may lie where no refcount block reaches.
    const first = oldOffset / cs;
    for (let c = first; c < first + Math.ceil(oldBytes / cs); c++) if ((await refcounts.get(c)) > 0) refcounts.releaseLater(c, 1);
    await refcounts.applyDecrements();
    await refcounts.writeBack();
    await backend.flush();
  }
}

/**
 * Check an image's metadata: every host cluster's refcount against the references found from the
 * header, the active and snapshot L1/L2 tables, the refcount structure, the snapshot table, bitmaps
 * and the encryption header; COPIED flags; alignment and reserved bits. With `repair`, fix what
 * qemu-img check -r fixes, then check again and report the second result with the fixed counts
 * of the first, as qemu-img does. Guest data is never changed.
 *
 * Throws a Qcow2Error when the image cannot be opened at all (qemu-img: "Could not open").
 */
export async function checkImage(target: BlockBackend | string, options: CheckOptions = {}): Promise<CheckReport> {
  const fix = fixFlags(options.repair ?? "none");
  const backend = await resolveBackend(target, fix === 0);
  const diagnostics: string[] = [];
  const diag = (line: string): void => {
    diagnostics.push(line);
    options.onDiagnostic?.(line);
  };
  try {
    if (fix && backend.readOnly) {
      throw new Qcow2Error(Qcow2ErrorCode.READ_ONLY, `${backend.name}: cannot repair: the backend is read-only`);
    }
    let pass = await checkPass(backend, fix, options, diag);
    if (!pass.failure && (pass.counts.corruptionsFixed || pass.counts.leaksFixed)) {
      const { corruptionsFixed, leaksFixed } = pass.counts;
      pass = await checkPass(backend, 0, options, diag);
      pass.counts.corruptionsFixed = corruptionsFixed;
      pass.counts.leaksFixed = leaksFixed;
    }
    const report: CheckReport = {
      filename: options.filename ?? backend.name,
      format: "qcow2",
      ...pass.counts,
      diagnostics,
    };
    if (pass.failure !== undefined) report.failure = pass.failure;
    return report;
  } finally {
    if (typeof target === "string") await backend.close();
  }
}

/** qemu-img check's exit status: 0 clean, 1 check failed, 2 corruptions, 3 leaks only. */
export function checkExitCode(report: CheckReport): number {
  if (report.failure !== undefined || report.checkErrors) return 1;
  if (report.corruptions) return 2;
  if (report.leaks) return 3;
  return 0;
}

/** The QAPI ImageCheck object qemu-img prints with --output=json (zero counts left out). */
export function checkToQemuJson(report: CheckReport): Record<string, string | number> {
  const out: Record<string, string | number> = {
    filename: report.filename,
    format: report.format,
    "check-errors": report.checkErrors,
  };
  const optional: Array<[string, number]> = [
    ["image-end-offset", report.imageEndOffset],
    ["corruptions", report.corruptions],
    ["leaks", report.leaks],
    ["corruptions-fixed", report.corruptionsFixed],
    ["leaks-fixed", report.leaksFixed],
    ["total-clusters", report.totalClusters],
    ["allocated-clusters", report.allocatedClusters],
    ["fragmented-clusters", report.fragmentedClusters],
    ["compressed-clusters", report.compressedClusters],
  ];
  for (const [key, value] of optional) if (value !== 0) out[key] = value;
  return qdictOrder(out);
}

/** What qemu-img check --output=json prints, byte for byte. */
export function formatCheckJson(report: CheckReport): string {
  return JSON.stringify(checkToQemuJson(report), null, 4) + "\n";
}

/** printf's "%0.2f": exact decimal value of the double, ties to even (toFixed breaks ties upwards). */
export function percent2(x: number): string {
  const exact = x.toFixed(60);
  const dot = exact.indexOf(".");
  if (/^50*$/.test(exact.slice(dot + 3))) {
    const last = Number(exact[dot + 2]);
    if (last % 2 === 0) return exact.slice(0, dot + 3);
  }
  return x.toFixed(2);
}

/** What qemu-img check prints on stdout in human mode (the repair preamble included). */
export function formatCheckHuman(report: CheckReport): string {
  let out = "";
  if (report.corruptionsFixed || report.leaksFixed) {
    out +=
      "The following inconsistencies were found and repaired:\n\n" +
      `    ${report.leaksFixed} leaked clusters\n` +
      `    ${report.corruptionsFixed} corruptions\n\n` +
      "Double checking the fixed image now...\n";
  }
  if (!(report.corruptions || report.leaks || report.checkErrors)) {
    out += "No errors were found on the image.\n";
  } else {
    if (report.corruptions) {
      out +=
        `\n${report.corruptions} errors were found on the image.\n` +
        "Data may be corrupted, or further writes to the image may corrupt it.\n";
    }
    if (report.leaks) {
      out +=
        `\n${report.leaks} leaked clusters were found on the image.\n` +
        "This means waste of disk space, but no harm to data.\n";
    }
    if (report.checkErrors) {
      out += `\n${report.checkErrors} internal errors have occurred during the check.\n`;
    }
  }
  if (report.totalClusters !== 0 && report.allocatedClusters !== 0) {
    const a = report.allocatedClusters;
    const t = report.totalClusters;
    out +=
      `${a}/${t} = ${percent2((a * 100) / t)}% allocated, ` +
      `${percent2((report.fragmentedClusters * 100) / a)}% fragmented, ` +
      `${percent2((report.compressedClusters * 100) / a)}% compressed clusters\n`;
  }
  if (report.imageEndOffset) out += `Image end offset: ${report.imageEndOffset}\n`;
  return out;
}

/**
 * What qemu does when it opens a dirty image (lazy refcounts after an unclean shutdown) for
 * writing: a check with full repair. `header` is updated in place (refcount table, dirty bit).
 */
export async function repairDirtyImage(backend: BlockBackend, header: Qcow2Header, options: { wasm?: WasmVariant } = {}): Promise<void> {
  const lines: string[] = [];
  const pass = await checkPass(backend, FIX_LEAKS | FIX_ERRORS, options, (line) => lines.push(line), header);
  if (pass.failure !== undefined || pass.counts.checkErrors || pass.counts.corruptions) {
    const why = pass.failure ?? lines.filter((l) => l.startsWith("ERROR")).slice(0, 3).join("; ");
    throw new Qcow2Error(Qcow2ErrorCode.CORRUPT, `${backend.name}: could not repair the dirty image: ${why || `${pass.counts.corruptions} corruptions remain`}`);
  }
}
