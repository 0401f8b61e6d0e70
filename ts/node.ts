// Node entry: the core, plus file paths, node:zlib and the Node file backend.
import path from "node:path";
import { NodeFileBackend } from "./io/node-file.js";
import { NodeZlibDeflater, NodeZlibInflater } from "./codecs/node-zlib.js";
import { registerPlatform } from "./platform.js";

registerPlatform({
  openFile: (file, { readOnly, create }) => NodeFileBackend.open(file, { readOnly, create: create ?? false }),
  // qemu resolves a relative backing name against the directory of the image naming it.
  resolveBackingPath: (backingFile, imageName) =>
    path.isAbsolute(backingFile) ? backingFile : path.join(path.dirname(imageName), backingFile),
  createInflater: () => new NodeZlibInflater(),
  createDeflater: () => new NodeZlibDeflater(),
});

export * from "./index.js";
export { NodeFileBackend, type NodeFileOptions } from "./io/node-file.js";
export { NodeZlibDeflater, NodeZlibInflater } from "./codecs/node-zlib.js";
