// Sector ciphers in WebAssembly (asm/aes.ts): bitsliced, constant-time AES, the portable
// implementation of SectorCipher. Key schedules and a staging buffer are reserved once in a
// WasmCore's arena; each run is copied in, transformed in place, and copied out, one staging
// buffer at a time. Views of linear memory are taken fresh for every piece.

import { WasmCore, type WasmVariant } from "../wasm/core.js";
import { AES_OK, AES_SCHEDULE_SIZE } from "../wasm/exports.js";
import {
  SECTOR_SIZE,
  checkSectorCipherKey,
  checkSectorRun,
  type SectorCipher,
  type SectorCipherAlgorithm,
} from "./sector-cipher.js";

const WHO = "aes-wasm";

/** Default staging buffer: 128 sectors, 16 CBC lockstep groups of 8. */
const DEFAULT_STAGING_BYTES = 64 * 1024;

export interface WasmSectorCipherOptions {
  /**
   * The core whose arena holds the key schedules and the staging buffer (reserved for the life of
   * the core). Default: a private core, so that key material shares memory with nothing else.
   */
  core?: WasmCore;
  /** Build to load when making a private core (default: SIMD where the engine validates it). */
  variant?: WasmVariant;
  /** Bytes moved through linear memory per WASM call, a multiple of 512 (default 64 KiB). */
  stagingBytes?: number;
}

export class WasmSectorCipher implements SectorCipher {
  readonly algorithm: SectorCipherAlgorithm;
  readonly variant: WasmVariant;
  private readonly core: WasmCore;
  private readonly xts: boolean;
  private readonly schedule: number;
  private readonly tweakSchedule: number;
  private readonly staging: number;
  private readonly stagingBytes: number;
  private destroyed = false;

  static async create(algorithm: SectorCipherAlgorithm, key: Uint8Array, options: WasmSectorCipherOptions = {}): Promise<WasmSectorCipher> {
    checkSectorCipherKey(WHO, algorithm, key);
    const stagingBytes = options.stagingBytes ?? DEFAULT_STAGING_BYTES;
    if (!Number.isSafeInteger(stagingBytes) || stagingBytes <= 0 || stagingBytes % SECTOR_SIZE !== 0) {
      throw new RangeError(`${WHO}: stagingBytes ${stagingBytes} is not a positive multiple of ${SECTOR_SIZE}`);
    }
    const core = options.core ?? (await WasmCore.create(options.variant));
    return new WasmSectorCipher(core, algorithm, key, stagingBytes);
  }

  private constructor(core: WasmCore, algorithm: SectorCipherAlgorithm, key: Uint8Array, stagingBytes: number) {
    const params = checkSectorCipherKey(WHO, algorithm, key);
    this.core = core;
    this.variant = core.variant;
    this.algorithm = algorithm;
    this.xts = params.mode === "xts";
    this.schedule = core.reserve(AES_SCHEDULE_SIZE);
    this.tweakSchedule = this.xts ? core.reserve(AES_SCHEDULE_SIZE) : 0;
    this.staging = core.reserve(stagingBytes);
    this.stagingBytes = stagingBytes;
    // XTS keys are the data key, then the tweak key (IEEE 1619 Key1 || Key2).
    const n = params.aesKeyBytes;
    this.expand(this.schedule, key.subarray(0, n));
    if (this.xts) this.expand(this.tweakSchedule, key.subarray(n, 2 * n));
  }

  private expand(schedule: number, aesKey: Uint8Array): void {
    this.core.u8().set(aesKey, this.staging);
    const rounds = this.core.exports.aesExpandKey(schedule, this.staging, aesKey.length);
    this.core.u8().fill(0, this.staging, this.staging + aesKey.length);
    if (rounds === 0) throw new Error(`${WHO}: key expansion refused a ${aesKey.length}-byte key`);
  }

  encrypt(src: Uint8Array, firstSector: number, dst?: Uint8Array): void {
    this.run(src, firstSector, checkSectorRun(WHO, src, firstSector, dst), true);
  }

  decrypt(src: Uint8Array, firstSector: number, dst?: Uint8Array): void {
    this.run(src, firstSector, checkSectorRun(WHO, src, firstSector, dst), false);
  }

  destroy(): void {
    if (this.destroyed) return;
    this.destroyed = true;
    const mem = this.core.u8();
    mem.fill(0, this.schedule, this.schedule + AES_SCHEDULE_SIZE);
    if (this.xts) mem.fill(0, this.tweakSchedule, this.tweakSchedule + AES_SCHEDULE_SIZE);
    mem.fill(0, this.staging, this.staging + this.stagingBytes);
  }

  private run(src: Uint8Array, firstSector: number, dst: Uint8Array, encrypt: boolean): void {
    if (this.destroyed) throw new TypeError(`${WHO}: cipher used after destroy()`);
    const x = this.core.exports;
    const staging = this.staging;
    for (let at = 0; at < src.length; at += this.stagingBytes) {
      const n = Math.min(this.stagingBytes, src.length - at);
      const sector = firstSector + at / SECTOR_SIZE;
      this.core.u8().set(src.subarray(at, at + n), staging);
      let rc: number;
      if (this.xts) {
        rc = encrypt
          ? x.aesXtsEncrypt(this.schedule, this.tweakSchedule, staging, n, sector)
          : x.aesXtsDecrypt(this.schedule, this.tweakSchedule, staging, n, sector);
      } else {
        rc = encrypt ? x.aesCbcEncrypt(this.schedule, staging, n, sector) : x.aesCbcDecrypt(this.schedule, staging, n, sector);
      }
      if (rc !== AES_OK) throw new Error(`${WHO}: WASM refused a run of ${n} bytes (status ${rc})`);
      dst.set(this.core.u8().subarray(staging, staging + n), at);
    }
  }
}
