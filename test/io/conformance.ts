// The conformance suite every BlockBackend passes (ts/io/backend.ts): one set of tests, run by
// backends.test.ts against each implementation, so they cannot drift apart.

import { describe, it, expect } from "vitest";
import { readFully, type BlockBackend } from "../../ts/io/backend.js";
import { Qcow2Error, type Qcow2ErrorCode } from "../../ts/errors.js";
import { randomBytes, rng } from "../helpers/qemu.js";

export interface BackendCaps {
  /** The backend can be opened read-write (write, truncate and flush work). */
  writable: boolean;
}

/** Opens a backend whose contents are `initial`. */
export type MakeBackend = (initial: Uint8Array, opts: { readOnly: boolean }) => Promise<BlockBackend>;

const INITIAL_SIZE = 10_000;

async function expectCode(promise: Promise<unknown>, code: Qcow2ErrorCode): Promise<void> {
  const err = await promise.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err, `expected Qcow2Error ${code}`).toBeInstanceOf(Qcow2Error);
  expect((err as Qcow2Error).code).toBe(code);
}

/** Calls `op`, which may throw synchronously or reject, as a promise. */
function attempt(op: () => Promise<unknown>): Promise<unknown> {
  try {
    return op();
  } catch (e) {
    return Promise.reject(e);
  }
}

/** Byte equality that stays fast on large arrays (toEqual walks them element by element). */
function expectBytes(actual: Uint8Array, expected: Uint8Array, label = "bytes"): void {
  expect(actual.length, `${label}: length`).toBe(expected.length);
  let firstDiff = -1;
  if (!Buffer.from(actual.buffer, actual.byteOffset, actual.length).equals(expected)) {
    firstDiff = actual.findIndex((x, i) => x !== expected[i]);
  }
  expect(firstDiff, `${label}: first differing byte`).toBe(-1);
}

function shuffle<T>(items: T[], rand: () => number): T[] {
  for (let i = items.length - 1; i > 0; i--) {
    const j = Math.floor(rand() * (i + 1));
    [items[i], items[j]] = [items[j]!, items[i]!];
  }
  return items;
}

async function readAll(backend: BlockBackend): Promise<Uint8Array> {
  const out = new Uint8Array(await backend.size());
  await readFully(backend, out, 0);
  return out;
}

