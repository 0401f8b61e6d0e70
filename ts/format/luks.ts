// The LUKS1 header inside a qcow2 image (docs/interop/qcow2.rst "Full disk encryption header
// pointer"; the LUKS1 on-disk format 1.2.1 as qemu implements it in crypto/block-luks.c, with
// crypto/afsplit.c and crypto/pbkdf.c). The area named by header extension 0x0537be77 starts with
// the 592-byte partition header; key material follows at sector offsets relative to the area.
//
// This module knows nothing of the image's data path: it parses and validates the header, unlocks
// the master key with a passphrase, builds a new area as qemu's `encrypt.format=luks` does, and
// describes it as `qemu-img info` does. Hashes, PBKDF2 and randomness come from an injected
// `LuksCrypto` (WebCrypto anywhere, node:crypto in Node: ts/codecs/luks-*.ts); the key material's
// cipher from an injected sector cipher factory (ts/codecs/sector-cipher.ts), the data path's own.

import {
  luksSectorCipherAlgorithm,
  SECTOR_CIPHER_ALGORITHMS,
  type SectorCipherAlgorithm,
  type SectorCipherFactory,
} from "../codecs/sector-cipher.js";
import { Qcow2Error, Qcow2ErrorCode, hex } from "../errors.js";
import { readFully, type BlockBackend } from "../io/backend.js";
import { decodeString, encodeString, view } from "./bytes.js";

// ---------------------------------------------------------------------------------------------
// Constants (qemu crypto/block-luks.c; all fixed by the LUKS1 specification unless noted)

export const LUKS_MAGIC: readonly number[] = [0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]; // "LUKS\xba\xbe"
export const LUKS_VERSION = 1;
/** The partition header with its 8 key slot descriptors. */
export const LUKS_HEADER_SIZE = 592;
/** Key material and payload offsets count 512-byte sectors; ciphers run per 512-byte sector. */
export const LUKS_SECTOR_SIZE = 512;
export const LUKS_NUM_KEY_SLOTS = 8;
/** Anti-forensic stripes per key slot. LUKS1 fixes it; cryptsetup refuses any other count. */
export const LUKS_STRIPES = 4000;
export const LUKS_DIGEST_LEN = 20;
export const LUKS_SALT_LEN = 32;
export const LUKS_UUID_LEN = 40;
const NAME_LEN = 32;
export const LUKS_KEY_SLOT_ENABLED = 0x00ac71f3;
export const LUKS_KEY_SLOT_DISABLED = 0x0000dead;
/** Key material starts after the header, rounded to 4 KiB (qemu QCRYPTO_BLOCK_LUKS_KEY_SLOT_OFFSET). */
export const LUKS_KEY_SLOT_OFFSET = 4096;
/** qemu's floors for calibrated iteration counts. */
export const LUKS_MIN_SLOT_KEY_ITERS = 1000;
export const LUKS_MIN_MASTER_KEY_ITERS = 1000;
/** qemu's default PBKDF2 time per key slot, in milliseconds. */
export const LUKS_DEFAULT_ITER_TIME_MS = 2000;
/**
 * Most PBKDF2 iterations an unlock or create accepts per key derivation (a caller may raise it).
 * The fields are u32: 2^32 - 1 iterations of PBKDF2-SHA256 take 20-60 minutes here, per slot, so a
 * hostile header could stall an open for hours. qemu's default 2-second calibration writes about
 * 9 million slot iterations on a fast machine (measured: 45072 per 10 ms of iter-time); 2^25 leaves
 * ~3.7x headroom for faster machines or longer iter-times while capping one derivation at seconds.
 */
export const LUKS_MAX_ITERATIONS = 2 ** 25;

// ---------------------------------------------------------------------------------------------
// Algorithm names, as QAPI spells them (qapi/crypto.json) and as `qemu-img info` prints them

export type LuksCipherAlg =
  | "aes-128"
  | "aes-192"
  | "aes-256"
  | "cast5-128"
  | "serpent-128"
  | "serpent-192"
  | "serpent-256"
  | "twofish-128"
  | "twofish-192"
  | "twofish-256";
export type LuksCipherMode = "ecb" | "cbc" | "xts" | "ctr";
export type LuksIvgenAlg = "plain" | "plain64" | "essiv";
export type LuksHashAlg = "md5" | "sha1" | "sha224" | "sha256" | "sha384" | "sha512" | "ripemd160";

const CIPHER_MODES: readonly LuksCipherMode[] = ["ecb", "cbc", "xts", "ctr"];
const IVGEN_ALGS: readonly LuksIvgenAlg[] = ["plain", "plain64", "essiv"];
const HASH_DIGEST_LEN: Readonly<Record<LuksHashAlg, number>> = {
  md5: 16,
  sha1: 20,
  sha224: 28,
  sha256: 32,
  sha384: 48,
  sha512: 64,
  ripemd160: 20,
};
/** qemu's LUKS cipher name map: name -> key sizes (per key: XTS keys are twice as long). */
const LUKS_CIPHER_KEY_SIZES: Readonly<Record<string, readonly number[]>> = {
  aes: [16, 24, 32],
  cast5: [16],
  serpent: [16, 24, 32],
  twofish: [16, 24, 32],
};
/**
 * Hashes an unlock or create may use: the ones both WebCrypto and node:crypto provide, so that an
 * image opens the same way on every platform.
 */
