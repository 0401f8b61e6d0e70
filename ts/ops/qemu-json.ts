// qemu prints JSON objects from a QDict, whose iteration order is its hash-bucket order (qobject/
// qdict.c: tdb_hash of the key modulo 512 buckets, newest first within a bucket). Reproducing that
// order makes our --output=json byte-identical to qemu-img's, not merely equal once parsed.

const QDICT_BUCKET_MAX = 512;

/** qdict.c's tdb_hash. */
function tdbHash(name: string): number {
  let value = Math.imul(0x238f13af, name.length) >>> 0;
  for (let i = 0; i < name.length; i++) {
    value = (value + ((name.charCodeAt(i) << ((i * 5) % 24)) >>> 0)) >>> 0;
  }
  return (Math.imul(1103515243, value) + 12345) >>> 0;
}

/** `obj` with its keys in the order qemu's QDict iterates them (keys given in insertion order). */
export function qdictOrder<T extends object>(obj: T): T {
  const keys = Object.keys(obj).map((key, inserted) => ({ key, inserted, bucket: tdbHash(key) % QDICT_BUCKET_MAX }));
  keys.sort((a, b) => a.bucket - b.bucket || b.inserted - a.inserted);
  const out: Record<string, unknown> = {};
  for (const { key } of keys) out[key] = (obj as Record<string, unknown>)[key];
  return out as T;
}
