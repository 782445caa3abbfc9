/**
 * The undo journal (issue 11 §1, consistency mode `journal`): the "save
 * volume" that keeps the old content of every chunk a generation overwrites,
 * so that a secondary can always produce the image of its last committed
 * generation, on any filesystem and on block devices.
 *
 * {@link JournaledVolume} wraps the target `Volume`. Between `begin(N)` and
 * `commit(N)`, before the first write or zero of a chunk, the chunk's current
 * content (or the fact that it was a hole, or all zeros) is appended to
 * `gen-<N>.journal` in the journal directory, and the target write is issued
 * only once that record is durable (fdatasync). Records are group-committed:
 * writes to different chunks may be in flight together (the Receiver keeps
 * several), their records are appended as one batch and one fdatasync covers
 * the batch; each call's target write waits for the fdatasync that covers its
 * own records. Calls that share a chunk are ordered: the later one starts
 * once the earlier one's target write is done. {@link JournaledVolume.rollback}
 * replays the records in reverse onto the stopped target.
 *
 * ## File format (all integers little-endian)
 *
 * A journal file is a sequence of records; each is
 *
 * | bytes | field |
 * | --- | --- |
 * | 0..4   | magic `TMJ1` |
 * | 4      | format version (1) |
 * | 5      | kind: 0 head, 1 data, 2 hole, 3 zeros |
 * | 6..8   | reserved (0) |
 * | 8..16  | generation (the N of the file name) |
 * | 16..24 | offset in the volume (bytes, a multiple of the chunk size) |
 * | 24..28 | length covered (bytes: whole chunks, the last chunk of the volume may be short) |
 * | 28..32 | payload length P (data: = length; head: 24; hole, zeros: 0) |
 * | 32..32+P | payload |
 * | 32+P..36+P | CRC-32C of bytes [0, 32+P) |
 *
 * The first record is the head; its payload is the volume size (u64), the
 * chunk size (u32), 0 (u32) and the **base**: the committed generation the
 * journal undoes to (u64). Data records hold the old bytes of a run of
 * chunks; hole records say the run was unallocated when the generation began
 * (replayed with `zero`, which punches); zeros records say it was allocated
 * but read as zeros (also replayed with `zero`: content exact, the run may
 * come back as a hole). A hole or zeros record is 36 bytes whatever the run's
 * length. At begin, the target's holes (up to PRESAVED_HOLE_RECORDS runs, the
 * largest) are saved at once, one hole record each, with one fdatasync:
 * writes into them then wait for no record of their own, so an initial sync
 * onto an empty target journals one record in all and reads nothing.
 *
 * ## Why a crash at any point leaves the committed image restorable
 *
 * Invariant, for every chunk while a journal with base C exists: either the
 * chunk is not saved and still holds its content of C (nothing wrote it since
 * C, because the wrapper writes a chunk only after saving it), or a durable
 * record holds its content of C.
 *
 * - A call's records are appended (positional writes at the end of the valid
 *   prefix, in a batch with those of other calls in flight), then one
 *   fdatasync covers the batch, then the call's chunks count as saved, then
 *   its target write or zero is issued. A crash before that fdatasync
 *   returned may leave a torn tail (zeros, part of a record, even later
 *   records of the same batch without earlier ones); the target was not
 *   touched for any of those chunks, so the tail is not needed: the journal
 *   is its longest prefix of records whose magic, lengths and CRC check, and
 *   what follows is ignored (rollback) or cut off (reopen, before anything is
 *   appended after it). Only what follows the last completed fdatasync can be
 *   torn: appends run one at a time, and an fdatasync covers every append
 *   before it.
 * - Two calls never read or write a chunk at the same time: a call waits for
 *   the earlier calls in flight that share one of its chunks (their target
 *   writes included). So a chunk's old content is read before any write of
 *   the generation reaches it, and writes to one chunk land in call order.
 * - A record whose CRC checks but whose content is impossible (another
 *   generation, outside the volume, not on chunk boundaries, a head that
 *   disagrees with the target) is not a torn write: TM_ERR_STATE.
 * - The head is written and synced, and the directory entry fsynced, when the
 *   file is created, before any record of it is relied on. A file without a
 *   valid head has no durable record and is deleted.
 * - Rollback writes every record back (newest file first, records in reverse),
 *   flushes the target, and only then deletes the journal. Killed half way,
 *   the journal is intact and replaying it again gives the same image (each
 *   record holds the content of C for its chunks: writing it twice is
 *   harmless). A wrapper opened on a half rolled-back target keeps the
 *   invariant too: a restored chunk is a saved chunk.
 * - The caller records `committed = N` after flushing the target and only
 *   then calls `commit(N)`, which deletes the journal. A crash between the two
 *   leaves a journal whose base is older than the recorded committed
 *   generation: stale, deleted without replay by `open` and `rollback` (that is
 *   why both take the committed generation, and why the head carries the base).
 * - Chunks are saved once per base, not once per file: when a generation M is
 *   abandoned (never committed) and N begins, M's saved chunks stay saved
 *   (their records hold C's content) and rollback replays both files.
 * - The CRC finds torn appends. A synced record damaged later on the medium
 *   ends the journal there like a torn tail: not detected (nor is damage to
 *   the target's own data).
 */
import { constants as fsc, promises as fsp } from 'node:fs';
import * as path from 'node:path';
import type { Logger } from 'pino';
import roaring from 'roaring';
import { asTmError, ErrorCodes, TmError } from '../errors.js';
import { native } from '../native/index.js';
import { fsyncDir, removeDurably } from '../util/atomic.js';
import { sleep } from '../util/sleep.js';
import { allocatedBytesOf, type ByteRange, type Volume, type VolumeCapabilities } from './volume.js';
import { isAllZero } from './zero.js';

const { RoaringBitmap32 } = roaring;
type Bitmap = InstanceType<typeof roaring.RoaringBitmap32>;

/** Record kinds (byte 5 of a record). */
export const RecordKind = { HEAD: 0, DATA: 1, HOLE: 2, ZEROS: 3 } as const;
export type RecordKind = (typeof RecordKind)[keyof typeof RecordKind];

