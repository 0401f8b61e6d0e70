// Writing the header and its extensions (docs/interop/qcow2.rst "Header", "Header extensions") in
// qemu's layout: fixed fields, then backing format, data file name, encryption header pointer,
// feature-name table (v3), bitmaps, extensions this library does not know (kept byte for byte),
// the end marker, and the backing file name last, all inside cluster 0.

import { Qcow2Error, Qcow2ErrorCode } from "../errors.js";
import { encodeString, setU64 } from "./bytes.js";
import {
  EXT_BACKING_FORMAT,
  EXT_BITMAPS,
  EXT_CRYPTO_HEADER,
  EXT_DATA_FILE,
  EXT_FEATURE_TABLE,
  KNOWN_FEATURE_NAMES,
  QCOW_MAGIC,
  V2_HEADER_LENGTH,
  V3_HEADER_LENGTH,
} from "./constants.js";
import type { Qcow2Header } from "./header.js";

function pad8(n: number): number {
  return Math.ceil(n / 8) * 8;
}

/** Bytes of cluster 0 that hold the header, its extensions and the backing file name. */
export function encodeHeader(h: Qcow2Header, clusterSize: number): Uint8Array {
  const extensions: Array<{ type: number; data: Uint8Array }> = [];
  const ext = h.extensions;
  if (ext.backingFormat !== undefined) extensions.push({ type: EXT_BACKING_FORMAT, data: encodeString(ext.backingFormat) });
  if (ext.dataFile !== undefined) extensions.push({ type: EXT_DATA_FILE, data: encodeString(ext.dataFile) });
  if (ext.cryptoHeader) {
    const data = new Uint8Array(16);
    const dv = new DataView(data.buffer);
    setU64(dv, 0, ext.cryptoHeader.offset);
    setU64(dv, 8, ext.cryptoHeader.length);
    extensions.push({ type: EXT_CRYPTO_HEADER, data });
  }
  // qemu-img 7.2 writes its feature-name table only with clusters of 8 KiB and more (verified:
  // none at 512 B..4 KiB, present at 8 KiB and 64 KiB).
  if (h.version >= 3 && clusterSize >= 8192) {
    const names: Array<{ type: number; bit: number; name: string }> = KNOWN_FEATURE_NAMES.map(([type, bit, name]) => ({ type, bit, name }));
    for (const own of ext.featureNames) {
      if (!names.some((n) => n.type === own.type && n.bit === own.bit)) names.push(own);
    }
    const data = new Uint8Array(names.length * 48);
    names.forEach((n, i) => {
      data[i * 48] = n.type;
      data[i * 48 + 1] = n.bit;
      data.set(encodeString(n.name).subarray(0, 46), i * 48 + 2);
    });
    extensions.push({ type: EXT_FEATURE_TABLE, data });
  }
  if (ext.bitmaps) {
    const data = new Uint8Array(24);
    const dv = new DataView(data.buffer);
    dv.setUint32(0, ext.bitmaps.nbBitmaps);
    setU64(dv, 8, ext.bitmaps.bitmapDirectorySize);
    setU64(dv, 16, ext.bitmaps.bitmapDirectoryOffset);
    extensions.push({ type: EXT_BITMAPS, data });
  }
  for (const u of ext.unknown) extensions.push(u);

  const headerLength = h.version === 2 ? V2_HEADER_LENGTH : Math.max(V3_HEADER_LENGTH, 112 + h.unknownHeaderFields.length);
  const backingName = h.backingFile === undefined ? new Uint8Array(0) : encodeString(h.backingFile);
  let length = headerLength;
  for (const e of extensions) length += 8 + pad8(e.data.length);
  length += 8; // end marker
  const backingFileOffset = backingName.length > 0 ? length : 0;
  length += backingName.length;
  if (length > clusterSize) {
    throw new Qcow2Error(
      Qcow2ErrorCode.LIMIT_EXCEEDED,
      `header, extensions and backing file name need ${length} bytes, more than the ${clusterSize}-byte cluster 0`,
    );
  }

  const out = new Uint8Array(length);
  const dv = new DataView(out.buffer);
  dv.setUint32(0, QCOW_MAGIC);
  dv.setUint32(4, h.version);
  setU64(dv, 8, backingFileOffset);
  dv.setUint32(16, backingName.length);
  dv.setUint32(20, h.clusterBits);
  setU64(dv, 24, h.size);
  dv.setUint32(32, h.cryptMethod);
  dv.setUint32(36, h.l1Size);
  setU64(dv, 40, h.l1TableOffset);
  setU64(dv, 48, h.refcountTableOffset);
  dv.setUint32(56, h.refcountTableClusters);
  dv.setUint32(60, h.nbSnapshots);
  setU64(dv, 64, h.snapshotsOffset);
  if (h.version >= 3) {
    dv.setBigUint64(72, h.incompatibleFeatures);
    dv.setBigUint64(80, h.compatibleFeatures);
    dv.setBigUint64(88, h.autoclearFeatures);
    dv.setUint32(96, h.refcountOrder);
    dv.setUint32(100, headerLength);
    out[104] = h.compressionType;
    out.set(h.unknownHeaderFields, 112);
  }
  let pos = headerLength;
  for (const e of extensions) {
    dv.setUint32(pos, e.type);
    dv.setUint32(pos + 4, e.data.length);
    out.set(e.data, pos + 8);
    pos += 8 + pad8(e.data.length);
  }
  pos += 8;
  out.set(backingName, pos);
  return out;
}
