/**
 * The pure parts of the link bench (bench/link.ts): what it runs, the shaped
 * link's commands, the tools it needs, and its ratios and verdicts. Nothing
 * here runs a command; test/unit/link-plan.test.ts checks them.
 */

export type DataKind = 'text' | 'random';
export type LinkRun = 'thinmirror' | 'stripped' | 'checked' | 'nbdcopy' | 'cp' | 'rsync';
export type Compression = 'auto' | 'lz4' | 'off';

export const DATA_KINDS: readonly DataKind[] = ['text', 'random'];
export const LINK_RUNS: readonly LinkRun[] = ['thinmirror', 'stripped', 'checked', 'nbdcopy', 'cp', 'rsync'];
/** The runs that also cross the shaped link (the others are local copies or the loopback ceiling). */
export const SHAPED_RUNS: readonly LinkRun[] = ['thinmirror', 'nbdcopy'];

export interface LinkPlan {
  data: DataKind[];
  loopback: boolean;
  shaped: boolean;
  runs: LinkRun[];
  /** Passed to the primary's mirror as `compression:` when set; no key otherwise. */
  compression: Compression | null;
  /** The tbf rate of the shaped link, in bits per second. */
  rateBits: number;
}

function pick<T extends string>(name: string, value: string | undefined, all: readonly T[]): T[] {
  if (value === undefined || value === '' || value === 'all') return [...all];
  const out: T[] = [];
  for (const v of value.split(',').map((s) => s.trim())) {
    if (!(all as readonly string[]).includes(v)) throw new Error(`${name}=${value}: expected a comma-separated list of ${all.join(', ')} (or all)`);
    if (!out.includes(v as T)) out.push(v as T);
  }
  return out;
}

/**
 * The link bench's selection from the environment:
 * TM_BENCH_LINK_DATA (text,random), TM_BENCH_LINK_CASE (loopback,shaped),
 * TM_BENCH_LINK_RUNS (thinmirror,stripped,checked,nbdcopy,cp,rsync), all by default;
 * TM_BENCH_LINK_MBIT (the shaped link's rate, default 1000);
 * TM_BENCH_COMPRESSION (auto|lz4|off, unset by default).
 */
export function linkPlan(env: Record<string, string | undefined>): LinkPlan {
  const cases = pick('TM_BENCH_LINK_CASE', env.TM_BENCH_LINK_CASE, ['loopback', 'shaped'] as const);
  const c = env.TM_BENCH_COMPRESSION;
  if (c !== undefined && c !== '' && !['auto', 'lz4', 'off'].includes(c)) throw new Error(`TM_BENCH_COMPRESSION=${c}: expected auto, lz4 or off`);
  const mbit = Number(env.TM_BENCH_LINK_MBIT ?? 1000);
  if (!Number.isFinite(mbit) || mbit <= 0) throw new Error(`TM_BENCH_LINK_MBIT=${env.TM_BENCH_LINK_MBIT}: expected a positive number of Mbit/s`);
  return {
    data: pick('TM_BENCH_LINK_DATA', env.TM_BENCH_LINK_DATA, DATA_KINDS),
    loopback: cases.includes('loopback'),
    shaped: cases.includes('shaped'),
    runs: pick('TM_BENCH_LINK_RUNS', env.TM_BENCH_LINK_RUNS, LINK_RUNS),
    compression: c ? (c as Compression) : null,
    rateBits: mbit * 1e6,
  };
}

/** The Debian package of each command the plan needs. */
const PACKAGES: Record<string, string> = {
  nbdkit: 'nbdkit',
  nbdcopy: 'libnbd-bin',
  rsync: 'rsync',
  cp: 'coreutils',
  sync: 'coreutils',
  truncate: 'coreutils',
  ip: 'iproute2',
  tc: 'iproute2',
};

/** The commands `plan` runs, each with its Debian package. */
export function neededTools(plan: LinkPlan): { command: string; pkg: string }[] {
  const cmds = new Set<string>(['sync']);
  const has = (r: LinkRun) => plan.runs.includes(r);
  if (plan.loopback && has('nbdcopy')) ['nbdkit', 'nbdcopy'].forEach((c) => cmds.add(c));
  if (plan.loopback && has('cp')) cmds.add('cp');
  if (plan.loopback && has('rsync')) cmds.add('rsync');
  if (plan.shaped) {
    ['ip', 'tc'].forEach((c) => cmds.add(c));
    if (has('nbdcopy')) ['nbdkit', 'nbdcopy'].forEach((c) => cmds.add(c));
  }
  return [...cmds].map((command) => ({ command, pkg: PACKAGES[command]! }));
}

/** The message naming what to install for the missing commands, or null when none is missing. */
export function missingToolsMessage(missing: { command: string; pkg: string }[]): string | null {
  if (missing.length === 0) return null;
  const pkgs = [...new Set(missing.map((m) => m.pkg))];
  return `the link bench needs ${missing.map((m) => m.command).join(', ')}: apt-get install ${pkgs.join(' ')}`;
}

