// The LUKS1 area of qcow2 encryption (ts/format/luks.ts): parsing, unlocking and info against
// images qemu-img makes, areas we create checked by qemu-io, and hostile headers.

import { execFile, execFileSync } from "node:child_process";
import { copyFileSync, readFileSync, writeFileSync } from "node:fs";
import path from "node:path";
import { promisify } from "node:util";
import { beforeAll, describe, expect, it } from "vitest";
import { Qcow2Error, Qcow2ErrorCode } from "../../ts/node.js";
import { platform } from "../../ts/platform.js";
import { parseHeader, readHeader } from "../../ts/format/header.js";
import { NodeFileBackend } from "../../ts/io/node-file.js";
import {
  LUKS_HEADER_SIZE,
  LUKS_KEY_SLOT_DISABLED,
  LUKS_MAX_ITERATIONS,
  afMerge,
  afSplit,
  createLuks,
  luksAreaFromBytes,
  luksAreaReader,
  luksInfo,
  parseLuksHeader,
  readLuksHeader,
  serializeLuksHeader,
  unlockLuks,
  type LuksCreateOptions,
  type LuksEnv,
  type LuksHeader,
} from "../../ts/format/luks.js";
import { nodeLuksCrypto } from "../../ts/codecs/luks-node.js";
import { NodeSectorCipher } from "../../ts/codecs/node-crypto.js";
import { WasmSectorCipher } from "../../ts/codecs/aes-wasm.js";
import { webCryptoLuks } from "../../ts/codecs/luks-webcrypto.js";
import { describeQemu, qemuImg, tempDir } from "../helpers/qemu.js";

const execFileAsync = promisify(execFile);

// What Node gets: node:crypto throughout.
const nodeEnv: LuksEnv = { crypto: nodeLuksCrypto(), createSectorCipher: (algorithm, key) => new NodeSectorCipher(algorithm, key) };
// What browsers get: WebCrypto for hashes and PBKDF2, AES in WebAssembly.
const webEnv: LuksEnv = { crypto: webCryptoLuks(), createSectorCipher: (algorithm, key) => WasmSectorCipher.create(algorithm, key) };
const providers: Array<[string, LuksEnv]> = [
  ["node:crypto", nodeEnv],
  ["WebCrypto + WASM AES", webEnv],
];

// ---------------------------------------------------------------------------------------------
// qemu helpers

/**
 * qemu-img 7.2 as packaged here fails now and then with "Unable to get accurate CPU usage" when its
 * first PBKDF2 calibration run reads 0 ms of CPU time (a known qemu bug): retry those.
 */
async function qemuImgRetry(args: string[]): Promise<void> {
  for (let attempt = 1; ; attempt++) {
    try {
      await execFileAsync("qemu-img", args);
      return;
    } catch (err) {
      const stderr = String((err as { stderr?: unknown }).stderr ?? "");
      if (attempt >= 8 || !stderr.includes("Unable to get accurate CPU usage")) throw err;
    }
  }
}

interface LuksImageSpec {
  name: string;
  passphrase: string;
  options: string; // extra encrypt.* options
}

async function qemuCreateLuks(dir: string, spec: LuksImageSpec): Promise<string> {
  const file = path.join(dir, `${spec.name}.qcow2`);
  const opts = ["encrypt.format=luks", "encrypt.key-secret=sec0", "encrypt.iter-time=10", spec.options].filter(Boolean).join(",");
  await qemuImgRetry(["create", "-q", "-f", "qcow2", "--object", `secret,id=sec0,data=${spec.passphrase}`, "-o", opts, file, "1M"]);
  return file;
}

function qemuEncryptInfo(file: string): unknown {
  const info = JSON.parse(qemuImg(["info", "--output=json", file])) as {
    "format-specific": { data: { encrypt: unknown } };
  };
  return info["format-specific"].data.encrypt;
}

/** The LUKS area of a qcow2 file, found through header extension 0x0537be77. */
function readArea(file: string): { offset: number; area: Uint8Array } {
  const bytes = new Uint8Array(readFileSync(file));
  const header = parseHeader(bytes.subarray(0, 2 ** bytes[23]!));
  const ext = header.extensions.cryptoHeader;
  if (!ext) throw new Error(`${file}: no encryption header extension`);
  return { offset: ext.offset, area: bytes.slice(ext.offset, ext.offset + ext.length) };
}

