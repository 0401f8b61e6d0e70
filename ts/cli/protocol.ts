// qemu's reading of "name:rest" file names (block.c path_has_protocol, bdrv_find_protocol): a
// prefix before the first ':' with no '/' ahead of it names a protocol driver. "file:" is the
// plain file driver; other protocols (network block devices, host devices) are not served here.

/** Protocol names of qemu 7.2's drivers (Debian build), "file" aside. */
const OTHER_PROTOCOLS = new Set([
  "host_device", "host_cdrom", "nbd", "nbd+tcp", "nbd+unix", "http", "https", "ftp", "ftps", "gluster", "gluster+tcp",
  "gluster+unix", "gluster+rdma", "iscsi", "iser", "nfs", "ssh", "rbd", "nvme", "null-co", "null-aio", "fat",
  "blkdebug", "blkverify",
]);

export type ProtocolPath = { ok: true; path: string } | { ok: false; message: string };

/**
 * The local path a file name stands for, or the error to print. `opening` says whether the name is
 * being opened (qemu: "Could not open 'X': ...") or created (the bare message).
 */
export function localPath(name: string, opening: boolean): ProtocolPath {
  const m = /^([^:/]*):/.exec(name);
  if (!m) return { ok: true, path: name };
  const protocol = m[1]!;
  if (protocol === "file") return { ok: true, path: name.slice(m[0].length) };
  // "json:" is qemu's inline options syntax when opening; when creating it is no protocol at all.
  const known = OTHER_PROTOCOLS.has(protocol) || (opening && protocol === "json");
  const message = known ? `qcow2-img opens only local files, not the '${protocol}' protocol` : `Unknown protocol '${protocol}'`;
  return { ok: false, message: opening ? `Could not open '${name}': ${message}` : message };
}
