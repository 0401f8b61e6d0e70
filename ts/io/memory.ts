// In-memory backend: tests, fixtures built on the fly, and images that never touch a disk.

import { Qcow2Error, Qcow2ErrorCode } from "../errors.js";
import { checkRange, type BlockBackend } from "./backend.js";

export interface MemoryBackendOptions {
  readOnly?: boolean;
  name?: string;
}

export class MemoryBackend implements BlockBackend {
  readonly readOnly: boolean;
  readonly name: string;
  private data: Uint8Array;
  private length: number;
  private closed = false;

  /** Wraps `initial` without copying it (writes go into it until it must grow). */
  constructor(initial: Uint8Array = new Uint8Array(0), options: MemoryBackendOptions = {}) {
    this.data = initial;
    this.length = initial.length;
    this.readOnly = options.readOnly ?? false;
    this.name = options.name ?? "memory";
  }

  /** The current contents (a view; copy it to keep it). */
  bytes(): Uint8Array {
    return this.data.subarray(0, this.length);
  }

  private live(op: string): void {
    if (this.closed) throw new Qcow2Error(Qcow2ErrorCode.CLOSED, `${this.name}: ${op} after close`);
  }

  private writable(op: string): void {
    this.live(op);
    if (this.readOnly) throw new Qcow2Error(Qcow2ErrorCode.READ_ONLY, `${this.name}: ${op} on a read-only backend`);
  }

  async read(dst: Uint8Array, pos: number): Promise<number> {
    this.live("read");
    checkRange("read", pos, dst.length);
    if (pos >= this.length) return 0;
    const n = Math.min(dst.length, this.length - pos);
    dst.set(this.data.subarray(pos, pos + n));
    return n;
  }

  async write(src: Uint8Array, pos: number): Promise<void> {
    this.writable("write");
    checkRange("write", pos, src.length);
    const end = pos + src.length;
    this.ensureCapacity(end);
    this.data.set(src, pos);
    if (end > this.length) this.length = end;
  }

  async size(): Promise<number> {
    this.live("size");
    return this.length;
  }

  async truncate(size: number): Promise<void> {
    this.writable("truncate");
    checkRange("truncate", size, 0);
    if (size > this.length) {
      this.ensureCapacity(size);
      this.data.fill(0, this.length, size);
    }
    this.length = size;
  }

  async flush(): Promise<void> {
    this.writable("flush");
  }

  async close(): Promise<void> {
    this.closed = true;
  }

  private ensureCapacity(end: number): void {
    if (end <= this.data.length) return;
    const grown = new Uint8Array(Math.max(end, Math.min(this.data.length * 2, end + (64 << 20))));
    grown.set(this.data.subarray(0, this.length));
    this.data = grown;
  }
}
