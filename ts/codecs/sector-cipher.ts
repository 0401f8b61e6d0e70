// Sector encryption, the codec the data path of encrypted images calls (FORMAT.md §1.12). It knows
// nothing of images: whole 512-byte sectors, numbered consecutively from `firstSector`, become
// ciphertext and back. Which number a sector carries (legacy AES: guest offset / 512; LUKS: host
// offset / 512) and how the key is derived (legacy AES: the password zero-padded to 16 bytes;
// LUKS: the unlocked master key) are the caller's business.
//
// Implementations: ts/codecs/aes-wasm.ts (portable, constant-time, the default) and
// ts/codecs/node-crypto.ts (OpenSSL through node:crypto, registered by the ./node entry). Both
// are synchronous once made: a run of many sectors is one call, which the caller may split to
// bound how long it holds the thread (WASM SIMD: 3-4 ms per MiB, node:crypto under 1.5 ms;
// bench/crypto.mjs).

export const SECTOR_SIZE = 512;

/**
 * The ciphers qcow2 images use, named cipher-bits-mode-ivgen. plain64 is the sector number as a
 * little-endian u64 in a zero-padded 16-byte block: the CBC IV, or the XTS tweak before it is
 * encrypted with the second half of the key.
 */
export type SectorCipherAlgorithm =
  /** Legacy qcow2 AES (crypt_method 1), and LUKS aes-128 cbc-plain64. 16-byte key. */
  | "aes-128-cbc-plain64"
  /** LUKS aes-256 cbc-plain64. 32-byte key. */
  | "aes-256-cbc-plain64"
  /** LUKS aes-128 xts-plain64. 32-byte key: data key, then tweak key. */
  | "aes-128-xts-plain64"
  /** LUKS aes-256 xts-plain64, qemu's default. 64-byte key: data key, then tweak key. */
  | "aes-256-xts-plain64";

export const SECTOR_CIPHER_ALGORITHMS: readonly SectorCipherAlgorithm[] = [
  "aes-128-cbc-plain64",
  "aes-256-cbc-plain64",
  "aes-128-xts-plain64",
  "aes-256-xts-plain64",
];

export interface SectorCipherParams {
  mode: "cbc" | "xts";
  /** Bytes of one AES key: 16 or 32. */
  aesKeyBytes: 16 | 32;
  /** Bytes of key the algorithm takes (both halves for XTS). */
  keyBytes: number;
}

const PARAMS: Readonly<Record<SectorCipherAlgorithm, SectorCipherParams>> = {
  "aes-128-cbc-plain64": { mode: "cbc", aesKeyBytes: 16, keyBytes: 16 },
  "aes-256-cbc-plain64": { mode: "cbc", aesKeyBytes: 32, keyBytes: 32 },
  "aes-128-xts-plain64": { mode: "xts", aesKeyBytes: 16, keyBytes: 32 },
  "aes-256-xts-plain64": { mode: "xts", aesKeyBytes: 32, keyBytes: 64 },
};

/**
 * Encrypts and decrypts runs of whole sectors. `dst` defaults to `src` (in place); otherwise it has
 * `src.length` bytes and is either `src` itself or does not overlap it. Both calls are synchronous.
 */
export interface SectorCipher {
  readonly algorithm: SectorCipherAlgorithm;
  /** Encrypt `src` (a multiple of 512 bytes), whose first sector is number `firstSector`. */
  encrypt(src: Uint8Array, firstSector: number, dst?: Uint8Array): void;
  /** Decrypt `src` (a multiple of 512 bytes), whose first sector is number `firstSector`. */
  decrypt(src: Uint8Array, firstSector: number, dst?: Uint8Array): void;
  /** Zero the key material this object holds; any later call throws. */
  destroy(): void;
}

/** Makes a cipher from an algorithm and a key of `sectorCipherParams(algorithm).keyBytes` bytes. */
export type SectorCipherFactory = (algorithm: SectorCipherAlgorithm, key: Uint8Array) => SectorCipher | Promise<SectorCipher>;

export function isSectorCipherAlgorithm(name: string): name is SectorCipherAlgorithm {
  return Object.hasOwn(PARAMS, name);
}

export function sectorCipherParams(algorithm: SectorCipherAlgorithm): SectorCipherParams {
  const params = PARAMS[algorithm];
  if (params === undefined) throw new TypeError(`sector-cipher: unknown algorithm ${JSON.stringify(algorithm)}`);
  return params;
}

/**
 * The algorithm for a LUKS cipher as QAPI names its parts ("aes-256", "xts", "plain64"), or
 * undefined when it is not one of these (other ciphers, aes-192, essiv, plain).
 */
export function luksSectorCipherAlgorithm(cipherAlg: string, cipherMode: string, ivgenAlg: string): SectorCipherAlgorithm | undefined {
  const name = `${cipherAlg}-${cipherMode}-${ivgenAlg}`;
  return isSectorCipherAlgorithm(name) ? name : undefined;
}

/** Validate a key for `algorithm` (caller misuse throws). */
export function checkSectorCipherKey(who: string, algorithm: SectorCipherAlgorithm, key: Uint8Array): SectorCipherParams {
  const params = sectorCipherParams(algorithm);
  if (!(key instanceof Uint8Array)) throw new TypeError(`${who}: key must be a Uint8Array`);
  if (key.length !== params.keyBytes) {
    throw new RangeError(`${who}: ${algorithm} takes a ${params.keyBytes}-byte key, got ${key.length} bytes`);
  }
  return params;
}

/**
 * Validate one encrypt/decrypt call and return the output buffer. Every sector number of the run
 * must be a safe integer (below 2^53): they travel as JS numbers.
 */
export function checkSectorRun(who: string, src: Uint8Array, firstSector: number, dst: Uint8Array | undefined): Uint8Array {
  if (!(src instanceof Uint8Array)) throw new TypeError(`${who}: data must be a Uint8Array`);
  if (src.length % SECTOR_SIZE !== 0) throw new RangeError(`${who}: length ${src.length} is not a multiple of ${SECTOR_SIZE}`);
  if (!Number.isSafeInteger(firstSector) || firstSector < 0) {
    throw new RangeError(`${who}: first sector ${firstSector} is not a non-negative safe integer`);
  }
  const sectors = src.length / SECTOR_SIZE;
  if (sectors > 0 && firstSector + (sectors - 1) > Number.MAX_SAFE_INTEGER) {
    throw new RangeError(`${who}: sectors ${firstSector}..${firstSector + sectors - 1} pass 2^53 - 1`);
  }
  if (dst === undefined) return src;
  if (!(dst instanceof Uint8Array)) throw new TypeError(`${who}: dst must be a Uint8Array`);
  if (dst.length !== src.length) throw new RangeError(`${who}: dst has ${dst.length} bytes, data ${src.length}`);
  return dst;
}

/** Write plain64(sector) into the 16 bytes at `out[at]`. */
export function writePlain64(out: Uint8Array, at: number, sector: number): void {
  const lo = sector >>> 0;
  const hi = Math.floor(sector / 0x100000000) >>> 0;
  out[at] = lo;
  out[at + 1] = lo >>> 8;
  out[at + 2] = lo >>> 16;
  out[at + 3] = lo >>> 24;
  out[at + 4] = hi;
  out[at + 5] = hi >>> 8;
  out[at + 6] = hi >>> 16;
  out[at + 7] = hi >>> 24;
  out.fill(0, at + 8, at + 16);
}
