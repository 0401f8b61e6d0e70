#!/usr/bin/env node
// qcow2-img: the qemu-img command line. One file per command.

import "../node-platform.js";
import { Qcow2Error } from "../errors.js";
import { UsageError } from "./args.js";

import type { Command } from "./main-types.js";

// Each command's module is loaded only when it runs: starting the tool does no other work.
const commands: Record<string, { usage: string; load: () => Promise<Command> }> = {
  amend: {
    usage: "amend [--object objectdef] [--image-opts] [-p] [-q] [-f fmt] [-t cache] [--force] -o options filename",
    load: async () => (await import("./amend.js")).amend,
  },
  bench: {
    usage:
      "bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval] [-i aio] [-n] [--no-drain] [-o offset] [--pattern=pattern] [-q] [-s buffer_size] [-S step_size] [-t cache] [-w] [-U] filename",
    load: async () => (await import("./bench.js")).bench,
  },
  check: {
    usage: "check [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-T src_cache] [-U] filename",
    load: async () => (await import("./check.js")).check,
  },
  commit: {
    usage: "commit [-q] [-f fmt] [-t cache] [-b base] [-r rate_limit] [-d] [-p] filename",
    load: async () => (await import("./commit.js")).commit,
  },
  compare: {
    usage: "compare [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [-U] filename1 filename2",
    load: async () => (await import("./compare.js")).compare,
  },
  convert: {
    usage:
      "convert [-c] [-p] [-q] [-n] [-f fmt] [-O output_fmt] [-B backing_file [-F backing_fmt]] [-o options] [-S sparse_size] [-m num_coroutines] [-W] [--target-is-zero] filename [filename2 [...]] output_filename",
    load: async () => (await import("./convert.js")).convert,
  },
  create: {
    usage: "create [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]",
    load: async () => (await import("./create.js")).create,
  },
  dd: {
    usage: "dd [--image-opts] [-U] [-f fmt] [-O output_fmt] [bs=block_size] [count=blocks] [skip=blocks] if=input of=output",
    load: async () => (await import("./dd.js")).dd,
  },
  info: {
    usage: "info [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename",
    load: async () => (await import("./info.js")).info,
  },
  map: {
    usage: "map [-f fmt] [--output=ofmt] [--start-offset=offset] [--max-length=len] [-U] filename",
    load: async () => (await import("./map.js")).map,
  },
  measure: {
    usage: "measure [--output=ofmt] [-O output_fmt] [-o options] [--size N | [-f fmt] filename]",
    load: async () => (await import("./measure.js")).measure,
  },
  rebase: {
    usage: "rebase [-U] [-q] [-f fmt] [-t cache] [-T src_cache] [-p] [-u] -b backing_file [-F backing_fmt] filename",
    load: async () => (await import("./rebase.js")).rebase,
  },
  resize: {
    usage: "resize [-f fmt] [--preallocation=prealloc] [-q] [--shrink] filename [+ | -]size",
    load: async () => (await import("./resize.js")).resize,
  },
  snapshot: {
    usage: "snapshot [-U] [-q] [-l | -a snapshot | -c snapshot | -d snapshot] filename",
    load: async () => (await import("./snapshot.js")).snapshot,
  },
};

/** qemu-img commands still to come (snapshots and encryption arrive with their own issues). */
const NOT_YET = new Set(["bitmap"]);

function help(): string {
  return (
    "qcow2-img: a qemu-img compatible tool for qcow2 images\n" +
    "usage: qcow2-img [standard options] command [command options]\n\n" +
    "Command syntax:\n" +
    Object.values(commands)
      .map((c) => `  ${c.usage}\n`)
      .join("")
  );
}

export async function main(argv: string[]): Promise<number> {
  const out = (text: string): void => void process.stdout.write(text);
  const err = (text: string): void => void process.stderr.write(text);
  const [name, ...rest] = argv;
  if (name === undefined || name === "-h" || name === "--help") {
    out(help());
    return name === undefined ? 1 : 0;
  }
  if (name === "-V" || name === "--version") {
    out("qcow2-img version 0.1.0 (qcow2-wasm)\n");
    return 0;
  }
  const command = commands[name];
  if (!command && NOT_YET.has(name)) {
    process.stderr.write(`qcow2-img: the '${name}' command is not supported yet\n`);
    return 1;
  }
  if (!command) {
    process.stderr.write(`qcow2-img: Command not found: ${name}\nTry 'qcow2-img --help' for more information\n`);
    return 1;
  }
  try {
    const run = await command.load();
    return await run(rest, out, err);
  } catch (err) {
    if (err instanceof UsageError) {
      process.stderr.write(`qcow2-img: ${err.message}\nTry 'qcow2-img --help' for more information\n`);
      return 1;
    }
    const message = err instanceof Qcow2Error || err instanceof Error ? err.message : String(err);
    process.stderr.write(`qcow2-img: ${message}\n`);
    return 1;
  }
}

// A reader that stops early (qcow2-img map | head) closes the pipe: stop quietly, as qemu-img
// does when SIGPIPE ends it, instead of a stack trace.
for (const stream of [process.stdout, process.stderr]) {
  stream.on("error", (e: NodeJS.ErrnoException) => {
    if (e.code === "EPIPE") process.exit(process.exitCode ?? 0);
    throw e;
  });
}

process.exitCode = await main(process.argv.slice(2));