export const LUKS_SUPPORTED_HASHES: readonly LuksHashAlg[] = ["sha1", "sha256", "sha384", "sha512"];

export function luksDigestLength(hash: LuksHashAlg): number {
  return HASH_DIGEST_LEN[hash];
}

function isHashAlg(name: string): name is LuksHashAlg {
  return Object.prototype.hasOwnProperty.call(HASH_DIGEST_LEN, name);
}

// ---------------------------------------------------------------------------------------------
// Injected crypto

/** The hash primitives LUKS needs. Providers: ts/codecs/luks-webcrypto.ts, ts/codecs/luks-node.ts. */
export interface LuksCrypto {
  /** PBKDF2-HMAC with `hash`, `keyLength` bytes out. */
  pbkdf2(hash: LuksHashAlg, password: Uint8Array, salt: Uint8Array, iterations: number, keyLength: number): Promise<Uint8Array>;
  /** The digest of the concatenation of `parts`. */
  digest(hash: LuksHashAlg, parts: readonly Uint8Array[]): Uint8Array | Promise<Uint8Array>;
  /** `length` cryptographically random bytes. */
  randomBytes(length: number): Uint8Array;
}

/** What unlocking and creating need from the platform. */
export interface LuksEnv {
  crypto: LuksCrypto;
  /** Ciphers for the key material: the data path's sector cipher factory. */
  createSectorCipher: SectorCipherFactory;
}

// ---------------------------------------------------------------------------------------------
// The parsed header

/** The volume's cipher as the header names it (what `qemu-img info` reports). */
export interface LuksCipherSpec {
  cipherAlg: LuksCipherAlg;
  cipherMode: LuksCipherMode;
  ivgenAlg: LuksIvgenAlg;
  /** essiv only. */
  ivgenHashAlg?: LuksHashAlg;
  /** Master key length in bytes (both XTS keys together: 64 for aes-256 xts). */
  keyBytes: number;
  /** Always 512 for LUKS1. */
  sectorSize: number;
}

export interface LuksKeySlot {
  /** The raw `active` field: LUKS_KEY_SLOT_ENABLED or LUKS_KEY_SLOT_DISABLED. */
  state: number;
  active: boolean;
  /** PBKDF2 iterations for the passphrase (0 in an erased slot). */
  iterations: number;
  salt: Uint8Array;
  /** In 512-byte sectors from the start of the LUKS area. */
  keyMaterialOffset: number;
  stripes: number;
}

export interface LuksHeader {
  version: number;
  /** The header's strings as stored: "aes", "xts-plain64", "sha256". */
  cipherName: string;
  cipherModeSpec: string;
  hashSpec: string;
  /** In 512-byte sectors; "valid but unused" inside qcow2 (the L2 tables place the data). */
  payloadOffset: number;
  keyBytes: number;
  mkDigest: Uint8Array;
  mkDigestSalt: Uint8Array;
  mkDigestIterations: number;
  uuid: string;
  keySlots: LuksKeySlot[];
  /** Decoded from the strings above. */
  cipher: LuksCipherSpec;
  hashAlg: LuksHashAlg;
}

function bad(message: string): Qcow2Error {
  return new Qcow2Error(Qcow2ErrorCode.BAD_HEADER, `LUKS header: ${message}`);
}

function unsupported(message: string): Qcow2Error {
  return new Qcow2Error(Qcow2ErrorCode.NOT_SUPPORTED, `LUKS: ${message}`);
}

/** A NUL-terminated string in a fixed-size field; qemu reads these as C strings. */
function fixedString(bytes: Uint8Array, field: string): string {
  const end = bytes.indexOf(0);
  if (end < 0) throw bad(`${field} is not NUL-terminated within its ${bytes.length} bytes`);
  return decodeString(bytes.subarray(0, end));
}

/** Sectors one key slot's material occupies, aligned as cryptsetup and qemu align it. */
/** Bytes of the LUKS area qemu creates for a `keyBytes`-byte master key (header, 8 slots of 4000 stripes). */
export function luksAreaLength(keyBytes: number): number {
  return (LUKS_KEY_SLOT_OFFSET / LUKS_SECTOR_SIZE + LUKS_NUM_KEY_SLOTS * splitKeySectors(keyBytes, LUKS_STRIPES)) * LUKS_SECTOR_SIZE;
}

function splitKeySectors(keyBytes: number, stripes: number): number {
  const headerSectors = LUKS_KEY_SLOT_OFFSET / LUKS_SECTOR_SIZE;
  const sectors = Math.ceil((keyBytes * stripes) / LUKS_SECTOR_SIZE);
  return Math.ceil(sectors / headerSectors) * headerSectors;
}

/**
 * Decode a cipher description as qemu's qcrypto_block_luks_parse_header does, in its order:
 * "<mode>-<ivgen>[:<ivhash>]", then the cipher name with the key size.
 */