const MAGIC = 0x314a4d54; // "TMJ1" read as u32 LE
const VERSION = 1;
/** Bytes of a record's header. */
export const RECORD_HEADER = 32;
/** Bytes a record adds to its payload: header + CRC. A hole or zeros record is this long. */
export const RECORD_OVERHEAD = RECORD_HEADER + 4;
const HEAD_PAYLOAD = 24;
/** Bytes of a journal's head record. */
export const HEAD_BYTES = RECORD_OVERHEAD + HEAD_PAYLOAD;
/** Old data read per slice (bytes): bounds the memory of one call, and the payload of one data record. */
const SLICE_BYTES = 8 * 1024 * 1024;
/** Record bytes gathered before one positional write to the journal. */
const APPEND_BYTES = 8 * 1024 * 1024;
/** Largest run one hole or zeros record covers (bytes; the length field is u32). */
const MAX_RUN_BYTES = 2 ** 31;
/**
 * Hole records made at begin at most: the target's largest holes not saved
 * yet are saved then, with one append and one fdatasync (36 bytes each, so
 * at most 36 KiB), and writes into them need no record of their own.
 */
export const PRESAVED_HOLE_RECORDS = 1024;
/** Window of the sequential reader of a journal file (bytes). */
const READ_WINDOW = 4 * 1024 * 1024;

const FILE_RE = /^gen-(\d+)\.journal$/;

/** The file of generation N's journal in `dir`. */
export function journalFile(dir: string, generation: number): string {
  return path.join(dir, `gen-${generation}.journal`);
}

export interface JournalOpenOptions {
  /** The journal directory (created if missing). It must be on a filesystem (plain files); normally next to the target. */
  dir: string;
  /** The mirror's chunk size (bytes): the unit saved once per generation. */
  chunkSize: number;
  /**
   * The last committed generation as the caller recorded it (0 when none).
   * Journals whose base is older are stale (a crash between recording a
   * commit and {@link JournaledVolume.commit}) and are deleted unreplayed.
   */
  committed: number;
  log?: Logger;
  /** Replaces the fdatasync of the journal file (tests inject failures or observe the order). */
  datasync?: (fh: fsp.FileHandle) => Promise<void>;
  /**
   * Break the ordering on purpose, for the crash test of issue 11 §2 only: the
   * records are built from the old content, the target is written, then the
   * records are appended and synced. Never in production.
   */
  unsafeWriteBeforeJournal?: boolean;
  /**
   * Test-only, for the same crash test: wait this many ms between the two
   * steps whose order the journal is about, in a call that saves chunks:
   * after its records are durable and before its target write, or (with
   * `unsafeWriteBeforeJournal`) after its target write and before its records
   * are appended. A SIGKILL then falls between the two often enough to tell the
   * orders apart; with the right order the wait changes nothing but the timing.
   */
  testGapMs?: number;
  /**
   * Hole records made at begin, at most (default {@link PRESAVED_HOLE_RECORDS};
   * 0: none, every call saves its own holes). See {@link JournaledVolume.begin}.
   */
  presaveHoles?: number;
}

/**
 * What {@link JournaledVolume.rollback} did: the newest generation rolled back
 * (null when there was no journal to replay), every generation replayed
 * (newest first), the chunks written back or zeroed, the data bytes written back.
 */
export interface RollbackResult {
  generation: number | null;
  generations: number[];
  chunks: number;
  bytes: number;
}

/**
 * Counters of a {@link JournaledVolume} (status, metrics, tests): the
 * generation begun (null if none), the committed one the journal undoes to,
 * the bytes of the live journal files (valid prefixes), the chunks saved
 * since `committed`, and the records appended and fdatasyncs done by this
 * wrapper (heads excluded).
 */
export interface JournalStats {
  generation: number | null;
  committed: number;
  bytes: number;
  savedChunks: number;
  records: number;
  syncs: number;
}

/** A record as found in a file: its position `at` in the file, what it covers (bytes). */
interface RecordRef {
  kind: RecordKind;
  at: number;
  offset: number;
  length: number;
  payloadLength: number;
}

interface JournalHead {
  generation: number;
  volumeSize: number;
  chunkSize: number;
  base: number;
}

/** A parsed journal file: its head (null if none is valid), records, the bytes of its valid prefix and of the file. */
interface ScannedJournal {
  file: string;
  generation: number;
  head: JournalHead | null;
  records: RecordRef[];
  validLength: number;
  fileLength: number;
}

/** A call in flight on chunks [first, end) (Infinity: all of them); `done` resolves (never rejects) when it ends. */
interface InFlight {
  first: number;
  end: number;
  done: Promise<void>;
}

/** A call waiting for its records to be appended or, with `sync`, durable. */
interface Waiter {
  resolve: () => void;
  reject: (e: unknown) => void;
  sync: boolean;
}

/** Records queued for one append of the group commit, and the calls waiting for them. */
interface Batch {
  bufs: Buffer[];
  records: number;
  waiters: Waiter[];
}

/** A live journal of the current base. */
interface LiveJournal {
  generation: number;
  file: string;
  length: number;
}

/** Encode a record header at `buf[at]`; the payload must follow, then {@link sealRecord}. */
function writeHeader(buf: Buffer, at: number, kind: RecordKind, generation: number, offset: number, length: number, payloadLength: number): void {
  buf.writeUInt32LE(MAGIC, at);
  buf.writeUInt8(VERSION, at + 4);
  buf.writeUInt8(kind, at + 5);
  buf.writeUInt16LE(0, at + 6);
  buf.writeBigUInt64LE(BigInt(generation), at + 8);
  buf.writeBigUInt64LE(BigInt(offset), at + 16);
  buf.writeUInt32LE(length, at + 24);
  buf.writeUInt32LE(payloadLength, at + 28);
}

