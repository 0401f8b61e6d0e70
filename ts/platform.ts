// What the platform entry points (./node, ./browser) plug into the core. The core itself imports no
// platform module; `qcow2-wasm/node` fills these in when it is imported.

import type { ClusterDeflater, ClusterInflater } from "./codecs/deflate.js";
import type { BlockBackend } from "./io/backend.js";
import type { LuksCrypto } from "./format/luks.js";
import type { SectorCipherFactory } from "./codecs/sector-cipher.js";

export interface FileOpenOptions {
  readOnly: boolean;
  /** Create the file if it does not exist (read-write only). */
  create?: boolean;
}

export interface Platform {
  /** Open a path as a backend. */
  openFile?: (path: string, options: FileOpenOptions) => Promise<BlockBackend>;
  /** Resolve a backing file name against the name of the image that refers to it. */
  resolveBackingPath?: (backingFile: string, imageName: string) => string;
  /** A fresh inflater for compressed clusters (asked for at the first compressed cluster read). */
  createInflater: () => ClusterInflater | Promise<ClusterInflater>;
  /** A fresh deflater for compressed writes (asked for at the first one). */
  createDeflater: () => ClusterDeflater | Promise<ClusterDeflater>;
  /** Hashes, PBKDF2 and randomness for LUKS (asked for when a LUKS area is unlocked or created). */
  createLuksCrypto: () => LuksCrypto | Promise<LuksCrypto>;
  /** A sector cipher (legacy AES, LUKS payload) for a key, asked for when an encrypted image is opened. */
  createSectorCipher: SectorCipherFactory;
}

// The codecs load on first use: opening an image that has no compressed cluster loads no zlib.
export const platform: Platform = {
  createInflater: async () => new (await import("./codecs/deflate.js")).PakoInflater(),
  createDeflater: async () => new (await import("./codecs/deflate.js")).PakoDeflater(),
  // WebCrypto works in browsers (secure contexts) and Node alike; Node registers node:crypto.
  createLuksCrypto: async () => (await import("./codecs/luks-webcrypto.js")).webCryptoLuks(),
  // Bitsliced AES in WebAssembly: portable and constant-time.
  createSectorCipher: async (algorithm, key) => (await import("./codecs/aes-wasm.js")).WasmSectorCipher.create(algorithm, key),
};

export function registerPlatform(overrides: Partial<Platform>): void {
  Object.assign(platform, overrides);
}