function decodeCipher(cipherName: string, cipherModeSpec: string, hashSpec: string, keyBytes: number): {
  cipher: LuksCipherSpec;
  hashAlg: LuksHashAlg;
} {
  const dash = cipherModeSpec.indexOf("-");
  if (dash < 0) throw bad(`unexpected cipher mode string format "${cipherModeSpec}" (expected <mode>-<ivgen>[:<hash>])`);
  const modeName = cipherModeSpec.slice(0, dash);
  let ivgenName = cipherModeSpec.slice(dash + 1);
  let ivgenHashAlg: LuksHashAlg | undefined;
  const colon = ivgenName.indexOf(":");
  if (colon >= 0) {
    const ivhashName = ivgenName.slice(colon + 1);
    ivgenName = ivgenName.slice(0, colon);
    if (!isHashAlg(ivhashName)) throw unsupported(`IV generator hash algorithm "${ivhashName}" not supported`);
    ivgenHashAlg = ivhashName;
  }
  if (!(CIPHER_MODES as readonly string[]).includes(modeName)) throw unsupported(`cipher mode "${modeName}" not supported`);
  const cipherMode = modeName as LuksCipherMode;

  if (cipherMode === "xts" && keyBytes % 2 !== 0) {
    throw bad(`key-bytes ${keyBytes} is odd, but xts needs two keys of one size`);
  }
  const perKey = cipherMode === "xts" ? keyBytes / 2 : keyBytes;
  const sizes = Object.prototype.hasOwnProperty.call(LUKS_CIPHER_KEY_SIZES, cipherName) ? LUKS_CIPHER_KEY_SIZES[cipherName] : undefined;
  if (sizes === undefined || !sizes.includes(perKey)) {
    throw unsupported(`cipher "${cipherName}" with key size ${perKey} bytes (key-bytes ${keyBytes}) not supported`);
  }
  const cipherAlg = `${cipherName}-${perKey * 8}` as LuksCipherAlg;

  if (!isHashAlg(hashSpec)) throw unsupported(`hash algorithm "${hashSpec}" not supported`);
  if (!(IVGEN_ALGS as readonly string[]).includes(ivgenName)) throw unsupported(`IV generator "${ivgenName}" not supported`);
  const ivgenAlg = ivgenName as LuksIvgenAlg;
  if (ivgenAlg === "essiv") {
    if (ivgenHashAlg === undefined) throw bad(`cipher mode "${cipherModeSpec}" uses essiv without an IV generator hash`);
    // qcrypto_block_luks_essiv_cipher: the IV cipher is keyed with the digest, so a cipher of
    // that key size must exist (AES, Serpent and Twofish have 16, 24 and 32; CAST5 only its own).
    const digestLen = luksDigestLength(ivgenHashAlg);
    if (digestLen !== perKey && (cipherName === "cast5" || !sizes.includes(digestLen))) {
      throw unsupported(`essiv with ${ivgenHashAlg} needs a ${digestLen}-byte ${cipherName} key, which does not exist`);
    }
  }

  const cipher: LuksCipherSpec = { cipherAlg, cipherMode, ivgenAlg, keyBytes, sectorSize: LUKS_SECTOR_SIZE };
  // qemu parses a hash after plain/plain64 (dm-crypt compatibility) and then ignores it.
  if (ivgenAlg === "essiv") cipher.ivgenHashAlg = ivgenHashAlg;
  return { cipher, hashAlg: hashSpec };
}

/**
 * Parse and validate the LUKS1 header at the start of an encryption header area of `areaLength`
 * bytes. `bytes` holds at least the first 592 bytes of the area. Checks qemu's
 * (qcrypto_block_luks_check_header, then the names) plus what keeps us bounded: strings
 * terminated, 4000 stripes in every slot (so key material is at most 256000 bytes), active slots'
 * material inside the area, iteration counts non-zero.
 */
