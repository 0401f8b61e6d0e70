// A fault-injecting backend: writes stay volatile until flush(); the N-th write "crashes" (it and
// everything after fail), and the disk left behind holds what was flushed plus, optionally, a
// random subset of the unflushed writes (a power cut with a reordering write cache).

import { MemoryBackend, Qcow2Error, Qcow2ErrorCode, type BlockBackend } from "../../ts/index.js";

export class CrashBackend implements BlockBackend {
  readonly readOnly = false;
  readonly name: string;
  /** What survives a power cut. */
  private durable: Uint8Array;
  private readonly volatile: MemoryBackend;
  private pending: Array<{ pos: number; data: Uint8Array } | { truncate: number }> = [];
  private writes = 0;
  private crashed = false;

  constructor(initial: Uint8Array, private readonly crashAtWrite: number, name = "crash") {
    this.name = name;
    this.durable = initial.slice();
    this.volatile = new MemoryBackend(initial.slice(), { name });
  }

  get writeCount(): number {
    return this.writes;
  }

  get hasCrashed(): boolean {
    return this.crashed;
  }

  private alive(op: string): void {
    if (this.crashed) throw new Qcow2Error(Qcow2ErrorCode.IO_ERROR, `${this.name}: ${op} after the simulated crash`);
  }

  read(dst: Uint8Array, pos: number): Promise<number> {
    this.alive("read");
    return this.volatile.read(dst, pos);
  }

  async write(src: Uint8Array, pos: number): Promise<void> {
    this.alive("write");
    this.writes++;
    if (this.writes === this.crashAtWrite) {
      this.crashed = true;
      throw new Qcow2Error(Qcow2ErrorCode.IO_ERROR, `${this.name}: simulated crash at write ${this.writes}`);
    }
    this.pending.push({ pos, data: src.slice() });
    await this.volatile.write(src, pos);
  }

  size(): Promise<number> {
    this.alive("size");
    return this.volatile.size();
  }

  async truncate(size: number): Promise<void> {
    this.alive("truncate");
    await this.volatile.truncate(size);
    this.pending.push({ truncate: size });
  }

  async flush(): Promise<void> {
    this.alive("flush");
    this.durable = this.volatile.bytes().slice();
    this.pending = [];
  }

  async close(): Promise<void> {
    await this.volatile.close();
  }

  /** The disk after the crash: flushed data plus each unflushed write kept with probability `keep`. */
  afterCrash(rand: () => number, keep: number): Uint8Array {
    let disk = this.durable.slice();
    for (const w of this.pending) {
      if (rand() >= keep) continue;
      if ("truncate" in w) {
        const next = new Uint8Array(w.truncate);
        next.set(disk.subarray(0, Math.min(disk.length, w.truncate)));
        disk = next;
        continue;
      }
      if (w.pos + w.data.length > disk.length) {
        const next = new Uint8Array(w.pos + w.data.length);
        next.set(disk);
        disk = next;
      }
      disk.set(w.data, w.pos);
    }
    return disk;
  }
}
