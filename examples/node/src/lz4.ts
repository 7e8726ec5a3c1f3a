// kafkajs decodes only gzip-compressed record batches by itself, and
// pgoutbox's relay compresses with lz4 by default (`kafka.compression`,
// env KAFKA_COMPRESSION). Without a codec a kafkajs consumer crashes on the
// first batch with "LZ4 compression not implemented". This registers one.
//
// Kafka's lz4 is the LZ4 frame format (https://github.com/lz4/lz4/blob/dev/doc/lz4_Frame_format.md).
// The frame is read here and each block decoded with lz4js (pure
// JavaScript: no compiler, no native module). lz4js's own frame reader is
// not used: it misreads frames with block checksums.
//
// Relays set to `snappy` or `zstd` need those codecs registered the same
// way (CompressionCodecs[CompressionTypes.Snappy] / .ZSTD); `gzip` and
// `none` need nothing.

import { CompressionCodecs, CompressionTypes } from "kafkajs";
import * as lz4 from "lz4js";

const MAGIC = 0x184d2204;
const BLOCK_MAX = [0, 0, 0, 0, 64 << 10, 256 << 10, 1 << 20, 4 << 20];

/** The content of one LZ4 frame. */
export function decodeLz4Frame(frame: Buffer): Buffer {
  if (frame.length < 7 || frame.readUInt32LE(0) !== MAGIC) throw new Error("lz4: not an LZ4 frame");
  const flags = frame[4];
  if (flags >> 6 !== 1) throw new Error(`lz4: frame version ${flags >> 6}`);
  const blockChecksums = (flags & 0x10) !== 0;
  const hasContentSize = (flags & 0x08) !== 0;
  const contentChecksum = (flags & 0x04) !== 0;
  const hasDictionary = (flags & 0x01) !== 0;
  const blockMax = BLOCK_MAX[(frame[5] >> 4) & 0x07];
  if (!blockMax) throw new Error("lz4: invalid block size");
  let at = 6;
  let contentSize: number | undefined;
  if (hasContentSize) {
    contentSize = Number(frame.readBigUInt64LE(at));
    at += 8;
  }
  if (hasDictionary) throw new Error("lz4: frames with a dictionary are not supported");
  at += 1; // header checksum

  // Blocks, first pass: where they are and how much room they need.
  const blocks: { start: number; size: number; compressed: boolean }[] = [];
  let room = 0;
  for (;;) {
    const word = frame.readUInt32LE(at);
    at += 4;
    if (word === 0) break; // end mark
    const compressed = (word & 0x80000000) === 0;
    const size = word & 0x7fffffff;
    blocks.push({ start: at, size, compressed });
    room += compressed ? blockMax : size;
    at += size + (blockChecksums ? 4 : 0);
  }
  if (contentChecksum) at += 4;
  if (at > frame.length) throw new Error("lz4: truncated frame");

  // Second pass: one contiguous output, so linked blocks find their matches.
  const out = Buffer.alloc(contentSize ?? room);
  let written = 0;
  for (const block of blocks) {
    if (block.compressed) {
      written = lz4.decompressBlock(frame, out, block.start, block.size, written);
    } else {
      written += frame.copy(out, written, block.start, block.start + block.size);
    }
    if (written > out.length) throw new Error("lz4: frame content larger than declared");
  }
  if (contentSize !== undefined && written !== contentSize) {
    throw new Error(`lz4: ${written} bytes decoded, the frame declares ${contentSize}`);
  }
  return out.subarray(0, written);
}

/** Teaches kafkajs to read (and write) lz4-compressed batches. Call once, before connecting. */
export function registerLz4Codec(): void {
  CompressionCodecs[CompressionTypes.LZ4] = () => ({
    async compress(encoder: { buffer: Buffer }): Promise<Buffer> {
      return Buffer.from(lz4.compress(encoder.buffer));
    },
    async decompress(buffer: Buffer): Promise<Buffer> {
      return decodeLz4Frame(buffer);
    },
  });
}
