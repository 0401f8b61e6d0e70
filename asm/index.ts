// Entry file: re-exports only. Every export is described by WasmExports in ts/wasm/exports.ts.
export { heapBase } from "./bytes";
export { l2Lookup } from "./l2";
export { firstNonZero, isZero, blockRun, copyBytes, fillBytes } from "./copy";
export { refcountGet, refcountSet, refcountFindZero, refcountZeroRun } from "./refcount";
export { checkScanL2, checkAddRange, checkFirstDiff, checkLastNonZero, checkFindNonZero, checkCopiedScan } from "./check";
export { aesExpandKey, aesCbcEncrypt, aesCbcDecrypt, aesXtsEncrypt, aesXtsDecrypt } from "./aes";
