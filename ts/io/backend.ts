// The only layer that touches the outside world. Every backend passes test/io/conformance.ts.

export interface BlockBackend {
  /** True when write, truncate and flush refuse with READ_ONLY. */
  readonly readOnly: boolean;
  /** A name for messages and for resolving relative backing file names (a path, a URL, a label). */
  readonly name: string;
  /**
   * Read up to `dst.length` bytes at byte `pos` into `dst`; resolves to the count read, which is
   * short only at the end of the data. Reads wholly past the end resolve to 0.
   */
  read(dst: Uint8Array, pos: number): Promise<number>;
  /** Write all of `src` at `pos`, growing the backend if needed. */
  write(src: Uint8Array, pos: number): Promise<void>;
  /** Current length in bytes. */
  size(): Promise<number>;
  /** Set the length; growing reads back as zeros. */
  truncate(size: number): Promise<void>;
  /** Make completed writes durable. */
  flush(): Promise<void>;
  /** Release the resource; further calls fail with CLOSED. Calling close twice is harmless. */
  close(): Promise<void>;
  /** Host bytes actually allocated, where the platform can tell (Node: st_blocks * 512). */
  allocatedSize?(): Promise<number>;
}

/** Read exactly `dst.length` bytes at `pos`; bytes past the end of the backend read as zeros. */
export async function readFully(backend: BlockBackend, dst: Uint8Array, pos: number): Promise<void> {
  let done = 0;
  while (done < dst.length) {
    const n = await backend.read(done === 0 ? dst : dst.subarray(done), pos + done);
    if (n <= 0) {
      dst.fill(0, done);
      return;
    }
    done += n;
  }
}

export function checkRange(op: string, pos: number, length: number): void {
  if (!Number.isSafeInteger(pos) || pos < 0) throw new RangeError(`${op}: position ${pos} is not a non-negative integer`);
  if (!Number.isSafeInteger(pos + length)) throw new RangeError(`${op}: range ${pos}+${length} is past 2^53`);
}