function writeArea(file: string, offset: number, area: Uint8Array): void {
  const bytes = readFileSync(file);
  bytes.set(area, offset);
  writeFileSync(file, bytes);
}

/** The host offset of guest cluster 0 (reading L1[0] and L2[0] directly). */
function hostOffsetOfCluster0(file: string): number {
  const bytes = readFileSync(file);
  const header = parseHeader(new Uint8Array(bytes.subarray(0, 2 ** bytes[23]!)));
  const l2 = Number(bytes.readBigUInt64BE(header.l1TableOffset) & 0x00fffffffffffe00n);
  return Number(bytes.readBigUInt64BE(l2) & 0x00fffffffffffe00n);
}

function qemuIoRead(file: string, passphrase: string, command = "read 0 512"): { ok: boolean; output: string } {
  try {
    const output = execFileSync(
      "qemu-io",
      ["--object", `secret,id=s,data=${passphrase}`, "--image-opts", `driver=qcow2,file.filename=${file},encrypt.key-secret=s`, "-c", command],
      { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] },
    );
    return { ok: true, output };
  } catch (err) {
    const e = err as { stdout?: string; stderr?: string };
    return { ok: false, output: `${e.stdout ?? ""}${e.stderr ?? ""}` };
  }
}

async function expectQcow2Error(promise: Promise<unknown>, code: string, message: RegExp | string): Promise<void> {
  const err = await promise.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(Qcow2Error);
  expect((err as Qcow2Error).code).toBe(code);
  if (typeof message === "string") expect((err as Error).message).toBe(message);
  else expect((err as Error).message).toMatch(message);
}

function expectParseError(bytes: Uint8Array, areaLength: number, code: string, message: RegExp): void {
  let err: unknown;
  try {
    parseLuksHeader(bytes, areaLength);
  } catch (e) {
    err = e;
  }
  expect(err, `expected ${message}`).toBeInstanceOf(Qcow2Error);
  expect((err as Qcow2Error).code).toBe(code);
  expect((err as Error).message).toMatch(message);
}

// ---------------------------------------------------------------------------------------------
// Images qemu makes

const QEMU_IMAGES: LuksImageSpec[] = [
  { name: "default", passphrase: "hunter2", options: "" },
  { name: "xts128-sha1", passphrase: "correct horse battery staple", options: "encrypt.cipher-alg=aes-128,encrypt.hash-alg=sha1" },
  { name: "cbc128", passphrase: "pässwörd ✓ ünïcode", options: "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc" },
  { name: "cbc256-sha1", passphrase: "x".repeat(200), options: "encrypt.cipher-mode=cbc,encrypt.hash-alg=sha1" },
  { name: "xts256-sha512", passphrase: "", options: "encrypt.hash-alg=sha512" },
];
/** Volumes we describe but do not unlock. */
const UNSUPPORTED_IMAGES: LuksImageSpec[] = [
  { name: "essiv", passphrase: "pw", options: "encrypt.ivgen-alg=essiv" },
  { name: "ecb", passphrase: "pw", options: "encrypt.cipher-mode=ecb" },
];

/**
 * Our areas, each written over the area of a qemu image whose key size (so area size) matches;
 * qemu's header is replaced whole, so its other options do not matter.
 */
const CREATE_CASES: Array<{ name: string; over: string; ours: Omit<LuksCreateOptions, "passphrase">; web: boolean }> = [
  { name: "default", over: "default", ours: {}, web: false },
  { name: "aes-128 xts sha1", over: "xts128-sha1", ours: { cipherAlg: "aes-128", hashAlg: "sha1" }, web: true },
  { name: "aes-256 cbc", over: "cbc256-sha1", ours: { cipherMode: "cbc" }, web: true },
  { name: "aes-128 cbc sha1", over: "cbc128", ours: { cipherAlg: "aes-128", cipherMode: "cbc", hashAlg: "sha1" }, web: false },
];

