/**
 * The link case of `npm run bench` (TM_BENCH_ONLY=link; issue 13 §2): the
 * initial sync of two data sets, each a 4 GiB sparse file with 1 GiB
 * allocated in 512 scattered extents, text-like (lz4 keeps about a quarter)
 * and random (incompressible), compared in the same run on the same data
 * with the peers that do the same job:
 *
 * a. Loopback, no shaping, default config: thinmirror (two daemon processes)
 *    against `nbdcopy --flush` between two `nbdkit file` servers over TCP
 *    (source read-only, target a new sparse file), `cp --sparse=always` then
 *    fsync, `rsync --sparse` then fsync, and the stripped pipeline
 *    (bench/stripped.ts: the same read, ws and write parts without codec,
 *    checksum or protocol, the transport's ceiling). Ratios: thinmirror /
 *    stripped (target >= 0.9) and thinmirror / nbdcopy (target >= 0.7).
 * b. A shaped link: namespaces tmlink-a (primary) and tmlink-b (secondary)
 *    joined by a veth pair, a tbf at 1 Gbit/s on tmlink-a's egress, its rate
 *    measured first by a raw TCP transfer (bench/blast.ts). thinmirror's
 *    allocated bytes per second against that rate (text >= 2.5x, random >=
 *    0.9x), and nbdcopy across the same link (nbdcopy and the source's nbdkit
 *    in tmlink-a, the target's nbdkit in tmlink-b).
 *
 * Every run: `sync` first; each daemon's peak RSS (VmHWM, target <= 200 MiB)
 * and CPU seconds per GiB allocated (/proc/PID/stat); the target's sha256
 * against the source's and its allocated bytes (du). nbdkit runs with
 * --exit-with-parent; the namespaces are removed in a finally, on SIGINT and
 * SIGTERM, and leftovers of an earlier run are removed at the start.
 *
 * Environment (bench/link-plan.ts): TM_BENCH_LINK_DATA (text,random),
 * TM_BENCH_LINK_CASE (loopback,shaped), TM_BENCH_LINK_RUNS
 * (thinmirror,stripped,nbdcopy,cp,rsync), each all by default;
 * TM_BENCH_LINK_MBIT (default 1000); TM_BENCH_COMPRESSION (auto|lz4|off:
 * the primary mirror's `compression:`, no key when unset); TM_BENCH_DIR,
 * TM_BENCH_SIZE, TM_BENCH_ALLOCATED as for the other cases.
 */
import { createHash } from 'node:crypto';
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, promises as fsp, rmSync, statSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { DaemonProcess } from '../src/cli/daemon-process.js';
import { loopbackPair, writeLoopbackPair } from '../src/cli/loopback-pair.js';
import { createSampleVolume } from '../src/util/sample.js';
import { SparseFileVolume } from '../src/volume/sparse-file.js';
import { formatBytes } from '../src/util/units.js';
import { freePort } from '../test/helpers/pair-config.js';
import { codecFloor } from './codec-floor.js';
import {
  inNetns,
  LINK_TARGETS,
  linkPlan,
  linkSetupCommands,
  linkTeardownCommands,
  linkVerdicts,
  mbps,
  missingToolsMessage,
  neededTools,
  SHAPED_LINK,
  SHAPED_RUNS,
  shapingVerified,
  tbfSizes,
  unionRanges,
  childCpuSeconds,
  strippedCeiling,
  type DataKind,
  type LinkPlan,
  type LinkRun,
  type RunFigures,
  type Verdict,
} from './link-plan.js';
import { cpuSeconds, peakRssBytes, writeResult } from './results.js';

const GiB = 1024 ** 3;
const HERE = path.dirname(fileURLToPath(import.meta.url));
/** Bytes the raw TCP transfer sends across the shaped link (about 2 s at 1 Gbit/s). */
const BLAST_BYTES = 256 * 1024 * 1024;

/** Figures of one run: the common ones plus whatever the tool adds (daemons' RSS and CPU...). */
type Run = RunFigures & Record<string, unknown>;

