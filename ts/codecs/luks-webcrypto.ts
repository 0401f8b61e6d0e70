// LUKS hashes and PBKDF2 over WebCrypto (crypto.subtle), available in browsers (secure contexts)
// and in Node. Sector ciphers are not here: WebCrypto has no XTS and no unpadded CBC.

import { Qcow2Error, Qcow2ErrorCode } from "../errors.js";
import type { LuksCrypto, LuksHashAlg } from "../format/luks.js";

const WEBCRYPTO_HASH: Partial<Record<LuksHashAlg, string>> = {
  sha1: "SHA-1",
  sha256: "SHA-256",
  sha384: "SHA-384",
  sha512: "SHA-512",
};

function hashName(hash: LuksHashAlg): string {
  const name = WEBCRYPTO_HASH[hash];
  if (name === undefined) throw new Qcow2Error(Qcow2ErrorCode.NOT_SUPPORTED, `LUKS: WebCrypto has no ${hash}`);
  return name;
}

/** getRandomValues fills at most 65536 bytes per call. */
const RANDOM_CHUNK = 65536;

/** LUKS crypto over `globalThis.crypto` (or the one given). */
export function webCryptoLuks(webCrypto: Crypto | undefined = globalThis.crypto): LuksCrypto {
  const subtle = webCrypto?.subtle;
  if (webCrypto === undefined || subtle === undefined) {
    throw new Qcow2Error(Qcow2ErrorCode.NOT_SUPPORTED, "LUKS: WebCrypto (crypto.subtle) is not available here; browsers offer it only in secure contexts");
  }
  return {
    async pbkdf2(hash, password, salt, iterations, keyLength) {
      const key = await subtle.importKey("raw", password as BufferSource, "PBKDF2", false, ["deriveBits"]);
      const bits = await subtle.deriveBits(
        { name: "PBKDF2", hash: hashName(hash), salt: salt as BufferSource, iterations },
        key,
        keyLength * 8,
      );
      return new Uint8Array(bits);
    },
    async digest(hash, parts) {
      let data: Uint8Array;
      if (parts.length === 1) data = parts[0]!;
      else {
        data = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
        let at = 0;
        for (const p of parts) {
          data.set(p, at);
          at += p.length;
        }
      }
      return new Uint8Array(await subtle.digest(hashName(hash), data as BufferSource));
    },
    randomBytes(length) {
      const out = new Uint8Array(length);
      for (let at = 0; at < length; at += RANDOM_CHUNK) webCrypto.getRandomValues(out.subarray(at, Math.min(length, at + RANDOM_CHUNK)));
      return out;
    },
  };
}
