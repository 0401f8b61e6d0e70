// What an image's header may ask for that qemu, or this library, refuses to open or to write.

import { Qcow2Error, Qcow2ErrorCode, hex } from "../errors.js";
import { AUTOCLEAR_DATA_FILE_RAW, COMPRESSION_ZSTD, CRYPT_NONE, INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_EXTL2, QCOW2_INCOMPAT_MASK } from "../format/constants.js";
import { featureBits, type Qcow2Header } from "../format/header.js";

/** Refuse opening for writing what qemu refuses, or what this library cannot write yet. */
export function refuseWrites(header: Qcow2Header, name: string): void {
  if (header.incompatibleFeatures & BigInt(INCOMPAT_CORRUPT)) {
    throw new Qcow2Error(Qcow2ErrorCode.CORRUPT, `${name}: the image is marked corrupt; it can only be opened read-only (repair it with check)`);
  }
}

/** For operations that rewrite data outside the encrypted data path (amend): not on encrypted images yet. */
export function refuseEncrypted(header: Qcow2Header, name: string): void {
  if (header.cryptMethod !== CRYPT_NONE) {
    throw new Qcow2Error(Qcow2ErrorCode.ENCRYPTED, `${name}: amending encrypted images is not supported yet`);
  }
}

/** Refuse what qemu refuses to open, and what this library cannot read yet. */
export function refuseFeatures(header: Qcow2Header, name: string): void {
  const incompat = header.incompatibleFeatures;
  const unknown = incompat & ~BigInt(QCOW2_INCOMPAT_MASK);
  if (unknown !== 0n) {
    const described = featureBits(unknown).map((bit) => {
      const own = header.extensions.featureNames.find((f) => f.type === 0 && f.bit === bit);
      return own ? `"${own.name}" (bit ${bit})` : `bit ${bit}`;
    });
    throw new Qcow2Error(
      Qcow2ErrorCode.UNKNOWN_FEATURE,
      `${name}: unsupported incompatible feature(s) ${described.join(", ")} (mask ${hex(unknown)})`,
    );
  }
  const notYet: Array<[number, string]> = [
    [INCOMPAT_DATA_FILE, "external data file"],
    [INCOMPAT_EXTL2, "extended L2 entries"],
  ];
  for (const [bit, feature] of notYet) {
    if (incompat & BigInt(bit)) {
      throw new Qcow2Error(Qcow2ErrorCode.NOT_SUPPORTED, `${name}: the "${feature}" feature is not supported yet`);
    }
  }
  if (header.autoclearFeatures & BigInt(AUTOCLEAR_DATA_FILE_RAW) && !(incompat & BigInt(INCOMPAT_DATA_FILE))) {
    throw new Qcow2Error(Qcow2ErrorCode.BAD_HEADER, `${name}: data-file-raw requires a data file (autoclear bit 1 without the external data file bit)`);
  }
  if (header.compressionType === COMPRESSION_ZSTD) {
    throw new Qcow2Error(Qcow2ErrorCode.NOT_SUPPORTED, `${name}: compression type zstd is not supported yet`);
  }
}

