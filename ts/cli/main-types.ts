/** A qcow2-img command: its arguments, stdout and stderr writers; resolves to the exit status. */
export type Command = (argv: string[], out: (text: string) => void, err: (text: string) => void) => Promise<number>;
