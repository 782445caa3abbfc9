/**
 * Thin-pool metadata, read through thin-provisioning-tools (`thin_dump`,
 * `thin_delta`), for `tracking.mode: lvm-thin`.
 *
 * The tools print XML. Their output for a big pool is large (one element per
 * run of mapped blocks), so it is parsed as it streams, one line at a time:
 * every element the tools emit sits on a line of its own (checked against
 * thin-provisioning-tools 0.9.0, the C++ tools, and the XML writers of the 1.x
 * Rust tools). Forms parsed:
 *
 * thin_dump:
 * ```
 * <superblock uuid="" time="1" transaction="2" flags="0" version="2" data_block_size="128" nr_data_blocks="1000">
 *   <device dev_id="1" mapped_blocks="5" transaction="0" creation_time="0" snap_time="1">
 *     <range_mapping origin_begin="0" data_begin="0" length="3" time="0"/>
 *     <single_mapping origin_block="10" data_block="3" time="0"/>
 * ```
 * thin_delta (without --verbose):
 * ```
 * <superblock uuid="" time="1" transaction="2" data_block_size="128" nr_data_blocks="1000">
 *   <diff left="1" right="2">
 *     <same begin="0" length="2"/>
 *     <different begin="2" length="1"/>
 *     <left_only begin="20" length="1"/>
 *     <right_only begin="30" length="1"/>
 * ```
 * `data_block_size` is in 512-byte sectors (a bare number in both tool
 * generations; a trailing " sectors" is accepted too). Mapping positions and
 * lengths are in thin blocks of that size.
 */
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { ErrorCodes, TmError } from '../errors.js';
import type { ByteRange } from '../volume/volume.js';
import { RoaringBitmap32 } from './bitmap-store.js';

const SECTOR = 512;

/** A run of thin blocks [begin, begin + length). */
export interface BlockRange {
  begin: number;
  length: number;
}

export interface ThinDumpResult {
  /** Thin block size in bytes (the superblock's data_block_size × 512). */
  dataBlockSize: number;
  /** Mapped thin blocks of the device, ascending, adjacent runs merged. */
  mapped: BlockRange[];
}

export interface ThinDeltaResult {
  dataBlockSize: number;
  /**
   * Thin blocks whose mapping differs between the two devices (`different`,
   * `left_only`, `right_only`; `same` is left out), ascending, adjacent runs
   * merged.
   */
  changed: BlockRange[];
}

export interface ThinToolOptions {
  /**
   * Read the pool's metadata snapshot (`-m`: the root the kernel holds after
   * `reserve_metadata_snap`) instead of the live superblock. Required on the
   * metadata device of an active pool: without it the tools open the device
   * exclusively and see metadata the kernel is changing under them.
   */
  metadataSnap?: boolean;
  signal?: AbortSignal;
}

/** Where the tools live when PATH (e.g. a non-login root shell) leaves sbin out. */
const EXTRA_PATH = ['/usr/local/sbin', '/usr/sbin', '/sbin'];

/** PATH with the sbin directories appended, so that spawn finds thin_* and lvm tools. */
export function toolEnv(): NodeJS.ProcessEnv {
  const parts = (process.env.PATH ?? '').split(':').filter((p) => p !== '');
  for (const p of EXTRA_PATH) if (!parts.includes(p)) parts.push(p);
  return { ...process.env, PATH: parts.join(':'), LC_ALL: 'C' };
}

/** Which package provides a program, for the "not installed" message. */
function packageOf(cmd: string): string {
  if (cmd.startsWith('thin_')) return 'thin-provisioning-tools';
  if (cmd === 'dmsetup') return 'dmsetup (Debian/Ubuntu) or device-mapper (RHEL/Fedora)';
  if (cmd.startsWith('lv') || cmd.startsWith('vg') || cmd === 'lvm') return 'lvm2';
  return cmd;
}