function run(cmd: string[], what = cmd.join(' ')): void {
  const r = spawnSync(cmd[0]!, cmd.slice(1), { stdio: ['ignore', 'ignore', 'pipe'] });
  if (r.status !== 0) throw new Error(`${what} failed (${r.status ?? r.signal}): ${r.stderr?.toString().trim()}`);
}

/** `cmd` run by bash, which then prints its children's CPU times (`times`) on stdout. */
function withTimes(cmd: string[]): string[] {
  return ['bash', '-c', '"$@"; s=$?; times; exit $s', 'bash', ...cmd];
}

function hasCommand(c: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${c}`], { stdio: 'ignore' }).status === 0;
}

/** Remove the shaped link if it exists (a leftover of an earlier run, or ours). */
function teardownLink(): void {
  const present = spawnSync('ip', ['netns', 'list']).stdout?.toString() ?? '';
  for (const cmd of linkTeardownCommands(SHAPED_LINK)) {
    if (new RegExp(`^${cmd[3]}( |$)`, 'm').test(present)) spawnSync(cmd[0]!, cmd.slice(1), { stdio: 'ignore' });
  }
}

/** Children this bench started (nbdkit, the stripped pipeline, the blast); killed by pid on the way out. */
class Children {
  private readonly live = new Set<ChildProcess>();

  /** `cmd` with its stderr appended to `log` (or dropped), its stdout piped only when `stdout` (to read it with {@link lines}). */
  spawn(cmd: string[], o: { log?: string; stdout?: boolean } = {}): ChildProcess {
    const c = spawn(cmd[0]!, cmd.slice(1), { stdio: ['ignore', o.stdout ? 'pipe' : 'ignore', 'pipe'] });
    closed.set(c, new Promise((resolve) => c.once('close', (code) => resolve(code))));
    this.live.add(c);
    c.once('exit', () => this.live.delete(c));
    const out = o.log;
    if (out) c.stderr!.on('data', (d: Buffer) => void fsp.appendFile(out, d).catch(() => {}));
    else c.stderr!.resume();
    return c;
  }

  killAll(): void {
    for (const c of this.live) c.kill('SIGKILL');
  }
}

/** The lines a child prints, as they come. */
function lines(c: ChildProcess): AsyncIterableIterator<string> & { all: string[] } {
  const all: string[] = [];
  let buf = '';
  const waiting: ((v: IteratorResult<string>) => void)[] = [];
  let ended = false;
  const queue: string[] = [];
  const push = (l: string) => {
    all.push(l);
    const w = waiting.shift();
    if (w) w({ value: l, done: false });
    else queue.push(l);
  };
  c.stdout!.on('data', (d: Buffer) => {
    buf += d.toString();
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      push(buf.slice(0, i));
      buf = buf.slice(i + 1);
    }
  });
  c.once('close', () => {
    ended = true;
    if (buf) push(buf);
    for (const w of waiting.splice(0)) w({ value: undefined, done: true });
  });
  const it = {
    all,
    next(): Promise<IteratorResult<string>> {
      if (queue.length) return Promise.resolve({ value: queue.shift()!, done: false });
      if (ended) return Promise.resolve({ value: undefined, done: true });
      return new Promise((resolve) => waiting.push(resolve));
    },
    [Symbol.asyncIterator]() {
      return it;
    },
  };
  return it;
}

async function expectLine(it: AsyncIterableIterator<string>, what: string, c: ChildProcess): Promise<string> {
  const r = await it.next();
  if (r.done) throw new Error(`${what} ended (${c.exitCode ?? c.signalCode}) before printing a line`);
  return r.value;
}

/** Each child's exit code, once its output is closed too (its last line read). */
const closed = new WeakMap<ChildProcess, Promise<number | null>>();

function exited(c: ChildProcess): Promise<number | null> {
  return closed.get(c)!;
}

async function waitFile(file: string, timeoutMs: number, what: string, c: ChildProcess): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!existsSync(file) || statSync(file).size === 0) {
    if (c.exitCode !== null || c.signalCode !== null) throw new Error(`${what} exited (${c.exitCode ?? c.signalCode}) before it was ready`);
    if (Date.now() > end) throw new Error(`${what} not ready after ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Where a run happens: on loopback, or the primary side in one namespace and the secondary in the other. */
interface Place {
  shaped: boolean;
  /** Namespaces of the sending and the receiving side (null: the bench's own). */
  nsPrimary: string | null;
  nsSecondary: string | null;
  /** Address the receiving side listens on. */
  host: string;
}

const LOOPBACK: Place = { shaped: false, nsPrimary: null, nsSecondary: null, host: '127.0.0.1' };
const SHAPED: Place = { shaped: true, nsPrimary: SHAPED_LINK.nsPrimary, nsSecondary: SHAPED_LINK.nsSecondary, host: SHAPED_LINK.addrSecondary };

interface DataSet {
  kind: DataKind;
  source: string;
  sizeBytes: number;
  allocatedBytes: number;
}

class LinkBench {
  readonly daemons: DaemonProcess[] = [];
  readonly children = new Children();
  private n = 0;

  constructor(
    readonly plan: LinkPlan,
    readonly dir: string,
  ) {}

  /** A fresh directory for one run. */
  private async runDir(label: string): Promise<string> {
    const d = path.join(this.dir, `${++this.n}-${label}`);
    await fsp.mkdir(d);
    return d;
  }

  /** After a run: the target against the source (sha256, allocated bytes), then the target removed. */
  private async check(ds: DataSet, target: string, seconds: number): Promise<RunFigures> {
    const targetAllocatedBytes = statSync(target).blocks * 512;
    const identical = await sameImage(ds.source, target);
    await fsp.rm(target);
    execFileSync('sync');
    return { seconds, allocatedBytes: ds.allocatedBytes, identical, targetAllocatedBytes };
  }

  async thinmirror(ds: DataSet, where: Place): Promise<Run> {
    const dir = await this.runDir(`thinmirror-${ds.kind}${where.shaped ? '-shaped' : ''}`);
    const target = path.join(dir, 'target.img');
    const port = where.shaped ? 7300 + this.n : await freePort();
    const pair = loopbackPair({ dir, port, mirrors: [{ name: 'bench', source: ds.source, target }], interval: '1h' });
    pair.secondary.listen = { host: where.host, port };
    // Plain ws:// across the veth as on loopback (nbdcopy's NBD is plain too): the config asks to say so.
    if (where.shaped) for (const m of [...pair.primary.mirrors, ...pair.secondary.mirrors]) m.insecure = true;
    for (const m of pair.primary.mirrors) {
      m.peer = `ws://${where.host}:${port}`;
      if (this.plan.compression) m.compression = this.plan.compression;
    }
    const cfg = await writeLoopbackPair(pair);
    execFileSync('sync');
    const secondary = new DaemonProcess(cfg.secondary, cfg.secondaryState, path.join(dir, 'secondary.log'), [], {}, inNetns(where.nsSecondary));
    this.daemons.push(secondary);
    try {
      await secondary.waitReady();
      const t0 = performance.now();
      const primary = new DaemonProcess(cfg.primary, cfg.primaryState, path.join(dir, 'primary.log'), [], {}, inNetns(where.nsPrimary));
      this.daemons.push(primary);
      const st = await primary.waitFor(
        (s) => {
          const m = s.mirrors[0]!;
          if (m.error) throw new Error(`mirror failed: ${m.error.code}: ${m.error.message}`);
          return m.committedGeneration >= 1 && m.state === 'in-sync';
        },
        600_000,
        'the initial sync',
        25,
      );
      const seconds = (performance.now() - t0) / 1000;
      const m = st.mirrors[0]!;
      const figures = {
        peakRssPrimaryBytes: peakRssBytes(primary.pid),
        peakRssSecondaryBytes: peakRssBytes(secondary.pid),
        cpuSecondsPrimary: cpuSeconds(primary.pid),
        cpuSecondsSecondary: cpuSeconds(secondary.pid),
        // The generation alone, from its detection to its commit (the primary's own clock): without process start and handshake.
        generationSeconds: m.lastCycle?.durationSeconds ?? null,
        payloadBytes: m.sentBytes,
        wireBytes: m.wireBytes,
        wireRatio: m.wireBytes / ds.allocatedBytes,
        compression: this.plan.compression ?? '(default)',
      };
      await Promise.all([primary.stop(), secondary.stop()]);
      return { ...(await this.check(ds, target, seconds)), ...figures, note: 'from starting the primary process to generation 1 committed (process start, handshake and the final flush included)' };
    } finally {
      await Promise.all(this.daemons.splice(0).map((d) => d.stop()));
    }
  }

  /** The stripped pipeline; `checks`: with the per-byte work of thinmirror's design (bench/stripped.ts). */
  async stripped(ds: DataSet, checks = false): Promise<Run> {
    const dir = await this.runDir(`stripped${checks ? '-checks' : ''}-${ds.kind}`);
    const more = checks ? ['checks'] : [];
    const target = path.join(dir, 'target.img');
    const port = await freePort();
    const script = path.join(HERE, 'stripped.ts');
    const size = statSync(ds.source).size;
    const recv = this.children.spawn([process.execPath, '--import', 'tsx', script, 'receive', '127.0.0.1', String(port), target, String(size), ...more], { log: path.join(dir, 'receiver.log'), stdout: true });
    const recvOut = lines(recv);
    if ((await expectLine(recvOut, 'the stripped receiver', recv)) !== 'listening') throw new Error(`the stripped receiver: ${recvOut.all.join('\n')}`);
    execFileSync('sync');
    const t0 = performance.now();
    const send = this.children.spawn([process.execPath, '--import', 'tsx', script, 'send', `ws://127.0.0.1:${port}`, ds.source, ...more], { log: path.join(dir, 'sender.log'), stdout: true });
    const sendOut = lines(send);
    const [sc, rc] = await Promise.all([exited(send), exited(recv)]);
    const wall = (performance.now() - t0) / 1000;
    if (sc !== 0 || rc !== 0) throw new Error(`the stripped pipeline failed (sender ${sc}, receiver ${rc}); logs in ${dir}`);
    const s = JSON.parse(sendOut.all.at(-1)!) as { seconds: number; cpuSeconds: number; maxRssBytes: number; frames: number };
    const r = JSON.parse(recvOut.all.at(-1)!) as { cpuSeconds: number; maxRssBytes: number };
    return {
      ...(await this.check(ds, target, s.seconds)),
      wallSeconds: wall,
      frames: s.frames,
      cpuSecondsSender: s.cpuSeconds,
      cpuSecondsReceiver: r.cpuSeconds,
      peakRssSenderBytes: s.maxRssBytes,
      peakRssReceiverBytes: r.maxRssBytes,
      note: "the sender's clock from its connect to the receiver's answer after the final flush (module loading excluded; wallSeconds includes node and tsx start)",
    };
  }

  /** An `nbdkit file` server in `ns` on host:port; resolves once it listens (its pidfile is written). */
  private async nbdkit(dir: string, name: string, file: string, ns: string | null, host: string, port: number, readOnly: boolean): Promise<ChildProcess> {
    const pidfile = path.join(dir, `${name}.pid`);
    const c = this.children.spawn(
      [...inNetns(ns), 'nbdkit', '--foreground', '--exit-with-parent', '--pidfile', pidfile, '--ipaddr', host, '--port', String(port), ...(readOnly ? ['--readonly'] : []), 'file', `file=${file}`],
      { log: path.join(dir, `${name}.log`) },
    );
    await waitFile(pidfile, 10_000, `nbdkit (${name})`, c);
    return c;
  }

  async nbdcopy(ds: DataSet, where: Place): Promise<Run> {
    const dir = await this.runDir(`nbdcopy-${ds.kind}${where.shaped ? '-shaped' : ''}`);
    const target = path.join(dir, 'target.img');
    await fsp.writeFile(target, '');
    await fsp.truncate(target, statSync(ds.source).size);
    const srcPort = where.shaped ? 7400 + this.n : await freePort();
    const dstPort = where.shaped ? 7500 + this.n : await freePort();
    const srcHost = '127.0.0.1'; // nbdcopy runs beside the source (the primary's side)
    const src = await this.nbdkit(dir, 'nbdkit-source', ds.source, where.nsPrimary, srcHost, srcPort, true);
    const dst = await this.nbdkit(dir, 'nbdkit-target', target, where.nsSecondary, where.host, dstPort, false);
    try {
      execFileSync('sync');
      const t0 = performance.now();
      const cp = this.children.spawn([...inNetns(where.nsPrimary), ...withTimes(['nbdcopy', '--flush', `nbd://${srcHost}:${srcPort}`, `nbd://${where.host}:${dstPort}`])], { log: path.join(dir, 'nbdcopy.log'), stdout: true });
      const out = lines(cp);
      const code = await exited(cp);
      const seconds = (performance.now() - t0) / 1000;
      if (code !== 0) throw new Error(`nbdcopy failed (${code}): ${await fsp.readFile(path.join(dir, 'nbdcopy.log'), 'utf8').catch(() => '')}`);
      const figures = {
        cpuSecondsCopy: childCpuSeconds(out.all.join('\n')),
        cpuSecondsSourceServer: cpuSeconds(src.pid!),
        cpuSecondsTargetServer: cpuSeconds(dst.pid!),
        peakRssTargetServerBytes: peakRssBytes(dst.pid!),
      };
      src.kill('SIGTERM');
      dst.kill('SIGTERM');
      await Promise.all([exited(src), exited(dst)]);
      return { ...(await this.check(ds, target, seconds)), ...figures, command: 'nbdcopy --flush nbd://source nbd://target (nbdkit file on both ends)' };
    } finally {
      src.kill('SIGKILL');
      dst.kill('SIGKILL');
    }
  }

  /** A local copy command, then fsync of the copy (`sync FILE`), timed together. */
  async local(ds: DataSet, label: 'cp' | 'rsync'): Promise<Run> {
    const dir = await this.runDir(`${label}-${ds.kind}`);
    const target = path.join(dir, 'target.img');
    const cmd = label === 'cp' ? ['cp', '--sparse=always', ds.source, target] : ['rsync', '--sparse', ds.source, target];
    execFileSync('sync');
    const t0 = performance.now();
    const r = spawnSync(withTimes(cmd)[0]!, withTimes(cmd).slice(1), { stdio: ['ignore', 'pipe', 'pipe'] });
    if (r.status !== 0) throw new Error(`${cmd.join(' ')} failed (${r.status ?? r.signal}): ${r.stderr?.toString().trim()}`);
    const copySeconds = (performance.now() - t0) / 1000;
    run(['sync', target]);
    const seconds = (performance.now() - t0) / 1000;
    return { ...(await this.check(ds, target, seconds)), copySeconds, cpuSecondsCopy: childCpuSeconds(r.stdout.toString()), command: `${cmd.slice(0, -2).join(' ')} SOURCE TARGET && sync TARGET` };
  }

  /** The raw TCP rate across the shaped link: primary's namespace to the secondary's. */
  async blast(): Promise<{ bytes: number; seconds: number; bytesPerSecond: number }> {
    const script = path.join(HERE, 'blast.ts');
    const port = 7299;
    const sink = this.children.spawn([...inNetns(SHAPED.nsSecondary), process.execPath, '--import', 'tsx', script, 'sink', SHAPED.host, String(port)], { stdout: true });
    const out = lines(sink);
    if ((await expectLine(out, 'the blast sink', sink)) !== 'listening') throw new Error(`the blast sink: ${out.all.join('\n')}`);
    const source = this.children.spawn([...inNetns(SHAPED.nsPrimary), process.execPath, '--import', 'tsx', script, 'source', SHAPED.host, String(port), String(BLAST_BYTES)]);
    const [a, b] = await Promise.all([exited(source), exited(sink)]);
    if (a !== 0 || b !== 0) throw new Error(`the raw TCP transfer failed (source ${a}, sink ${b})`);
    return JSON.parse(out.all.at(-1)!) as { bytes: number; seconds: number; bytesPerSecond: number };
  }
}

/**
 * Whether two images hold the same bytes: equal sizes, and the same sha256 of
 * each over the union of both allocation maps (SEEK_DATA/SEEK_HOLE), outside
 * which both read zeros. The same answer as the sha256 of each whole file,
 * reading the allocated GiB rather than 4.
 */
export async function sameImage(a: string, b: string): Promise<boolean> {
  const va = await SparseFileVolume.open(a, { readOnly: true });
  const vb = await SparseFileVolume.open(b, { readOnly: true });
  try {
    if (va.size !== vb.size) return false;
    const ranges = unionRanges([...(await va.allocated()), ...(await vb.allocated())]);
    const [ha, hb] = [createHash('sha256'), createHash('sha256')];
    const [ba, bb] = [Buffer.allocUnsafe(4 << 20), Buffer.allocUnsafe(4 << 20)];
    for (const r of ranges) {
      for (let o = r.offset; o < r.offset + r.length; o += ba.length) {
        const n = Math.min(ba.length, r.offset + r.length - o);
        const [x, y] = await Promise.all([va.read(o, n, ba.subarray(0, n)), vb.read(o, n, bb.subarray(0, n))]);
        ha.update(x);
        hb.update(y);
      }
    }
    return ha.digest('hex') === hb.digest('hex');
  } finally {
    await Promise.all([va.close(), vb.close()]);
  }
}

async function makeDataSet(dir: string, kind: DataKind, size: number, allocated: number): Promise<DataSet> {
  const source = path.join(dir, `source-${kind}.img`);
  await createSampleVolume(source, { size, allocated, extents: 512, seed: kind === 'text' ? 42 : 43, content: kind });
  return { kind, source, sizeBytes: size, allocatedBytes: statSync(source).blocks * 512 };
}

export async function linkBench(): Promise<void> {
  const plan = linkPlan(process.env);
  const missing = neededTools(plan).filter((t) => !hasCommand(t.command));
  const msg = missingToolsMessage(missing);
  if (msg) throw new Error(msg);
  if (plan.shaped && process.getuid?.() !== 0) throw new Error('the shaped link needs root (ip netns, tc); run as root or set TM_BENCH_LINK_CASE=loopback');
  const size = Number(process.env.TM_BENCH_SIZE ?? 4 * GiB);
  const allocated = Number(process.env.TM_BENCH_ALLOCATED ?? 1 * GiB);
  const dir = await fsp.mkdtemp(path.join(process.env.TM_BENCH_DIR ?? os.tmpdir(), 'tm-link-'));
  const bench = new LinkBench(plan, dir);
  const onSignal = (sig: NodeJS.Signals) => {
    bench.children.killAll();
    for (const d of bench.daemons) d.kill();
    if (plan.shaped) teardownLink();
    if (!process.env.TM_BENCH_KEEP) rmSync(dir, { recursive: true, force: true });
    // Exit here: re-raising the signal would not end the process while tsx listens for it too.
    process.exit(sig === 'SIGINT' ? 130 : 143);
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  if (plan.shaped) teardownLink();
  const tbf = tbfSizes(plan.rateBits);
  const sets: Record<string, unknown>[] = [];
  let link: { bytes: number; seconds: number; bytesPerSecond: number } | null = null;
  let shaping: ReturnType<typeof shapingVerified> | null = null;
  const verdicts: Verdict[] = [];
  const say = (l: string) => console.log(l);
  try {
    console.log(`link bench: ${plan.data.join(', ')} data; ${[plan.loopback && 'loopback', plan.shaped && 'shaped'].filter(Boolean).join(' and ')}; runs ${plan.runs.join(', ')}; compression ${plan.compression ?? '(no key)'} (${dir})`);
    if (plan.shaped) {
      for (const cmd of linkSetupCommands(SHAPED_LINK, plan.rateBits)) run(cmd);
      link = await bench.blast();
      shaping = shapingVerified(link.bytesPerSecond, plan.rateBits);
      say(
        `shaped link: tbf ${plan.rateBits / 1e6} Mbit/s (burst ${formatBytes(tbf.burstBytes)}, limit ${formatBytes(tbf.limitBytes)}) on ${SHAPED_LINK.devPrimary}; ` +
          `raw TCP measured ${(link.bytesPerSecond / 1e6).toFixed(1)} MB/s of payload (${formatBytes(link.bytes)} in ${link.seconds.toFixed(2)} s), ` +
          `${(100 * shaping.ratio).toFixed(0)}% of the ${(shaping.expectedBytesPerSecond / 1e6).toFixed(1)} MB/s the tbf lets through${shaping.ok ? '' : ': THE SHAPING IS NOT WHAT WAS ASKED, the shaped figures are suspect'}`,
      );
      say('  (the link rate below is this measured rate)');
    }
    for (const kind of plan.data) {
      console.log(`creating the ${kind} data set: ${formatBytes(size)} with ${formatBytes(allocated)} in 512 extents`);
      const ds = await makeDataSet(dir, kind, size, allocated);
      const codec = await codecFloor(ds.source, 0.4);
      const loopback: Partial<Record<LinkRun, Run>> = {};
      const shaped: Partial<Record<LinkRun, Run>> = {};
      const one = async (name: LinkRun, where: Place): Promise<Run> => {
        console.log(`  ${kind} ${where.shaped ? 'shaped' : 'loopback'}: ${name}`);
        if (name === 'thinmirror') return bench.thinmirror(ds, where);
        if (name === 'nbdcopy') return bench.nbdcopy(ds, where);
        if (name === 'stripped') return bench.stripped(ds);
        if (name === 'checked') return bench.stripped(ds, true);
        return bench.local(ds, name);
      };
      if (plan.loopback) for (const name of plan.runs) loopback[name] = await one(name, LOOPBACK);
      if (plan.shaped) for (const name of plan.runs.filter((r) => SHAPED_RUNS.includes(r))) shaped[name] = await one(name, SHAPED);
      await fsp.rm(ds.source);
      const rss: Record<string, number> = {};
      for (const [where, r] of [['loopback', loopback.thinmirror], ['shaped', shaped.thinmirror]] as const) {
        if (!r) continue;
        rss[`${where} primary`] = r.peakRssPrimaryBytes as number;
        rss[`${where} secondary`] = r.peakRssSecondaryBytes as number;
      }
      const v = linkVerdicts(kind, { loopback, shaped, linkBytesPerSecond: link?.bytesPerSecond, peakRss: rss });
      verdicts.push(...v);
      const ceiling = strippedCeiling(loopback);
      sets.push({ kind, allocatedBytes: ds.allocatedBytes, lz4Ratio: codec.wireRatio, codec, loopback, shaped, verdicts: v, ceilingVsStripped: ceiling });
      printSet(say, kind, ds, codec.wireRatio, loopback, shaped, link, v, ceiling);
    }
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    await Promise.all(bench.daemons.map((d) => d.stop()));
    bench.children.killAll();
    if (plan.shaped) teardownLink();
    if (process.env.TM_BENCH_KEEP) console.log(`kept ${dir}`);
    else await fsp.rm(dir, { recursive: true, force: true });
  }
  const result = {
    date: new Date().toISOString(),
    host: { cpus: os.cpus().length, model: os.cpus()[0]?.model, node: process.version, kernel: os.release(), fs: spawnSync('findmnt', ['-n', '-o', 'FSTYPE', '-T', dir]).stdout?.toString().trim() },
    plan,
    volume: { sizeBytes: size, allocatedBytes: allocated, extents: 512 },
    link: plan.shaped ? { rateBits: plan.rateBits, ...tbf, measured: link, shaping } : null,
    sets,
    verdicts,
    targets: LINK_TARGETS,
  };
  const out = await writeResult('link', result);
  const failed = verdicts.filter((v) => !v.met);
  console.log('');
  console.log(`targets: ${verdicts.length - failed.length} of ${verdicts.length} met${failed.length ? `; not met: ${failed.map((v) => `${v.name} ${v.value.toFixed(2)} (target ${v.kind === 'min' ? '>=' : '<='} ${v.target})`).join('; ')}` : ''}`);
  console.log(`results: ${out}`);
  if (verdicts.some((v) => v.name.endsWith('image identical'))) process.exitCode = 1;
}

function printSet(
  say: (l: string) => void,
  kind: DataKind,
  ds: DataSet,
  lz4Ratio: number,
  loopback: Partial<Record<LinkRun, Run>>,
  shaped: Partial<Record<LinkRun, Run>>,
  link: { bytesPerSecond: number } | null,
  v: Verdict[],
  ceiling: number | null,
): void {
  const gib = ds.allocatedBytes / GiB;
  const row = (name: string, r: Run | undefined, ref?: number) => {
    if (!r) return;
    const cpu =
      r.cpuSecondsPrimary !== undefined
        ? `  (generation alone ${(r.generationSeconds as number | null)?.toFixed(2) ?? '?'} s)  CPU primary ${((r.cpuSecondsPrimary as number) / gib).toFixed(2)} s/GiB, secondary ${((r.cpuSecondsSecondary as number) / gib).toFixed(2)} s/GiB; peak RSS ${formatBytes(r.peakRssPrimaryBytes as number)} / ${formatBytes(r.peakRssSecondaryBytes as number)}; wire/allocated ${(r.wireRatio as number).toFixed(3)}`
        : r.cpuSecondsSender !== undefined
          ? `  CPU sender ${((r.cpuSecondsSender as number) / gib).toFixed(2)} s/GiB, receiver ${((r.cpuSecondsReceiver as number) / gib).toFixed(2)} s/GiB`
          : r.cpuSecondsTargetServer !== undefined
            ? `  CPU nbdcopy ${((r.cpuSecondsCopy as number) / gib).toFixed(2)} s/GiB, nbdkit source ${((r.cpuSecondsSourceServer as number) / gib).toFixed(2)} s/GiB, target ${((r.cpuSecondsTargetServer as number) / gib).toFixed(2)} s/GiB`
            : r.cpuSecondsCopy !== undefined
              ? `  CPU ${((r.cpuSecondsCopy as number) / gib).toFixed(2)} s/GiB (all its processes)`
              : '';
    const vsLink = ref ? ` = ${(mbps(r) / (ref / 1e6)).toFixed(2)}x link` : '';
    say(
      `  ${name.padEnd(22)} ${r.seconds.toFixed(2).padStart(6)} s ${mbps(r).toFixed(0).padStart(5)} MB/s${vsLink}  identical=${r.identical} target du ${formatBytes(r.targetAllocatedBytes)}${cpu}`,
    );
  };
  say('');
  say(`${kind} data: ${formatBytes(ds.allocatedBytes)} allocated in 512 extents of a ${formatBytes(ds.sizeBytes)} file, lz4 keeps ${(100 * lz4Ratio).toFixed(1)}% (${(1 / lz4Ratio).toFixed(2)}:1)`);
  if (Object.keys(loopback).length) {
    say(' loopback (allocated bytes per second):');
    for (const [name, r] of Object.entries(loopback)) row(name === 'cp' ? 'cp --sparse + fsync' : name === 'rsync' ? 'rsync --sparse + fsync' : name === 'nbdcopy' ? 'nbdcopy --flush' : name === 'checked' ? 'stripped + checks' : name, r);
  }
  if (Object.keys(shaped).length) {
    say(` shaped link (${link ? `${(link.bytesPerSecond / 1e6).toFixed(1)} MB/s measured` : '?'}):`);
    for (const [name, r] of Object.entries(shaped)) row(name === 'nbdcopy' ? 'nbdcopy --flush' : name, r, link?.bytesPerSecond);
  }
  for (const x of v) say(`  ${x.met ? 'met    ' : 'NOT MET'} ${x.name}: ${x.value.toFixed(2)} (target ${x.kind === 'min' ? '>=' : '<='} ${x.target})`);
  if (ceiling !== null) {
    say(`  ceiling ${kind}: stripped with checks / stripped (loopback): ${ceiling.toFixed(2)}: thinmirror / stripped cannot exceed it here without beating the stripped pipeline at the rest`);
  }
}
