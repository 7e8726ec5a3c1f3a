// lz4js ships no type declarations; these are the functions used.
declare module "lz4js" {
  /** An LZ4 frame holding `src`. */
  export function compress(src: Uint8Array, maxSize?: number): Uint8Array;
  /**
   * Decodes the LZ4 block `src[sIndex .. sIndex + sLength]` into `dst` from
   * `dIndex` (matches may reach back before `dIndex`); returns the index after
   * the last byte written.
   */
  export function decompressBlock(src: Uint8Array, dst: Uint8Array, sIndex: number, sLength: number, dIndex: number): number;
}
