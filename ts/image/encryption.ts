// The data path of encrypted images (FORMAT.md §1.12): which cipher, which key, and which number
// each 512-byte sector carries. Legacy qcow2 AES (crypt_method 1) numbers sectors by guest offset
// and keys AES-128-CBC with the passphrase itself; LUKS (crypt_method 2) numbers them by host
// offset and keys the volume's cipher with the master key its key slots guard. Metadata is plain.

import { Qcow2Error, Qcow2ErrorCode } from "../errors.js";
import type { BlockBackend } from "../io/backend.js";
import { CRYPT_AES, CRYPT_LUKS } from "../format/constants.js";
import type { Qcow2Header } from "../format/header.js";
import { luksAreaReader, readLuksHeader, unlockLuks, type LuksHeader } from "../format/luks.js";
import type { SectorCipher } from "../codecs/sector-cipher.js";
import { platform } from "../platform.js";

export interface DataEncryption {
  format: "aes" | "luks";
  cipher: SectorCipher;
  /** Sector numbers come from the guest offset (legacy AES) or the host offset (LUKS). */
  sectorsBy: "guest" | "host";
}

/** qemu reads a secret as a C string: it ends at the first NUL. */
function secretBytes(passphrase: string | Uint8Array): Uint8Array {
  const bytes = typeof passphrase === "string" ? new TextEncoder().encode(passphrase) : passphrase;
  const nul = bytes.indexOf(0);
  return nul < 0 ? bytes : bytes.subarray(0, nul);
}

/** qcrypto_block_qcow_init: the first 16 bytes of the password, zero padded, are the AES-128 key. */
export function legacyAesKey(passphrase: string | Uint8Array): Uint8Array {
  const key = new Uint8Array(16);
  const bytes = secretBytes(passphrase);
  key.set(bytes.subarray(0, 16));
  return key;
}

/** The LUKS header of an image, from the area its full-disk-encryption extension names. */
export async function imageLuksHeader(backend: BlockBackend, header: Qcow2Header): Promise<LuksHeader> {
  const area = header.extensions.cryptoHeader;
  if (!area) {
    throw new Qcow2Error(Qcow2ErrorCode.BAD_HEADER, `${backend.name}: LUKS encryption without a full disk encryption header extension`);
  }
  return readLuksHeader(backend, area);
}

/** Set up the data path of an encrypted image with its passphrase (a wrong one fails for LUKS only). */
export async function openEncryption(backend: BlockBackend, header: Qcow2Header, passphrase: string | Uint8Array): Promise<DataEncryption> {
  if (header.cryptMethod === CRYPT_AES) {
    const key = legacyAesKey(passphrase);
    try {
      return { format: "aes", cipher: await platform.createSectorCipher("aes-128-cbc-plain64", key), sectorsBy: "guest" };
    } finally {
      key.fill(0);
    }
  }
  if (header.cryptMethod === CRYPT_LUKS) {
    const luks = await imageLuksHeader(backend, header);
    const env = { crypto: await platform.createLuksCrypto(), createSectorCipher: platform.createSectorCipher };
    const unlocked = await unlockLuks(luks, passphrase, luksAreaReader(backend, header.extensions.cryptoHeader!), env);
    try {
      return { format: "luks", cipher: await platform.createSectorCipher(unlocked.algorithm, unlocked.masterKey), sectorsBy: "host" };
    } finally {
      unlocked.masterKey.fill(0);
    }
  }
  throw new Qcow2Error(Qcow2ErrorCode.NOT_SUPPORTED, `${backend.name}: crypt_method ${header.cryptMethod} is not an encryption this library knows`);
}