export function parseLuksHeader(bytes: Uint8Array, areaLength: number): LuksHeader {
  if (!Number.isSafeInteger(areaLength) || areaLength < 0) throw new RangeError(`parseLuksHeader: area length ${areaLength} is not a byte count`);
  if (areaLength < LUKS_HEADER_SIZE) {
    throw bad(`the encryption header area is ${areaLength} bytes, shorter than the ${LUKS_HEADER_SIZE}-byte LUKS header`);
  }
  if (bytes.length < LUKS_HEADER_SIZE) {
    throw new RangeError(`parseLuksHeader: needs the first ${LUKS_HEADER_SIZE} bytes of the area, got ${bytes.length}`);
  }
  const dv = view(bytes);
  for (let i = 0; i < LUKS_MAGIC.length; i++) {
    if (bytes[i] !== LUKS_MAGIC[i]) {
      const got = Array.from(bytes.subarray(0, 6), (b) => b.toString(16).padStart(2, "0")).join(" ");
      throw new Qcow2Error(Qcow2ErrorCode.BAD_MAGIC, `LUKS header: magic ${got} is not "LUKS\\xba\\xbe" (volume is not in LUKS format)`);
    }
  }
  const version = dv.getUint16(6);
  if (version !== LUKS_VERSION) {
    throw new Qcow2Error(Qcow2ErrorCode.UNSUPPORTED_VERSION, `LUKS header: version ${version} is not supported (only LUKS1)`);
  }
  const cipherName = fixedString(bytes.subarray(8, 40), "cipher-name");
  const cipherModeSpec = fixedString(bytes.subarray(40, 72), "cipher-mode");
  const hashSpec = fixedString(bytes.subarray(72, 104), "hash-spec");
  const payloadOffset = dv.getUint32(104);
  const keyBytes = dv.getUint32(108);
  const mkDigest = bytes.slice(112, 132);
  const mkDigestSalt = bytes.slice(132, 164);
  const mkDigestIterations = dv.getUint32(164);
  const uuidBytes = bytes.subarray(168, 208);
  const uuidEnd = uuidBytes.indexOf(0);
  const uuid = decodeString(uuidEnd < 0 ? uuidBytes : uuidBytes.subarray(0, uuidEnd));

  // key-bytes sizes every allocation below: bound it before anything else uses it (the cipher
  // check that follows narrows it to 16..64).
  if (keyBytes === 0 || keyBytes > 64) throw bad(`key-bytes ${keyBytes} is outside 1..64`);

  const keySlots: LuksKeySlot[] = [];
  for (let i = 0; i < LUKS_NUM_KEY_SLOTS; i++) {
    const at = 208 + i * 48;
    const state = dv.getUint32(at);
    keySlots.push({
      state,
      active: state === LUKS_KEY_SLOT_ENABLED,
      iterations: dv.getUint32(at + 4),
      salt: bytes.slice(at + 8, at + 40),
      keyMaterialOffset: dv.getUint32(at + 40),
      stripes: dv.getUint32(at + 44),
    });
  }

  // qemu's qcrypto_block_luks_check_header, slot by slot, with its wording where it has one.
  const headerSectors = LUKS_KEY_SLOT_OFFSET / LUKS_SECTOR_SIZE;
  for (let i = 0; i < LUKS_NUM_KEY_SLOTS; i++) {
    const slot = keySlots[i]!;
    if (slot.stripes === 0) throw bad(`key slot ${i} is corrupted (stripes == 0)`);
    if (slot.stripes !== LUKS_STRIPES) throw bad(`key slot ${i} stripes ${slot.stripes} is not ${LUKS_STRIPES}`);
    if (slot.state !== LUKS_KEY_SLOT_ENABLED && slot.state !== LUKS_KEY_SLOT_DISABLED) {
      throw bad(`key slot ${i} state (active/disabled) ${hex(slot.state)} is corrupted`);
    }
    const start = slot.keyMaterialOffset;
    const length = splitKeySectors(keyBytes, slot.stripes);
    if (start < headerSectors) {
      throw bad(`key slot ${i} key-material-offset ${start} overlaps the ${headerSectors}-sector partition header`);
    }
    if (start + length > payloadOffset) {
      throw bad(`key slot ${i} (sectors ${start}..${start + length}) overlaps the encrypted payload at sector ${payloadOffset}`);
    }
    for (let j = i + 1; j < LUKS_NUM_KEY_SLOTS; j++) {
      const other = keySlots[j]!;
      if (other.stripes !== LUKS_STRIPES) continue; // refused when the loop reaches it
      const start2 = other.keyMaterialOffset;
      const length2 = splitKeySectors(keyBytes, other.stripes);
      if (start + length > start2 && start2 + length2 > start) {
        throw bad(`key slots ${i} and ${j} overlap (sectors ${start}..${start + length} and ${start2}..${start2 + length2})`);
      }
    }
    if (slot.active) {
      // qemu reads exactly stripes * key-bytes bytes and refuses reads past the area.
      const end = start * LUKS_SECTOR_SIZE + keyBytes * slot.stripes;
      if (end > areaLength) {
        throw bad(`key slot ${i} material at ${hex(start * LUKS_SECTOR_SIZE)}..${hex(end)} is outside the ${areaLength}-byte encryption header area`);
      }
      if (slot.iterations === 0) throw bad(`key slot ${i} is active with 0 iterations`);
    }
  }
  if (mkDigestIterations === 0) throw bad(`mk-digest-iterations is 0`);

  const { cipher, hashAlg } = decodeCipher(cipherName, cipherModeSpec, hashSpec, keyBytes);
  return {
    version,
    cipherName,
    cipherModeSpec,
    hashSpec,
    payloadOffset,
    keyBytes,
    mkDigest,
    mkDigestSalt,
    mkDigestIterations,
    uuid,
    keySlots,
    cipher,
    hashAlg,
  };
}

/** The 592 header bytes for `header` (strings from cipherName/cipherModeSpec/hashSpec). */
export function serializeLuksHeader(header: LuksHeader): Uint8Array {
  const out = new Uint8Array(LUKS_HEADER_SIZE);
  const dv = view(out);
  out.set(LUKS_MAGIC, 0);
  dv.setUint16(6, header.version);
  putString(out, 8, header.cipherName, "cipher-name");
  putString(out, 40, header.cipherModeSpec, "cipher-mode");
  putString(out, 72, header.hashSpec, "hash-spec");
  dv.setUint32(104, header.payloadOffset);
  dv.setUint32(108, header.keyBytes);
  out.set(header.mkDigest.subarray(0, LUKS_DIGEST_LEN), 112);
  out.set(header.mkDigestSalt.subarray(0, LUKS_SALT_LEN), 132);
  dv.setUint32(164, header.mkDigestIterations);
  const uuid = encodeString(header.uuid);
  if (uuid.length >= LUKS_UUID_LEN) throw new RangeError(`serializeLuksHeader: uuid "${header.uuid}" does not fit ${LUKS_UUID_LEN - 1} bytes`);
  out.set(uuid, 168);
  header.keySlots.forEach((slot, i) => {
    const at = 208 + i * 48;
    dv.setUint32(at, slot.state);
    dv.setUint32(at + 4, slot.iterations);
    out.set(slot.salt.subarray(0, LUKS_SALT_LEN), at + 8);
    dv.setUint32(at + 40, slot.keyMaterialOffset);
    dv.setUint32(at + 44, slot.stripes);
  });
  return out;
}

