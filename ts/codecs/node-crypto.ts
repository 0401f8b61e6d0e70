// Sector ciphers over node:crypto (OpenSSL, AES-NI where the CPU has it). Registered by the ./node
// entry; nothing in the core imports this file.
//
// OpenSSL restarts the IV (CBC) or tweak (XTS) only with a new cipher object, and one object per
// 512-byte sector costs ~3 us: 150-180 MiB/s whatever the CPU (bench/crypto.mjs). So runs go
// through long-lived objects and JS does the per-sector part:
// - CBC decryption: one CBC pass over the whole run with the first sector's IV. Every block comes
//   out right except the first of each later sector, which was XORed with the previous sector's
//   last ciphertext block instead of its own IV: one 16-byte fix-up per sector.
// - CBC encryption chains inside each sector, so sectors run in lockstep through one long-lived
//   ECB object: block j of every sector of a chunk in one call (32 calls per chunk). Short runs,
//   where those calls cost more than they save, chain through one CBC object, re-aiming the IV
//   at each sector boundary by XORing it into the sector's first plaintext block.
// - XTS: the sectors' first tweaks in one ECB call with the tweak key; JS steps the tweaks (times
//   alpha in GF(2^128)) and XORs them in and out around one ECB call with the data key.
// The JS passes read and write 32-bit words through Int32Arrays, which assumes a little-endian
// host; elsewhere (and on request) every sector gets its own cipher object.

import { createCipheriv, createDecipheriv, type Cipher, type Decipher } from "node:crypto";
import {
  SECTOR_SIZE,
  checkSectorCipherKey,
  checkSectorRun,
  writePlain64,
  type SectorCipher,
  type SectorCipherAlgorithm,
} from "./sector-cipher.js";

const WHO = "node-crypto";

const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/** Sectors per JS pass: 256 KiB, so the working buffers stay in cache. */
const CHUNK_SECTORS = 512;
/**
 * Below this many sectors CBC encryption chains through one CBC object instead of lockstep ECB
 * (32 ECB calls per run): the two cross at about 24 sectors here.
 */
const LOCKSTEP_MIN_SECTORS = 24;
const BLOCKS_PER_SECTOR = SECTOR_SIZE / 16;
const WORDS_PER_SECTOR = SECTOR_SIZE / 4;

export interface NodeSectorCipherOptions {
  /**
   * "batched" (default on little-endian hosts): the strategies above. "per-sector": one OpenSSL
   * object per sector, the plain way (for comparison, and the big-endian fallback).
   */
  strategy?: "batched" | "per-sector";
}

/** Int32 view of a buffer, copying it into `spare` when it is not 4-byte aligned. */
function words(buf: Uint8Array, spare: () => Uint8Array): Int32Array {
  if ((buf.byteOffset & 3) === 0) return new Int32Array(buf.buffer, buf.byteOffset, buf.length >>> 2);
  const copy = spare().subarray(0, buf.length);
  copy.set(buf);
  return new Int32Array(copy.buffer, copy.byteOffset, copy.length >>> 2);
}

export class NodeSectorCipher implements SectorCipher {
  readonly algorithm: SectorCipherAlgorithm;
  readonly strategy: "batched" | "per-sector";
  private readonly name: string;
  private readonly xts: boolean;
  private key: Buffer;
  private readonly iv = new Uint8Array(16);
  // Long-lived objects (batched strategy): never finalized, so they keep taking whole blocks.
  private ecbEncrypt: Cipher | undefined;
  private ecbDecrypt: Decipher | undefined;
  private ecbTweak: Cipher | undefined;
  // Scratch, grown on demand up to one chunk; byteOffset 0, so Int32Array views are aligned.
  private work = new Uint8Array(0);
  private blocks = new Uint8Array(0);
  private tweaks = new Int32Array(0);
  private spare = new Uint8Array(0);
  private destroyed = false;

  constructor(algorithm: SectorCipherAlgorithm, key: Uint8Array, options: NodeSectorCipherOptions = {}) {
    const params = checkSectorCipherKey(WHO, algorithm, key);
    this.algorithm = algorithm;
    this.xts = params.mode === "xts";
    this.name = `aes-${params.aesKeyBytes * 8}-${params.mode}`;
    this.key = Buffer.from(key);
    this.strategy = options.strategy ?? (LITTLE_ENDIAN ? "batched" : "per-sector");
    if (this.strategy === "batched" && !LITTLE_ENDIAN) throw new TypeError(`${WHO}: the batched strategy needs a little-endian host`);
    if (this.strategy !== "batched" && this.strategy !== "per-sector") throw new TypeError(`${WHO}: unknown strategy ${String(this.strategy)}`);
    if (this.strategy === "batched") {
      const ecb = `aes-${params.aesKeyBytes * 8}-ecb`;
      const n = params.aesKeyBytes;
      const dataKey = this.key.subarray(0, n);
      this.ecbEncrypt = createCipheriv(ecb, dataKey, null).setAutoPadding(false);
      if (this.xts) {
        this.ecbDecrypt = createDecipheriv(ecb, dataKey, null).setAutoPadding(false);
        this.ecbTweak = createCipheriv(ecb, this.key.subarray(n, 2 * n), null).setAutoPadding(false);
      }
    }
  }

