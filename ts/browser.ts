// Browser entry: the core plus the Blob backend (read-only, for files picked or dropped by a user).
export * from "./index.js";