function putString(out: Uint8Array, at: number, text: string, field: string): void {
  const bytes = encodeString(text);
  if (bytes.length >= NAME_LEN) throw new RangeError(`serializeLuksHeader: ${field} "${text}" is too long for the LUKS header`);
  out.set(bytes, at);
}

// ---------------------------------------------------------------------------------------------
// qemu-img info

export interface QemuLuksSlotInfo {
  active: boolean;
  iters?: number;
  "key-offset": number;
  stripes?: number;
}

/** `format-specific.data.encrypt` of `qemu-img info --output=json` for a LUKS image. */
export interface QemuLuksInfo {
  "ivgen-alg": LuksIvgenAlg;
  "hash-alg": LuksHashAlg;
  "cipher-alg": LuksCipherAlg;
  uuid: string;
  "ivgen-hash-alg"?: LuksHashAlg;
  format: "luks";
  "cipher-mode": LuksCipherMode;
  slots: QemuLuksSlotInfo[];
  "payload-offset": number;
  "master-key-iters": number;
}

/** qemu's qcrypto_block_luks_get_info, keys in the order qemu-img prints them. */
export function luksInfo(header: LuksHeader): QemuLuksInfo {
  const { cipher } = header;
  return {
    "ivgen-alg": cipher.ivgenAlg,
    "hash-alg": header.hashAlg,
    "cipher-alg": cipher.cipherAlg,
    uuid: header.uuid,
    ...(cipher.ivgenHashAlg !== undefined ? { "ivgen-hash-alg": cipher.ivgenHashAlg } : {}),
    format: "luks",
    "cipher-mode": cipher.cipherMode,
    slots: header.keySlots.map((slot) =>
      slot.active
        ? { active: true, iters: slot.iterations, "key-offset": slot.keyMaterialOffset * LUKS_SECTOR_SIZE, stripes: slot.stripes }
        : { active: false, "key-offset": slot.keyMaterialOffset * LUKS_SECTOR_SIZE },
    ),
    "payload-offset": header.payloadOffset * LUKS_SECTOR_SIZE,
    "master-key-iters": header.mkDigestIterations,
  };
}

// ---------------------------------------------------------------------------------------------
// Anti-forensic split (crypto/afsplit.c, from cryptsetup's lib/luks1/af.c)

/** qcrypto_afsplit_hash: hash each digest-sized piece of `block` with its big-endian index. */
async function afDiffuse(crypto: LuksCrypto, hash: LuksHashAlg, block: Uint8Array): Promise<void> {
  const digestLen = luksDigestLength(hash);
  const pieces = Math.ceil(block.length / digestLen);
  const pending: Array<Uint8Array | Promise<Uint8Array>> = [];
  for (let i = 0; i < pieces; i++) {
    const index = new Uint8Array(4);
    view(index).setUint32(0, i);
    const start = i * digestLen;
    pending.push(crypto.digest(hash, [index, block.subarray(start, Math.min(start + digestLen, block.length))]));
  }
  for (let i = 0; i < pieces; i++) {
    const out = await pending[i]!;
    const start = i * digestLen;
    block.set(out.subarray(0, Math.min(digestLen, block.length - start)), start);
  }
}

function xorInto(dst: Uint8Array, src: Uint8Array): void {
  for (let i = 0; i < dst.length; i++) dst[i]! ^= src[i]!;
}

/** qcrypto_afsplit_decode: merge `stripes` blocks of `blockLength` bytes back into one. */
export async function afMerge(crypto: LuksCrypto, hash: LuksHashAlg, blockLength: number, stripes: number, src: Uint8Array): Promise<Uint8Array> {
  if (src.length < blockLength * stripes) throw new RangeError(`afMerge: ${src.length} bytes is less than ${stripes} stripes of ${blockLength}`);
  const block = new Uint8Array(blockLength);
  for (let i = 0; i < stripes - 1; i++) {
    xorInto(block, src.subarray(i * blockLength, (i + 1) * blockLength));
    await afDiffuse(crypto, hash, block);
  }
  xorInto(block, src.subarray((stripes - 1) * blockLength, stripes * blockLength));
  return block;
}