/** The shaped link: two namespaces joined by a veth pair; the primary's side shapes its egress. */
export interface ShapedLink {
  nsPrimary: string;
  nsSecondary: string;
  devPrimary: string;
  devSecondary: string;
  addrPrimary: string;
  addrSecondary: string;
}

export const SHAPED_LINK: ShapedLink = {
  nsPrimary: 'tmlink-a',
  nsSecondary: 'tmlink-b',
  devPrimary: 'tmlink-a0',
  devSecondary: 'tmlink-b0',
  addrPrimary: '10.213.77.1',
  addrSecondary: '10.213.77.2',
};

/**
 * The tbf's burst and queue limit for `rateBits`: the burst holds 4 ms at the
 * rate (the token refill a 250 Hz timer needs, tbf's own rule of thumb) and at
 * least 128 KiB (two 64 KiB GSO segments of the veth); the queue holds 20 ms
 * at the rate and at least 4 bursts, enough for TCP on a link whose RTT is
 * well under a millisecond, so that the rate is what limits it, not drops.
 */
export function tbfSizes(rateBits: number): { burstBytes: number; limitBytes: number } {
  const perSecond = rateBits / 8;
  const burstBytes = Math.max(128 * 1024, Math.ceil((perSecond * 0.004) / 1024) * 1024);
  const limitBytes = Math.max(4 * burstBytes, Math.ceil((perSecond * 0.02) / 1024) * 1024);
  return { burstBytes, limitBytes };
}

/** The `ip`/`tc` argument lists that build the shaped link, in order. */
export function linkSetupCommands(l: ShapedLink, rateBits: number): string[][] {
  const { burstBytes, limitBytes } = tbfSizes(rateBits);
  return [
    ['ip', 'netns', 'add', l.nsPrimary],
    ['ip', 'netns', 'add', l.nsSecondary],
    ['ip', 'link', 'add', l.devPrimary, 'netns', l.nsPrimary, 'type', 'veth', 'peer', 'name', l.devSecondary, 'netns', l.nsSecondary],
    ['ip', '-n', l.nsPrimary, 'addr', 'add', `${l.addrPrimary}/24`, 'dev', l.devPrimary],
    ['ip', '-n', l.nsSecondary, 'addr', 'add', `${l.addrSecondary}/24`, 'dev', l.devSecondary],
    ['ip', '-n', l.nsPrimary, 'link', 'set', 'lo', 'up'],
    ['ip', '-n', l.nsSecondary, 'link', 'set', 'lo', 'up'],
    ['ip', '-n', l.nsPrimary, 'link', 'set', l.devPrimary, 'up'],
    ['ip', '-n', l.nsSecondary, 'link', 'set', l.devSecondary, 'up'],
    tbfCommand(l, rateBits, burstBytes, limitBytes),
  ];
}

/** The tbf on the primary's egress of the veth. */
export function tbfCommand(l: ShapedLink, rateBits: number, burstBytes: number, limitBytes: number): string[] {
  return ['tc', '-n', l.nsPrimary, 'qdisc', 'replace', 'dev', l.devPrimary, 'root', 'tbf', 'rate', `${Math.round(rateBits)}bit`, 'burst', String(burstBytes), 'limit', String(limitBytes)];
}

/** The commands that remove the shaped link (deleting a namespace deletes its veth end, the pair and its qdisc). */
export function linkTeardownCommands(l: ShapedLink): string[][] {
  return [
    ['ip', 'netns', 'del', l.nsPrimary],
    ['ip', 'netns', 'del', l.nsSecondary],
  ];
}

/** The prefix that runs a command inside namespace `ns`. */
export function inNetns(ns: string | null): string[] {
  return ns ? ['ip', 'netns', 'exec', ns] : [];
}

/** What one run measured. */
export interface RunFigures {
  seconds: number;
  allocatedBytes: number;
  identical: boolean;
  targetAllocatedBytes: number;
  /** thinmirror: the generation alone (detection to commit, the primary's clock), without process start and handshake. */
  generationSeconds?: number | null;
}

/** Allocated bytes per second of a run, in MB/s (10^6). */
export function mbps(r: { seconds: number; allocatedBytes: number }): number {
  return r.allocatedBytes / 1e6 / r.seconds;
}

/** The targets. */
export const LINK_TARGETS = {
  vsStripped: 0.9,
  vsNbdcopy: 0.7,
  shapedText: 2.5,
  shapedRandom: 0.9,
  peakRssBytes: 200 * 1024 * 1024,
} as const;

export interface Verdict {
  name: string;
  value: number;
  target: number;
  /** `min`: value must be at least target; `max`: at most. */
  kind: 'min' | 'max';
  met: boolean;
}

function verdict(name: string, value: number, target: number, kind: 'min' | 'max' = 'min'): Verdict {
  return { name, value, target, kind, met: kind === 'min' ? value >= target : value <= target };
}

/**
 * The ratios of one data set and whether each meets its target: thinmirror's
 * throughput against the stripped pipeline's and nbdcopy's on loopback (each
 * a ratio of allocated bytes per second), and on the shaped link thinmirror's
 * rate against the link rate measured by the raw TCP transfer.
 */