export function backendConformance(name: string, make: MakeBackend, caps: BackendCaps): void {
  const initial = (seed = 1, size = INITIAL_SIZE): Uint8Array => randomBytes(rng(seed), size);

  async function withBackend<T>(
    data: Uint8Array,
    readOnly: boolean,
    body: (b: BlockBackend) => Promise<T>,
  ): Promise<T> {
    const b = await make(data, { readOnly });
    try {
      return await body(b);
    } finally {
      await b.close();
    }
  }

  describe(`BlockBackend conformance: ${name}`, () => {
    describe("reads", () => {
      it("reports readOnly and a name", async () => {
        await withBackend(initial(), !caps.writable, async (b) => {
          expect(b.readOnly).toBe(!caps.writable);
          expect(typeof b.name).toBe("string");
          expect(b.name.length).toBeGreaterThan(0);
        });
      });

      it("size() is the length of the data", async () => {
        await withBackend(initial(), true, async (b) => {
          expect(await b.size()).toBe(INITIAL_SIZE);
        });
        await withBackend(new Uint8Array(0), true, async (b) => {
          expect(await b.size()).toBe(0);
        });
      });

      it("reads whole, inside, and the exact bytes", async () => {
        const data = initial(2);
        await withBackend(data, true, async (b) => {
          const all = new Uint8Array(INITIAL_SIZE);
          expect(await b.read(all, 0)).toBe(INITIAL_SIZE);
          expectBytes(all, data);
          const mid = new Uint8Array(777);
          expect(await b.read(mid, 1234)).toBe(777);
          expectBytes(mid, data.subarray(1234, 1234 + 777));
        });
      });

      it("is short only at EOF", async () => {
        const data = initial(3);
        await withBackend(data, true, async (b) => {
          const dst = new Uint8Array(100);
          expect(await b.read(dst, INITIAL_SIZE - 40)).toBe(40);
          expectBytes(dst.subarray(0, 40), data.subarray(INITIAL_SIZE - 40));
          // Exactly up to EOF is a full read.
          const tail = new Uint8Array(40);
          expect(await b.read(tail, INITIAL_SIZE - 40)).toBe(40);
          expectBytes(tail, data.subarray(INITIAL_SIZE - 40));
        });
      });

      it("reads at or wholly past EOF return 0", async () => {
        await withBackend(initial(), true, async (b) => {
          for (const pos of [INITIAL_SIZE, INITIAL_SIZE + 1, INITIAL_SIZE + 65536, 2 ** 40, 2 ** 52]) {
            expect(await b.read(new Uint8Array(64), pos), `read at ${pos}`).toBe(0);
          }
        });
        await withBackend(new Uint8Array(0), true, async (b) => {
          expect(await b.read(new Uint8Array(16), 0)).toBe(0);
        });
      });

      it("zero-length reads return 0 anywhere", async () => {
        await withBackend(initial(), true, async (b) => {
          for (const pos of [0, 1, INITIAL_SIZE - 1, INITIAL_SIZE, 2 ** 40]) {
            expect(await b.read(new Uint8Array(0), pos)).toBe(0);
          }
        });
      });

      it("reads into a subarray of a larger buffer", async () => {
        const data = initial(4);
        await withBackend(data, true, async (b) => {
          const big = new Uint8Array(300).fill(0xee);
          expect(await b.read(big.subarray(100, 200), 500)).toBe(100);
          expectBytes(big.subarray(100, 200), data.subarray(500, 600));
          expect(big.subarray(0, 100).every((x) => x === 0xee)).toBe(true);
          expect(big.subarray(200).every((x) => x === 0xee)).toBe(true);
        });
      });

      it("readFully zero-fills past EOF", async () => {
        const data = initial(5);
        await withBackend(data, true, async (b) => {
          const dst = new Uint8Array(500).fill(0xee);
          await readFully(b, dst, INITIAL_SIZE - 200);
          expectBytes(dst.subarray(0, 200), data.subarray(INITIAL_SIZE - 200));
          expect(dst.subarray(200).every((x) => x === 0)).toBe(true);
          const far = new Uint8Array(64).fill(0xee);
          await readFully(b, far, 2 ** 40);
          expect(far.every((x) => x === 0)).toBe(true);
        });
      });

      it("concurrent reads at random offsets return the right bytes", async () => {
        const size = 256 * 1024;
        const data = initial(6, size);
        await withBackend(data, true, async (b) => {
          const rand = rng(7);
          const jobs: { pos: number; dst: Uint8Array }[] = [];
          for (let i = 0; i < 200; i++) {
            // Some reads straddle or pass EOF.
            const pos = Math.floor(rand() * (size + 4096));
            const len = Math.floor(rand() * 9000);
            jobs.push({ pos, dst: new Uint8Array(len) });
          }
          const counts = await Promise.all(jobs.map((j) => b.read(j.dst, j.pos)));
          jobs.forEach((j, i) => {
            const expected = data.subarray(Math.min(j.pos, size), Math.min(j.pos + j.dst.length, size));
            expect(counts[i], `read ${j.dst.length} at ${j.pos}`).toBe(expected.length);
            expectBytes(j.dst.subarray(0, expected.length), expected, `read ${j.dst.length} at ${j.pos}`);
          });
        });
      });
    });

    describe("bad positions", () => {
      const bad = [-1, -4096, 0.5, 1.5, NaN, Infinity, -Infinity, 2 ** 53, 2 ** 53 + 2, 2 ** 60];

      it("read throws RangeError", async () => {
        await withBackend(initial(), true, async (b) => {
          for (const pos of bad) {
            await expect(attempt(() => b.read(new Uint8Array(8), pos)), `read at ${pos}`).rejects.toThrow(RangeError);
          }
          // The end of the range must stay below 2^53 too.
          await expect(attempt(() => b.read(new Uint8Array(8), 2 ** 53 - 4))).rejects.toThrow(RangeError);
        });
      });

      if (caps.writable) {
        it("write and truncate throw RangeError and change nothing", async () => {
          const data = initial(8);
          await withBackend(data.slice(), false, async (b) => {
            for (const pos of bad) {
              await expect(attempt(() => b.write(new Uint8Array(8), pos)), `write at ${pos}`).rejects.toThrow(RangeError);
              await expect(attempt(() => b.truncate(pos)), `truncate to ${pos}`).rejects.toThrow(RangeError);
            }
            await expect(attempt(() => b.write(new Uint8Array(8), 2 ** 53 - 4))).rejects.toThrow(RangeError);
            expect(await b.size()).toBe(INITIAL_SIZE);
            expectBytes(await readAll(b), data);
          });
        });
      }
    });

    if (caps.writable) {
      describe("writes", () => {
        it("overwrites in place", async () => {
          const data = initial(9);
          await withBackend(data.slice(), false, async (b) => {
            const patch = randomBytes(rng(10), 1000);
            await b.write(patch, 3000);
            const expected = data.slice();
            expected.set(patch, 3000);
            expect(await b.size()).toBe(INITIAL_SIZE);
            expectBytes(await readAll(b), expected);
          });
        });

        it("extends at EOF and past EOF (the gap reads as zeros)", async () => {
          const data = initial(11);
          await withBackend(data.slice(), false, async (b) => {
            const a = randomBytes(rng(12), 500);
            await b.write(a, INITIAL_SIZE - 100);
            expect(await b.size()).toBe(INITIAL_SIZE + 400);
            const c = randomBytes(rng(13), 300);
            const far = INITIAL_SIZE + 70_000;
            await b.write(c, far);
            expect(await b.size()).toBe(far + 300);
            const expected = new Uint8Array(far + 300);
            expected.set(data);
            expected.set(a, INITIAL_SIZE - 100);
            expected.set(c, far);
            expectBytes(await readAll(b), expected);
          });
        });

        it("writes into an empty backend, and a zero-length write changes nothing", async () => {
          await withBackend(new Uint8Array(0), false, async (b) => {
            await b.write(new Uint8Array(0), 0);
            expect(await b.size()).toBe(0);
            const a = randomBytes(rng(14), 4096);
            await b.write(a, 0);
            expect(await b.size()).toBe(4096);
            expectBytes(await readAll(b), a);
          });
        });

        it("writes from a subarray of a larger buffer", async () => {
          await withBackend(new Uint8Array(0), false, async (b) => {
            const big = randomBytes(rng(15), 1000);
            await b.write(big.subarray(200, 300), 10);
            expect(await b.size()).toBe(110);
            const out = await readAll(b);
            expect(out.subarray(0, 10).every((x) => x === 0)).toBe(true);
            expectBytes(out.subarray(10), big.subarray(200, 300));
          });
        });

        it("truncate grows with zeros and shrinks; regrowing does not resurrect old bytes", async () => {
          const data = initial(16);
          await withBackend(data.slice(), false, async (b) => {
            await b.truncate(INITIAL_SIZE + 5000);
            expect(await b.size()).toBe(INITIAL_SIZE + 5000);
            let out = await readAll(b);
            expectBytes(out.subarray(0, INITIAL_SIZE), data);
            expect(out.subarray(INITIAL_SIZE).every((x) => x === 0)).toBe(true);

            await b.truncate(1000);
            expect(await b.size()).toBe(1000);
            expectBytes(await readAll(b), data.subarray(0, 1000));
            expect(await b.read(new Uint8Array(10), 1000)).toBe(0);

            await b.truncate(3000);
            out = await readAll(b);
            expectBytes(out.subarray(0, 1000), data.subarray(0, 1000));
            expect(out.subarray(1000).every((x) => x === 0)).toBe(true);

            await b.truncate(0);
            expect(await b.size()).toBe(0);
            await b.truncate(0);
            expect(await b.size()).toBe(0);
          });
        });

        it("flush succeeds and keeps the data", async () => {
          const data = initial(17);
          await withBackend(data.slice(), false, async (b) => {
            await b.write(new Uint8Array([1, 2, 3]), 5);
            await b.flush();
            const expected = data.slice();
            expected.set([1, 2, 3], 5);
            expectBytes(await readAll(b), expected);
          });
        });

        it("concurrent writes to disjoint ranges all land", async () => {
          const size = 64 * 1024;
          await withBackend(new Uint8Array(0), false, async (b) => {
            const chunk = 4096;
            const rand = rng(18);
            const expected = randomBytes(rand, size);
            const order = shuffle(Array.from({ length: size / chunk }, (_, i) => i), rand);
            await Promise.all(order.map((i) => b.write(expected.slice(i * chunk, (i + 1) * chunk), i * chunk)));
            expect(await b.size()).toBe(size);
            expectBytes(await readAll(b), expected);
          });
        });
      });
    }

    describe("read-only", () => {
      it("refuses write, truncate and flush with READ_ONLY and changes nothing", async () => {
        const data = initial(19);
        await withBackend(data.slice(), true, async (b) => {
          expect(b.readOnly).toBe(true);
          await expectCode(attempt(() => b.write(new Uint8Array([1]), 0)), "READ_ONLY");
          await expectCode(attempt(() => b.write(new Uint8Array(0), 0)), "READ_ONLY");
          await expectCode(attempt(() => b.truncate(0)), "READ_ONLY");
          await expectCode(attempt(() => b.truncate(INITIAL_SIZE * 2)), "READ_ONLY");
          await expectCode(attempt(() => b.flush()), "READ_ONLY");
          expect(await b.size()).toBe(INITIAL_SIZE);
          expectBytes(await readAll(b), data);
        });
      });
    });

    describe("close", () => {
      it("makes every further operation fail with CLOSED; closing twice is harmless", async () => {
        for (const readOnly of caps.writable ? [true, false] : [true]) {
          const b = await make(initial(20), { readOnly });
          await b.close();
          await b.close();
          await expectCode(attempt(() => b.read(new Uint8Array(8), 0)), "CLOSED");
          await expectCode(attempt(() => b.read(new Uint8Array(0), 0)), "CLOSED");
          await expectCode(attempt(() => b.size()), "CLOSED");
          await expectCode(attempt(() => b.write(new Uint8Array(8), 0)), "CLOSED");
          await expectCode(attempt(() => b.truncate(0)), "CLOSED");
          await expectCode(attempt(() => b.flush()), "CLOSED");
          if (b.allocatedSize) await expectCode(attempt(() => b.allocatedSize!()), "CLOSED");
          await b.close();
        }
      });
    });
  });
}
