// Compressed clusters, deflate flavour (docs/interop/qcow2.rst "Compressed Clusters Descriptor";
// qemu block/qcow2-threads.c): raw deflate, no zlib header, written with a 4 KiB window.
// qemu's rule for reading: the stream must produce one full cluster; bytes after the end of the
// stream are ignored, and output past one cluster is never produced.

import {
  deflateRaw,
  ZStream,
  Z_BUF_ERROR,
  Z_FINISH,
  Z_STREAM_END,
  zlibInflate,
  zlibInflateInit2,
  zlibInflateReset,
} from "pako";

export interface ClusterInflater {
  /** Inflate raw deflate `src` into all of `dst`; false when the stream cannot fill `dst`. */
  inflate(src: Uint8Array, dst: Uint8Array): boolean;
  /**
   * Inflate many clusters, using other threads where the platform has them; each result says
   * whether that stream filled its `dst`.
   */
  inflateMany?(jobs: Array<{ src: Uint8Array; dst: Uint8Array }>): Promise<boolean[]>;
}

/**
 * Portable inflater (pako's zlib port) writing straight into the caller's buffer. Window 15 accepts
 * every stream qemu's window-12 inflate accepts, and a few more it would refuse.
 */
export class PakoInflater implements ClusterInflater {
  private readonly strm = new ZStream();

  constructor() {
    zlibInflateInit2(this.strm, -15);
  }

  inflate(src: Uint8Array, dst: Uint8Array): boolean {
    const strm = this.strm;
    zlibInflateReset(strm);
    strm.input = src;
    strm.next_in = 0;
    strm.avail_in = src.length;
    strm.output = dst as Uint8Array<ArrayBuffer>;
    strm.next_out = 0;
    strm.avail_out = dst.length;
    const ret = zlibInflate(strm, Z_FINISH);
    const ok = (ret === Z_STREAM_END || ret === Z_BUF_ERROR) && strm.avail_out === 0;
    strm.input = EMPTY;
    strm.output = EMPTY;
    return ok;
  }
}

const EMPTY = new Uint8Array(0);

export interface ClusterDeflater {
  /**
   * Compress one cluster as qemu does (raw deflate, 4 KiB window, memLevel 9, default level);
   * undefined when the result would not be smaller than `limit` bytes.
   */
  deflate(src: Uint8Array, limit: number): Uint8Array | undefined;
  /** The same off the main thread, where the platform can (Node: the libuv thread pool). */
  deflateAsync?(src: Uint8Array, limit: number): Promise<Uint8Array | undefined>;
  /**
   * Deflate many clusters, using other threads where the platform has them (Node: worker
   * threads); each result is what `deflate` gives for that cluster.
   */
  deflateMany?(clusters: Uint8Array[], limit: number): Promise<Array<Uint8Array | undefined>>;
}

/** Portable deflater (pako). */
export class PakoDeflater implements ClusterDeflater {
  deflate(src: Uint8Array, limit: number): Uint8Array | undefined {
    const out = deflateRaw(src, { windowBits: 12, memLevel: 9, level: 6 });
    return out.length < limit ? out : undefined;
  }
}