/** qcrypto_afsplit_encode: spread `key` over `stripes` blocks, all random but the last. */
export async function afSplit(crypto: LuksCrypto, hash: LuksHashAlg, key: Uint8Array, stripes: number): Promise<Uint8Array> {
  const blockLength = key.length;
  const out = new Uint8Array(blockLength * stripes);
  const block = new Uint8Array(blockLength);
  for (let i = 0; i < stripes - 1; i++) {
    const stripe = out.subarray(i * blockLength, (i + 1) * blockLength);
    stripe.set(crypto.randomBytes(blockLength));
    xorInto(block, stripe);
    await afDiffuse(crypto, hash, block);
  }
  const last = out.subarray((stripes - 1) * blockLength);
  last.set(key);
  xorInto(last, block);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Unlock

/** Reads `dst.length` bytes of the LUKS area at `offset` (relative to the start of the area). */
export type LuksAreaReader = (dst: Uint8Array, offset: number) => Promise<void>;

/** The unlocked volume key and how to use it. */
export interface LuksKey {
  masterKey: Uint8Array;
  /** The key slot the passphrase opened. */
  slot: number;
  /** For the data path: `createSectorCipher(algorithm, masterKey)`, sectors numbered by host offset / 512. */
  algorithm: SectorCipherAlgorithm;
  cipher: LuksCipherSpec;
}

export interface LuksUnlockOptions {
  /** Refuse key slots (and a master key digest) needing more PBKDF2 iterations than this. */
  maxIterations?: number;
}

/** qemu reads the passphrase as a C string: it ends at the first NUL. */
function passphraseBytes(passphrase: string | Uint8Array): Uint8Array {
  const bytes = typeof passphrase === "string" ? encodeString(passphrase) : passphrase;
  const nul = bytes.indexOf(0);
  return nul < 0 ? bytes : bytes.subarray(0, nul);
}

/** The sector cipher for a volume, or NOT_SUPPORTED naming what is missing. */
function sectorAlgorithm(header: LuksHeader): SectorCipherAlgorithm {
  if (!LUKS_SUPPORTED_HASHES.includes(header.hashAlg)) {
    throw unsupported(`hash algorithm ${header.hashAlg} is not supported (${LUKS_SUPPORTED_HASHES.join(", ")})`);
  }
  const { cipherAlg, cipherMode, ivgenAlg } = header.cipher;
  const algorithm = luksSectorCipherAlgorithm(cipherAlg, cipherMode, ivgenAlg);
  if (algorithm === undefined) {
    throw unsupported(`cipher ${cipherAlg} ${cipherMode}-${ivgenAlg} is not supported (${SECTOR_CIPHER_ALGORITHMS.join(", ")})`);
  }
  return algorithm;
}

function checkIterations(what: string, iterations: number, max: number): void {
  if (iterations > max) {
    throw new Qcow2Error(
      Qcow2ErrorCode.LIMIT_EXCEEDED,
      `LUKS header: ${what} ${iterations} iterations exceed the limit of ${max} (raise maxIterations to open it)`,
    );
  }
}

function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  let diff = 0;
  for (let i = 0; i < a.length; i++) diff |= a[i]! ^ b[i]!;
  return diff === 0;
}

/**
 * Try `passphrase` on every active key slot in order (qemu's qcrypto_block_luks_find_key):
 * PBKDF2 → decrypt the key material (IVs from sector 0 of the slot) → AF-merge → compare the
 * master key's PBKDF2 digest. Every iteration count is checked against the limit before any work.
 */
export async function unlockLuks(
  header: LuksHeader,
  passphrase: string | Uint8Array,
  readArea: LuksAreaReader,
  env: LuksEnv,
  options: LuksUnlockOptions = {},
): Promise<LuksKey> {
  const { crypto, createSectorCipher } = env;
  const algorithm = sectorAlgorithm(header);
  const max = options.maxIterations ?? LUKS_MAX_ITERATIONS;
  checkIterations("mk-digest", header.mkDigestIterations, max);
  header.keySlots.forEach((slot, i) => {
    if (slot.active) checkIterations(`key slot ${i}`, slot.iterations, max);
  });
  const password = passphraseBytes(passphrase);
  const { keyBytes, cipher } = header;
  for (let i = 0; i < header.keySlots.length; i++) {
    const slot = header.keySlots[i]!;
    if (!slot.active) continue;
    const slotKey = await crypto.pbkdf2(header.hashAlg, password, slot.salt, slot.iterations, keyBytes);
    const material = new Uint8Array(keyBytes * slot.stripes);
    await readArea(material, slot.keyMaterialOffset * LUKS_SECTOR_SIZE);
    const slotCipher = await createSectorCipher(algorithm, slotKey);
    try {
      slotCipher.decrypt(material, 0);
    } finally {
      slotCipher.destroy();
    }
    const candidate = await afMerge(crypto, header.hashAlg, keyBytes, slot.stripes, material);
    const digest = await crypto.pbkdf2(header.hashAlg, candidate, header.mkDigestSalt, header.mkDigestIterations, LUKS_DIGEST_LEN);
    material.fill(0);
    slotKey.fill(0);
    if (equalBytes(digest, header.mkDigest)) return { masterKey: candidate, slot: i, algorithm, cipher: { ...cipher } };
    candidate.fill(0);
  }
  throw new Qcow2Error(Qcow2ErrorCode.BAD_PASSPHRASE, "Invalid password, cannot unlock any keyslot");
}

/** A reader over an area already in memory. */
export function luksAreaFromBytes(area: Uint8Array): LuksAreaReader {
  return async (dst, offset) => {
    if (offset < 0 || offset + dst.length > area.length) {
      throw bad(`request for ${dst.length} bytes at ${offset} is outside the ${area.length}-byte encryption header area`);
    }
    dst.set(area.subarray(offset, offset + dst.length));
  };
}

