// qcow2-img convert against qemu-img convert on encrypted images (256 MiB; 64 MiB with --quick):
// a LUKS (aes-256-xts) and a legacy AES (aes-128-cbc) image made by qemu-img from the same
// deterministic mixed data, decrypted to raw, and the raw data encrypted into a new image. Both
// tools run as processes with the same arguments (--object secret, --image-opts), alternating, best
// of several rounds; outputs are compared before any time counts.
//
//   node bench/convert-encrypted.mjs [--quick]

import { spawnSync } from "node:child_process";
import { closeSync, openSync, readFileSync, rmSync, writeSync } from "node:fs";
import path from "node:path";
import { MiB, OUT_DIR, QUICK, best, buildOnce, fillText, fmt, fmtRatio, headline, now, printTable, rng32, run, scratchDirFor, section, warn } from "./_common.mjs";

const SIZE = QUICK ? 64 * MiB : 256 * MiB;
const ROUNDS = QUICK ? 2 : 3;
const CLI = new URL("../build/cli/main.js", import.meta.url).pathname;
const SECRET = ["--object", "secret,id=sec0,data=bench-passphrase"];
const opts = (file) => `driver=qcow2,file.filename=${file},encrypt.key-secret=sec0`;

const raw = buildOnce(path.join(OUT_DIR, `convert-enc-${SIZE / MiB}m.raw`), (f) => {
  const fd = openSync(f, "w");
  const next = rng32(0xe4c);
  const region = 4 * MiB;
  const buf = Buffer.alloc(region);
  for (let r = 0; r < SIZE / region; r++) {
    buf.fill(0);
    for (let i = 0; i < 2 * MiB; i += 4) buf.writeUInt32LE(next(), i);
    fillText(buf.subarray(3 * MiB), next);
    writeSync(fd, buf, 0, region, r * region);
  }
  closeSync(fd);
});

/** qemu 7.2's PBKDF2 calibration fails now and then ("Unable to get accurate CPU usage"): retry. */
function qemuConvertRetry(args) {
  for (let i = 0; i < 30; i++) {
    const p = spawnSync("qemu-img", ["convert", ...args], { encoding: "utf8" });
    if (p.status === 0) return;
    if (!p.stderr.includes("Unable to get accurate CPU usage")) throw new Error(p.stderr);
  }
  throw new Error("qemu-img convert kept failing its PBKDF2 calibration");
}

const images = {};
for (const format of ["luks", "aes"]) {
  images[format] = buildOnce(path.join(OUT_DIR, `convert-enc-${SIZE / MiB}m-${format}.qcow2`), (f) =>
    qemuConvertRetry([...SECRET, "-f", "raw", "-O", "qcow2", "-o", `encrypt.format=${format},encrypt.key-secret=sec0${format === "luks" ? ",encrypt.iter-time=10" : ""}`, raw, f]),
  );
}

const scratch = scratchDirFor(3 * SIZE);
const rows = [];
const cases = [
  ["LUKS aes-256-xts → raw", (src) => [...SECRET, "--image-opts", opts(src), "-O", "raw"], images.luks, "raw"],
  ["legacy AES aes-128-cbc → raw", (src) => [...SECRET, "--image-opts", opts(src), "-O", "raw"], images.aes, "raw"],
  ["raw → LUKS aes-256-xts", () => [...SECRET, "-f", "raw", "-O", "qcow2", "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10"], raw, "qcow2"],
  ["raw → legacy AES", () => [...SECRET, "-f", "raw", "-O", "qcow2", "-o", "encrypt.format=aes,encrypt.key-secret=sec0"], raw, "qcow2"],
];

section(`convert, ${SIZE / MiB} MiB encrypted: qcow2-img vs qemu-img (processes, same arguments)`);
for (const [name, argsFor, src, outFmt] of cases) {
  const ours = path.join(scratch, "enc-ours.out");
  const theirs = path.join(scratch, "enc-qemu.out");
  const times = { ours: [], qemu: [] };
  let ok = true;
  for (let r = 0; r < ROUNDS && ok; r++) {
    for (const side of r % 2 ? ["qemu", "ours"] : ["ours", "qemu"]) {
      const file = side === "ours" ? ours : theirs;
      const args = [...argsFor(src), src.endsWith(".raw") ? src : undefined, file].filter((a) => a !== undefined);
      for (let attempt = 0; attempt < 30; attempt++) {
        rmSync(file, { force: true });
        const t = now();
        const p = side === "ours" ? spawnSync(process.execPath, [CLI, "convert", ...args], { encoding: "utf8" }) : spawnSync("qemu-img", ["convert", ...args], { encoding: "utf8" });
        const ms = now() - t;
        if (p.status === 0) {
          times[side].push(ms);
          break;
        }
        if (side === "qemu" && p.stderr.includes("Unable to get accurate CPU usage")) continue;
        warn(`convert ${name}`, `${side} failed: ${p.stderr}`, "");
        ok = false;
        break;
      }
      if (!ok) break;
    }
  }
  if (!ok) continue;
  // Same guest contents: raw outputs byte for byte; encrypted outputs read back through the secret.
  const plain = (file) => {
    if (outFmt === "raw") return readFileSync(file);
    const back = path.join(scratch, "enc-back.raw");
    run("qemu-img", ["convert", ...SECRET, "--image-opts", opts(file), "-O", "raw", back]);
    const bytes = readFileSync(back);
    rmSync(back, { force: true });
    return bytes;
  };
  if (Buffer.compare(plain(ours), plain(theirs)) !== 0) {
    warn(`convert ${name}`, "output differs from qemu's", "");
    continue;
  }
  const o = best(times.ours);
  const q = best(times.qemu);
  rows.push([name, `${fmt(o, 0)} ms`, `${fmt(q, 0)} ms`, fmt(o / q, 2), fmtRatio(q / o)]);
  headline(`convert ${SIZE / MiB} MiB encrypted, ${name}: qcow2-img vs qemu-img convert (time)`, `${fmt(o, 0)} ms`, `${fmt(q, 0)} ms`, fmtRatio(q / o));
  rmSync(ours, { force: true });
  rmSync(theirs, { force: true });
}
printTable(["case", "qcow2-img", "qemu-img", "time ratio", "speed-up"], rows);
