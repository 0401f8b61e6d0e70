// Running qemu-img / qemu-io from tests. Tests that need them use `describeQemu`: where the tools
// are missing they are skipped with a visible notice, except under CI, where they must run.

import { execFileSync, spawnSync } from "node:child_process";
import { closeSync, mkdtempSync, openSync, readSync, rmSync, writeSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { afterAll, describe } from "vitest";
import type { MapEntry } from "../../ts/ops/map.js";

export const hasQemu = spawnSync("qemu-img", ["--version"]).status === 0;

if (!hasQemu) {
  if (process.env.CI) throw new Error("qemu-img is required under CI (apt-get install qemu-utils)");
  console.warn("qemu-img not found: tests that compare with qemu are SKIPPED (apt-get install qemu-utils)");
}

/** `describe` for suites that need qemu-img; skipped with a notice where it is missing (never in CI). */
export const describeQemu: typeof describe = hasQemu ? describe : (describe.skip as typeof describe);

export function qemuImg(args: string[], options: { input?: Buffer } = {}): string {
  return execFileSync("qemu-img", args, { encoding: "utf8", maxBuffer: 1 << 30, input: options.input });
}

export function qemuImgBuffer(args: string[]): Buffer {
  return execFileSync("qemu-img", args, { maxBuffer: 1 << 30 });
}

/** Run qemu-io commands on an image: qemuIo(file, ["write -P 0xaa 0 64k", ...], ["-f", "qcow2"]). */
export function qemuIo(file: string, commands: string[], extra: string[] = []): string {
  const args = [...extra];
  for (const c of commands) args.push("-c", c);
  args.push(file);
  return execFileSync("qemu-io", args, { encoding: "utf8", maxBuffer: 1 << 30 });
}

/** What qemu-img map --output=json prints per entry: the same shape as our MapEntry. */
export type QemuMapEntry = MapEntry;

export function qemuMap(file: string): QemuMapEntry[] {
  return JSON.parse(qemuImg(["map", "--output=json", file])) as QemuMapEntry[];
}

/** What qemu-img map says is data, zero or a hole, range by range: the layout, not where it lies. */
export function allocationLayout(file: string): string[] {
  return qemuMap(file).map((e) => `${e.start}+${e.length}:${e.data ? "data" : e.zero ? "zero" : "hole"}`);
}

/** A temporary directory removed after the calling file's tests. */
export function tempDir(prefix = "qcow2-test-"): string {
  const dir = mkdtempSync(path.join(tmpdir(), prefix));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** Deterministic pseudo-random generator (mulberry32) for fixed-seed tests. */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export function randomBytes(rand: () => number, length: number): Uint8Array {
  const out = new Uint8Array(length);
  for (let i = 0; i < length; i++) out[i] = (rand() * 256) | 0;
  return out;
}

/**
 * `qemu-img create` of an encrypted image. qemu 7.2's PBKDF2 calibration fails now and then on a
 * busy machine ("Unable to get accurate CPU usage"): that error alone is retried.
 */
export function qemuCreateEncrypted(args: string[]): void {
  for (let attempt = 0; ; attempt++) {
    try {
      execFileSync("qemu-img", ["create", ...args], { stdio: "pipe" });
      return;
    } catch (e) {
      if (attempt >= 30 || !String((e as { stderr?: Buffer }).stderr).includes("Unable to get accurate CPU usage")) throw e;
    }
  }
}

/** Overwrite the start of guest cluster 0's compressed stream with 0xff, so that it no longer inflates. */
export function breakCompressedCluster(file: string): void {
  const fd = openSync(file, "r+");
  try {
    const at = (pos: number, bytes: number): Buffer => {
      const b = Buffer.alloc(bytes);
      readSync(fd, b, 0, bytes, pos);
      return b;
    };
    const clusterBits = at(20, 4).readUInt32BE(0);
    const l1 = Number(at(40, 8).readBigUInt64BE(0));
    const l2 = Number(at(l1, 8).readBigUInt64BE(0) & 0x00fffffffffffe00n);
    const entry = at(l2, 8).readBigUInt64BE(0);
    const hostOffset = Number(entry & ((1n << BigInt(62 - (clusterBits - 8))) - 1n));
    writeSync(fd, Buffer.alloc(64, 0xff), 0, 64, hostOffset);
  } finally {
    closeSync(fd);
  }
}
