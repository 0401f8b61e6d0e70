// Coordination between overlapping requests: one async lock per image for metadata, and a set of
// guest cluster ranges that writing requests own while their data is in flight (the seed's
// dependent requests: a request touching an owned range waits for its owner, then looks again).

/** A FIFO async mutex. Hold it only across metadata work, never across guest data I/O. */
export class AsyncLock {
  private tail: Promise<void> = Promise.resolve();

  /** Wait for the lock; the returned function releases it. */
  acquire(): Promise<() => void> {
    let release!: () => void;
    const next = new Promise<void>((resolve) => (release = resolve));
    const ready = this.tail.then(() => release);
    this.tail = this.tail.then(() => next);
    return ready;
  }

  async run<T>(fn: () => Promise<T>): Promise<T> {
    const release = await this.acquire();
    try {
      return await fn();
    } finally {
      release();
    }
  }
}

interface Owned {
  first: number;
  end: number;
  done: Promise<void>;
}

export interface Claim {
  /** Resolves once every earlier claim overlapping this one has been released. */
  ready: Promise<void>;
  release(): void;
}

/**
 * Guest cluster ranges [first, end) claimed by writing requests. Claims are taken at once, in the
 * order requests are issued, and a claim is ready when every earlier overlapping claim is
 * released: overlapping requests take effect in issue order, others run side by side.
 */
export class InFlight {
  private readonly owned = new Set<Owned>();

  claim(first: number, end: number): Claim {
    const before: Promise<void>[] = [];
    for (const o of this.owned) if (o.first < end && first < o.end) before.push(o.done);
    let finish!: () => void;
    const entry: Owned = { first, end, done: new Promise<void>((resolve) => (finish = resolve)) };
    this.owned.add(entry);
    return {
      ready: before.length === 0 ? Promise.resolve() : Promise.all(before).then(() => undefined),
      release: () => {
        this.owned.delete(entry);
        finish();
      },
    };
  }

  get size(): number {
    return this.owned.size;
  }
}