/** Write the CRC of the record at `buf[at]` whose payload is `payloadLength` bytes. */
function sealRecord(buf: Buffer, at: number, payloadLength: number): void {
  const end = at + RECORD_HEADER + payloadLength;
  buf.writeUInt32LE(native().crc32c(buf.subarray(at, end)), end);
}

function encodeHead(h: JournalHead): Buffer {
  const buf = Buffer.alloc(HEAD_BYTES);
  writeHeader(buf, 0, RecordKind.HEAD, h.generation, 0, 0, HEAD_PAYLOAD);
  buf.writeBigUInt64LE(BigInt(h.volumeSize), RECORD_HEADER);
  buf.writeUInt32LE(h.chunkSize, RECORD_HEADER + 8);
  buf.writeUInt32LE(0, RECORD_HEADER + 12);
  buf.writeBigUInt64LE(BigInt(h.base), RECORD_HEADER + 16);
  sealRecord(buf, 0, HEAD_PAYLOAD);
  return buf;
}

function safeU64(buf: Buffer, at: number): number {
  const v = buf.readBigUInt64LE(at);
  return v > BigInt(Number.MAX_SAFE_INTEGER) ? Number.NaN : Number(v);
}

async function readFully(fh: fsp.FileHandle, buf: Buffer, position: number): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    const { bytesRead } = await fh.read(buf, done, buf.length - done, position + done);
    if (bytesRead === 0) throw new TmError(ErrorCodes.STATE, `journal ended at ${position + done} while reading ${buf.length} bytes at ${position}`);
    done += bytesRead;
  }
}

async function writeFully(fh: fsp.FileHandle, buf: Buffer, position: number): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    const { bytesWritten } = await fh.write(buf, done, buf.length - done, position + done);
    done += bytesWritten;
  }
}

/** Reads of [pos, pos + len) of a file through a window (many small records cost one read); null past the end. */
function windowReader(fh: fsp.FileHandle, size: number): (pos: number, len: number) => Promise<Buffer | null> {
  let buf = Buffer.alloc(0);
  let at = 0;
  return async (pos, len) => {
    if (pos + len > size) return null;
    if (pos < at || pos + len > at + buf.length) {
      buf = Buffer.allocUnsafe(Math.min(Math.max(len, READ_WINDOW), size - pos));
      at = pos;
      await readFully(fh, buf, pos);
    }
    return buf.subarray(pos - at, pos - at + len);
  };
}

/**
 * Parse journal `file` (of generation `generation`): the longest prefix of
 * records that check (magic, version, lengths within the file, CRC). A record
 * that checks but cannot be right is TM_ERR_STATE. `volumeSize` bounds the
 * records (the target's size; a head naming another size is TM_ERR_STATE).
 */
async function scanJournal(file: string, generation: number, volumeSize: number): Promise<ScannedJournal> {
  const fh = await fsp.open(file, 'r').catch((e: unknown) => {
    throw asTmError(e, ErrorCodes.STATE, `opening journal ${file}`);
  });
  try {
    const fileLength = (await fh.stat()).size;
    const get = windowReader(fh, fileLength);
    const out: ScannedJournal = { file, generation, head: null, records: [], validLength: 0, fileLength };
    const bad = (at: number, why: string) => new TmError(ErrorCodes.STATE, `journal ${file}: record at ${at} ${why}`);
    let pos = 0;
    for (;;) {
      const hdr = await get(pos, RECORD_HEADER);
      if (!hdr || hdr.readUInt32LE(0) !== MAGIC || hdr.readUInt8(4) !== VERSION) break;
      const payloadLength = hdr.readUInt32LE(28);
      const whole = await get(pos, RECORD_OVERHEAD + payloadLength);
      if (!whole) break;
      if (native().crc32c(whole.subarray(0, RECORD_HEADER + payloadLength)) !== whole.readUInt32LE(RECORD_HEADER + payloadLength)) break;
      // From here the record was written whole: anything wrong with it is not a torn append.
      const kind = whole.readUInt8(5) as RecordKind;
      const gen = safeU64(whole, 8);
      const offset = safeU64(whole, 16);
      const length = whole.readUInt32LE(24);
      if (gen !== generation) throw bad(pos, `belongs to generation ${gen}, not ${generation}`);
      if (pos === 0) {
        if (kind !== RecordKind.HEAD || payloadLength !== HEAD_PAYLOAD) throw bad(pos, 'is not a journal head');
        const head: JournalHead = {
          generation,
          volumeSize: safeU64(whole, RECORD_HEADER),
          chunkSize: whole.readUInt32LE(RECORD_HEADER + 8),
          base: safeU64(whole, RECORD_HEADER + 16),
        };
        if (head.volumeSize !== volumeSize) throw bad(pos, `is for a volume of ${head.volumeSize} bytes, the target has ${volumeSize}`);
        if (head.chunkSize <= 0 || !Number.isSafeInteger(head.base)) throw bad(pos, 'is a malformed head');
        out.head = head;
      } else {
        const cs = out.head!.chunkSize;
        const payloadOk = kind === RecordKind.DATA ? payloadLength === length : (kind === RecordKind.HOLE || kind === RecordKind.ZEROS) && payloadLength === 0;
        if (!payloadOk) throw bad(pos, `has kind ${kind} and a payload of ${payloadLength} bytes for ${length}`);
        if (!(length > 0) || !Number.isSafeInteger(offset) || offset % cs !== 0 || offset + length > volumeSize || (length % cs !== 0 && offset + length !== volumeSize)) {
          throw bad(pos, `covers ${offset}+${length}, not whole chunks of ${cs} bytes within ${volumeSize}`);
        }
        out.records.push({ kind, at: pos, offset, length, payloadLength });
      }
      pos += RECORD_OVERHEAD + payloadLength;
      out.validLength = pos;
    }
    return out;
  } catch (e) {
    throw asTmError(e, ErrorCodes.STATE, `reading journal ${file}`);
  } finally {
    await fh.close();
  }
}

