// qemu's progress meter (util/qemu-progress.c) as qemu-img prints it with -p: "    (NN.NN/100%)\r"
// on stdout whenever the value moved by more than `minSkip` points (or is 0 or 100), in C float
// arithmetic; a newline at the end. Disabled, it prints nothing.

export class QemuProgress {
  private current = 0;
  private lastPrint = 0;

  constructor(
    private readonly enabled: boolean,
    private readonly out: (text: string) => void,
    private readonly minSkip: number,
  ) {}

  /** qemu_progress_print: with `max` 0, `delta` is the new value; else it advances by delta% of max. */
  print(delta: number, max: number): void {
    if (!this.enabled) return;
    const f = Math.fround;
    let current = max === 0 ? f(delta) : f(this.current + f(f(delta / 100) * max));
    if (current > 100) current = 100;
    this.current = current;
    if (
      current > f(this.lastPrint + this.minSkip) ||
      current < f(this.lastPrint - this.minSkip) ||
      current === 0 ||
      current === 100
    ) {
      this.lastPrint = current;
      this.out(`    (${current.toFixed(2)}/100%)\r`);
    }
  }

  /** qemu_progress_end. */
  end(): void {
    if (this.enabled) this.out("\n");
  }
}
