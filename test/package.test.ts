// The package's promises: the core and browser entries reach no node:* module, every export
// path exists after the build, and the embedded WASM equals the raw modules shipped beside it.

import { existsSync, readFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";

const root = path.join(path.dirname(fileURLToPath(import.meta.url)), "..");
const pkg = JSON.parse(readFileSync(path.join(root, "package.json"), "utf8")) as {
  exports: Record<string, string | { types: string; default: string }>;
  bin: Record<string, string>;
};

/** Every module specifier reachable through imports (static or dynamic) and re-exports from `entry`. */
function reachable(entry: string): Set<string> {
  const seen = new Set<string>();
  const external = new Set<string>();
  const queue = [entry];
  while (queue.length > 0) {
    const file = queue.pop()!;
    if (seen.has(file)) continue;
    seen.add(file);
    const text = readFileSync(file, "utf8");
    for (const m of text.matchAll(
      /(?:^|\n)\s*(?:import|export)\s[^;]*?from\s+["']([^"']+)["']|(?:^|\n)\s*import\s+["']([^"']+)["']|\bimport\(\s*["']([^"']+)["']\s*\)/g,
    )) {
      const spec = m[1] ?? m[2] ?? m[3]!;
      if (spec.startsWith(".")) queue.push(path.resolve(path.dirname(file), spec));
      else external.add(spec);
    }
  }
  return external;
}

describe("package", () => {
  it.each(["index.js", "browser.js"])("build/%s reaches no node:* module", (entry) => {
    const external = [...reachable(path.join(root, "build", entry))];
    expect(external.filter((s) => s.startsWith("node:") || ["fs", "path", "zlib", "crypto"].includes(s))).toEqual([]);
    expect(external.sort()).toEqual(["pako"]);
  });

  it("every export and bin path exists, types first", () => {
    for (const [key, target] of Object.entries(pkg.exports)) {
      if (typeof target === "string") {
        expect({ key, exists: existsSync(path.join(root, target)) }).toEqual({ key, exists: true });
      } else {
        expect(Object.keys(target)[0]).toBe("types");
        expect({ key, types: existsSync(path.join(root, target.types)), js: existsSync(path.join(root, target.default)) }).toEqual({
          key,
          types: true,
          js: true,
        });
      }
    }
    for (const target of Object.values(pkg.bin)) expect(existsSync(path.join(root, target))).toBe(true);
  });

  it("the embedded modules are the shipped .wasm files", async () => {
    const embedded = await import("../ts/wasm/embedded.generated.js");
    expect(Buffer.from(embedded.WASM_SCALAR_BASE64, "base64").equals(readFileSync(path.join(root, "build/wasm/qcow2.wasm")))).toBe(true);
    expect(Buffer.from(embedded.WASM_SIMD_BASE64, "base64").equals(readFileSync(path.join(root, "build/wasm/qcow2-simd.wasm")))).toBe(true);
  });
});
