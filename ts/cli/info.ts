// qcow2-img info [-f fmt] [--output=human|json] [--backing-chain] [-U] file

import { NodeFileBackend } from "../io/node-file.js";
import { Qcow2Image } from "../image/qcow2-image.js";
import { formatInfoHuman, imageInfo, type QemuImageInfo } from "../ops/info.js";
import { parseArgs, UsageError } from "./args.js";
import { fullBackingPath, openDevice, parseFormat, type ImageFormat } from "./open.js";
import { CRYPT_LUKS } from "../format/constants.js";
import { jsonFilename, OptionsError, parseImageOpts, parseObjects } from "./image-opts.js";

export const INFO_USAGE = "info [--object objectdef] [--image-opts] [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename";

async function describe(
  file: string,
  format: ImageFormat | undefined,
  displayName = file,
): Promise<{ info: QemuImageInfo; next?: { file: string; format: ImageFormat | undefined } }> {
  // Like qemu-img info: the image alone, its backing file not opened.
  const device = await openDevice(file, format, { backing: "none" });
  try {
    const stat = await NodeFileBackend.open(file, { readOnly: true });
    const actualSize = await stat.allocatedSize();
    await stat.close();
    let fullBackingFilename: string | undefined;
    let next: { file: string; format: ImageFormat | undefined } | undefined;
    if (device instanceof Qcow2Image && device.header.backingFile !== undefined) {
      fullBackingFilename = fullBackingPath(file, device.header.backingFile);
      const fmt = device.header.extensions.backingFormat;
      next = { file: fullBackingFilename, format: fmt === undefined ? undefined : parseFormat(fmt) };
    }
    const snapshots = device instanceof Qcow2Image && device.header.nbSnapshots > 0 ? await device.snapshots.list() : undefined;
    // A LUKS image shows its header's fields; no passphrase is needed for them.
    const encrypt =
      device instanceof Qcow2Image && device.header.cryptMethod === CRYPT_LUKS
        ? ((await import("../format/luks.js")).luksInfo(
            await (await import("../image/encryption.js")).imageLuksHeader(device.backend, device.header),
          ) as unknown as Record<string, unknown>)
        : undefined;
    const options = {
      filename: displayName,
      actualSize,
      ...(fullBackingFilename === undefined ? {} : { fullBackingFilename }),
      ...(snapshots ? { snapshots } : {}),
      ...(encrypt ? { encrypt } : {}),
    };
    return next ? { info: imageInfo(device, options), next } : { info: imageInfo(device, options) };
  } finally {
    await device.close();
  }
}

export async function info(argv: string[], out: (text: string) => void, err: (text: string) => void = () => undefined): Promise<number> {
  const args = parseArgs(argv, { withValue: ["-f", "--output", "--object"], flags: ["-U", "--force-share", "--backing-chain", "--image-opts", "-h", "--help"] });
  if (args.flags.has("-h") || args.flags.has("--help")) {
    out(`usage: qcow2-img ${INFO_USAGE}\n`);
    return 0;
  }
  if (args.positional.length !== 1) throw new UsageError("Expecting one image file name");
  const output = args.values.get("--output") ?? "human";
  if (output !== "human" && output !== "json") throw new UsageError(`--output must be used with human or json as argument.`);
  const fmtArg = args.values.get("-f");
  let current: { file: string; format: ImageFormat | undefined } | undefined = {
    file: args.positional[0]!,
    format: fmtArg === undefined ? undefined : parseFormat(fmtArg),
  };
  // info reads no guest data: secrets are parsed (bad ones refused) but none is needed.
  let displayName: string | undefined;
  try {
    await parseObjects(args.all.get("--object") ?? []);
    if (args.flags.has("--image-opts")) {
      if (fmtArg !== undefined) {
        err("qcow2-img: --image-opts and --format are mutually exclusive\n");
        return 1;
      }
      const opts = parseImageOpts(args.positional[0]!);
      current = { file: opts.file, format: opts.format };
      displayName = jsonFilename(opts);
    }
  } catch (e) {
    if (!(e instanceof OptionsError)) throw e;
    err(`qcow2-img: ${e.message}\n`);
    return 1;
  }
  const chain: QemuImageInfo[] = [];
  const seen = new Set<string>();
  while (current) {
    if (seen.has(current.file)) throw new Error(`Backing file '${current.file}' creates a loop`);
    seen.add(current.file);
    const { info, next } = await describe(current.file, current.format, chain.length === 0 ? displayName : undefined);
    chain.push(info);
    current = args.flags.has("--backing-chain") ? next : undefined;
  }
  if (output === "json") {
    out(JSON.stringify(args.flags.has("--backing-chain") ? chain : chain[0], null, 4) + "\n");
  } else {
    out(chain.map(formatInfoHuman).join("\n"));
  }
  return 0;
}
