// Loads the WebAssembly core (asm/) and hands out a JS-owned arena inside its linear memory.
//
// Each WasmCore is its own instance with its own memory, so one image's cache can never be
// invalidated by another's growth. The compiled module is shared. Views into memory are
// re-derived through `u8()` after anything that may have grown it; never keep one across an await
// that may reserve.

import { WASM_SCALAR_BASE64, WASM_SIMD_BASE64 } from "./embedded.generated.js";
import {
  L2_RESULT_SIZE,
  type WasmExports,
} from "./exports.js";

export type WasmVariant = "simd" | "scalar";

const WASM_PAGE = 65536;

function decodeBase64(text: string): Uint8Array<ArrayBuffer> {
  const binary = atob(text);
  const out = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) out[i] = binary.charCodeAt(i);
  return out;
}

const modules = new Map<WasmVariant, Promise<WebAssembly.Module>>();

/** The variant this engine runs best: SIMD when the engine validates the SIMD build. */
export function preferredVariant(): WasmVariant {
  return WebAssembly.validate(decodeBase64(WASM_SIMD_BASE64)) ? "simd" : "scalar";
}

let detected: WasmVariant | undefined;

/** Compile (once per variant, lazily) the embedded module. */
export function compileWasm(variant?: WasmVariant): Promise<WebAssembly.Module> {
  const v = variant ?? (detected ??= preferredVariant());
  let pending = modules.get(v);
  if (!pending) {
    pending = WebAssembly.compile(decodeBase64(v === "simd" ? WASM_SIMD_BASE64 : WASM_SCALAR_BASE64));
    modules.set(v, pending);
  }
  return pending;
}

/** Result of one L2 lookup; fields are overwritten by the next lookup on the same core. */
export interface L2LookupResult {
  /** L2_TYPE_* */
  type: number;
  /** L2_INVALID_* when type is L2_TYPE_INVALID. */
  invalidReason: number;
  /** Host cluster offset (normal, zero-alloc) or compressed stream offset. */
  hostOffset: number;
  /** Bytes to read for a compressed cluster (an upper bound). */
  compressedSize: number;
  /** QCOW_OFLAG_COPIED of the first entry. */
  copied: boolean;
}

export class WasmCore {
  readonly exports: WasmExports;
  readonly variant: WasmVariant;
  private top: number;
  private view: Uint8Array<ArrayBuffer>;
  private f64: Float64Array<ArrayBuffer>;
  private u32: Uint32Array<ArrayBuffer>;
  private dv: DataView<ArrayBuffer>;
  private readonly resultPtr: number;
  readonly result: L2LookupResult = { type: 0, invalidReason: 0, hostOffset: 0, compressedSize: 0, copied: false };

  private constructor(exports: WasmExports, variant: WasmVariant) {
    this.exports = exports;
    this.variant = variant;
    this.top = exports.heapBase();
    this.view = new Uint8Array(exports.memory.buffer);
    this.f64 = new Float64Array(exports.memory.buffer);
    this.u32 = new Uint32Array(exports.memory.buffer);
    this.dv = new DataView(exports.memory.buffer);
    this.resultPtr = this.reserve(L2_RESULT_SIZE);
  }

  static async create(variant?: WasmVariant): Promise<WasmCore> {
    const v = variant ?? (detected ??= preferredVariant());
    const module = await compileWasm(v);
    const instance = await WebAssembly.instantiate(module, {});
    const exports = instance.exports as unknown as WasmExports;
    exports._initialize?.();
    return new WasmCore(exports, v);
  }

  /** Reserve `size` bytes (16-byte aligned) for the life of this core, growing memory if needed. */
  reserve(size: number, align = 16): number {
    if (!Number.isSafeInteger(size) || size < 0) throw new RangeError(`wasm: bad reservation size ${size}`);
    const ptr = Math.ceil(this.top / align) * align;
    const end = ptr + size;
    const memory = this.exports.memory;
    if (end > memory.buffer.byteLength) {
      memory.grow(Math.ceil((end - memory.buffer.byteLength) / WASM_PAGE));
      this.refresh();
    }
    this.top = end;
    return ptr;
  }

  /**
   * A view of all of linear memory, re-derived if memory has grown since the last call. Growing
   * detaches the old buffer (length 0), which is cheaper to test than reading memory.buffer (~25 ns).
   */
  u8(): Uint8Array<ArrayBuffer> {
    if (this.view.length === 0) this.refresh();
    return this.view;
  }

  private refresh(): void {
    const buffer = this.exports.memory.buffer;
    this.view = new Uint8Array(buffer);
    this.f64 = new Float64Array(buffer);
    this.u32 = new Uint32Array(buffer);
    this.dv = new DataView(buffer);
  }

  /** A DataView of all of linear memory (big-endian table entries are read and written through it). */
  dataView(): DataView<ArrayBuffer> {
    this.u8();
    return this.dv;
  }

  /** A fresh view of [ptr, ptr + length). */
  bytes(ptr: number, length: number): Uint8Array<ArrayBuffer> {
    return this.u8().subarray(ptr, ptr + length);
  }

  /** Classify L2 entry `startIndex` of the table at `slotPtr`; returns the run length, fills `result`. */
  l2Lookup(slotPtr: number, startIndex: number, count: number, clusterBits: number, flags: number): number {
    const n = this.exports.l2Lookup(slotPtr, startIndex, count, clusterBits, flags, this.resultPtr);
    this.u8();
    const r = this.result;
    const w = this.resultPtr >>> 2;
    r.type = this.u32[w]!;
    r.invalidReason = this.u32[w + 1]!;
    r.hostOffset = this.f64[(this.resultPtr + 8) >>> 3]!;
    r.compressedSize = this.f64[(this.resultPtr + 16) >>> 3]!;
    r.copied = this.u32[w + 6] !== 0;
    return n;
  }
}