export function linkVerdicts(
  kind: DataKind,
  r: {
    loopback?: Partial<Record<LinkRun, RunFigures>>;
    shaped?: Partial<Record<LinkRun, RunFigures>>;
    linkBytesPerSecond?: number;
    /** Each daemon's peak RSS in bytes, by a name of the daemon (e.g. `loopback primary`). */
    peakRss?: Record<string, number>;
  },
): Verdict[] {
  const out: Verdict[] = [];
  const tm = r.loopback?.thinmirror;
  if (tm && r.loopback?.stripped) {
    out.push(verdict(`${kind}: thinmirror / stripped (loopback)`, mbps(tm) / mbps(r.loopback.stripped), LINK_TARGETS.vsStripped));
    // The stripped pipeline's clock starts at its connect: compared with thinmirror's generation alone too.
    if (tm.generationSeconds) out.push(verdict(`${kind}: thinmirror generation alone / stripped (loopback)`, r.loopback.stripped.seconds / tm.generationSeconds, LINK_TARGETS.vsStripped));
  }
  if (tm && r.loopback?.nbdcopy) out.push(verdict(`${kind}: thinmirror / nbdcopy (loopback)`, mbps(tm) / mbps(r.loopback.nbdcopy), LINK_TARGETS.vsNbdcopy));
  const stm = r.shaped?.thinmirror;
  if (stm && r.linkBytesPerSecond) {
    const target = kind === 'text' ? LINK_TARGETS.shapedText : LINK_TARGETS.shapedRandom;
    out.push(verdict(`${kind}: thinmirror / link rate (shaped)`, (stm.allocatedBytes / stm.seconds) / r.linkBytesPerSecond, target));
  }
  for (const [who, rss] of Object.entries(r.peakRss ?? {})) out.push(verdict(`${kind}: peak RSS of the ${who} (MiB)`, rss / 1024 / 1024, LINK_TARGETS.peakRssBytes / 1024 / 1024, 'max'));
  for (const runs of [r.loopback, r.shaped]) {
    for (const [name, f] of Object.entries(runs ?? {})) {
      if (f && !f.identical) out.push(verdict(`${kind}: ${name} image identical`, 0, 1));
    }
  }
  return out;
}

/**
 * The stripped pipeline with checks against the stripped pipeline (loopback),
 * or null without both: not a target but a ceiling. The checked run does the
 * per-byte work thinmirror's design requires on top of the stripped one
 * (SHA-256 chunk digests, CRC-32C and GMAC on both sides), so on the same
 * machine thinmirror / stripped cannot exceed it unless it beats the stripped
 * pipeline at the rest.
 */
export function strippedCeiling(loopback: Partial<Record<LinkRun, RunFigures>> | undefined): number | null {
  if (!loopback?.checked || !loopback.stripped) return null;
  return mbps(loopback.checked) / mbps(loopback.stripped);
}

/** Byte ranges merged where they overlap or touch, in ascending order. */
export function unionRanges(ranges: { offset: number; length: number }[]): { offset: number; length: number }[] {
  const out: { offset: number; length: number }[] = [];
  for (const r of [...ranges].filter((x) => x.length > 0).sort((a, b) => a.offset - b.offset)) {
    const last = out.at(-1);
    if (last && r.offset <= last.offset + last.length) last.length = Math.max(last.length, r.offset + r.length - last.offset);
    else out.push({ offset: r.offset, length: r.length });
  }
  return out;
}

/**
 * The children's user + system CPU seconds from bash's `times` output (its
 * second line, e.g. `0m1.250s 0m0.500s`); NaN when absent.
 */
export function childCpuSeconds(timesOutput: string): number {
  const ls = timesOutput.trim().split('\n').filter((l) => /^\d+m[\d.]+s \d+m[\d.]+s$/.test(l.trim()));
  const last = ls.at(-1);
  if (!last || ls.length < 2) return NaN;
  return last
    .trim()
    .split(' ')
    .map((t) => {
      const m = /^(\d+)m([\d.]+)s$/.exec(t)!;
      return Number(m[1]) * 60 + Number(m[2]);
    })
    .reduce((a, b) => a + b, 0);
}

/** TCP payload per byte the tbf counts: a 1448-byte segment (MSS with timestamps) in a 1514-byte Ethernet frame. */
export const TCP_PAYLOAD_SHARE = 1448 / 1514;

/**
 * Whether the raw TCP rate measured across the link shows the shaping at work:
 * within 85%..105% of the payload rate the tbf allows (`rateBits` counts
 * Ethernet frames, headers included).
 */
export function shapingVerified(measuredBytesPerSecond: number, rateBits: number): { expectedBytesPerSecond: number; ratio: number; ok: boolean } {
  const expectedBytesPerSecond = (rateBits / 8) * TCP_PAYLOAD_SHARE;
  const ratio = measuredBytesPerSecond / expectedBytesPerSecond;
  return { expectedBytesPerSecond, ratio, ok: ratio >= 0.85 && ratio <= 1.05 };
}