  encrypt(src: Uint8Array, firstSector: number, dst?: Uint8Array): void {
    const out = checkSectorRun(WHO, src, firstSector, dst);
    this.live();
    if (this.strategy === "per-sector") this.perSector(src, firstSector, out, true);
    else if (this.xts) this.xtsRun(src, firstSector, out, true);
    else if (src.length / SECTOR_SIZE < LOCKSTEP_MIN_SECTORS) this.cbcEncryptChained(src, firstSector, out);
    else this.cbcEncryptLockstep(src, firstSector, out);
  }

  decrypt(src: Uint8Array, firstSector: number, dst?: Uint8Array): void {
    const out = checkSectorRun(WHO, src, firstSector, dst);
    this.live();
    if (this.strategy === "per-sector") this.perSector(src, firstSector, out, false);
    else if (this.xts) this.xtsRun(src, firstSector, out, false);
    else this.cbcDecrypt(src, firstSector, out);
  }

  /** Zeroes this object's copy of the key and drops the OpenSSL contexts (which node cannot wipe). */
  destroy(): void {
    this.destroyed = true;
    this.key.fill(0);
    this.key = Buffer.alloc(0);
    this.ecbEncrypt = this.ecbDecrypt = this.ecbTweak = undefined;
    this.work.fill(0);
    this.blocks.fill(0);
    this.tweaks.fill(0);
    this.spare.fill(0);
  }

  private live(): void {
    if (this.destroyed) throw new TypeError(`${WHO}: cipher used after destroy()`);
  }

  private ivFor(sector: number): Uint8Array {
    writePlain64(this.iv, 0, sector);
    return this.iv;
  }

  private scratch(field: "work" | "blocks" | "spare", bytes: number): Uint8Array {
    if (this[field].length < bytes) this[field] = new Uint8Array(Math.max(bytes, Math.min(2 * this[field].length, CHUNK_SECTORS * SECTOR_SIZE)));
    return this[field];
  }

  private perSector(src: Uint8Array, firstSector: number, dst: Uint8Array, encrypt: boolean): void {
    for (let at = 0, sector = firstSector; at < src.length; at += SECTOR_SIZE, sector++) {
      const iv = this.ivFor(sector);
      const c = encrypt ? createCipheriv(this.name, this.key, iv) : createDecipheriv(this.name, this.key, iv);
      if (!this.xts) c.setAutoPadding(false);
      dst.set(c.update(src.subarray(at, at + SECTOR_SIZE)), at);
    }
  }

  private cbcDecrypt(src: Uint8Array, firstSector: number, dst: Uint8Array): void {
    const iv = this.iv;
    for (let at = 0; at < src.length; at += CHUNK_SECTORS * SECTOR_SIZE) {
      const bytes = Math.min(CHUNK_SECTORS * SECTOR_SIZE, src.length - at);
      const sector0 = firstSector + at / SECTOR_SIZE;
      const chunk = src.subarray(at, at + bytes);
      const out = createDecipheriv(this.name, this.key, this.ivFor(sector0)).setAutoPadding(false).update(chunk);
      for (let o = SECTOR_SIZE, sector = sector0 + 1; o < bytes; o += SECTOR_SIZE, sector++) {
        // out = D(C) ^ previous ciphertext block; the sector wants D(C) ^ plain64(sector).
        writePlain64(iv, 0, sector);
        for (let i = 0; i < 16; i++) out[o + i]! ^= chunk[o - 16 + i]! ^ iv[i]!;
      }
      dst.set(out, at);
    }
  }

  private cbcEncryptChained(src: Uint8Array, firstSector: number, dst: Uint8Array): void {
    if (src.length === 0) return;
    const c = createCipheriv(this.name, this.key, this.ivFor(firstSector)).setAutoPadding(false);
    const sectorBuf = this.scratch("blocks", SECTOR_SIZE).subarray(0, SECTOR_SIZE);
    const iv = this.iv;
    let last: Uint8Array | undefined;
    for (let at = 0, sector = firstSector; at < src.length; at += SECTOR_SIZE, sector++) {
      let input = src.subarray(at, at + SECTOR_SIZE);
      if (last !== undefined) {
        // The object chains from the previous sector's last ciphertext block; this sector's chain
        // starts from plain64(sector): XOR both into the first plaintext block.
        writePlain64(iv, 0, sector);
        sectorBuf.set(input);
        for (let i = 0; i < 16; i++) sectorBuf[i]! ^= iv[i]! ^ last[SECTOR_SIZE - 16 + i]!;
        input = sectorBuf;
      }
      last = c.update(input);
      dst.set(last, at);
    }
  }