/** A reader over the area `{offset, length}` of a qcow2 file (header extension 0x0537be77). */
export function luksAreaReader(backend: BlockBackend, area: { offset: number; length: number }): LuksAreaReader {
  return async (dst, offset) => {
    // qcow2_crypto_hdr_read_func: "Request for data outside of extension header".
    if (offset < 0 || offset + dst.length > area.length) {
      throw bad(`request for ${dst.length} bytes at ${offset} is outside the ${area.length}-byte encryption header area`);
    }
    await readFully(backend, dst, area.offset + offset);
  };
}

/** Read and parse the LUKS header of the area `{offset, length}` in `backend`. */
export async function readLuksHeader(backend: BlockBackend, area: { offset: number; length: number }): Promise<LuksHeader> {
  if (area.length < LUKS_HEADER_SIZE) {
    throw bad(`the encryption header area is ${area.length} bytes, shorter than the ${LUKS_HEADER_SIZE}-byte LUKS header`);
  }
  const bytes = new Uint8Array(LUKS_HEADER_SIZE);
  await readFully(backend, bytes, area.offset);
  return parseLuksHeader(bytes, area.length);
}

// ---------------------------------------------------------------------------------------------
// Create

export interface LuksCreateOptions {
  passphrase: string | Uint8Array;
  /** Default aes-256. */
  cipherAlg?: LuksCipherAlg;
  /** Default xts. */
  cipherMode?: LuksCipherMode;
  /** Only plain64 (qemu's default). */
  ivgenAlg?: LuksIvgenAlg;
  /** Default sha256. */
  hashAlg?: LuksHashAlg;
  /** Milliseconds of PBKDF2 per key slot, as qemu's encrypt.iter-time. Default 2000. */
  iterTime?: number;
  /** Refuse to write more PBKDF2 iterations than unlock accepts by default. */
  maxIterations?: number;
}

export interface LuksCreated {
  /** The whole area: header, slot 0's key material, zeros elsewhere. Its length is the extension's. */
  area: Uint8Array;
  header: LuksHeader;
  key: LuksKey;
}

const CREATE_CIPHER_ALGS: readonly LuksCipherAlg[] = ["aes-128", "aes-256"];

/**
 * How many iterations of PBKDF2 run in one second (qemu's qcrypto_pbkdf2_count_iters): grow a trial
 * count until one run takes longer than a window, then scale. qemu's window is 500 ms (~1-2 s of
 * calibration per call); ours is iterTime/4 clamped to 25..500 ms, so the default iter-time
 * calibrates exactly as qemu does and short iter-times (tests) calibrate in tens of milliseconds.
 * Timing is wall-clock (performance.now), where qemu reads thread CPU time.
 */
async function countIterations(
  crypto: LuksCrypto,
  hash: LuksHashAlg,
  key: Uint8Array,
  salt: Uint8Array,
  outLength: number,
  iterTime: number,
): Promise<number> {
  const windowMs = Math.min(500, Math.max(25, iterTime / 4));
  let iterations = 2 ** 15;
  for (;;) {
    const start = performance.now();
    await crypto.pbkdf2(hash, key, salt, iterations, outLength);
    const delta = performance.now() - start;
    if (delta > windowMs) return Math.floor((iterations * 1000) / delta);
    if (delta < windowMs / 5) iterations *= 10;
    else iterations = Math.floor((iterations * 2 * windowMs) / delta);
    if (iterations > 2 ** 31 - 1) {
      throw unsupported(`cannot calibrate PBKDF2: ${iterations} iterations still ran in ${delta.toFixed(1)} ms`);
    }
  }
}

function scaledIterations(what: string, perSecond: number, iterTime: number, divisor: number, floor: number, max: number): number {
  const iterations = Math.max(Math.floor((perSecond * iterTime) / 1000 / divisor), floor);
  if (iterations > 0xffffffff) throw new Qcow2Error(Qcow2ErrorCode.LIMIT_EXCEEDED, `LUKS: PBKDF iterations ${iterations} larger than ${0xffffffff}`);
  if (iterations > max) {
    throw new Qcow2Error(
      Qcow2ErrorCode.LIMIT_EXCEEDED,
      `LUKS: iter-time ${iterTime} ms gives ${iterations} ${what} iterations, more than the limit of ${max} (raise maxIterations)`,
    );
  }
  return iterations;
}

