// LUKS hashes and PBKDF2 over node:crypto (OpenSSL): PBKDF2 on libuv's thread pool, synchronous
// digests (the anti-forensic merge hashes ~8000 small blocks per key slot). Sector ciphers are
// ts/codecs/node-crypto.ts.

import { createCipheriv, createDecipheriv, createHash, pbkdf2, randomFillSync } from "node:crypto";
import { Qcow2Error, Qcow2ErrorCode } from "../errors.js";
import type { LuksCrypto, LuksHashAlg } from "../format/luks.js";

/** OpenSSL's digest names for the hashes LUKS images use. */
const NODE_HASH: Partial<Record<LuksHashAlg, string>> = {
  sha1: "sha1",
  sha256: "sha256",
  sha384: "sha384",
  sha512: "sha512",
};

function hashName(hash: LuksHashAlg): string {
  const name = NODE_HASH[hash];
  if (name === undefined) throw new Qcow2Error(Qcow2ErrorCode.NOT_SUPPORTED, `LUKS: no ${hash} here`);
  return name;
}

/** LUKS hashes, PBKDF2 and randomness over node:crypto. */
export function nodeLuksCrypto(): LuksCrypto {
  return {
    pbkdf2: (hash, password, salt, iterations, keyLength) =>
      new Promise((resolve, reject) => {
        pbkdf2(password, salt, iterations, keyLength, hashName(hash), (err, key) => {
          if (err) reject(err);
          else resolve(new Uint8Array(key.buffer, key.byteOffset, key.byteLength));
        });
      }),
    digest(hash, parts) {
      const h = createHash(hashName(hash));
      for (const p of parts) h.update(p);
      const d = h.digest();
      return new Uint8Array(d.buffer, d.byteOffset, d.byteLength);
    },
    randomBytes: (length) => randomFillSync(new Uint8Array(length)),
  };
}
