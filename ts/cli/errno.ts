// qemu reports a failed request with strerror(-ret): the system's words for the errno, and EIO
// ("Input/output error") for what the qcow2 driver finds broken (bad tables, data that will not
// inflate). These are those words for this library's errors.

import { Qcow2Error, Qcow2ErrorCode } from "../errors.js";

const ERRNO_TEXT: Record<string, string> = {
  ENOENT: "No such file or directory",
  EACCES: "Permission denied",
  EPERM: "Operation not permitted",
  EISDIR: "Is a directory",
  ENOTDIR: "Not a directory",
  EROFS: "Read-only file system",
  ENOSPC: "No space left on device",
  EFBIG: "File too large",
  EIO: "Input/output error",
  ENAMETOOLONG: "File name too long",
  ELOOP: "Too many levels of symbolic links",
  ETXTBSY: "Text file busy",
  EINVAL: "Invalid argument",
};

/** strerror's words for the system error somewhere in `e`'s cause chain, if there is one. */
export function errnoText(e: unknown): string | undefined {
  for (let c: unknown = e; c instanceof Error; c = c.cause) {
    const text = ERRNO_TEXT[String((c as NodeJS.ErrnoException).code)];
    if (text !== undefined) return text;
  }
  return undefined;
}

/** What qemu would print for a request that failed with `e`: strerror's words, else the message. */
export function strerror(e: unknown): string {
  const errno = errnoText(e);
  if (errno !== undefined) return errno;
  for (let c: unknown = e; c instanceof Error; c = c.cause) {
    if (c instanceof Qcow2Error && (c.code === Qcow2ErrorCode.CORRUPT || c.code === Qcow2ErrorCode.BAD_COMPRESSED_DATA || c.code === Qcow2ErrorCode.IO_ERROR)) {
      return "Input/output error";
    }
  }
  return e instanceof Error ? e.message : String(e);
}
