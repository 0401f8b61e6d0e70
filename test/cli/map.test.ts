// qcow2-img map against qemu-img map on the same files: stdout byte for byte (human and JSON),
// stderr and exit codes, over v2/v3 images of several cluster sizes, zero and compressed clusters,
// backing chains (qcow2 and raw, shorter than the overlay), raw files with holes, and the
// --start-offset / --max-length range, with qemu's messages for what it refuses.

import { spawnSync } from "node:child_process";
import { mkdirSync, writeFileSync } from "node:fs";
import path from "node:path";
import { beforeAll, expect, it } from "vitest";
import { UsageError } from "../../ts/cli/args.js";
import { map } from "../../ts/cli/map.js";
import { runOurs, runQemuImg, type CliResult } from "../helpers/cli.js";
import { describeQemu, qemuImg, qemuIo, randomBytes, rng, tempDir } from "../helpers/qemu.js";

type Result = CliResult;

async function ours(args: string[]): Promise<Result> {
  return runOurs(map, args);
}

function theirs(args: string[]): Result {
  return runQemuImg("map", args);
}

describeQemu("qcow2-img map", () => {
  const dir = tempDir("qcow2-climap-");
  // Relative to the working directory, so that both tools print the same names.
  const rel = (name: string): string => path.relative(process.cwd(), path.join(dir, name));

  beforeAll(() => {
    const at = (name: string): string => path.join(dir, name);
    const rand = rng(7);
    writeFileSync(at("random.src"), randomBytes(rand, 3 << 20));
    const src = at("random.src");

    qemuImg(["create", "-f", "qcow2", at("v3.qcow2"), "8M"]);
    qemuIo(at("v3.qcow2"), [`write -s ${src} 0 1M`, `write -s ${src} 2M 192k`, "write -z 1M 128k", "write -P 0 3M 64k", `write -s ${src} 4M 4k`, "discard 4M 4k", `write -s ${src} 5M 3000`, `write -s ${src} 7936k 256k`]);

    qemuImg(["create", "-f", "qcow2", "-o", "compat=0.10,cluster_size=512", at("v2-512.qcow2"), "3M"]);
    qemuIo(at("v2-512.qcow2"), [`write -s ${src} 1000 300000`, `write -s ${src} 1M 512`, `write -s ${src} 2M 1M`]);

    // 4 KiB clusters: an L2 table maps 2 MiB, entries split there.
    qemuImg(["create", "-f", "qcow2", "-o", "cluster_size=4096", at("c4k.qcow2"), "9M"]);
    qemuIo(at("c4k.qcow2"), [`write -s ${src} 1M 2M`, `write -s ${src} 6M 1M`, `write -s ${src} 4M 8k`, "write -z 5M 64k"]);

    qemuImg(["create", "-f", "qcow2", "-o", "cluster_size=2M", at("c2m.qcow2"), "16M"]);
    qemuIo(at("c2m.qcow2"), [`write -s ${src} 3M 1M`, `write -s ${src} 12M 100k`]);

    qemuImg(["create", "-f", "qcow2", at("compressed.qcow2"), "4M"]);
    qemuIo(at("compressed.qcow2"), [`write -s ${src} 0 512k`, "write -c -P 0x41 1M 128k", "write -c -P 0x42 1152k 64k", `write -s ${src} 2M 64k`]);

    qemuImg(["create", "-f", "qcow2", at("empty.qcow2"), "0"]);

    // A chain in a subdirectory, named relatively: top -> mid -> base, base shorter than the rest.
    mkdirSync(at("sub"));
    qemuImg(["create", "-f", "qcow2", at("sub/base.qcow2"), "4M"]);
    qemuIo(at("sub/base.qcow2"), [`write -s ${src} 0 1M`, "write -z 3M 64k", `write -s ${src} 3200k 64k`]);
    qemuImg(["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", at("sub/mid.qcow2"), "6M"]);
    qemuIo(at("sub/mid.qcow2"), ["write -P 0x22 512k 128k", "write -z 2M 64k", "write -P 0x23 5M 64k"]);
    qemuImg(["create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", at("sub/top.qcow2"), "8M"]);
    qemuIo(at("sub/top.qcow2"), ["write -P 0x33 600k 100k", "write -P 0x34 7M 64k"]);

    // Raw files: qemu-img create's (first block allocated), with holes, all data, an odd length.
    qemuImg(["create", "-f", "raw", at("created.raw"), "2M"]);
    qemuImg(["create", "-f", "raw", at("holes.raw"), "3M"]);
    qemuIo(at("holes.raw"), [`write -s ${src} 512k 64k`, `write -s ${src} 1M 5000`, `write -s ${src} 3068k 4k`], ["-f", "raw"]);
    writeFileSync(at("full.raw"), randomBytes(rand, 1 << 20));
    writeFileSync(at("odd.raw"), randomBytes(rand, 1000));
    writeFileSync(at("sparse.raw"), new Uint8Array(0));
    spawnSync("truncate", ["-s", "1M", at("sparse.raw")]);

    // A raw backing file with holes under a qcow2 overlay.
    qemuImg(["create", "-f", "raw", at("sub/base.raw"), "2M"]);
    qemuIo(at("sub/base.raw"), [`write -s ${src} 1M 64k`], ["-f", "raw"]);
    qemuImg(["create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", at("sub/over-raw.qcow2"), "3M"]);
    qemuIo(at("sub/over-raw.qcow2"), ["write -P 7 64k 64k"]);
  });

  const images = ["v3.qcow2", "v2-512.qcow2", "c4k.qcow2", "c2m.qcow2", "empty.qcow2", "sub/top.qcow2", "sub/mid.qcow2", "sub/over-raw.qcow2", "created.raw", "holes.raw", "full.raw", "odd.raw", "sparse.raw"];

  it("prints what qemu-img map prints, human and JSON", async () => {
    for (const image of images) {
      for (const args of [[], ["--output=json"], ["--output", "human"], ["-U", "--output=json"]]) {
        const argv = [...args, rel(image)];
        expect({ argv, ...(await ours(argv)) }).toEqual({ argv, ...theirs(argv) });
      }
    }
  });

  it("honours -f raw", async () => {
    for (const image of ["odd.raw", "holes.raw", "created.raw"]) {
      for (const args of [["-f", "raw"], ["-f", "raw", "--output=json"]]) {
        const argv = [...args, rel(image)];
        expect({ argv, ...(await ours(argv)) }).toEqual({ argv, ...theirs(argv) });
      }
    }
  });

  it("names backing files as qemu does, however the image is named", async () => {
    const top = rel("sub/top.qcow2");
    for (const name of [top, `./${top}`, path.resolve(top)]) {
      for (const args of [[], ["--output=json"]]) {
        const argv = [...args, name];
        expect({ argv, ...(await ours(argv)) }).toEqual({ argv, ...theirs(argv) });
      }
    }
  });

  it("maps only the range asked for, sizes with suffixes, past the end and with wrapping sums", async () => {
    const ranges = [
      ["--start-offset=0x90000", "--max-length=1M"],
      ["--start-offset=100", "--max-length=1000"],
      ["--start-offset=1.5M"],
      ["--max-length=3000"],
      ["--start-offset", "64k", "--max-length", "64k"],
      ["--start-offset=8M"],
      ["--start-offset=1E"],
      ["--start-offset=9223372036854775807"],
      ["--max-length=0"],
      ["--start-offset=1", "--max-length=9223372036854775807"],
      ["--max-length=9223372036854775807"],
      ["--start-offset=0x1k"],
    ];
    for (const image of ["v3.qcow2", "sub/top.qcow2", "holes.raw", "c4k.qcow2"]) {
      for (const range of ranges) {
        for (const output of ["--output=json", "--output=human"]) {
          const argv = [...range, output, rel(image)];
          expect({ argv, ...(await ours(argv)) }).toEqual({ argv, ...theirs(argv) });
        }
      }
    }
  });

  it("refuses compressed clusters in human output after the rows before them, and maps them in JSON", async () => {
    for (const args of [[], ["--output=json"], ["--start-offset=2M"], ["--max-length=1M"]]) {
      const argv = [...args, rel("compressed.qcow2")];
      const r = await ours(argv);
      expect({ argv, ...r }).toEqual({ argv, ...theirs(argv) });
    }
    expect((await ours([rel("compressed.qcow2")])).stderr).toBe("qemu-img: File contains external, encrypted or compressed clusters.\n");
  });

  it("fails as qemu-img does on bad sizes, options, formats and files", async () => {
    mkdirSync(path.join(dir, "a-directory"), { recursive: true });
    const bad = [
      ["--start-offset=-1", rel("v3.qcow2")],
      ["--start-offset=abc", rel("v3.qcow2")],
      ["--max-length=-5", rel("v3.qcow2")],
      ["--max-length=1e3", rel("v3.qcow2")],
      ["--max-length=99999999999999999999", rel("v3.qcow2")],
      ["--start-offset=18446744073709551615", rel("v3.qcow2")],
      ["--start-offset=.5M", rel("v3.qcow2")],
      ["--output=xml", rel("v3.qcow2")],
      [rel("v3.qcow2"), rel("v2-512.qcow2")],
      [],
      [rel("missing.qcow2")],
      [rel("a-directory")],
      ["-f", "qcow2", rel("full.raw")],
      ["-f", "nosuchformat", rel("v3.qcow2")],
    ];
    for (const argv of bad) {
      expect({ argv, ...(await ours(argv)) }).toEqual({ argv, ...theirs(argv) });
    }
  });
});
