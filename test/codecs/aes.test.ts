// Sector ciphers (ts/codecs/aes-wasm.ts, ts/codecs/node-crypto.ts): published vectors (NIST SP
// 800-38A, IEEE P1619-2007) through every implementation, differential runs against two oracles
// (node:crypto with one OpenSSL object per sector, and @noble/ciphers) over many sector numbers and
// lengths, both WASM builds, and a qemu-written legacy AES image decrypted (and written) by us.

import { execFileSync } from "node:child_process";
import { closeSync, openSync, readFileSync, readSync, writeFileSync, writeSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { cbc, ecb } from "@noble/ciphers/aes.js";
import { beforeAll, describe, expect, it } from "vitest";
import { WasmSectorCipher } from "../../ts/codecs/aes-wasm.js";
import { NodeSectorCipher } from "../../ts/codecs/node-crypto.js";
import {
  SECTOR_CIPHER_ALGORITHMS,
  SECTOR_SIZE,
  luksSectorCipherAlgorithm,
  sectorCipherParams,
  writePlain64,
  type SectorCipher,
  type SectorCipherAlgorithm,
} from "../../ts/codecs/sector-cipher.js";
import { platform } from "../../ts/platform.js";
import { WasmCore } from "../../ts/wasm/core.js";
import { AES_BAD_LENGTH, AES_BAD_SCHEDULE, AES_OK, AES_SCHEDULE_SIZE } from "../../ts/wasm/exports.js";
import { describeQemu, qemuImg, randomBytes, rng, tempDir } from "../helpers/qemu.js";

const here = path.dirname(fileURLToPath(import.meta.url));

interface BlockVector {
  comment: string;
  key: string;
  iv?: string;
  plaintext: string;
  ciphertext: string;
}
interface XtsVector {
  vector: number;
  key: string;
  dataUnitSequenceNumber: number;
  plaintext: string;
  ciphertext: string;
}
const VECTORS = JSON.parse(readFileSync(path.join(here, "vectors", "aes.json"), "utf8")) as {
  ecb: { vectors: BlockVector[] };
  cbc: { vectors: BlockVector[] };
  xts: { vectors: XtsVector[] };
};

const hex = (s: string): Uint8Array => Uint8Array.from(Buffer.from(s, "hex"));
const toHex = (b: Uint8Array): string => Buffer.from(b).toString("hex");
const MiB = 1 << 20;

/** The oracle from @noble/ciphers: CBC per sector; XTS composed from ECB as IEEE 1619 defines it. */
class NobleSectorCipher implements SectorCipher {
  readonly algorithm: SectorCipherAlgorithm;
  private readonly key: Uint8Array;

  constructor(algorithm: SectorCipherAlgorithm, key: Uint8Array) {
    this.algorithm = algorithm;
    this.key = key.slice();
  }

  encrypt(src: Uint8Array, firstSector: number, dst: Uint8Array = src): void {
    this.run(src, firstSector, dst, true);
  }

  decrypt(src: Uint8Array, firstSector: number, dst: Uint8Array = src): void {
    this.run(src, firstSector, dst, false);
  }

  destroy(): void {
    this.key.fill(0);
  }

  private run(src: Uint8Array, firstSector: number, dst: Uint8Array, encrypt: boolean): void {
    const { mode, aesKeyBytes: n } = sectorCipherParams(this.algorithm);
    const iv = new Uint8Array(16);
    for (let at = 0, s = firstSector; at < src.length; at += SECTOR_SIZE, s++) {
      writePlain64(iv, 0, s);
      const sector = src.subarray(at, at + SECTOR_SIZE);
      if (mode === "cbc") {
        const c = cbc(this.key, iv, { disablePadding: true });
        dst.set(encrypt ? c.encrypt(sector) : c.decrypt(sector), at);
        continue;
      }
      const tweak = ecb(this.key.subarray(n, 2 * n), { disablePadding: true }).encrypt(iv);
      const tweaks = new Uint8Array(SECTOR_SIZE);
      for (let j = 0; j < SECTOR_SIZE; j += 16) {
        tweaks.set(tweak, j);
        // Times alpha: left shift of the little-endian 128-bit value, 0x87 in on carry-out.
        const carry = tweak[15]! >> 7;
        for (let i = 15; i > 0; i--) tweak[i] = ((tweak[i]! << 1) | (tweak[i - 1]! >> 7)) & 0xff;
        tweak[0] = ((tweak[0]! << 1) & 0xff) ^ (carry * 0x87);
      }
      const x = sector.map((b, i) => b ^ tweaks[i]!);
      const block = ecb(this.key.subarray(0, n), { disablePadding: true });
      const y = encrypt ? block.encrypt(x) : block.decrypt(x);
      dst.set(
        y.map((b, i) => b ^ tweaks[i]!),
        at,
      );
    }
  }
}

type Maker = (algorithm: SectorCipherAlgorithm, key: Uint8Array) => Promise<SectorCipher>;

const IMPLEMENTATIONS: Array<[string, Maker]> = [
  ["wasm simd", (a, k) => WasmSectorCipher.create(a, k, { variant: "simd" })],
  ["wasm scalar", (a, k) => WasmSectorCipher.create(a, k, { variant: "scalar" })],
  // A small staging buffer, so runs cross many staging pieces.
  ["wasm simd, 4 KiB staging", (a, k) => WasmSectorCipher.create(a, k, { variant: "simd", stagingBytes: 4096 })],
  ["node:crypto batched", async (a, k) => new NodeSectorCipher(a, k)],
  ["node:crypto per sector", async (a, k) => new NodeSectorCipher(a, k, { strategy: "per-sector" })],
  ["noble (oracle)", async (a, k) => new NobleSectorCipher(a, k)],
];

/** One 512-byte sector with `head` at its start and zeros after. */
function sectorWith(head: Uint8Array): Uint8Array {
  const s = new Uint8Array(SECTOR_SIZE);
  s.set(head);
  return s;
}

function xorInto(dst: Uint8Array, src: Uint8Array): void {
  for (let i = 0; i < src.length; i++) dst[i]! ^= src[i]!;
}

describe("published vectors", () => {
  const aesBits = (key: string): 128 | 256 => (key.length === 32 ? 128 : 256);

  for (const [name, make] of IMPLEMENTATIONS) {
    describe(name, () => {
      it("SP 800-38A ECB: single blocks through sector 0 of CBC (IV 0)", async () => {
        let checked = 0;
        for (const v of VECTORS.ecb.vectors) {
          const c = await make(`aes-${aesBits(v.key)}-cbc-plain64`, hex(v.key));
          const pt = hex(v.plaintext);
          const ct = hex(v.ciphertext);
          for (let b = 0; b < pt.length; b += 16) {
            const enc = sectorWith(pt.subarray(b, b + 16));
            c.encrypt(enc, 0);
            expect(toHex(enc.subarray(0, 16)), `${v.comment} block ${b / 16}`).toBe(toHex(ct.subarray(b, b + 16)));
            const dec = sectorWith(ct.subarray(b, b + 16));
            c.decrypt(dec, 0);
            expect(toHex(dec.subarray(0, 16))).toBe(toHex(pt.subarray(b, b + 16)));
            checked++;
          }
        }
        expect(checked).toBe(8);
      });

      it("SP 800-38A CBC: F.2.1 and F.2.5 (the IV folded into the first block of sector 0)", async () => {
        for (const v of VECTORS.cbc.vectors) {
          const c = await make(`aes-${aesBits(v.key)}-cbc-plain64`, hex(v.key));
          const iv = hex(v.iv!);
          const pt = hex(v.plaintext);
          const ct = hex(v.ciphertext);
          // plain64(0) is all zeros, so P0 ^ IV in the first block gives E(P0 ^ IV) as the vector does.
          const enc = sectorWith(pt);
          xorInto(enc, iv);
          c.encrypt(enc, 0);
          expect(toHex(enc.subarray(0, ct.length)), v.comment).toBe(toHex(ct));
          const dec = sectorWith(ct);
          c.decrypt(dec, 0);
          xorInto(dec, iv);
          expect(toHex(dec.subarray(0, pt.length)), v.comment).toBe(toHex(pt));
        }
      });

      it("IEEE P1619 XTS-AES vectors 1-14", async () => {
        for (const v of VECTORS.xts.vectors) {
          const key = hex(v.key);
          const c = await make(key.length === 32 ? "aes-128-xts-plain64" : "aes-256-xts-plain64", key);
          const pt = hex(v.plaintext);
          const ct = hex(v.ciphertext);
          const half = key.length / 2;
          if (name === "node:crypto per sector" && Buffer.compare(key.subarray(0, half), key.subarray(half)) === 0) {
            // OpenSSL 3's XTS refuses Key1 == Key2 (vector 1); the batched strategy runs ECB and is fine.
            expect(() => c.encrypt(sectorWith(pt), v.dataUnitSequenceNumber)).toThrow(/duplicated keys/);
            continue;
          }
          // Vectors 1-3 have 32-byte data units: the first blocks of a 512-byte unit with the same tweak.
          const enc = sectorWith(pt);
          c.encrypt(enc, v.dataUnitSequenceNumber);
          expect(toHex(enc.subarray(0, ct.length)), `vector ${v.vector}`).toBe(toHex(ct));
          const dec = sectorWith(ct);
          c.decrypt(dec, v.dataUnitSequenceNumber);
          expect(toHex(dec.subarray(0, pt.length)), `vector ${v.vector}`).toBe(toHex(pt));
        }
        expect(VECTORS.xts.vectors.length).toBe(14);
      });
    });
  }
});

/** Sector numbers worth crossing: small, around 2^31 and 2^32, far past 2^32, and up to 2^53 - 1. */
const SECTORS = [0, 1, 7, 2 ** 31 - 3, 2 ** 32 - 5, 2 ** 32, 2 ** 40 + 12345, 2 ** 48 - 1, 2 ** 53 - 8192];

/**
 * Lengths in sectors: around the 8-lane batches, node:crypto's lockstep threshold (24) and chunk
 * (512), the 64 KiB staging buffer; 1 and 4 MiB.
 */
const LENGTHS = [1, 2, 3, 7, 8, 9, 15, 16, 17, 23, 24, 33, 127, 128, 129, 513, 2048, 8192];

describe("implementations agree (fixed seeds)", () => {
  for (const algorithm of SECTOR_CIPHER_ALGORITHMS) {
    describe(algorithm, () => {
      const rand = rng(0x5ec7 + algorithm.length * 7919 + (algorithm.includes("256") ? 1 : 0));
      const key = randomBytes(rand, sectorCipherParams(algorithm).keyBytes);
      const reference = new NodeSectorCipher(algorithm, key, { strategy: "per-sector" });
      const noble = new NobleSectorCipher(algorithm, key);
      const plain = randomBytes(rand, 4 * MiB);
      const cases = LENGTHS.map((sectors, i) => ({ sectors, first: SECTORS[i % SECTORS.length]! }));
      // The top of the range exactly: the last sector is 2^53 - 1.
      cases.push({ sectors: 5, first: 2 ** 53 - 5 });
      const expected = new Map<string, Uint8Array>();

      beforeAll(() => {
        for (const { sectors, first } of cases) {
          const out = new Uint8Array(sectors * SECTOR_SIZE);
          reference.encrypt(plain.subarray(0, out.length), first, out);
          expected.set(`${sectors}@${first}`, out);
        }
      });

      it("the two oracles agree with each other", () => {
        for (const { sectors, first } of cases) {
          if (sectors > 128) continue; // noble is the slow one; the long runs are covered below
          const out = plain.slice(0, sectors * SECTOR_SIZE);
          noble.encrypt(out, first);
          expect(toHex(out) === toHex(expected.get(`${sectors}@${first}`)!), `${sectors} sectors from ${first}`).toBe(true);
        }
      });

      for (const [name, make] of IMPLEMENTATIONS.slice(0, 4)) {
        it(`${name}: encrypt and decrypt, in place and into dst`, async () => {
          const c = await make(algorithm, key);
          for (const [i, { sectors, first }] of cases.entries()) {
            const bytes = sectors * SECTOR_SIZE;
            const want = expected.get(`${sectors}@${first}`)!;
            const src = plain.subarray(0, bytes);
            const label = `${sectors} sectors from ${first}`;
            if (i % 2 === 0) {
              const buf = src.slice();
              c.encrypt(buf, first);
              expect(Buffer.compare(buf, want), `encrypt in place, ${label}`).toBe(0);
              c.decrypt(buf, first);
              expect(Buffer.compare(buf, src), `decrypt in place, ${label}`).toBe(0);
            } else {
              // A dst at an odd offset inside a larger buffer, and a src that must not change.
              const before = src.slice();
              const outer = new Uint8Array(bytes + 3);
              const dst = outer.subarray(1, 1 + bytes);
              c.encrypt(src, first, dst);
              expect(Buffer.compare(dst, want), `encrypt into dst, ${label}`).toBe(0);
              expect(Buffer.compare(src, before)).toBe(0);
              expect(outer[0]).toBe(0);
              expect(outer[bytes + 1]).toBe(0);
              const back = new Uint8Array(bytes);
              c.decrypt(dst, first, back);
              expect(Buffer.compare(back, src), `decrypt into dst, ${label}`).toBe(0);
            }
          }
          c.destroy();
        });
      }

      it("a run gives the same bytes as the same sectors in pieces", async () => {
        const c = await WasmSectorCipher.create(algorithm, key);
        const first = 2 ** 32 - 40;
        const whole = plain.slice(0, 200 * SECTOR_SIZE);
        c.encrypt(whole, first);
        const pieces = plain.slice(0, 200 * SECTOR_SIZE);
        for (const [from, to] of [[0, 1], [1, 9], [9, 50], [50, 51], [51, 200]] as const) {
          c.encrypt(pieces.subarray(from * SECTOR_SIZE, to * SECTOR_SIZE), first + from);
        }
        expect(Buffer.compare(whole, pieces)).toBe(0);
      });
    });
  }
});

describe("misuse", () => {
  it("refuses bad keys, lengths, sector numbers and dst, naming the module", async () => {
    const key = new Uint8Array(64);
    for (const make of [(k: Uint8Array) => WasmSectorCipher.create("aes-256-xts-plain64", k), async (k: Uint8Array) => new NodeSectorCipher("aes-256-xts-plain64", k)]) {
      await expect(make(new Uint8Array(32))).rejects.toThrow(/takes a 64-byte key, got 32/);
      const c = await make(key);
      expect(() => c.encrypt(new Uint8Array(1000), 0)).toThrow(RangeError);
      expect(() => c.encrypt(new Uint8Array(1000), 0)).toThrow(/length 1000 is not a multiple of 512/);
      expect(() => c.decrypt(new Uint8Array(512), -1)).toThrow(RangeError);
      expect(() => c.decrypt(new Uint8Array(512), 1.5)).toThrow(RangeError);
      expect(() => c.decrypt(new Uint8Array(1024), 2 ** 53 - 1)).toThrow(/pass 2\^53 - 1/);
      expect(() => c.encrypt(new Uint8Array(512), 0, new Uint8Array(1024))).toThrow(/dst has 1024 bytes/);
      c.encrypt(new Uint8Array(0), 0);
      c.destroy();
      expect(() => c.encrypt(new Uint8Array(512), 0)).toThrow(/after destroy/);
    }
    await expect(WasmSectorCipher.create("aes-128-ecb" as SectorCipherAlgorithm, new Uint8Array(16))).rejects.toThrow(TypeError);
    await expect(WasmSectorCipher.create("aes-128-cbc-plain64", new Uint8Array(16), { stagingBytes: 1000 })).rejects.toThrow(RangeError);
  });

  it("the WASM exports return status codes instead of trapping", async () => {
    for (const variant of ["simd", "scalar"] as const) {
      const core = await WasmCore.create(variant);
      const x = core.exports;
      const schedule = core.reserve(AES_SCHEDULE_SIZE);
      const tweak = core.reserve(AES_SCHEDULE_SIZE);
      const data = core.reserve(1024);
      expect(x.aesExpandKey(schedule, data, 24)).toBe(0);
      // A schedule never expanded (all zero) is refused, and so are partial sectors.
      expect(x.aesCbcEncrypt(schedule, data, 512, 0)).toBe(AES_BAD_SCHEDULE);
      expect(x.aesXtsDecrypt(schedule, tweak, data, 512, 0)).toBe(AES_BAD_SCHEDULE);
      expect(x.aesExpandKey(schedule, data, 16)).toBe(10);
      expect(x.aesExpandKey(tweak, data, 32)).toBe(14);
      expect(x.aesCbcDecrypt(schedule, data, 1000, 0)).toBe(AES_BAD_LENGTH);
      expect(x.aesXtsEncrypt(schedule, tweak, data, 16, 0)).toBe(AES_BAD_LENGTH);
      expect(x.aesXtsEncrypt(schedule, tweak, data, 1024, 2 ** 40)).toBe(AES_OK);
    }
  });

  it("maps LUKS cipher names", () => {
    expect(luksSectorCipherAlgorithm("aes-256", "xts", "plain64")).toBe("aes-256-xts-plain64");
    expect(luksSectorCipherAlgorithm("aes-128", "cbc", "plain64")).toBe("aes-128-cbc-plain64");
    expect(luksSectorCipherAlgorithm("aes-192", "xts", "plain64")).toBeUndefined();
    expect(luksSectorCipherAlgorithm("aes-256", "cbc", "essiv")).toBeUndefined();
  });

  it("the core platform's default is the WASM cipher", async () => {
    const c = await platform.createSectorCipher("aes-128-cbc-plain64", new Uint8Array(16));
    expect(c).toBeInstanceOf(WasmSectorCipher);
    c.destroy();
  });
});

// ---- qemu writes a legacy AES image; we decrypt its host clusters (and qemu reads what we encrypt).

/** Host offset of the cluster holding `guestOffset`, from the image's L1 and L2 tables. */
function hostClusterOffset(file: string, guestOffset: number): number {
  const fd = openSync(file, "r");
  try {
    const header = Buffer.alloc(104);
    readSync(fd, header, 0, header.length, 0);
    const clusterBits = header.readUInt32BE(20);
    const l1Offset = Number(header.readBigUInt64BE(40));
    const cryptMethod = header.readUInt32BE(32);
    expect(cryptMethod).toBe(1);
    const l2Entries = 2 ** (clusterBits - 3);
    const clusterIndex = Math.floor(guestOffset / 2 ** clusterBits);
    const entry = Buffer.alloc(8);
    readSync(fd, entry, 0, 8, l1Offset + 8 * Math.floor(clusterIndex / l2Entries));
    const l2Offset = Number(entry.readBigUInt64BE(0) & 0x00fffffffffffe00n);
    readSync(fd, entry, 0, 8, l2Offset + 8 * (clusterIndex % l2Entries));
    const host = Number(entry.readBigUInt64BE(0) & 0x00fffffffffffe00n);
    expect(host).toBeGreaterThan(0);
    return host + (guestOffset % 2 ** clusterBits);
  } finally {
    closeSync(fd);
  }
}

describeQemu("qemu legacy AES (crypt_method 1) cross-check", () => {
  const dir = tempDir("qcow2-aes-");
  const file = path.join(dir, "aes.qcow2");
  const secret = ["--object", "secret,id=sec0,data=abc"];
  const imageOpts = `driver=qcow2,file.filename=${file},encrypt.key-secret=sec0`;
  // The password "abc", zero-padded to 16 bytes, is the key (qemu crypto/block-qcow.c).
  const key = new Uint8Array(16);
  key.set(Buffer.from("abc"));

  beforeAll(() => {
    qemuImg(["create", "-q", "-f", "qcow2", "-o", "encrypt.format=aes,encrypt.key-secret=sec0", ...secret, file, "4M"]);
    // A second cluster far from the first in guest space, so guest and host sector numbers differ.
    execFileSync("qemu-io", [...secret, "--image-opts", imageOpts, "-c", "write -P 0x5a 0 64k", "-c", "write -P 0xc3 3M 64k"]);
  });

  for (const [name, make] of IMPLEMENTATIONS.slice(0, 5)) {
    it(`${name} decrypts qemu's host clusters with guest sector numbers`, async () => {
      const c = await make("aes-128-cbc-plain64", key);
      const fd = openSync(file, "r");
      try {
        for (const [guest, pattern] of [
          [0, 0x5a],
          [3 * MiB, 0xc3],
        ] as const) {
          const host = hostClusterOffset(file, guest);
          expect(host).not.toBe(guest);
          const raw = Buffer.alloc(65536);
          readSync(fd, raw, 0, raw.length, host);
          expect(raw.includes(Buffer.alloc(512, pattern))).toBe(false);
          const plain = new Uint8Array(raw.length);
          c.decrypt(raw, guest / SECTOR_SIZE, plain);
          expect(plain.every((b) => b === pattern), `guest ${guest}`).toBe(true);
          // Numbered by host offset (as LUKS numbers them) the first block of each sector is wrong.
          c.decrypt(raw, host / SECTOR_SIZE, plain);
          expect(plain.every((b) => b === pattern)).toBe(false);
          expect(plain.subarray(16, 512).every((b) => b === pattern)).toBe(true);
          // And our encryption of the pattern is exactly what qemu wrote.
          const again = new Uint8Array(65536).fill(pattern);
          c.encrypt(again, guest / SECTOR_SIZE);
          expect(Buffer.compare(again, raw)).toBe(0);
        }
      } finally {
        closeSync(fd);
      }
    });
  }

  it("qemu reads a cluster we encrypted", async () => {
    const c = await WasmSectorCipher.create("aes-128-cbc-plain64", key);
    const copy = path.join(dir, "ours.qcow2");
    writeFileSync(copy, readFileSync(file));
    const guest = 3 * MiB;
    const host = hostClusterOffset(copy, guest);
    const data = new Uint8Array(65536);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7 + (i >> 9)) & 0xff;
    const cipher = data.slice();
    c.encrypt(cipher, guest / SECTOR_SIZE);
    const fd = openSync(copy, "r+");
    writeSync(fd, cipher, 0, cipher.length, host);
    closeSync(fd);
    const raw = path.join(dir, "ours.raw");
    qemuImg(["convert", "-O", "raw", ...secret, "--image-opts", imageOpts.replace(file, copy), raw]);
    const guestBytes = readFileSync(raw).subarray(guest, guest + data.length);
    expect(Buffer.compare(guestBytes, data)).toBe(0);
  });
});