/** "cmd arg1 arg2" for messages (arguments are quoted when they hold spaces). */
export function commandLine(cmd: string, args: readonly string[]): string {
  return [cmd, ...args].map((a) => (/[\s"']/.test(a) ? JSON.stringify(a) : a)).join(' ');
}

/** What a failing command printed on stderr, reduced to its first and last non-empty line. */
export function stderrSummary(stderr: string): string {
  const lines = stderr.split('\n').map((l) => l.trim()).filter((l) => l !== '');
  if (lines.length === 0) return 'no stderr';
  const first = lines[0]!;
  const last = lines[lines.length - 1]!;
  return lines.length === 1 ? `stderr: ${last}` : `stderr: ${first} … ${last}`;
}

/** Keep at most this much of a child's stderr (its head and its tail). */
const STDERR_KEEP = 8192;

export interface RunOptions {
  signal?: AbortSignal;
  /** Called for every line of stdout (without the newline); stdout is not kept when given. */
  onLine?: (line: string) => void;
}

/**
 * Run `cmd args` without a shell. stdout goes line by line to `onLine` (or is
 * collected and returned when there is none); a non-zero exit or a signal is a
 * TmError LVM naming the command line, its exit status and stderr; a missing
 * program is TOOL_MISSING naming the package to install; an abort kills the
 * child and is ABORTED. An exception thrown by `onLine` kills the child and is
 * rethrown.
 */
export function runTool(cmd: string, args: readonly string[], o: RunOptions = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    const line = commandLine(cmd, args);
    if (o.signal?.aborted) {
      reject(new TmError(ErrorCodes.ABORTED, `${line}: aborted`));
      return;
    }
    const child = spawn(cmd, [...args], { stdio: ['ignore', 'pipe', 'pipe'], env: toolEnv() });
    let failure: unknown;
    let stdout = '';
    let stderrHead = '';
    let stderrTail = '';
    const fail = (e: unknown) => {
      failure ??= e;
      child.kill('SIGKILL');
    };
    const onAbort = () => fail(new TmError(ErrorCodes.ABORTED, `${line}: aborted`));
    o.signal?.addEventListener('abort', onAbort, { once: true });

    const rl = createInterface({ input: child.stdout, crlfDelay: Infinity });
    rl.on('line', (l) => {
      if (failure !== undefined) return;
      if (o.onLine) {
        try {
          o.onLine(l);
        } catch (e) {
          fail(e);
        }
      } else {
        stdout += l + '\n';
      }
    });
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (d: string) => {
      if (stderrHead.length < STDERR_KEEP / 2) stderrHead += d;
      else stderrTail = (stderrTail + d).slice(-STDERR_KEEP / 2);
    });
    // Both 'error' (spawn failed) and 'close' may come; settle once.
    let settled = false;
    const settle = (e: unknown) => {
      if (settled) return;
      settled = true;
      o.signal?.removeEventListener('abort', onAbort);
      if (e === undefined) resolve(stdout);
      else reject(e);
    };
    child.on('error', (e: NodeJS.ErrnoException) => {
      if (e.code === 'ENOENT') {
        settle(new TmError(ErrorCodes.TOOL_MISSING, `${cmd} is not installed (looked in PATH and ${EXTRA_PATH.join(', ')}): install ${packageOf(cmd)}`, { cause: e }));
      } else {
        settle(new TmError(ErrorCodes.LVM, `${line}: cannot run: ${e.message}`, { cause: e }));
      }
    });
    // 'close' comes after stdout and stderr have ended, so every line was seen.
    child.on('close', (code, signal) => {
      if (failure !== undefined) return settle(failure);
      if (code === 0) return settle(undefined);
      const status = signal ? `killed by ${signal}` : `exit status ${code}`;
      settle(new TmError(ErrorCodes.LVM, `${line} failed (${status}); ${stderrSummary(stderrHead + stderrTail)}`));
    });
  });
}

/** One XML element of the tools' output: its name and attributes. */
export type Element = { name: string; attrs: Map<string, string> };