describeQemu("LUKS with qemu", () => {
  const dir = tempDir("qcow2-luks-");
  const files = new Map<string, string>();

  // qemu-img spends over a second calibrating PBKDF2 per image whatever the iter-time: make them all at once.
  beforeAll(async () => {
    const specs = [...QEMU_IMAGES, ...UNSUPPORTED_IMAGES];
    const made = await Promise.all(specs.map((spec) => qemuCreateLuks(dir, spec)));
    specs.forEach((spec, i) => files.set(spec.name, made[i]!));
  }, 120_000);

  describe.each(QEMU_IMAGES)("qemu-img's $name area", (spec) => {
    it("parses to qemu-img info's encrypt object", () => {
      const file = files.get(spec.name)!;
      const { area } = readArea(file);
      const header = parseLuksHeader(area, area.length);
      const ours = luksInfo(header);
      const theirs = qemuEncryptInfo(file);
      expect(ours).toEqual(theirs);
      // Same key order as qemu-img prints.
      expect(JSON.stringify(ours)).toBe(JSON.stringify(theirs));
      expect(header.payloadOffset * 512).toBe(area.length);
    });

    it.each(providers)("unlocks with the passphrase and refuses another (%s)", async (_name, crypto) => {
      const file = files.get(spec.name)!;
      const { area } = readArea(file);
      const header = parseLuksHeader(area, area.length);
      const key = await unlockLuks(header, spec.passphrase, luksAreaFromBytes(area), crypto);
      expect(key.slot).toBe(0);
      expect(key.masterKey.length).toBe(header.keyBytes);
      expect(key.cipher).toEqual({ ...header.cipher });
      await expectQcow2Error(
        unlockLuks(header, spec.passphrase + "!", luksAreaFromBytes(area), crypto),
        Qcow2ErrorCode.BAD_PASSPHRASE,
        "Invalid password, cannot unlock any keyslot",
      );
    });

    it("yields the master key qemu encrypts data with (host sector IVs)", async () => {
      const file = path.join(dir, `${spec.name}-data.qcow2`);
      copyFileSync(files.get(spec.name)!, file);
      expect(qemuIoRead(file, spec.passphrase, "write -P 0xa5 0 64k").ok).toBe(true);
      const { area } = readArea(file);
      const header = parseLuksHeader(area, area.length);
      const key = await unlockLuks(header, spec.passphrase, luksAreaFromBytes(area), nodeEnv);
      const host = hostOffsetOfCluster0(file);
      const data = new Uint8Array(readFileSync(file).subarray(host, host + 65536));
      new NodeSectorCipher(key.algorithm, key.masterKey).decrypt(data, host / 512);
      expect(data.every((b) => b === 0xa5)).toBe(true);
    });
  });

  it("unlocks a second key slot added by qemu-img amend, each passphrase its own slot", async () => {
    const file = path.join(dir, "two-slots.qcow2");
    copyFileSync(files.get("cbc128")!, file);
    const first = QEMU_IMAGES.find((s) => s.name === "cbc128")!.passphrase;
    await qemuImgRetry([
      "amend",
      "--object",
      `secret,id=sec0,data=${first}`,
      "--object",
      "secret,id=sec1,data=second one",
      "--image-opts",
      `driver=qcow2,file.filename=${file},encrypt.key-secret=sec0`,
      "-o",
      "encrypt.keyslot=1,encrypt.new-secret=sec1,encrypt.state=active,encrypt.iter-time=10",
    ]);
    const { area } = readArea(file);
    const header = parseLuksHeader(area, area.length);
    expect(luksInfo(header)).toEqual(qemuEncryptInfo(file));
    expect(header.keySlots.map((s) => s.active)).toEqual([true, true, false, false, false, false, false, false]);
    const a = await unlockLuks(header, first, luksAreaFromBytes(area), nodeEnv);
    const b = await unlockLuks(header, "second one", luksAreaFromBytes(area), webEnv);
    expect([a.slot, b.slot]).toEqual([0, 1]);
    expect(b.masterKey).toEqual(a.masterKey);
    await expectQcow2Error(unlockLuks(header, "second", luksAreaFromBytes(area), nodeEnv), Qcow2ErrorCode.BAD_PASSPHRASE, /Invalid password/);
  });

  it("unlocks from a backend through the platform, as the image layer will", async () => {
    const backend = await NodeFileBackend.open(files.get("default")!, { readOnly: true });
    try {
      const ext = (await readHeader(backend)).extensions.cryptoHeader!;
      const header = await readLuksHeader(backend, ext);
      const env: LuksEnv = { crypto: await platform.createLuksCrypto(), createSectorCipher: platform.createSectorCipher };
      const key = await unlockLuks(header, "hunter2", luksAreaReader(backend, ext), env);
      expect(key.algorithm).toBe("aes-256-xts-plain64");
      await expectQcow2Error(readLuksHeader(backend, { offset: ext.offset, length: 591 }), Qcow2ErrorCode.BAD_HEADER, /shorter than the 592-byte LUKS header/);
      await expectQcow2Error(luksAreaReader(backend, ext)(new Uint8Array(512), ext.length - 511), Qcow2ErrorCode.BAD_HEADER, /outside the 2068480-byte/);
    } finally {
      await backend.close();
    }
  });

  it.each<[string, RegExp]>([
    ["essiv", /cipher aes-256 xts-essiv is not supported \(aes-128-cbc-plain64, /],
    ["ecb", /cipher aes-256 ecb-plain64 is not supported/],
  ])("describes an %s volume as qemu does, and refuses to unlock it", async (name, refusal) => {
    const file = files.get(name)!;
    const { area } = readArea(file);
    const header = parseLuksHeader(area, area.length);
    expect(JSON.stringify(luksInfo(header))).toBe(JSON.stringify(qemuEncryptInfo(file)));
    await expectQcow2Error(unlockLuks(header, "pw", luksAreaFromBytes(area), nodeEnv), Qcow2ErrorCode.NOT_SUPPORTED, refusal);
  });

  it.each(CREATE_CASES)("our $name area (web: $web): qemu-io unlocks it, qemu-img info shows our fields, qemu encrypts with our key", async ({ name, over, ours, web }) => {
    const file = path.join(dir, `ours-${name.replace(/ /g, "-")}.qcow2`);
    copyFileSync(files.get(over)!, file);
    const qemuPassphrase = QEMU_IMAGES.find((s) => s.name === over)!.passphrase;
    const passphrase = "ours: ünïcode ✓";
    const created = await createLuks({ passphrase, iterTime: 10, ...ours }, web ? webEnv : nodeEnv);
    const { offset, area: qemuArea } = readArea(file);
    // Same layout as qemu's, so our area fits where qemu's was.
    expect(created.area.length).toBe(qemuArea.length);
    const qemuHeader = parseLuksHeader(qemuArea, qemuArea.length);
    expect(created.header.keySlots.map((s) => s.keyMaterialOffset)).toEqual(qemuHeader.keySlots.map((s) => s.keyMaterialOffset));
    expect(created.header.payloadOffset).toBe(qemuHeader.payloadOffset);

    writeArea(file, offset, created.area);
    const ok = qemuIoRead(file, passphrase);
    expect(ok.output).toMatch(/read 512\/512 bytes at offset 0/);
    const wrong = qemuIoRead(file, qemuPassphrase);
    expect(wrong.ok).toBe(false);
    expect(wrong.output).toMatch(/Invalid password, cannot unlock any keyslot/);

    const reparsed = parseLuksHeader(created.area, created.area.length);
    expect(JSON.stringify(qemuEncryptInfo(file))).toBe(JSON.stringify(luksInfo(reparsed)));
    expect(luksInfo(created.header)).toEqual(luksInfo(reparsed));
    expect(reparsed.uuid).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    expect(reparsed.keySlots[0]!.iterations).toBeGreaterThanOrEqual(1000);
    expect(reparsed.mkDigestIterations).toBeGreaterThanOrEqual(1000);

    // qemu writes guest data with the master key we made.
    expect(qemuIoRead(file, passphrase, "write -P 0x3c 0 64k").ok).toBe(true);
    const host = hostOffsetOfCluster0(file);
    const data = new Uint8Array(readFileSync(file).subarray(host, host + 65536));
    new NodeSectorCipher(created.key.algorithm, created.key.masterKey).decrypt(data, host / 512);
    expect(data.every((b) => b === 0x3c)).toBe(true);

    // And we unlock what we made, either way.
    const key = await unlockLuks(reparsed, passphrase, luksAreaFromBytes(created.area), web ? nodeEnv : webEnv);
    expect(key.masterKey).toEqual(created.key.masterKey);
  });
});

describe("createLuks", () => {
  it("lays out qemu's default area: slots every 504 sectors from 8, payload at 4040, zeros in unused slots", async () => {
    const { area, header, key } = await createLuks({ passphrase: "pw", iterTime: 10 }, nodeEnv);
    expect(area.length).toBe(2068480);
    expect(header.payloadOffset).toBe(4040);
    expect(header.keySlots.map((s) => s.keyMaterialOffset)).toEqual([8, 512, 1016, 1520, 2024, 2528, 3032, 3536]);
    expect(header.keySlots.map((s) => s.stripes)).toEqual(new Array(8).fill(4000));
    expect(header.keySlots.slice(1).every((s) => s.state === LUKS_KEY_SLOT_DISABLED && s.iterations === 0)).toBe(true);
    expect(header.keyBytes).toBe(64);
    expect(key.cipher).toEqual({ cipherAlg: "aes-256", cipherMode: "xts", ivgenAlg: "plain64", keyBytes: 64, sectorSize: 512 });
    expect(key.algorithm).toBe("aes-256-xts-plain64");
    expect(area.subarray(LUKS_HEADER_SIZE, 4096).every((b) => b === 0)).toBe(true);
    expect(area.subarray(512 * 512).every((b) => b === 0)).toBe(true);
    expect(area.subarray(0, LUKS_HEADER_SIZE)).toEqual(serializeLuksHeader(parseLuksHeader(area, area.length)));
  });

  it("calibrates iterations to iter-time (qemu divides the master key's by 8)", async () => {
    const short = await createLuks({ passphrase: "pw", iterTime: 10, cipherMode: "cbc" }, nodeEnv);
    const long = await createLuks({ passphrase: "pw", iterTime: 200, cipherMode: "cbc" }, nodeEnv);
    const s = short.header.keySlots[0]!.iterations;
    const l = long.header.keySlots[0]!.iterations;
    // 20x the time: on a loaded machine the rate varies, but not by a factor of 4 either way.
    expect(l / s).toBeGreaterThan(5);
    expect(l / s).toBeLessThan(80);
    expect(long.header.mkDigestIterations).toBeLessThan(l);
  }, 30_000);

  it("refuses options qemu would take but we do not implement, and bad iter-times", async () => {
    await expectQcow2Error(createLuks({ passphrase: "pw", ivgenAlg: "essiv" }, nodeEnv), Qcow2ErrorCode.NOT_SUPPORTED, /ivgen-alg essiv is not supported \(only plain64\)/);
    await expectQcow2Error(createLuks({ passphrase: "pw", ivgenAlg: "plain" }, nodeEnv), Qcow2ErrorCode.NOT_SUPPORTED, /ivgen-alg plain is not supported/);
    await expectQcow2Error(createLuks({ passphrase: "pw", cipherMode: "ecb" }, nodeEnv), Qcow2ErrorCode.NOT_SUPPORTED, /cipher-mode ecb/);
    await expectQcow2Error(createLuks({ passphrase: "pw", cipherAlg: "serpent-256" }, nodeEnv), Qcow2ErrorCode.NOT_SUPPORTED, /cipher-alg serpent-256/);
    await expectQcow2Error(createLuks({ passphrase: "pw", cipherAlg: "aes-192" }, nodeEnv), Qcow2ErrorCode.NOT_SUPPORTED, /cipher-alg aes-192 is not supported \(aes-128, aes-256\)/);
    await expectQcow2Error(createLuks({ passphrase: "pw", hashAlg: "md5" }, nodeEnv), Qcow2ErrorCode.NOT_SUPPORTED, /hash-alg md5/);
    await expect(createLuks({ passphrase: "pw", iterTime: 0 }, nodeEnv)).rejects.toThrow(RangeError);
    await expectQcow2Error(
      createLuks({ passphrase: "pw", iterTime: 10, maxIterations: 999 }, nodeEnv),
      Qcow2ErrorCode.LIMIT_EXCEEDED,
      /more than the limit of 999/,
    );
  });

  it("treats a passphrase as qemu does: UTF-8, ending at the first NUL", async () => {
    const { area } = await createLuks({ passphrase: "abc", iterTime: 10, cipherMode: "cbc", cipherAlg: "aes-128" }, nodeEnv);
    const header = parseLuksHeader(area, area.length);
    expect((await unlockLuks(header, "abc\0def", luksAreaFromBytes(area), nodeEnv)).slot).toBe(0);
    expect((await unlockLuks(header, new TextEncoder().encode("abc"), luksAreaFromBytes(area), nodeEnv)).slot).toBe(0);
  });
});

describe("anti-forensic split", () => {
  it.each(providers)("merge undoes split for every key size and hash (%s)", async (_name, { crypto }) => {
    for (const hash of ["sha1", "sha256", "sha512"] as const) {
      for (const size of [16, 24, 32, 48, 64]) {
        const key = crypto.randomBytes(size);
        const split = await afSplit(crypto, hash, key, 40);
        expect(await afMerge(crypto, hash, size, 40, split)).toEqual(key);
        split[3]! ^= 1;
        expect(await afMerge(crypto, hash, size, 40, split)).not.toEqual(key);
      }
    }
  });
});

describe("platform", () => {
  it("gives node:crypto once qcow2-wasm/node is loaded (synchronous digests)", async () => {
    const crypto = await platform.createLuksCrypto();
    const digest = crypto.digest("sha256", [new Uint8Array(0)]);
    expect(digest).toBeInstanceOf(Uint8Array);
    expect(Buffer.from(digest as Uint8Array).toString("hex")).toBe("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  });
});

// ---------------------------------------------------------------------------------------------
// Hostile headers: one field changed per case, from a valid area we made

describe("hostile LUKS headers", () => {
  let valid: Uint8Array;
  let validHeader: LuksHeader;
  const areaLength = 2068480;

  beforeAll(async () => {
    const created = await createLuks({ passphrase: "pw", iterTime: 10 }, nodeEnv);
    valid = created.area.slice(0, LUKS_HEADER_SIZE);
    validHeader = created.header;
  });

  function mutate(edit: (dv: DataView, bytes: Uint8Array) => void): Uint8Array {
    const bytes = valid.slice();
    edit(new DataView(bytes.buffer), bytes);
    return bytes;
  }
  const slotAt = (i: number): number => 208 + i * 48;
  const ascii = (bytes: Uint8Array, at: number, text: string, width = 32): void => {
    bytes.fill(0, at, at + width);
    bytes.set(new TextEncoder().encode(text), at);
  };

  it("the valid header parses", () => {
    expect(parseLuksHeader(valid, areaLength)).toEqual(validHeader);
  });

  it.each<[string, (dv: DataView, b: Uint8Array) => void, string, RegExp]>([
    ["magic", (_, b) => (b[4] = 0xbb), Qcow2ErrorCode.BAD_MAGIC, /magic 4c 55 4b 53 bb be is not "LUKS\\xba\\xbe"/],
    ["version 2", (dv) => dv.setUint16(6, 2), Qcow2ErrorCode.UNSUPPORTED_VERSION, /version 2 is not supported/],
    ["cipher-name unterminated", (_, b) => b.fill(0x61, 8, 40), Qcow2ErrorCode.BAD_HEADER, /cipher-name is not NUL-terminated within its 32 bytes/],
    ["cipher-name unknown", (_, b) => ascii(b, 8, "blowfish"), Qcow2ErrorCode.NOT_SUPPORTED, /cipher "blowfish" with key size 32 bytes \(key-bytes 64\) not supported/],
    ["cipher-name constructor", (_, b) => ascii(b, 8, "constructor"), Qcow2ErrorCode.NOT_SUPPORTED, /cipher "constructor"/],
    ["cipher-mode without ivgen", (_, b) => ascii(b, 40, "xts"), Qcow2ErrorCode.BAD_HEADER, /unexpected cipher mode string format "xts"/],
    ["cipher-mode unknown", (_, b) => ascii(b, 40, "gcm-plain64"), Qcow2ErrorCode.NOT_SUPPORTED, /cipher mode "gcm" not supported/],
    ["ivgen unknown", (_, b) => ascii(b, 40, "xts-benbi"), Qcow2ErrorCode.NOT_SUPPORTED, /IV generator "benbi" not supported/],
    ["ivgen hash unknown", (_, b) => ascii(b, 40, "xts-essiv:sha3"), Qcow2ErrorCode.NOT_SUPPORTED, /IV generator hash algorithm "sha3" not supported/],
    ["essiv without hash", (_, b) => ascii(b, 40, "xts-essiv"), Qcow2ErrorCode.BAD_HEADER, /essiv without an IV generator hash/],
    ["essiv with a digest no AES key matches", (_, b) => ascii(b, 40, "xts-essiv:sha1"), Qcow2ErrorCode.NOT_SUPPORTED, /essiv with sha1 needs a 20-byte aes key/],
    ["hash-spec unknown", (_, b) => ascii(b, 72, "whirlpool"), Qcow2ErrorCode.NOT_SUPPORTED, /hash algorithm "whirlpool" not supported/],
    ["key-bytes 0", (dv) => dv.setUint32(108, 0), Qcow2ErrorCode.BAD_HEADER, /key-bytes 0 is outside 1..64/],
    ["key-bytes huge", (dv) => dv.setUint32(108, 0xffffffff), Qcow2ErrorCode.BAD_HEADER, /key-bytes 4294967295 is outside 1..64/],
    ["key-bytes odd for xts", (dv) => dv.setUint32(108, 33), Qcow2ErrorCode.BAD_HEADER, /key-bytes 33 is odd/],
    ["key-bytes 40 for xts", (dv) => dv.setUint32(108, 40), Qcow2ErrorCode.NOT_SUPPORTED, /key size 20 bytes \(key-bytes 40\)/],
    ["stripes 0", (dv) => dv.setUint32(slotAt(3) + 44, 0), Qcow2ErrorCode.BAD_HEADER, /key slot 3 is corrupted \(stripes == 0\)/],
    ["stripes 4001", (dv) => dv.setUint32(slotAt(0) + 44, 4001), Qcow2ErrorCode.BAD_HEADER, /key slot 0 stripes 4001 is not 4000/],
    ["stripes huge", (dv) => dv.setUint32(slotAt(0) + 44, 0xffffffff), Qcow2ErrorCode.BAD_HEADER, /key slot 0 stripes 4294967295 is not 4000/],
    ["slot state", (dv) => dv.setUint32(slotAt(5), 0x12345678), Qcow2ErrorCode.BAD_HEADER, /key slot 5 state \(active\/disabled\) 0x12345678 is corrupted/],
    ["slot over the header", (dv) => dv.setUint32(slotAt(0) + 40, 0), Qcow2ErrorCode.BAD_HEADER, /key slot 0 key-material-offset 0 overlaps the 8-sector partition header/],
    ["slot over the payload", (dv) => dv.setUint32(slotAt(7) + 40, 3537), Qcow2ErrorCode.BAD_HEADER, /key slot 7 \(sectors 3537..4041\) overlaps the encrypted payload at sector 4040/],
    ["payload-offset small", (dv) => dv.setUint32(104, 4039), Qcow2ErrorCode.BAD_HEADER, /key slot 7 .* overlaps the encrypted payload at sector 4039/],
    ["slots overlapping", (dv) => dv.setUint32(slotAt(2) + 40, 600), Qcow2ErrorCode.BAD_HEADER, /key slots 1 and 2 overlap \(sectors 512..1016 and 600..1104\)/],
    ["active slot with 0 iterations", (dv) => dv.setUint32(slotAt(0) + 4, 0), Qcow2ErrorCode.BAD_HEADER, /key slot 0 is active with 0 iterations/],
    ["mk-digest-iterations 0", (dv) => dv.setUint32(164, 0), Qcow2ErrorCode.BAD_HEADER, /mk-digest-iterations is 0/],
  ])("%s", (_name, edit, code, message) => {
    expectParseError(mutate(edit), areaLength, code, message);
  });

  it("refuses an area too short for the header or for an active slot's material", () => {
    expectParseError(valid, 591, Qcow2ErrorCode.BAD_HEADER, /area is 591 bytes, shorter than the 592-byte LUKS header/);
    // Slot 0's material (sectors 8.., 256000 bytes) must lie inside the area; payload-offset follows.
    const small = mutate((dv) => {
      dv.setUint32(104, 512);
      for (let i = 1; i < 8; i++) dv.setUint32(slotAt(i) + 40, 512 + i * 504);
    });
    expectParseError(small, 100000, Qcow2ErrorCode.BAD_HEADER, /key slot 0 material at 0x1000..0x3f800 is outside the 100000-byte encryption header area/);
  });

  it("accepts an inactive slot whose material lies past the area, as qemu does (it is never read)", () => {
    const bytes = mutate((dv) => {
      dv.setUint32(slotAt(7) + 40, 5000);
      dv.setUint32(104, 6000);
    });
    expect(parseLuksHeader(bytes, areaLength).keySlots[7]!.keyMaterialOffset).toBe(5000);
  });

  it("refuses huge iteration counts before any PBKDF2 work", async () => {
    for (const edit of [
      (dv: DataView) => dv.setUint32(slotAt(0) + 4, 0xffffffff),
      (dv: DataView) => dv.setUint32(164, 0xffffffff),
      (dv: DataView) => dv.setUint32(slotAt(0) + 4, LUKS_MAX_ITERATIONS + 1),
    ]) {
      const header = parseLuksHeader(mutate(edit), areaLength);
      const start = performance.now();
      await expectQcow2Error(
        unlockLuks(header, "pw", luksAreaFromBytes(new Uint8Array(areaLength)), nodeEnv),
        Qcow2ErrorCode.LIMIT_EXCEEDED,
        /iterations exceed the limit of 33554432 \(raise maxIterations to open it\)/,
      );
      expect(performance.now() - start).toBeLessThan(50);
    }
    const lowered = parseLuksHeader(valid, areaLength);
    await expectQcow2Error(
      unlockLuks(lowered, "pw", luksAreaFromBytes(new Uint8Array(areaLength)), nodeEnv, { maxIterations: 999 }),
      Qcow2ErrorCode.LIMIT_EXCEEDED,
      /limit of 999/,
    );
  });

  it.each<[string, number, RegExp]>([
    ["xts-plain", 64, /cipher aes-256 xts-plain is not supported/],
    ["cbc-essiv:sha256", 32, /cipher aes-256 cbc-essiv is not supported/],
    ["cbc-plain64", 24, /cipher aes-192 cbc-plain64 is not supported/],
  ])("parses %s with key-bytes %i but refuses to unlock it", async (mode, keyBytes, refusal) => {
    const bytes = mutate((dv, b) => {
      ascii(b, 40, mode);
      dv.setUint32(108, keyBytes);
    });
    const header = parseLuksHeader(bytes, areaLength);
    const start = performance.now();
    await expectQcow2Error(unlockLuks(header, "pw", luksAreaFromBytes(new Uint8Array(areaLength)), nodeEnv), Qcow2ErrorCode.NOT_SUPPORTED, refusal);
    expect(performance.now() - start).toBeLessThan(50);
  });

  it("refuses hashes WebCrypto lacks, so every platform opens the same images", async () => {
    const header = parseLuksHeader(mutate((_, b) => ascii(b, 72, "ripemd160")), areaLength);
    expect(luksInfo(header)["hash-alg"]).toBe("ripemd160");
    await expectQcow2Error(
      unlockLuks(header, "pw", luksAreaFromBytes(new Uint8Array(areaLength)), nodeEnv),
      Qcow2ErrorCode.NOT_SUPPORTED,
      /hash algorithm ripemd160 is not supported \(sha1, sha256, sha384, sha512\)/,
    );
  });

  it("refuses reads outside the area", async () => {
    const read = luksAreaFromBytes(new Uint8Array(1024));
    await expectQcow2Error(read(new Uint8Array(512), 600), Qcow2ErrorCode.BAD_HEADER, /outside the 1024-byte encryption header area/);
  });
});