/** Journal files in `dir`, by generation (empty when `dir` does not exist). */
async function listJournalFiles(dir: string): Promise<{ generation: number; file: string }[]> {
  let names: string[];
  try {
    names = await fsp.readdir(dir);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw asTmError(e, ErrorCodes.STATE, `listing journal directory ${dir}`);
  }
  const out: { generation: number; file: string }[] = [];
  for (const n of names) {
    const m = FILE_RE.exec(n);
    if (m && Number.isSafeInteger(Number(m[1]))) out.push({ generation: Number(m[1]), file: path.join(dir, n) });
  }
  return out.sort((a, b) => a.generation - b.generation);
}

/**
 * The journals of `dir` sorted into live ones (base = `committed`, newest
 * first) after deleting, durably, those without a valid head and the stale
 * ones (base older than `committed`). A base newer than `committed` is
 * TM_ERR_STATE: the journal undoes to a generation the caller does not know
 * as committed.
 */
async function sortJournals(dir: string, volumeSize: number, committed: number, log?: Logger): Promise<ScannedJournal[]> {
  const live: ScannedJournal[] = [];
  for (const { generation, file } of await listJournalFiles(dir)) {
    const j = await scanJournal(file, generation, volumeSize);
    if (!j.head) {
      log?.info({ file }, 'journal without a head (created at a crash): deleted');
      await removeDurably(file);
    } else if (j.head.base < committed) {
      log?.info({ file, base: j.head.base, committed }, 'stale journal (its base is older than the committed generation): deleted without replay');
      await removeDurably(file);
    } else if (j.head.base > committed) {
      throw new TmError(ErrorCodes.STATE, `journal ${file} undoes to generation ${j.head.base}, but the committed generation is ${committed}`);
    } else {
      live.push(j);
    }
  }
  return live.sort((a, b) => b.generation - a.generation);
}

/** The journal files in `dir` and their sizes in bytes (status of a stopped mirror); reads no content. */
export async function listJournals(dir: string): Promise<{ generation: number; file: string; bytes: number }[]> {
  const out: { generation: number; file: string; bytes: number }[] = [];
  for (const j of await listJournalFiles(dir)) {
    try {
      out.push({ ...j, bytes: (await fsp.stat(j.file)).size });
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw asTmError(e, ErrorCodes.STATE, `journal ${j.file}`);
    }
  }
  return out;
}

/**
 * A `Volume` that saves the old content of each chunk in the undo journal
 * before the chunk's first write or zero in a generation (format and
 * durability argument: the file's header). Reads, `allocated`, `flush`, size,
 * path, kind and capabilities are the target's. `write` and `zero` outside a
 * begun generation are refused (TM_ERR_INTERNAL). After a journal append or
 * fdatasync failed, every later write and zero is refused (TM_ERR_VOLUME_IO,
 * that failure as cause) until the wrapper is closed and opened again, which
 * re-reads the journal: after a failed fdatasync the page cache proves nothing.
 * The wrapper owns the target: `close()` closes the journal file and the target.
 */
export class JournaledVolume implements Volume {
  private closed = false;
  private failed: TmError | null = null;
  /** The generation begun and not yet committed. */
  private current: number | null = null;
  private fh: fsp.FileHandle | null = null;
  /** The live journal being appended to (`current`'s). */
  private journal: LiveJournal | null = null;
  /** Live journals of other (abandoned, uncommitted) generations of the same base. */
  private others: LiveJournal[] = [];
  /** Chunks whose content of `committed` is in a durable record. */
  private readonly saved: Bitmap = new RoaringBitmap32();
  /** Chunks allocated (even in part) when `current` began; valid for every chunk not saved. */
  private allocatedAtBegin: Bitmap | null = null;
  /**
   * Writes, zeros, begins, commits and close in progress, in the order they
   * were called: each waits for the earlier ones whose chunks it shares (a
   * begin, commit or close shares every chunk). Writes to different chunks run
   * concurrently, which is what lets one fdatasync cover several of them.
   */
  private readonly inFlight = new Set<InFlight>();
  /** Records waiting for the next append: the group commit. */
  private queued: Batch | null = null;
  /** The append loop, while it runs. */
  private appending: Promise<void> | null = null;
  /** Appends completed on the journal being appended to. */
  private appends = 0;
  /** Calls whose records were appended (up to append number `upTo`) and that wait for an fdatasync started after it. */
  private unsynced: { upTo: number; waiters: Waiter[] }[] = [];
  /** The fdatasync loop, while it runs. */
  private syncing: Promise<void> | null = null;
  private records = 0;
  private syncs = 0;

  private constructor(
    private readonly target: Volume,
    private readonly dir: string,
    readonly chunkSize: number,
    private committed: number,
    private readonly o: JournalOpenOptions,
  ) {}

  get path(): string {
    return this.target.path;
  }
  get size(): number {
    return this.target.size;
  }
  get kind(): Volume['kind'] {
    return this.target.kind;
  }
  get capabilities(): VolumeCapabilities {
    return this.target.capabilities;
  }

