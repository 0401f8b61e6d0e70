// Browser backend over a Blob or File (read-only): a dropped file is checked or read in place.

import { Qcow2Error, Qcow2ErrorCode } from "../errors.js";
import { checkRange, type BlockBackend } from "./backend.js";

export class BlobBackend implements BlockBackend {
  readonly readOnly = true;
  readonly name: string;
  private readonly blob: Blob;
  private closed = false;

  constructor(blob: Blob, name?: string) {
    this.blob = blob;
    this.name = name ?? ((blob as { name?: string }).name || "blob");
  }

  private live(op: string): void {
    if (this.closed) throw new Qcow2Error(Qcow2ErrorCode.CLOSED, `${this.name}: ${op} after close`);
  }

  private refuse(op: string): never {
    this.live(op);
    throw new Qcow2Error(Qcow2ErrorCode.READ_ONLY, `${this.name}: ${op} on a read-only Blob backend`);
  }

  async read(dst: Uint8Array, pos: number): Promise<number> {
    this.live("read");
    checkRange("read", pos, dst.length);
    if (pos >= this.blob.size || dst.length === 0) return 0;
    const end = Math.min(this.blob.size, pos + dst.length);
    let chunk: ArrayBuffer;
    try {
      chunk = await this.blob.slice(pos, end).arrayBuffer();
    } catch (cause) {
      throw new Qcow2Error(Qcow2ErrorCode.IO_ERROR, `${this.name}: read of ${end - pos} bytes at ${pos} failed`, { cause });
    }
    dst.set(new Uint8Array(chunk));
    return chunk.byteLength;
  }

  async write(_src: Uint8Array, _pos: number): Promise<void> {
    this.refuse("write");
  }

  async size(): Promise<number> {
    this.live("size");
    return this.blob.size;
  }

  async truncate(_size: number): Promise<void> {
    this.refuse("truncate");
  }

  async flush(): Promise<void> {
    this.refuse("flush");
  }

  async close(): Promise<void> {
    this.closed = true;
  }
}