/** A random version 4 UUID, lowercase, as qemu_uuid_unparse prints it. */
function randomUuid(crypto: LuksCrypto): string {
  const b = crypto.randomBytes(16);
  b[6] = (b[6]! & 0x0f) | 0x40;
  b[8] = (b[8]! & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/**
 * Build a LUKS1 area as qemu's qcrypto_block_luks_create does: random master key and salts,
 * calibrated iteration counts, 8 slots of 4000 stripes laid out from sector 8 with each slot's
 * material rounded up to 8 sectors, payload-offset = the area's length in sectors, slot 0 holding
 * the master key under `passphrase`. The caller stores `area` in host clusters and points the
 * header extension at it (length = area.length).
 */
export async function createLuks(options: LuksCreateOptions, env: LuksEnv): Promise<LuksCreated> {
  const { crypto, createSectorCipher } = env;
  const cipherAlg = options.cipherAlg ?? "aes-256";
  const cipherMode = options.cipherMode ?? "xts";
  const ivgenAlg = options.ivgenAlg ?? "plain64";
  const hashAlg = options.hashAlg ?? "sha256";
  const iterTime = options.iterTime ?? LUKS_DEFAULT_ITER_TIME_MS;
  const max = options.maxIterations ?? LUKS_MAX_ITERATIONS;
  if (!CREATE_CIPHER_ALGS.includes(cipherAlg)) throw unsupported(`cipher-alg ${cipherAlg} is not supported (${CREATE_CIPHER_ALGS.join(", ")})`);
  if (cipherMode !== "xts" && cipherMode !== "cbc") throw unsupported(`cipher-mode ${cipherMode} is not supported (xts, cbc)`);
  if (ivgenAlg !== "plain64") throw unsupported(`ivgen-alg ${ivgenAlg} is not supported (only plain64)`);
  if (!LUKS_SUPPORTED_HASHES.includes(hashAlg)) throw unsupported(`hash-alg ${hashAlg} is not supported (${LUKS_SUPPORTED_HASHES.join(", ")})`);
  if (!Number.isSafeInteger(iterTime) || iterTime < 1) throw new RangeError(`createLuks: iter-time ${iterTime} is not a positive number of milliseconds`);

  const perKey = Number(cipherAlg.slice(4)) / 8;
  const keyBytes = cipherMode === "xts" ? perKey * 2 : perKey;
  const cipher: LuksCipherSpec = { cipherAlg, cipherMode, ivgenAlg, keyBytes, sectorSize: LUKS_SECTOR_SIZE };
  const algorithm = luksSectorCipherAlgorithm(cipherAlg, cipherMode, ivgenAlg)!;

  // Same order of work as qemu: uuid, master key salt, master key, its digest, layout, slot 0.
  const uuid = randomUuid(crypto);
  const mkDigestSalt = crypto.randomBytes(LUKS_SALT_LEN);
  const masterKey = crypto.randomBytes(keyBytes);
  const mkRate = await countIterations(crypto, hashAlg, masterKey, mkDigestSalt, LUKS_DIGEST_LEN, iterTime);
  // qemu (after cryptsetup) divides by 8, so that checking all 8 slots costs about one iter-time.
  const mkDigestIterations = scaledIterations("master key", mkRate, iterTime, 8, LUKS_MIN_MASTER_KEY_ITERS, max);
  const mkDigest = await crypto.pbkdf2(hashAlg, masterKey, mkDigestSalt, mkDigestIterations, LUKS_DIGEST_LEN);

  const headerSectors = LUKS_KEY_SLOT_OFFSET / LUKS_SECTOR_SIZE;
  const slotSectors = splitKeySectors(keyBytes, LUKS_STRIPES);
  const keySlots: LuksKeySlot[] = [];
  for (let i = 0; i < LUKS_NUM_KEY_SLOTS; i++) {
    keySlots.push({
      state: LUKS_KEY_SLOT_DISABLED,
      active: false,
      iterations: 0,
      salt: new Uint8Array(LUKS_SALT_LEN),
      keyMaterialOffset: headerSectors + i * slotSectors,
      stripes: LUKS_STRIPES,
    });
  }
  const payloadOffset = headerSectors + LUKS_NUM_KEY_SLOTS * slotSectors;
  const area = new Uint8Array(payloadOffset * LUKS_SECTOR_SIZE);

  // qcrypto_block_luks_store_key for slot 0.
  const password = passphraseBytes(options.passphrase);
  const slot = keySlots[0]!;
  slot.salt = crypto.randomBytes(LUKS_SALT_LEN);
  const slotRate = await countIterations(crypto, hashAlg, password, slot.salt, keyBytes, iterTime);
  slot.iterations = scaledIterations("key slot", slotRate, iterTime, 1, LUKS_MIN_SLOT_KEY_ITERS, max);
  const slotKey = await crypto.pbkdf2(hashAlg, password, slot.salt, slot.iterations, keyBytes);
  const material = await afSplit(crypto, hashAlg, masterKey, LUKS_STRIPES);
  const slotCipher = await createSectorCipher(algorithm, slotKey);
  try {
    slotCipher.encrypt(material, 0);
  } finally {
    slotCipher.destroy();
  }
  area.set(material, slot.keyMaterialOffset * LUKS_SECTOR_SIZE);
  material.fill(0);
  slotKey.fill(0);
  slot.state = LUKS_KEY_SLOT_ENABLED;
  slot.active = true;

  const header: LuksHeader = {
    version: LUKS_VERSION,
    cipherName: "aes",
    cipherModeSpec: `${cipherMode}-${ivgenAlg}`,
    hashSpec: hashAlg,
    payloadOffset,
    keyBytes,
    mkDigest,
    mkDigestSalt,
    mkDigestIterations,
    uuid,
    keySlots,
    cipher,
    hashAlg,
  };
  area.set(serializeLuksHeader(header), 0);
  return { area, header, key: { masterKey, slot: 0, algorithm, cipher: { ...cipher } } };
}
