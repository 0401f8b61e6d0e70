// Node file backend. Every call is a synchronous fs call on the descriptor by default: with the
// page cache warm, one awaited call costs ~45 µs of thread-pool round trip, more than copying
// 64 KiB, and the engine already coalesces requests into large ones (bench/io-backend.mjs measures
// both); a command on a small image then never starts the thread pool. `{ sync: false }` keeps
// the event loop free for servers that read from slow disks. `asyncFrom` sends only large reads
// and writes to the thread pool: a caller that keeps several in flight (convert's reads) overlaps
// them with its own work, while small metadata requests stay synchronous.

import fs from "node:fs";
import { Qcow2Error, Qcow2ErrorCode } from "../errors.js";
import { checkRange, type BlockBackend } from "./backend.js";

export interface NodeFileOptions {
  readOnly?: boolean;
  /** Create the file if missing (read-write only). */
  create?: boolean;
  /** Use synchronous fs calls (default true). */
  sync?: boolean;
  /**
   * With `sync`, reads and writes of at least this many bytes still go through the thread pool
   * (default: none do).
   */
  asyncFrom?: number;
}

function ioError(name: string, op: string, cause: unknown): Qcow2Error {
  const reason = cause instanceof Error ? cause.message : String(cause);
  return new Qcow2Error(Qcow2ErrorCode.IO_ERROR, `${name}: ${op} failed: ${reason}`, { cause });
}

/** An fs call taking a callback, as a promise (on a bare descriptor: no FileHandle to set up). */
function call<T>(fn: (cb: (err: NodeJS.ErrnoException | null, value: T) => void) => void): Promise<T> {
  return new Promise<T>((resolve, reject) => fn((err, value) => (err ? reject(err) : resolve(value))));
}

export class NodeFileBackend implements BlockBackend {
  readonly readOnly: boolean;
  readonly name: string;
  private readonly fd: number;
  /** Requests of at least this many bytes go through the thread pool; smaller ones are synchronous. */
  private readonly asyncFrom: number;
  /** Open, stat, truncate, flush and close are synchronous too (no thread pool at all). */
  private readonly sync: boolean;
  private closed = false;

  private constructor(fd: number, path: string, readOnly: boolean, sync: boolean, asyncFrom: number) {
    this.fd = fd;
    this.name = path;
    this.readOnly = readOnly;
    this.sync = sync;
    this.asyncFrom = asyncFrom;
  }

  static async open(path: string, options: NodeFileOptions = {}): Promise<NodeFileBackend> {
    const readOnly = options.readOnly ?? true;
    const sync = options.sync ?? true;
    // "a+" would append on Linux; open with O_CREAT|O_RDWR instead so positional writes work.
    const flags = readOnly ? fs.constants.O_RDONLY : options.create ? fs.constants.O_RDWR | fs.constants.O_CREAT : fs.constants.O_RDWR;
    let fd: number;
    try {
      // Synchronous by default: a command that opens a small image never starts the thread pool.
      fd = sync ? fs.openSync(path, flags, 0o644) : await call<number>((cb) => fs.open(path, flags, 0o644, cb));
    } catch (cause) {
      throw ioError(path, "open", cause);
    }
    return new NodeFileBackend(fd, path, readOnly, sync, sync ? (options.asyncFrom ?? Infinity) : 0);
  }

  private live(op: string): void {
    if (this.closed) throw new Qcow2Error(Qcow2ErrorCode.CLOSED, `${this.name}: ${op} after close`);
  }

  private writable(op: string): void {
    this.live(op);
    if (this.readOnly) throw new Qcow2Error(Qcow2ErrorCode.READ_ONLY, `${this.name}: ${op} on a read-only file`);
  }

  async read(dst: Uint8Array, pos: number): Promise<number> {
    this.live("read");
    checkRange("read", pos, dst.length);
    if (dst.length === 0) return 0;
    try {
      if (dst.length < this.asyncFrom) return fs.readSync(this.fd, dst, 0, dst.length, pos);
      return await call<number>((cb) => fs.read(this.fd, dst, 0, dst.length, pos, cb));
    } catch (cause) {
      throw ioError(this.name, `read of ${dst.length} bytes at ${pos}`, cause);
    }
  }

  async write(src: Uint8Array, pos: number): Promise<void> {
    this.writable("write");
    checkRange("write", pos, src.length);
    try {
      const sync = src.length < this.asyncFrom;
      let done = 0;
      while (done < src.length) {
        const n = sync
          ? fs.writeSync(this.fd, src, done, src.length - done, pos + done)
          : await call<number>((cb) => fs.write(this.fd, src, done, src.length - done, pos + done, cb));
        done += n;
      }
    } catch (cause) {
      throw ioError(this.name, `write of ${src.length} bytes at ${pos}`, cause);
    }
  }

  private async stat(): Promise<fs.Stats> {
    return this.sync ? fs.fstatSync(this.fd) : await call<fs.Stats>((cb) => fs.fstat(this.fd, cb));
  }

  async size(): Promise<number> {
    this.live("size");
    try {
      return (await this.stat()).size;
    } catch (cause) {
      throw ioError(this.name, "stat", cause);
    }
  }

  async allocatedSize(): Promise<number> {
    this.live("stat");
    try {
      return (await this.stat()).blocks * 512;
    } catch (cause) {
      throw ioError(this.name, "stat", cause);
    }
  }

  async truncate(size: number): Promise<void> {
    this.writable("truncate");
    checkRange("truncate", size, 0);
    try {
      if (this.sync) fs.ftruncateSync(this.fd, size);
      else await call<void>((cb) => fs.ftruncate(this.fd, size, (err) => cb(err, undefined)));
    } catch (cause) {
      throw ioError(this.name, `truncate to ${size}`, cause);
    }
  }

  async flush(): Promise<void> {
    this.writable("flush");
    try {
      if (this.sync) fs.fdatasyncSync(this.fd);
      else await call<void>((cb) => fs.fdatasync(this.fd, (err) => cb(err, undefined)));
    } catch (cause) {
      throw ioError(this.name, "flush", cause);
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    try {
      if (this.sync) fs.closeSync(this.fd);
      else await call<void>((cb) => fs.close(this.fd, (err) => cb(err, undefined)));
    } catch (cause) {
      throw ioError(this.name, "close", cause);
    }
  }
}