  /**
   * Wrap `target`, loading the journals already in `o.dir` (after a crash or
   * a stop mid-generation): live ones (base = `o.committed`) make their chunks
   * count as saved; stale ones and ones without a valid head are deleted.
   *
   * @throws TmError TM_ERR_STATE for a journal that belongs to another volume
   *   size or chunk size, undoes to a generation newer than `o.committed`, or
   *   holds an impossible record; TM_ERR_VOLUME_RANGE for a chunk size that
   *   is not a positive integer or gives more than 2^32 chunks.
   */
  static async open(target: Volume, o: JournalOpenOptions): Promise<JournaledVolume> {
    const cs = o.chunkSize;
    if (!Number.isSafeInteger(cs) || cs <= 0 || cs >= MAX_RUN_BYTES || Math.ceil(target.size / cs) > 2 ** 32) {
      throw new TmError(ErrorCodes.VOLUME_RANGE, `journal chunk size ${cs} does not fit volume ${target.path} (${target.size} bytes)`);
    }
    if (!Number.isSafeInteger(o.committed) || o.committed < 0) throw new TmError(ErrorCodes.INTERNAL, `committed generation ${o.committed} is not a non-negative integer`);
    try {
      const created = await fsp.mkdir(o.dir, { recursive: true, mode: 0o700 });
      if (created !== undefined) await fsyncDir(path.dirname(o.dir));
    } catch (e) {
      throw asTmError(e, ErrorCodes.VOLUME_IO, `creating journal directory ${o.dir}`);
    }
    const live = await sortJournals(o.dir, target.size, o.committed, o.log);
    const v = new JournaledVolume(target, o.dir, cs, o.committed, o);
    for (const j of live) {
      if (j.head!.chunkSize !== cs) throw new TmError(ErrorCodes.STATE, `journal ${j.file} was written with chunks of ${j.head!.chunkSize} bytes, not ${cs}`);
      for (const r of j.records) v.saved.addRange(r.offset / cs, Math.ceil((r.offset + r.length) / cs));
      // A torn tail is cut when (if) this generation is begun again.
      v.others.push({ generation: j.generation, file: j.file, length: j.validLength });
      if (j.fileLength > j.validLength) o.log?.warn({ file: j.file, tornBytes: j.fileLength - j.validLength }, 'journal ends with a torn append (its target writes never happened): ignored');
    }
    if (live.length) o.log?.info({ generations: live.map((j) => j.generation), savedChunks: v.saved.size }, 'journal loaded: the target is between the committed generation and the journaled one');
    return v;
  }

  /** Counters for status and tests. */
  get stats(): JournalStats {
    let bytes = 0;
    for (const j of this.liveJournals()) bytes += j.length;
    return { generation: this.current, committed: this.committed, bytes, savedChunks: this.saved.size, records: this.records, syncs: this.syncs };
  }

  private liveJournals(): LiveJournal[] {
    return this.journal ? [this.journal, ...this.others] : [...this.others];
  }

  /**
   * Run `fn` once every earlier call in flight that touches chunks
   * [first, end) is done (target write included); `end` Infinity: after all of
   * them, and before any later one (begin, commit, close). The set of earlier
   * calls is taken synchronously, so calls are ordered as they were made.
   */
  private async ordered<T>(first: number, end: number, fn: () => Promise<T>): Promise<T> {
    const before: Promise<void>[] = [];
    for (const f of this.inFlight) if (f.first < end && first < f.end) before.push(f.done);
    let release!: () => void;
    const me: InFlight = { first, end, done: new Promise<void>((r) => (release = r)) };
    this.inFlight.add(me);
    try {
      if (before.length) await Promise.all(before); // `done` never rejects
      return await fn();
    } finally {
      this.inFlight.delete(me);
      release();
    }
  }

  /** Like {@link ordered} over every chunk, once the group commit is idle too: nothing of the journal is moving. */
  private exclusive<T>(fn: () => Promise<T>): Promise<T> {
    return this.ordered(0, Infinity, async () => {
      while (this.appending || this.syncing) await (this.appending ?? this.syncing);
      return fn();
    });
  }

  private checkOpen(what: string): void {
    if (this.closed) throw new TmError(ErrorCodes.VOLUME_IO, `${what}: journaled volume ${this.path} is closed`);
  }

  /**
   * Start (or, after a restart, continue) journaling generation N: every
   * chunk first written or zeroed from now on is saved before the target
   * changes. Calling it again for the running N is a no-op; a different N
   * while one is begun abandons it (its saved chunks stay saved: they hold
   * the committed image's content, and rollback replays both journals).
   *
   * @throws TmError TM_ERR_INTERNAL when N is not above the committed generation.
   */
  async begin(generation: number): Promise<void> {
    this.checkOpen(`begin(${generation})`);
    if (!Number.isSafeInteger(generation) || generation <= this.committed) {
      throw new TmError(ErrorCodes.INTERNAL, `begin(${generation}): generation ${this.committed} is already committed`);
    }
    await this.exclusive(async () => {
      if (this.failed) throw this.refusal(`begin(${generation})`);
      if (this.current === generation) return;
      await this.closeJournal();
      const had = this.others.findIndex((j) => j.generation === generation);
      const file = journalFile(this.dir, generation);
      let fh: fsp.FileHandle | undefined;
      let j: LiveJournal | undefined;
      try {
        if (had >= 0) {
          j = this.others.splice(had, 1)[0]!;
          fh = await fsp.open(file, fsc.O_RDWR);
          if ((await fh.stat()).size > j.length) {
            // Cut the torn tail before appending after it, or new records would follow garbage.
            await fh.truncate(j.length);
            await fh.datasync();
          }
          this.journal = j;
        } else {
          fh = await fsp.open(file, fsc.O_RDWR | fsc.O_CREAT | fsc.O_TRUNC, 0o600);
          const head = encodeHead({ generation, volumeSize: this.size, chunkSize: this.chunkSize, base: this.committed });
          await writeFully(fh, head, 0);
          await fh.datasync();
          await fsyncDir(this.dir);
          this.journal = { generation, file, length: head.length };
        }
        this.fh = fh;
      } catch (e) {
        await fh?.close().catch(() => {});
        if (j && !this.journal) this.others.push(j); // still on disk, still live
        throw asTmError(e, ErrorCodes.VOLUME_IO, `opening journal ${file}`);
      }
      const alloc = new RoaringBitmap32();
      const allocated = await this.target.allocated(this.chunkSize);
      for (const r of allocated) alloc.addRange(r.offset / this.chunkSize, Math.ceil((r.offset + r.length) / this.chunkSize));
      this.allocatedAtBegin = alloc;
      this.current = generation;
      const presaved = await this.saveHoles(generation, allocated);
      this.o.log?.debug({ generation, continued: had >= 0, presavedHoleRecords: presaved }, 'journal begins');
    });
  }