  private cbcEncryptLockstep(src: Uint8Array, firstSector: number, dst: Uint8Array): void {
    const ecb = this.ecbEncrypt!;
    for (let at = 0; at < src.length; at += CHUNK_SECTORS * SECTOR_SIZE) {
      const bytes = Math.min(CHUNK_SECTORS * SECTOR_SIZE, src.length - at);
      const n = bytes / SECTOR_SIZE;
      const sector0 = firstSector + at / SECTOR_SIZE;
      const work = this.scratch("work", bytes).subarray(0, bytes);
      work.set(src.subarray(at, at + bytes));
      const w = new Int32Array(work.buffer, 0, bytes >>> 2);
      const lanes = this.scratch("blocks", n * 16).subarray(0, n * 16);
      const l = new Int32Array(lanes.buffer, 0, n * 4);
      for (let j = 0; j < BLOCKS_PER_SECTOR; j++) {
        for (let k = 0, p = j * 4; k < n; k++, p += WORDS_PER_SECTOR) {
          const q = k * 4;
          if (j === 0) {
            const sector = sector0 + k;
            l[q] = w[p]! ^ sector;
            l[q + 1] = w[p + 1]! ^ Math.floor(sector / 0x100000000);
            l[q + 2] = w[p + 2]!;
            l[q + 3] = w[p + 3]!;
          } else {
            // w[p - 4 ..] already holds the previous block's ciphertext.
            l[q] = w[p]! ^ w[p - 4]!;
            l[q + 1] = w[p + 1]! ^ w[p - 3]!;
            l[q + 2] = w[p + 2]! ^ w[p - 2]!;
            l[q + 3] = w[p + 3]! ^ w[p - 1]!;
          }
        }
        const y = words(ecb.update(lanes), () => this.scratch("spare", n * 16));
        for (let k = 0, p = j * 4; k < n; k++, p += WORDS_PER_SECTOR) {
          const q = k * 4;
          w[p] = y[q]!;
          w[p + 1] = y[q + 1]!;
          w[p + 2] = y[q + 2]!;
          w[p + 3] = y[q + 3]!;
        }
      }
      dst.set(work, at);
    }
  }

  private xtsRun(src: Uint8Array, firstSector: number, dst: Uint8Array, encrypt: boolean): void {
    const data = encrypt ? this.ecbEncrypt! : this.ecbDecrypt!;
    for (let at = 0; at < src.length; at += CHUNK_SECTORS * SECTOR_SIZE) {
      const bytes = Math.min(CHUNK_SECTORS * SECTOR_SIZE, src.length - at);
      const n = bytes / SECTOR_SIZE;
      const sector0 = firstSector + at / SECTOR_SIZE;
      const ivs = this.scratch("blocks", n * 16).subarray(0, n * 16);
      for (let k = 0; k < n; k++) writePlain64(ivs, k * 16, sector0 + k);
      const t0 = words(this.ecbTweak!.update(ivs), () => this.scratch("spare", n * 16));
      const work = this.scratch("work", bytes).subarray(0, bytes);
      work.set(src.subarray(at, at + bytes));
      const w = new Int32Array(work.buffer, 0, bytes >>> 2);
      if (this.tweaks.length < bytes >>> 2) this.tweaks = new Int32Array(CHUNK_SECTORS * WORDS_PER_SECTOR);
      const t = this.tweaks;
      for (let k = 0, p = 0; k < n; k++) {
        let a = t0[k * 4]!;
        let b = t0[k * 4 + 1]!;
        let c = t0[k * 4 + 2]!;
        let d = t0[k * 4 + 3]!;
        for (let j = 0; j < BLOCKS_PER_SECTOR; j++, p += 4) {
          t[p] = a;
          t[p + 1] = b;
          t[p + 2] = c;
          t[p + 3] = d;
          w[p] = w[p]! ^ a;
          w[p + 1] = w[p + 1]! ^ b;
          w[p + 2] = w[p + 2]! ^ c;
          w[p + 3] = w[p + 3]! ^ d;
          // Times alpha: a 128-bit little-endian left shift, 0x87 folded in on carry-out.
          const carry = d >> 31;
          d = (d << 1) | (c >>> 31);
          c = (c << 1) | (b >>> 31);
          b = (b << 1) | (a >>> 31);
          a = (a << 1) ^ (carry & 0x87);
        }
      }
      const y = words(data.update(work), () => this.scratch("spare", bytes));
      const count = bytes >>> 2;
      for (let i = 0; i < count; i++) y[i] = y[i]! ^ t[i]!;
      dst.set(new Uint8Array(y.buffer, y.byteOffset, bytes), at);
    }
  }
}