/** Attributes of the first XML element on a line: its name and attributes, or null. */
export function parseElement(line: string): Element | null {
  const m = /^\s*<([A-Za-z_][\w-]*)((?:\s+[\w-]+="[^"]*")*)\s*\/?>/.exec(line);
  if (!m) return null;
  const attrs = new Map<string, string>();
  for (const a of m[2]!.matchAll(/([\w-]+)="([^"]*)"/g)) attrs.set(a[1]!, a[2]!);
  return { name: m[1]!, attrs };
}

function intAttr(el: Element, key: string, what: string): number {
  const raw = el.attrs.get(key);
  const v = raw === undefined ? NaN : Number(raw);
  if (raw === undefined || !/^\d+$/.test(raw) || !Number.isSafeInteger(v)) {
    throw new TmError(ErrorCodes.LVM, `${what}: <${el.name}> has no valid ${key} (${raw === undefined ? 'missing' : JSON.stringify(raw)})`);
  }
  return v;
}

/** data_block_size="128" (sectors; "128 sectors" accepted) → bytes. */
function blockSizeAttr(el: Element, what: string): number {
  const raw = el.attrs.get('data_block_size') ?? '';
  const m = /^(\d+)(?:\s*sectors)?$/.exec(raw.trim());
  const sectors = m ? Number(m[1]) : NaN;
  if (!m || !Number.isSafeInteger(sectors) || sectors <= 0) {
    throw new TmError(ErrorCodes.LVM, `${what}: <superblock> has no valid data_block_size (${JSON.stringify(raw)})`);
  }
  return sectors * SECTOR;
}

/** Appends ranges, merging one that starts where the previous ended; checks ascending order. */
class RangeCollector {
  readonly ranges: BlockRange[] = [];
  constructor(private readonly what: string) {}
  add(begin: number, length: number): void {
    if (length <= 0) return;
    const last = this.ranges[this.ranges.length - 1];
    if (last) {
      const end = last.begin + last.length;
      if (begin < end) throw new TmError(ErrorCodes.LVM, `${this.what}: ranges out of order (${begin} after ${last.begin}+${last.length})`);
      if (begin === end) {
        last.length += length;
        return;
      }
    }
    this.ranges.push({ begin, length });
  }
}

/**
 * What the thin_dump and thin_delta parsers share: one element per line,
 * `<superblock>` with the data block size, one container element (`<device>`
 * or `<diff>`) holding the entries, and `</superblock>` at the end. Anything
 * unknown is refused: elements of other formats or versions (e.g. <def>,
 * <ref>) would change the meaning.
 */
abstract class ThinXmlParser {
  protected dataBlockSize = 0;
  protected readonly out: RangeCollector;
  /** Containers seen, and whether one is open now. */
  protected containers = 0;
  private inside = false;
  protected ended = false;

  constructor(
    protected readonly what: string,
    private readonly container: string,
  ) {
    this.out = new RangeCollector(what);
  }

  line(line: string): void {
    const t = line.trim();
    if (t === '') return;
    if (t.startsWith('</')) {
      if (t.startsWith(`</${this.container}`)) this.inside = false;
      if (t.startsWith('</superblock')) this.ended = true;
      return;
    }
    const el = parseElement(t);
    if (!el) throw new TmError(ErrorCodes.LVM, `${this.what}: cannot parse line ${JSON.stringify(t.slice(0, 200))}`);
    if (el.name === 'superblock') {
      this.dataBlockSize = blockSizeAttr(el, this.what);
    } else if (el.name === this.container) {
      this.opened(el);
      this.inside = !t.endsWith('/>');
      this.containers++;
    } else if (this.isEntry(el.name)) {
      if (!this.inside) throw new TmError(ErrorCodes.LVM, `${this.what}: <${el.name}> outside <${this.container}>`);
      this.entry(el);
    } else {
      throw new TmError(ErrorCodes.LVM, `${this.what}: unexpected element <${el.name}>`);
    }
  }

  /** The container element opened (checks its attributes). */
  protected opened(_el: Element): void {}
  protected abstract isEntry(name: string): boolean;
  /** One entry inside the container. */
  protected abstract entry(el: Element): void;
}

/**
 * Stream parser for `thin_dump --dev-id N` output: feed lines, then `result()`.
 * Exported for tests; {@link thinDump} runs the tool through it.
 */
export class ThinDumpParser extends ThinXmlParser {
  constructor(
    private readonly devId: number,
    what = 'thin_dump output',
  ) {
    super(what, 'device');
  }

  protected override opened(el: Element): void {
    const id = intAttr(el, 'dev_id', this.what);
    if (id !== this.devId) throw new TmError(ErrorCodes.LVM, `${this.what}: holds device ${id}, asked for ${this.devId}`);
  }

  protected isEntry(name: string): boolean {
    return name === 'range_mapping' || name === 'single_mapping';
  }

  protected entry(el: Element): void {
    if (el.name === 'range_mapping') this.out.add(intAttr(el, 'origin_begin', this.what), intAttr(el, 'length', this.what));
    else this.out.add(intAttr(el, 'origin_block', this.what), 1);
  }

  result(): ThinDumpResult {
    if (this.dataBlockSize === 0 || !this.ended) throw new TmError(ErrorCodes.LVM, `${this.what}: incomplete (no <superblock> or no </superblock>)`);
    if (this.containers !== 1) throw new TmError(ErrorCodes.LVM, `${this.what}: device ${this.devId} not found in the pool metadata`);
    return { dataBlockSize: this.dataBlockSize, mapped: this.out.ranges };
  }
}

const DELTA_ENTRIES = new Set(['same', 'different', 'left_only', 'right_only']);

/** Stream parser for `thin_delta` output (without --verbose). Exported for tests. */
export class ThinDeltaParser extends ThinXmlParser {
  constructor(what = 'thin_delta output') {
    super(what, 'diff');
  }

  protected isEntry(name: string): boolean {
    return DELTA_ENTRIES.has(name);
  }

  protected entry(el: Element): void {
    // The --verbose form nests <range> elements in these: not asked for, not accepted.
    if (!el.attrs.has('begin')) throw new TmError(ErrorCodes.LVM, `${this.what}: <${el.name}> without begin (verbose output?)`);
    const begin = intAttr(el, 'begin', this.what);
    const length = intAttr(el, 'length', this.what);
    if (el.name !== 'same') this.out.add(begin, length);
  }

  result(): ThinDeltaResult {
    if (this.dataBlockSize === 0 || !this.ended || this.containers !== 1) throw new TmError(ErrorCodes.LVM, `${this.what}: incomplete (no <superblock>, <diff> or </superblock>)`);
    return { dataBlockSize: this.dataBlockSize, changed: this.out.ranges };
  }
}

function checkDevId(id: number, what: string): void {
  if (!Number.isSafeInteger(id) || id < 0) throw new TmError(ErrorCodes.INTERNAL, `${what}: invalid thin device id ${id}`);
}

/**
 * `thin_dump [-m] --dev-id DEV METADATA`: the thin blocks device `devId` maps.
 * `metadataPath`: the pool's metadata device (`/dev/mapper/VG-POOL_tmeta`) or a
 * metadata file.
 */
export async function thinDump(metadataPath: string, devId: number, o: ThinToolOptions = {}): Promise<ThinDumpResult> {
  checkDevId(devId, 'thin_dump');
  const args = [...(o.metadataSnap ? ['-m'] : []), '--dev-id', String(devId), metadataPath];
  const parser = new ThinDumpParser(devId, `thin_dump of device ${devId} in ${metadataPath}`);
  await runTool('thin_dump', args, { signal: o.signal, onLine: (l) => parser.line(l) });
  return parser.result();
}

/**
 * `thin_delta [-m] --snap1 A --snap2 B METADATA`: thin blocks whose mapping
 * differs between devices A and B. Blocks that are mapped on one side only
 * count as changed (written, or discarded); blocks mapped to the same data
 * block on both sides do not (the tools compare data block numbers, not
 * contents: a block rewritten in place in a device that shares nothing would
 * not show, which is why both sides must be snapshots, never the live origin).
 */
export async function thinDelta(metadataPath: string, snap1DevId: number, snap2DevId: number, o: ThinToolOptions = {}): Promise<ThinDeltaResult> {
  checkDevId(snap1DevId, 'thin_delta');
  checkDevId(snap2DevId, 'thin_delta');
  const args = [...(o.metadataSnap ? ['-m'] : []), '--snap1', String(snap1DevId), '--snap2', String(snap2DevId), metadataPath];
  const parser = new ThinDeltaParser(`thin_delta of devices ${snap1DevId} and ${snap2DevId} in ${metadataPath}`);
  await runTool('thin_delta', args, { signal: o.signal, onLine: (l) => parser.line(l) });
  return parser.result();
}

function checkSizes(dataBlockSize: number, other: number, otherName: string): void {
  if (!Number.isSafeInteger(dataBlockSize) || dataBlockSize <= 0) throw new TmError(ErrorCodes.INTERNAL, `invalid thin block size ${dataBlockSize}`);
  if (!Number.isSafeInteger(other) || other < 0) throw new TmError(ErrorCodes.INTERNAL, `invalid ${otherName} ${other}`);
}

/**
 * Chunks touched by thin-block ranges: a thin block covering any part of a
 * chunk marks the chunk. Either size may be the larger and neither need divide
 * the other. Chunks at or past `chunkCount` are dropped (a thin device is
 * rounded up to whole thin blocks; the volume need not be). Adds to `into`
 * when given.
 */
export function blockRangesToChunks(
  ranges: Iterable<BlockRange>,
  dataBlockSize: number,
  chunkSize: number,
  chunkCount: number,
  into: RoaringBitmap32 = new RoaringBitmap32(),
): RoaringBitmap32 {
  checkSizes(dataBlockSize, chunkSize, 'chunk size');
  if (chunkSize <= 0) throw new TmError(ErrorCodes.INTERNAL, `invalid chunk size ${chunkSize}`);
  for (const r of ranges) {
    const startByte = r.begin * dataBlockSize;
    const endByte = (r.begin + r.length) * dataBlockSize;
    if (!Number.isSafeInteger(endByte)) throw new TmError(ErrorCodes.LVM, `thin block range ${r.begin}+${r.length} is beyond any volume this can mirror`);
    const first = Math.floor(startByte / chunkSize);
    const end = Math.min(chunkCount, Math.ceil(endByte / chunkSize));
    if (end > first) into.addRange(first, end);
  }
  return into;
}

/** Thin-block ranges as byte ranges, clipped to `size` (ascending, merged as given). */
export function blockRangesToBytes(ranges: Iterable<BlockRange>, dataBlockSize: number, size: number): ByteRange[] {
  checkSizes(dataBlockSize, size, 'volume size');
  const out: ByteRange[] = [];
  for (const r of ranges) {
    const start = r.begin * dataBlockSize;
    if (start >= size) break;
    const end = Math.min(size, (r.begin + r.length) * dataBlockSize);
    out.push({ offset: start, length: end - start });
  }
  return out;
}
