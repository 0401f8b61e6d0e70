// Encrypted images against qemu: images qemu-img/qemu-io made (legacy AES and LUKS, several cluster
// sizes, over a backing file) read byte for byte as qemu reads them with the passphrase; images we
// create and write (unaligned and partial-sector writes, COW from a backing file, zeroes) read by
// qemu-img convert with --object secret exactly as our model says, and check clean.

import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import path from "node:path";
import { expect, it } from "vitest";
import { Qcow2Image, isQcow2Error } from "../../ts/node.js";
import { describeQemu, qemuCreateEncrypted, qemuImg, rng, tempDir } from "../helpers/qemu.js";

const SECRET = "s3cr3t passphrase";


function imageOpts(file: string): string {
  return `driver=qcow2,file.filename=${file},encrypt.key-secret=sec0`;
}

function qemuIoEncrypted(file: string, commands: string[]): void {
  const args = ["--object", `secret,id=sec0,data=${SECRET}`, "--image-opts", imageOpts(file)];
  for (const c of commands) args.push("-c", c);
  execFileSync("qemu-io", args, { stdio: "pipe" });
}

/** What qemu reads from an encrypted image (the whole guest disk as raw). */
function qemuRead(dir: string, file: string): Buffer {
  const out = path.join(dir, "qemu-read.raw");
  execFileSync("qemu-img", ["convert", "--object", `secret,id=sec0,data=${SECRET}`, "--image-opts", imageOpts(file), "-O", "raw", out]);
  return readFileSync(out);
}

function checkClean(file: string): Record<string, number> {
  const r = JSON.parse(
    execFileSync("qemu-img", ["check", "--object", `secret,id=sec0,data=${SECRET}`, "--image-opts", imageOpts(file), "--output=json"], {
      encoding: "utf8",
    }),
  ) as Record<string, number>;
  return { corruptions: r.corruptions ?? 0, leaks: r.leaks ?? 0, errors: r["check-errors"] ?? 0 };
}

describeQemu("encrypted images", { timeout: 120_000 }, () => {
  const dir = tempDir("qcow2-crypt-");

  for (const format of ["aes", "luks"] as const) {
    for (const clusterSize of [4096, 65536]) {
      it(`reads what qemu wrote: ${format}, ${clusterSize}-byte clusters, over a backing file`, async () => {
        const base = path.join(dir, `base-${format}-${clusterSize}.raw`);
        qemuImg(["create", "-q", "-f", "raw", base, "2M"]);
        execFileSync("qemu-io", ["-f", "raw", "-c", "write -P 0x11 0 2M", base], { stdio: "pipe" });
        const file = path.join(dir, `qemu-${format}-${clusterSize}.qcow2`);
        qemuCreateEncrypted([
          "-q", "-f", "qcow2", "--object", `secret,id=sec0,data=${SECRET}`,
          "-o", `encrypt.format=${format},encrypt.key-secret=sec0,cluster_size=${clusterSize}${format === "luks" ? ",encrypt.iter-time=10" : ""}`,
          "-b", base, "-F", "raw", file, "2M",
        ]);
        qemuIoEncrypted(file, ["write -P 0x5a 0 100k", "write -P 0xa5 300k 1000", "write -P 0x33 1030k 7", "write -z 1500k 64k"]);
        const image = await Qcow2Image.open(file, { passphrase: SECRET });
        expect(image.info().encryption).toBe(format);
        const ours = await image.read(0, image.virtualSize);
        // Unaligned reads decrypt the sectors they touch.
        const piece = await image.read(300 * 1024 + 3, 1001);
        await image.close();
        const theirs = qemuRead(dir, file);
        expect(Buffer.compare(ours, theirs)).toBe(0);
        expect(Buffer.compare(piece, theirs.subarray(300 * 1024 + 3, 300 * 1024 + 1004))).toBe(0);
      });
    }
  }

  for (const format of ["aes", "luks"] as const) {
    it(`writes what qemu reads: ${format}, created by us, random unaligned writes, COW from a backing file`, async () => {
      const size = 3 << 20;
      const base = path.join(dir, `wbase-${format}.raw`);
      qemuImg(["create", "-q", "-f", "raw", base, String(size)]);
      execFileSync("qemu-io", ["-f", "raw", "-c", `write -P 0x77 0 ${size}`, base], { stdio: "pipe" });
      const file = path.join(dir, `ours-${format}.qcow2`);
      const image = await Qcow2Image.create(file, {
        size,
        clusterSize: 4096,
        backingFile: base,
        backingFormat: "raw",
        encryption: { format, passphrase: SECRET, iterTime: 10 },
      });
      const model = new Uint8Array(size).fill(0x77);
      const rand = rng(format === "aes" ? 3 : 4);
      for (let i = 0; i < 60; i++) {
        const start = Math.floor(rand() * (size - 1));
        const len = Math.min(size - start, 1 + Math.floor(rand() * 20000));
        if (rand() < 0.15) {
          await image.writeZeroes(start, len);
          model.fill(0, start, start + len);
        } else {
          const data = new Uint8Array(len);
          for (let k = 0; k < len; k++) data[k] = (i * 13 + k) & 0xff;
          await image.write(start, data);
          model.set(data, start);
        }
      }
      expect(Buffer.compare(await image.read(0, size), model)).toBe(0);
      await image.close();
      expect(checkClean(file)).toEqual({ corruptions: 0, leaks: 0, errors: 0 });
      expect(Buffer.compare(qemuRead(dir, file), model)).toBe(0);
      const info = JSON.parse(qemuImg(["info", "--output=json", file])) as { encrypted?: boolean; "format-specific": { data: { encrypt: { format: string } } } };
      expect(info.encrypted).toBe(true);
      expect(info["format-specific"].data.encrypt.format).toBe(format);
      // And we read it back after reopening.
      const again = await Qcow2Image.open(file, { passphrase: SECRET });
      expect(Buffer.compare(await again.read(0, size), model)).toBe(0);
      await again.close();
    });
  }

  it("refuses what it cannot do: no passphrase, a wrong LUKS passphrase, compressed writes", async () => {
    const file = path.join(dir, "refuse.qcow2");
    const image = await Qcow2Image.create(file, { size: 1 << 20, encryption: { format: "luks", passphrase: SECRET, iterTime: 10 } });
    await image.write(0, new Uint8Array(4096).fill(1));
    await expect(image.writeCompressed(65536, new Uint8Array(65536))).rejects.toSatisfy((e) => isQcow2Error(e, "NOT_SUPPORTED"));
    await image.close();
    const locked = await Qcow2Image.open(file);
    expect(locked.info().encryption).toBe("luks");
    await expect(locked.read(0, 512)).rejects.toSatisfy((e) => isQcow2Error(e, "ENCRYPTED"));
    await locked.close();
    await expect(Qcow2Image.open(file, { passphrase: "wrong" })).rejects.toSatisfy(
      (e) => isQcow2Error(e, "BAD_PASSPHRASE") && (e as Error).message === "Invalid password, cannot unlock any keyslot",
    );
    const rw = await Qcow2Image.open(file, { readOnly: false });
    await expect(rw.write(0, new Uint8Array(10))).rejects.toSatisfy((e) => isQcow2Error(e, "ENCRYPTED"));
    await rw.close();
  });
});
