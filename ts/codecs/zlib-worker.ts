// A worker of the node:zlib pool (node-zlib.ts): deflates or inflates one piece of a batch per
// message (zlib-protocol.ts), cluster by cluster, with the parameters and acceptance rules of
// NodeZlibDeflater and NodeZlibInflater.
//
// Where node:zlib's native handle can be driven directly (checked against the public API when the
// worker starts), one handle per direction is reset and reused for every cluster and writes
// straight into the reply: no stream set up and torn down per cluster, no output buffer to
// allocate and copy. That saves ~7% of a compressed image's conversion (bench/convert.mjs). It also
// stops an inflate at one cluster as qemu does, so over-long streams need no fallback.

import { parentPort } from "node:worker_threads";
import zlib from "node:zlib";
import { ITEM_FAILED, ITEM_TOO_LONG, type ZlibPiece, type ZlibReply } from "./zlib-protocol.js";

const DEFLATE: zlib.ZlibOptions = { windowBits: 12, memLevel: 9, level: 6 };

/** Writes up to `room` bytes into `out` at `at`; undefined on a zlib error. */
type Codec = (src: Uint8Array, out: Uint8Array, at: number, room: number) => { produced: number; inputLeft: number } | undefined;

interface NativeHandle {
  reset(): void;
  writeSync(flush: number, src: Uint8Array, inOff: number, inLen: number, out: Uint8Array, outOff: number, outLen: number): void;
}

/** A codec on node:zlib's internal handle, or undefined when this Node does not have one. */
function handleCodec(make: () => zlib.Inflate | zlib.Deflate, flush: number): Codec | undefined {
  let stream: zlib.Inflate | zlib.Deflate | undefined;
  const internals = (s: object): { handle?: NativeHandle; state?: Uint32Array } => {
    const x = s as { _handle?: NativeHandle; _writeState?: Uint32Array };
    return { handle: x._handle, state: x._writeState };
  };
  const probe = internals(make());
  if (typeof probe.handle?.reset !== "function" || typeof probe.handle.writeSync !== "function" || !(probe.state instanceof Uint32Array)) {
    return undefined;
  }
  return (src, out, at, room) => {
    if (!stream) {
      stream = make();
      stream.on("error", () => undefined); // seen below as a destroyed stream
    }
    const { handle, state } = internals(stream);
    handle!.reset();
    handle!.writeSync(flush, src, 0, src.length, out, at, room);
    if (stream.destroyed) {
      stream = undefined; // a zlib error closes the handle: the next cluster gets a new one
      return undefined;
    }
    return { produced: room - state![0]!, inputLeft: state![1]! };
  };
}

let deflateCodec: Codec | undefined = handleCodec(() => zlib.createDeflateRaw(DEFLATE), zlib.constants.Z_FINISH);
let inflateCodec: Codec | undefined = handleCodec(() => zlib.createInflateRaw(), zlib.constants.Z_SYNC_FLUSH);

/** Deflate one cluster into out[at..]: its length, or ITEM_FAILED when not shorter than `limit`. */
function deflateInto(src: Uint8Array, out: Uint8Array, at: number, limit: number): number {
  if (deflateCodec) {
    const r = deflateCodec(src, out, at, limit);
    // Output that fills all of `limit` is not shorter than it (or did not fit).
    return r && r.produced < limit && r.inputLeft === 0 ? r.produced : ITEM_FAILED;
  }
  const packed = zlib.deflateRawSync(src, { ...DEFLATE, chunkSize: limit + 1024 });
  if (packed.length >= limit) return ITEM_FAILED;
  out.set(packed, at);
  return packed.length;
}

/** Inflate one cluster into out[at, at + cs): cs, or ITEM_FAILED / ITEM_TOO_LONG. */
function inflateInto(src: Uint8Array, out: Uint8Array, at: number, cs: number): number {
  if (inflateCodec) {
    const r = inflateCodec(src, out, at, cs);
    return r && r.produced === cs ? cs : ITEM_FAILED;
  }
  let cluster: Buffer;
  try {
    cluster = zlib.inflateRawSync(src, { finishFlush: zlib.constants.Z_SYNC_FLUSH, maxOutputLength: cs, chunkSize: Math.max(cs, 64) });
  } catch (err) {
    // Streams that run on past one cluster are legal: the caller inflates those itself.
    return (err as { code?: string }).code === "ERR_BUFFER_TOO_LARGE" ? ITEM_TOO_LONG : ITEM_FAILED;
  }
  if (cluster.length !== cs) return ITEM_FAILED;
  out.set(cluster, at);
  return cs;
}

/** The handle codecs must give what the public API gives, byte for byte, or they are not used. */
function checkHandleCodecs(): void {
  const cs = 65536;
  const cluster = new Uint8Array(cs);
  for (let i = 0; i < cs; i++) cluster[i] = i % 3 === 0 ? (i * 2654435761) >>> 27 : 97 + (i % 11);
  const reference = zlib.deflateRawSync(cluster, DEFLATE);
  const out = new Uint8Array(2 * cs);
  try {
    const n = deflateCodec ? deflateInto(cluster, out, 7, cs) : reference.length;
    if (n !== reference.length || (deflateCodec && !Buffer.from(out.subarray(7, 7 + n)).equals(reference))) deflateCodec = undefined;
    const m = inflateCodec ? inflateInto(reference, out, 3, cs) : cs;
    if (m !== cs || (inflateCodec && !Buffer.from(out.subarray(3, 3 + cs)).equals(cluster))) inflateCodec = undefined;
  } catch {
    deflateCodec = undefined;
    inflateCodec = undefined;
  }
}

function run(piece: ZlibPiece): ZlibReply {
  const cs = piece.clusterSize;
  const input = new Uint8Array(piece.input);
  const lengths = new Int32Array(piece.lengths.length);
  // Deflate output is kept only when shorter than a cluster; inflate output is one cluster.
  const need = piece.lengths.length * cs;
  const output = piece.spare && piece.spare.byteLength >= need ? new Uint8Array(piece.spare) : new Uint8Array(need);
  let inPos = 0;
  let outPos = 0;
  piece.lengths.forEach((n, k) => {
    const src = input.subarray(inPos, inPos + n);
    inPos += n;
    const r = piece.op === "deflate" ? deflateInto(src, output, outPos, cs) : inflateInto(src, output, outPos, cs);
    lengths[k] = r;
    if (r > 0) outPos += r;
  });
  return { id: piece.id, output: output.buffer, lengths };
}

checkHandleCodecs();

parentPort?.on("message", (piece: ZlibPiece) => {
  const reply = run(piece);
  parentPort!.postMessage(reply, [reply.output]);
});
