// Node entry: the core, plus file paths, node:zlib and the Node file backend.
import "./node-platform.js";

export * from "./index.js";
export { NodeFileBackend, type NodeFileOptions } from "./io/node-file.js";
export { NodeZlibDeflater, NodeZlibInflater } from "./codecs/node-zlib.js";