  /**
   * Save the target's holes at begin: the runs of chunks that no allocated
   * range touches and that are not saved yet, the largest first, at most
   * `presaveHoles` records, as hole records in one append covered by one
   * fdatasync. Rollback punches them, which a hole does not mind, and writes
   * into them then need no record and no fdatasync of their own: an initial
   * sync onto an empty target journals one record in all instead of one per
   * write call, each waited for before its write. Runs that touch a saved
   * chunk are left to the calls. Returns the records made.
   */
  private async saveHoles(gen: number, allocated: ByteRange[]): Promise<number> {
    const limit = this.o.presaveHoles ?? PRESAVED_HOLE_RECORDS;
    if (limit <= 0) return 0;
    const cs = this.chunkSize;
    const chunks = Math.ceil(this.size / cs);
    const runChunks = Math.max(1, Math.floor(MAX_RUN_BYTES / cs));
    let runs: { first: number; end: number }[] = [];
    const gap = (first: number, end: number) => {
      if (first >= end || this.saved.intersectsWithRange(first, end)) return;
      for (let a = first; a < end; a += runChunks) runs.push({ first: a, end: Math.min(end, a + runChunks) });
    };
    let at = 0; // allocated() is ascending and aligned to chunks
    for (const r of allocated) {
      const first = Math.floor(r.offset / cs);
      gap(at, first);
      at = Math.max(at, Math.ceil((r.offset + r.length) / cs));
    }
    gap(at, chunks);
    if (runs.length === 0) return 0;
    if (runs.length > limit) runs = runs.sort((x, y) => y.end - y.first - (x.end - x.first) || x.first - y.first).slice(0, limit).sort((x, y) => x.first - y.first);
    const recs = runs.map((run) => {
      const start = run.first * cs;
      const rec = Buffer.allocUnsafe(RECORD_OVERHEAD);
      writeHeader(rec, 0, RecordKind.HOLE, gen, start, Math.min(run.end * cs, this.size) - start, 0);
      sealRecord(rec, 0, 0);
      return rec;
    });
    await this.groupCommit(recs, recs.length, true);
    for (const run of runs) this.saved.addRange(run.first, run.end);
    return recs.length;
  }

  /**
   * Generation N is committed: the caller flushed the target and recorded N
   * as committed, in that order, before calling this. Deletes every journal
   * file durably; writes are refused until the next {@link begin}.
   *
   * @throws TmError TM_ERR_INTERNAL when N is not the generation begun.
   */
  async commit(generation: number): Promise<void> {
    this.checkOpen(`commit(${generation})`);
    await this.exclusive(async () => {
      if (this.current !== generation) throw new TmError(ErrorCodes.INTERNAL, `commit(${generation}) but ${this.current === null ? 'no generation' : `generation ${this.current}`} is begun`);
      const files = this.liveJournals();
      this.o.log?.debug({ ...this.stats, generation }, 'journal of the generation dropped at commit');
      await this.closeJournal();
      this.others = [];
      this.current = null;
      this.allocatedAtBegin = null;
      this.saved.clear();
      this.committed = generation;
      try {
        for (const j of files) await removeDurably(j.file);
      } catch (e) {
        // What is left is stale (older base) and goes at the next open or rollback.
        throw asTmError(e, ErrorCodes.VOLUME_IO, `deleting the journal of generation ${generation}`);
      }
    });
  }

  private async closeJournal(): Promise<void> {
    const fh = this.fh;
    if (this.journal) this.others.unshift(this.journal);
    this.journal = null;
    this.fh = null;
    this.current = null;
    this.allocatedAtBegin = null;
    if (fh) await fh.close().catch(() => {});
  }

  private refusal(what: string): TmError {
    return new TmError(ErrorCodes.VOLUME_IO, `${what}: the journal of ${this.path} failed earlier (${this.failed!.message}); reopen the volume`, { cause: this.failed });
  }

  allocated(alignTo?: number, within?: ByteRange): Promise<ByteRange[]> {
    return this.target.allocated(alignTo, within);
  }

  allocatedBytes(): Promise<number> {
    return allocatedBytesOf(this.target);
  }

