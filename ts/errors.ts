// One error type for everything wrong with an image or its I/O; caller misuse is TypeError/RangeError.

/** Every `Qcow2Error.code`. Stable strings: match on these, never on messages. */
export const Qcow2ErrorCode = {
  /** The first four bytes are not "QFI\xfb". */
  BAD_MAGIC: "BAD_MAGIC",
  /** Header version other than 2 or 3. */
  UNSUPPORTED_VERSION: "UNSUPPORTED_VERSION",
  /** A header field is out of range, misaligned or inconsistent with another. */
  BAD_HEADER: "BAD_HEADER",
  /** A header extension is malformed, too long or repeated. */
  BAD_EXTENSION: "BAD_EXTENSION",
  /** An incompatible feature bit this library does not know. */
  UNKNOWN_FEATURE: "UNKNOWN_FEATURE",
  /** A feature qemu knows that this library does not implement yet. */
  NOT_SUPPORTED: "NOT_SUPPORTED",
  /** A table would exceed one of qemu's size limits. */
  LIMIT_EXCEEDED: "LIMIT_EXCEEDED",
  /** The backing file name, format or chain is unusable (missing, loop, too deep). */
  BAD_BACKING: "BAD_BACKING",
  /** Metadata found while reading contradicts the format (qemu would mark the image corrupt). */
  CORRUPT: "CORRUPT",
  /** A compressed cluster does not inflate to one full cluster. */
  BAD_COMPRESSED_DATA: "BAD_COMPRESSED_DATA",
  /** The image is encrypted and no key was given, or the method is not implemented yet. */
  ENCRYPTED: "ENCRYPTED",
  /** A write was attempted on a read-only image or backend. */
  READ_ONLY: "READ_ONLY",
  /** The image was used after close(). */
  CLOSED: "CLOSED",
  /** The backend failed; `cause` holds the original error. */
  IO_ERROR: "IO_ERROR",
  /** The file is not in the format that was asked for. */
  WRONG_FORMAT: "WRONG_FORMAT",
  /** No snapshot (or other named object) matches the id or name given. */
  NOT_FOUND: "NOT_FOUND",
  /** An id or name that must be unique is taken. */
  ALREADY_EXISTS: "ALREADY_EXISTS",
  /** No LUKS key slot opens with the passphrase given. */
  BAD_PASSPHRASE: "BAD_PASSPHRASE",
} as const;

export type Qcow2ErrorCode = (typeof Qcow2ErrorCode)[keyof typeof Qcow2ErrorCode];

export class Qcow2Error extends Error {
  readonly code: Qcow2ErrorCode;

  constructor(code: Qcow2ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "Qcow2Error";
    this.code = code;
  }
}

export function isQcow2Error(err: unknown, code?: Qcow2ErrorCode): err is Qcow2Error {
  return err instanceof Qcow2Error && (code === undefined || err.code === code);
}

/** Hex for messages: `0x1f`. Accepts numbers and bigints. */
export function hex(value: number | bigint): string {
  return "0x" + value.toString(16);
}
