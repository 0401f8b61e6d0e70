// Registers the Node platform (file paths, node:zlib) without loading the rest of the library, so
// the CLI starts by loading only what its command needs: node:zlib and the pako fallback load at
// the first compressed cluster.
import path from "node:path";
import { NodeFileBackend } from "./io/node-file.js";
import { registerPlatform } from "./platform.js";

registerPlatform({
  openFile: (file, { readOnly, create }) => NodeFileBackend.open(file, { readOnly, create: create ?? false }),
  // qemu resolves a relative backing name against the directory of the image naming it.
  resolveBackingPath: (backingFile, imageName) =>
    path.isAbsolute(backingFile) ? backingFile : path.join(path.dirname(imageName), backingFile),
  createInflater: async () => new (await import("./codecs/node-zlib.js")).NodeZlibInflater(),
  createDeflater: async () => new (await import("./codecs/node-zlib.js")).NodeZlibDeflater(),
  createLuksCrypto: async () => (await import("./codecs/luks-node.js")).nodeLuksCrypto(),
  // OpenSSL through node:crypto: several times the WASM build (bench/crypto.mjs).
  createSectorCipher: async (algorithm, key) => new (await import("./codecs/node-crypto.js")).NodeSectorCipher(algorithm, key),
});