  read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    return this.target.read(offset, length, into);
  }

  /** Write after saving the old content of the chunks it touches first in this generation. */
  async write(offset: number, data: Buffer): Promise<void> {
    await this.guarded(offset, data.length, 'write', false, () => this.target.write(offset, data));
  }

  /**
   * Zero after saving the chunks it touches first in this generation, except
   * those that were holes when the generation began: they read as zeros
   * before and after, so they need no record.
   */
  async zero(offset: number, length: number): Promise<void> {
    await this.guarded(offset, length, 'zero', true, () => this.target.zero(offset, length));
  }

  /** The target's flush: the journal is already durable up to every write issued. */
  flush(): Promise<void> {
    return this.target.flush();
  }

  /** Close the journal file and the target (idempotent); waits for a save in progress. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.exclusive(async () => {
      await this.closeJournal();
      await this.target.close();
    });
  }

  private async guarded(offset: number, length: number, what: string, zeroing: boolean, op: () => Promise<void>): Promise<void> {
    this.checkOpen(what);
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new TmError(ErrorCodes.VOLUME_RANGE, `${what} ${offset}+${length} is outside volume ${this.path} (${this.size} bytes)`);
    }
    if (this.current === null) throw new TmError(ErrorCodes.INTERNAL, `${what} ${offset}+${length} on ${this.path} outside a journaled generation (begin was not called)`);
    if (length === 0) return op();
    const cs = this.chunkSize;
    const first = Math.floor(offset / cs);
    const end = Math.floor((offset + length - 1) / cs) + 1;
    // In order with the calls in flight on the same chunks: a chunk's old
    // content is read before any write to it, and writes to it land in call order.
    await this.ordered(first, end, async () => {
      const ran = await this.save(first, end, `${what} ${offset}+${length}`, zeroing, this.o.unsafeWriteBeforeJournal ? op : null);
      if (!ran) await op();
    });
  }

  /**
   * Save the chunks [first, end) not saved yet (for a zero, not those that
   * were holes at begin): read their old content, queue their records for
   * the group commit, wait until an fdatasync covers them, mark them saved.
   * Runs when no earlier call on these chunks is in flight. With `unsafeOp`
   * (the broken ordering), runs it between reading the old content and
   * queuing the records; returns whether it ran it.
   */
  private async save(first: number, end: number, what: string, zeroing: boolean, unsafeOp: (() => Promise<void>) | null): Promise<boolean> {
    if (this.failed) throw this.refusal(what);
    if (this.current === null || !this.allocatedAtBegin) {
      throw new TmError(ErrorCodes.INTERNAL, `${what} on ${this.path}: generation committed meanwhile`);
    }
    const cs = this.chunkSize;
    if (this.saved.hasRange(first, end)) return false;
    const need = new RoaringBitmap32();
    need.addRange(first, end);
    need.andNotInPlace(this.saved);
    if (zeroing) need.andInPlace(this.allocatedAtBegin);
    if (need.isEmpty) return false;

    const gen = this.current;
    const alloc = this.allocatedAtBegin;
    const sliceChunks = Math.max(1, Math.floor(SLICE_BYTES / cs));
    const runChunks = Math.max(1, Math.floor(MAX_RUN_BYTES / cs));
    // Runs of consecutive chunks [first, end) alike in being allocated at begin or not.
    const runs: { first: number; end: number; allocated: boolean }[] = [];
    for (const i of need) {
      const a = alloc.has(i);
      const last = runs[runs.length - 1];
      if (last && last.end === i && last.allocated === a && last.end - last.first < (a ? sliceChunks : runChunks)) last.end++;
      else runs.push({ first: i, end: i + 1, allocated: a });
    }

    // Records are handed to the group commit APPEND_BYTES at a time (bounds
    // the memory of a long call); in the unsafe mode all of them are kept
    // until after the target write.
    let pending: Buffer[] = [];
    let pendingBytes = 0;
    let pendingRecords = 0;
    const hand = (sync: boolean) => {
      const bufs = pending;
      const records = pendingRecords;
      pending = [];
      pendingBytes = 0;
      pendingRecords = 0;
      return this.groupCommit(bufs, records, sync);
    };
    /** Queue a record; `rec` when the payload was read in place (the header and CRC are filled in here). */
    const push = async (kind: RecordKind, at: number, len: number, payload?: Buffer, rec?: Buffer) => {
      const p = payload ? payload.length : 0;
      rec ??= Buffer.allocUnsafe(RECORD_OVERHEAD + p);
      writeHeader(rec, 0, kind, gen, at, len, p);
      if (payload && payload.buffer !== rec.buffer) payload.copy(rec, RECORD_HEADER);
      sealRecord(rec, 0, p);
      pending.push(rec);
      pendingBytes += rec.length;
      pendingRecords++;
      if (!unsafeOp && pendingBytes >= APPEND_BYTES) await hand(false);
    };

    for (const run of runs) {
      const start = run.first * cs;
      const stop = Math.min(run.end * cs, this.size);
      if (!run.allocated) {
        await push(RecordKind.HOLE, start, stop - start);
        continue;
      }
      // The old content is read straight into the payload of a data record
      // covering the run (a buffer of this call's own: calls on other chunks run meanwhile).
      const rec = Buffer.allocUnsafe(RECORD_OVERHEAD + stop - start);
      const payload = rec.subarray(RECORD_HEADER, RECORD_HEADER + stop - start);
      let old = await this.target.read(start, stop - start, payload);
      if (old.buffer !== payload.buffer || old.byteOffset !== payload.byteOffset) old = Buffer.from(old); // not read in place: no sharing below
      // Consecutive chunks that read as zeros make a zeros record, the others data records.
      const zeros = (at: number) => isAllZero(old.subarray(at, Math.min(at + cs, old.length)));
      for (let from = 0; from < old.length; ) {
        const z = zeros(from);
        let to = from + cs;
        while (to < old.length && zeros(to) === z) to += cs;
        to = Math.min(to, old.length);
        // The usual case, no zero chunk in the run: the record is the buffer read into.
        const whole = !z && from === 0 && to === old.length && old.buffer === rec.buffer;
        await push(z ? RecordKind.ZEROS : RecordKind.DATA, start + from, to - from, z ? undefined : old.subarray(from, to), whole ? rec : undefined);
        from = to;
      }
    }

    if (unsafeOp) {
      await unsafeOp();
      if (this.o.testGapMs) await sleep(this.o.testGapMs);
    }
    await hand(true);
    this.saved.orInPlace(need);
    if (this.o.testGapMs && !unsafeOp) await sleep(this.o.testGapMs);
    return unsafeOp !== null;
  }

  /**
   * The group commit. Queue `bufs` (`records` records) for the next append at
   * the end of the journal's valid prefix; with `sync`, resolve only once an
   * fdatasync that started after that append completed has returned (the
   * records are durable). Appends run one at a time, and so do fdatasyncs,
   * but an append runs while the previous batch's fdatasync does: whatever is
   * queued meanwhile goes into the next batch, so the saves in flight together
   * share one fdatasync. A failed append or fdatasync poisons the wrapper and
   * rejects every call waiting for one (their target writes are not issued).
   */
  private groupCommit(bufs: Buffer[], records: number, sync: boolean): Promise<void> {
    if (this.failed) return Promise.reject(this.failed);
    const q = (this.queued ??= { bufs: [], records: 0, waiters: [] });
    for (const b of bufs) q.bufs.push(b);
    q.records += records;
    const done = new Promise<void>((resolve, reject) => q.waiters.push({ resolve, reject, sync }));
    this.appending ??= this.runAppends();
    return done;
  }

  /** Append batch after batch until none is queued; never rejects (failures go to the waiting calls). */
  private async runAppends(): Promise<void> {
    await null; // never done before `appending` is set; below, the last check and the reset are one step
    try {
      for (let q = this.queued; q; q = this.queued) {
        this.queued = null;
        const j = this.journal;
        const fh = this.fh;
        try {
          if (this.failed) throw this.failed;
          if (!j || !fh) throw new TmError(ErrorCodes.INTERNAL, `journal of ${this.path} closed with records queued`);
          await this.append(j, fh, q.bufs);
        } catch (e) {
          this.fail(e, q.waiters, `appending to journal ${j?.file ?? this.dir}`);
          continue;
        }
        this.records += q.records;
        this.appends++;
        const toSync = q.waiters.filter((w) => w.sync);
        for (const w of q.waiters) if (!w.sync) w.resolve();
        if (toSync.length) {
          this.unsynced.push({ upTo: this.appends, waiters: toSync });
          this.syncing ??= this.runSyncs();
        }
      }
    } finally {
      this.appending = null;
    }
  }

  /** fdatasync until every append a call waits for is covered; never rejects. */
  private async runSyncs(): Promise<void> {
    await null; // as in runAppends
    try {
      while (this.unsynced.length) {
        const upTo = this.appends; // this fdatasync starts after these appends completed
        const fh = this.fh;
        try {
          if (this.failed) throw this.failed;
          if (!fh) throw new TmError(ErrorCodes.INTERNAL, `journal of ${this.path} closed with records to sync`);
          await (this.o.datasync ? this.o.datasync(fh) : fh.datasync());
        } catch (e) {
          const all = this.unsynced.flatMap((u) => u.waiters);
          this.unsynced = [];
          this.fail(e, all, `journal ${this.journal?.file ?? this.dir}`);
          continue;
        }
        this.syncs++;
        while (this.unsynced.length && this.unsynced[0]!.upTo <= upTo) for (const w of this.unsynced.shift()!.waiters) w.resolve();
      }
    } finally {
      this.syncing = null;
    }
  }

  /** The journal failed: poison the wrapper, reject `waiters` and every call queued behind them. */
  private fail(e: unknown, waiters: Waiter[], what: string): void {
    this.failed ??= asTmError(e, ErrorCodes.VOLUME_IO, what);
    const q = this.queued;
    this.queued = null;
    for (const w of [...waiters, ...(q?.waiters ?? [])]) w.reject(this.failed);
  }

  /**
   * Positional append of `bufs` at the end of the valid prefix of `j`, in one
   * writev (records under 64 KiB, such as hole records, are first joined).
   */
  private async append(j: LiveJournal, fh: fsp.FileHandle, bufs: Buffer[]): Promise<void> {
    const iov: Buffer[] = [];
    let small: Buffer[] = [];
    let smallBytes = 0;
    const join = () => {
      if (small.length) iov.push(small.length === 1 ? small[0]! : Buffer.concat(small, smallBytes));
      small = [];
      smallBytes = 0;
    };
    for (const b of bufs) {
      if (b.length >= 65536) {
        join();
        iov.push(b);
      } else {
        small.push(b);
        smallBytes += b.length;
        if (smallBytes >= APPEND_BYTES) join();
      }
    }
    join();
    let bytes = 0;
    for (const b of iov) bytes += b.length;
    let done = 0;
    let from = 0; // first buffer of iov not wholly written
    while (done < bytes) {
      const { bytesWritten } = await fh.writev(iov.slice(from, from + 512), j.length + done);
      done += bytesWritten;
      // Drop what was written: whole buffers, then the written head of a partly written one.
      let left = bytesWritten;
      while (left > 0 && left >= iov[from]!.length) left -= iov[from++]!.length;
      if (left > 0) iov[from] = iov[from]!.subarray(left);
    }
    j.length += bytes;
  }

  /**
   * Restore `target` to the image of the committed generation `o.committed`:
   * replay every live journal of `dir` (newest generation first, records in
   * reverse: data written back, holes and zeros zeroed), flush the target,
   * then delete the journals durably. Stale journals (older base) are
   * deleted unreplayed; a torn tail is ignored. Idempotent: killed at any
   * point and run again, it gives the same image. No journal: a no-op
   * (generation null, the target is not touched). The target must not be
   * open through a JournaledVolume meanwhile (a stopped mirror).
   *
   * @throws TmError TM_ERR_STATE for a journal of another volume size, an
   *   impossible record or a base newer than `o.committed` (nothing is
   *   written then); the target's errors while replaying (the journal stays).
   */
  static async rollback(target: Volume, dir: string, o: { committed: number; log?: Logger }): Promise<RollbackResult> {
    const live = await sortJournals(dir, target.size, o.committed, o.log);
    const result: RollbackResult = { generation: null, generations: [], chunks: 0, bytes: 0 };
    if (!live.length) return result;
    for (const j of live) {
      if (j.fileLength > j.validLength) o.log?.warn({ file: j.file, tornBytes: j.fileLength - j.validLength }, 'journal ends with a torn append (its target writes never happened): ignored');
      const cs = j.head!.chunkSize;
      const fh = await fsp.open(j.file, 'r').catch((e: unknown) => {
        throw asTmError(e, ErrorCodes.STATE, `opening journal ${j.file}`);
      });
      try {
        for (let k = j.records.length - 1; k >= 0; k--) {
          const r = j.records[k]!;
          result.chunks += Math.ceil(r.length / cs);
          if (r.kind !== RecordKind.DATA) {
            await target.zero(r.offset, r.length);
            continue;
          }
          const whole = Buffer.allocUnsafe(RECORD_OVERHEAD + r.payloadLength);
          await readFully(fh, whole, r.at).catch((e: unknown) => {
            throw asTmError(e, ErrorCodes.STATE, `reading journal ${j.file} at ${r.at}`);
          });
          if (native().crc32c(whole.subarray(0, RECORD_HEADER + r.payloadLength)) !== whole.readUInt32LE(RECORD_HEADER + r.payloadLength)) {
            throw new TmError(ErrorCodes.STATE, `journal ${j.file}: record at ${r.at} changed since it was checked`);
          }
          await target.write(r.offset, whole.subarray(RECORD_HEADER, RECORD_HEADER + r.payloadLength));
          result.bytes += r.payloadLength;
        }
      } finally {
        await fh.close();
      }
      result.generations.push(j.generation);
    }
    await target.flush();
    for (const j of live) await removeDurably(j.file);
    result.generation = result.generations[0] ?? null;
    o.log?.info({ ...result, committed: o.committed }, 'rolled back to the committed generation');
    return result;
  }
}
