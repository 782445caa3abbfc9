import { promises as fsp } from 'node:fs';
import { isIP } from 'node:net';
import * as path from 'node:path';
import { isNode, LineCounter, parseDocument, type Document } from 'yaml';
import { z } from 'zod';
import { ErrorCodes, TmError } from '../errors.js';
import { isValidChunkSize, parseDuration, parseRate, parseSize } from '../util/units.js';
import type { TlsFiles } from '../wire/tls.js';
import { STATE_DIR_FILES } from './state-dir.js';

/** Every default of the config in one place. Sizes in bytes, durations in seconds. */
export const DEFAULTS = {
  logLevel: 'info',
  chunkSize: 64 * 1024,
  maxInFlight: 16 * 1024 * 1024,
  maxExtent: 1024 * 1024,
  checkpointBytes: 64 * 1024 * 1024,
  checkpointInterval: 5,
  reconnectMin: 1,
  reconnectMax: 30,
  trackingMode: 'auto',
  trackingInterval: 30,
  consistency: 'auto',
  compression: 'auto',
} as const;

export type { MirrorConfig } from '../mirror/settings.js';
import { COMPRESSION_MODES, CONSISTENCY_MODES, type MirrorConfig } from '../mirror/settings.js';

/** The key mirrors to one peer share a bandwidth bucket under: the URL's host:port. */
export function peerKey(url: string): string {
  const u = new URL(url);
  return `${u.hostname}:${u.port || (u.protocol === 'wss:' ? '443' : '80')}`;
}

/** 127.0.0.0/8, ::1 (or ::ffff:127.x.y.z) and localhost: traffic that never leaves the host. */
export function isLoopbackHost(host: string): boolean {
  const h = host.toLowerCase().replace(/^\[(.*)\]$/, '$1');
  if (h === 'localhost' || h.endsWith('.localhost')) return true;
  if (isIP(h) === 4) return h.startsWith('127.');
  if (isIP(h) === 6) return h === '::1' || h === '0:0:0:0:0:0:0:1' || /^::ffff:127\./.test(h);
  return false;
}

export { TRACKING_MODES, type TrackingMode } from '../track/source.js';
import { TRACKING_MODES, type TrackingMode } from '../track/source.js';

export interface DaemonConfig {
  node: { name: string; stateDir: string; logLevel: string };
  listen?: { host: string; port: number };
  /** Optional TCP listener serving GET /metrics (Prometheus text); the control socket serves it too. */
  metrics?: { host: string; port: number };
  auth: { pskFile: string };
  /** The node's TLS identity: the listener's (server) and, unless a mirror has its own, every wss:// primary's (client). */
  tls?: Omit<TlsFiles, 'origin'>;
  /** Settings per peer (secondary host) shared by every primary mirror to it. */
  peers?: { url: string; bandwidth?: number }[];
  mirrors: MirrorConfig[];
  /** The file this config was read from. */
  sourcePath: string;
}

const NAME = /^[A-Za-z0-9._-]{1,64}$/;

const name = z.string().regex(NAME, 'expected 1..64 characters of A-Z a-z 0-9 . _ -');

/** A mirror's name: a letter or a digit, then letters, digits, `.`, `_`, `-`; at most 64 characters. */
export const MIRROR_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
/**
 * A mirror's name is also its directory under node.stateDir
 * (`stateDir/<name>/state.json`): never `.` or `..` (the state directory or
 * its parent), nor a file the daemon keeps there.
 */
const mirrorName = z.string().superRefine((v, ctx) => {
  const problem =
    v === '.' || v === '..'
      ? `"${v}" cannot name a mirror: the mirror's state lives in node.stateDir/<name>/`
      : STATE_DIR_FILES.includes(v)
        ? `"${v}" is a file the daemon keeps in node.stateDir, where each mirror has a directory of its name: choose another name`
        : !MIRROR_NAME.test(v)
          ? `expected a letter or a digit, then letters, digits, ".", "_", "-" (at most 64 characters), got ${JSON.stringify(v)}`
          : null;
  if (problem) ctx.addIssue({ code: 'custom', message: problem });
});
/** A schema for a string or number read by `parse`; its error becomes the key's problem. */
function parsed(parse: (v: string | number) => number) {
  return z.union([z.string(), z.number()]).transform((v, ctx) => {
    try {
      return parse(v);
    } catch (e) {
      ctx.addIssue({ code: 'custom', message: (e as Error).message });
      return z.NEVER;
    }
  });
}
const size = parsed(parseSize);
const duration = parsed((v) => {
  const s = parseDuration(v);
  if (s <= 0) throw new Error(`expected a duration above zero, got ${JSON.stringify(v)}`);
  return s;
});
const rate = parsed(parseRate);
const chunkSize = size.refine(isValidChunkSize, { message: 'expected a power of two between 4KiB and 4MiB' });
const pathString = z.string().min(1, 'expected a path');

const tlsSchema = z.strictObject({ ca: pathString, cert: pathString, key: pathString });

/** A ws:// or wss:// URL that also parses as a URL (with a valid host and port), so later rules may take it apart. */
const peerUrl = z
  .string()
  .regex(/^wss?:\/\/[^\s/]+(\/\S*)?$/, 'expected a ws:// or wss:// URL such as ws://10.0.0.2:7890')
  .refine((u) => URL.canParse(u), { message: 'expected a ws:// or wss:// URL with a valid host and port, such as ws://10.0.0.2:7890' });

const mirrorSchema = z.strictObject({
  name: mirrorName,
  role: z.enum(['primary', 'secondary']),
  volume: pathString,
  peer: peerUrl.optional(),
  chunkSize: chunkSize.optional(),
  maxInFlight: size.optional(),
  maxExtent: size.optional(),
  checkpoint: z.strictObject({ bytes: size.optional(), interval: duration.optional() }).optional(),
  consistency: z.enum(CONSISTENCY_MODES).optional(),
  compression: z.enum(COMPRESSION_MODES).optional(),
  consistencyDir: pathString.optional(),
  reconnect: z.strictObject({ min: duration.optional(), max: duration.optional() }).optional(),
  tracking: z.strictObject({ mode: z.enum(TRACKING_MODES).optional(), interval: duration.optional() }).optional(),
  lvm: z.strictObject({ pool: z.string().regex(/^[A-Za-z0-9+_.-]+\/[A-Za-z0-9+_.-]+$/, 'expected VG/POOL, e.g. vg0/pool0') }).optional(),
  bandwidth: rate.optional(),
  tls: tlsSchema.optional(),
  insecure: z.boolean().optional(),
});

const configSchema = z.strictObject({
  node: z.strictObject({
    name,
    stateDir: pathString,
    logLevel: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).optional(),
  }),
  listen: z.strictObject({ host: z.string().min(1), port: z.number().int().min(1).max(65535) }).optional(),
  metrics: z.strictObject({ host: z.string().min(1), port: z.number().int().min(1).max(65535) }).optional(),
  auth: z.strictObject({ pskFile: pathString }),
  tls: tlsSchema.optional(),
  peers: z.array(z.strictObject({ url: peerUrl, bandwidth: rate.optional() })).optional(),
  mirrors: z.array(mirrorSchema).min(1, 'expected at least one mirror'),
});

/** Alias nodes a config may expand (the yaml package's default): a real config has none or a few. */
const MAX_ALIAS_COUNT = 100;

type Problem = { path: (string | number)[]; message: string };

/** "mirrors[1].chunkSize" */
function keyPath(p: (string | number)[]): string {
  return p.map((k, i) => (typeof k === 'number' ? `[${k}]` : i === 0 ? k : `.${k}`)).join('') || '(top level)';
}

/** Line:column of the deepest node that exists along `p`. */
function position(doc: Document, lc: LineCounter, p: (string | number)[]): string {
  for (let n = p.length; n >= 0; n--) {
    const node = n === 0 ? doc.contents : doc.getIn(p.slice(0, n), true);
    if (isNode(node) && node.range) {
      const { line, col } = lc.linePos(node.range[0]);
      return `${line}:${col}`;
    }
  }
  return '1:1';
}

/**
 * Parse and validate a config. Every problem is reported (one line each) in one
 * TmError(TM_ERR_CONFIG) naming the file, line:column, key and what was expected.
 * Relative paths resolve against the config file's directory.
 */
export function parseConfig(text: string, sourcePath: string): DaemonConfig {
  const lc = new LineCounter();
  const doc = parseDocument(text, { lineCounter: lc, prettyErrors: false, uniqueKeys: true });
  if (doc.errors.length > 0) {
    const lines = doc.errors.map((e) => {
      const pos = lc.linePos(e.pos[0]);
      return `${sourcePath}:${pos.line}:${pos.col}: YAML: ${e.message.split('\n')[0]}`;
    });
    throw new TmError(ErrorCodes.CONFIG, `invalid config:\n${lines.join('\n')}`);
  }
  let raw: unknown;
  try {
    // An alias expanding into more than maxAliasCount nodes (a "billion laughs" document) throws here.
    raw = doc.toJS({ maxAliasCount: MAX_ALIAS_COUNT }) as unknown;
  } catch (e) {
    const msg = (e as Error).message;
    const why = /alias count/i.test(msg) ? `${msg}: an alias expands into more than ${MAX_ALIAS_COUNT} nodes` : msg;
    throw new TmError(ErrorCodes.CONFIG, `invalid config:\n${sourcePath}: YAML: ${why}`, { cause: e });
  }
  const parsed = configSchema.safeParse(raw ?? {});
  const problems: Problem[] = [];
  if (!parsed.success) {
    for (const issue of parsed.error.issues) {
      const p = issue.path.filter((k): k is string | number => typeof k !== 'symbol');
      if (issue.code === 'unrecognized_keys') {
        for (const k of issue.keys) problems.push({ path: [...p, k], message: `unknown key (a typo?)` });
      } else {
        problems.push({ path: p, message: issue.message });
      }
    }
  }
  const dir = path.dirname(path.resolve(sourcePath));
  const abs = (p: string) => path.resolve(dir, p);
  let config: DaemonConfig | undefined;
  if (parsed.success) {
    const c = parsed.data;
    const tlsPaths = (t: { ca: string; cert: string; key: string }) => ({ ca: abs(t.ca), cert: abs(t.cert), key: abs(t.key) });
    const nodeTls = c.tls ? tlsPaths(c.tls) : undefined;
    /** The TLS files a primary with a wss:// peer uses: its own, else the node's. */
    const tlsOf = (m: (typeof c.mirrors)[number]): { tls?: TlsFiles } =>
      !m.peer?.startsWith('wss://') ? {} : m.tls ? { tls: { ...tlsPaths(m.tls), origin: 'mirror' } } : nodeTls ? { tls: { ...nodeTls, origin: 'node' } } : {};
    const mirrors: MirrorConfig[] = c.mirrors.map((m) => ({
      name: m.name,
      role: m.role,
      volume: abs(m.volume),
      ...(m.peer !== undefined ? { peer: m.peer } : {}),
      ...tlsOf(m),
      insecure: m.insecure ?? false,
      chunkSize: m.chunkSize ?? DEFAULTS.chunkSize,
      maxInFlight: m.maxInFlight ?? DEFAULTS.maxInFlight,
      maxExtent: m.maxExtent ?? DEFAULTS.maxExtent,
      checkpointBytes: m.checkpoint?.bytes ?? DEFAULTS.checkpointBytes,
      checkpointInterval: m.checkpoint?.interval ?? DEFAULTS.checkpointInterval,
      consistency: m.consistency ?? DEFAULTS.consistency,
      compression: m.compression ?? DEFAULTS.compression,
      ...(m.consistencyDir !== undefined ? { consistencyDir: abs(m.consistencyDir) } : {}),
      reconnectMin: m.reconnect?.min ?? DEFAULTS.reconnectMin,
      reconnectMax: m.reconnect?.max ?? DEFAULTS.reconnectMax,
      tracking: { mode: m.tracking?.mode ?? DEFAULTS.trackingMode, interval: m.tracking?.interval ?? DEFAULTS.trackingInterval },
      ...(m.lvm ? { lvm: { vg: m.lvm.pool.split('/')[0]!, pool: m.lvm.pool.split('/')[1]! } } : {}),
      ...(m.bandwidth !== undefined ? { bandwidth: m.bandwidth } : {}),
    }));
    // A peer's shared cap goes into each of its mirrors' config, so a change of
    // it counts as a change of those mirrors.
    const peerIndex = new Map<string, number>();
    (c.peers ?? []).forEach((p, i) => {
      const key = peerKey(p.url);
      if (peerIndex.has(key)) problems.push({ path: ['peers', i, 'url'], message: `peer ${key} is already listed at peers[${peerIndex.get(key)}]` });
      else peerIndex.set(key, i);
      const users = mirrors.filter((m) => m.peer && peerKey(m.peer) === key);
      if (users.length === 0) problems.push({ path: ['peers', i, 'url'], message: `no primary mirror has a peer at ${key} (a typo?)` });
      if (p.bandwidth !== undefined) for (const m of users) m.peerBandwidth = p.bandwidth;
    });
    config = {
      node: { name: c.node.name, stateDir: abs(c.node.stateDir), logLevel: c.node.logLevel ?? DEFAULTS.logLevel },
      ...(c.listen ? { listen: c.listen } : {}),
      ...(c.metrics ? { metrics: c.metrics } : {}),
      auth: { pskFile: abs(c.auth.pskFile) },
      ...(nodeTls ? { tls: nodeTls } : {}),
      ...(c.peers ? { peers: c.peers.map((p) => ({ url: p.url, ...(p.bandwidth !== undefined ? { bandwidth: p.bandwidth } : {}) })) } : {}),
      mirrors,
      sourcePath: path.resolve(sourcePath),
    };
    // Transport security: TLS, or plain ws:// only on loopback unless the mirror says insecure: true.
    c.mirrors.forEach((raw, i) => {
      const m = mirrors[i]!;
      if (m.peer) {
        const host = new URL(m.peer).hostname; // the schema checked that it parses
        if (m.peer.startsWith('wss://')) {
          if (!m.tls) problems.push({ path: ['mirrors', i, 'peer'], message: `peer ${m.peer} is wss:// but no tls: { ca, cert, key } is configured (on the mirror or at the top level)` });
        } else {
          if (raw.tls) problems.push({ path: ['mirrors', i, 'tls'], message: `tls: is used with a wss:// peer; peer ${m.peer} is plain ws://` });
          if (!m.insecure && !isLoopbackHost(host)) {
            problems.push({ path: ['mirrors', i, 'peer'], message: `peer ${m.peer} is plain ws:// to a host that is not loopback: use wss:// with tls: { ca, cert, key }, or set insecure: true on this mirror` });
          }
        }
      }
      if (m.role === 'secondary') {
        if (raw.tls && !m.peer) problems.push({ path: ['mirrors', i, 'tls'], message: 'a secondary mirror takes no tls: the listener uses the top-level tls: { ca, cert, key }' });
        if (c.listen && !c.tls && !m.insecure && !isLoopbackHost(c.listen.host)) {
          problems.push({
            path: ['mirrors', i],
            message: `listen.host ${c.listen.host} is not loopback and there is no top-level tls: primaries would send this mirror in clear text: set tls: { ca, cert, key } at the top level, or insecure: true on this mirror`,
          });
        }
      }
    });
    // Rules across keys.
    const names = new Map<string, number>();
    const volumes = new Map<string, number>();
    mirrors.forEach((m, i) => {
      const at = (k: string) => ['mirrors', i, k];
      if (names.has(m.name)) problems.push({ path: at('name'), message: `duplicate mirror name "${m.name}" (also mirrors[${names.get(m.name)}])` });
      names.set(m.name, i);
      if (volumes.has(m.volume)) problems.push({ path: at('volume'), message: `volume ${m.volume} is already used by mirrors[${volumes.get(m.volume)}]` });
      volumes.set(m.volume, i);
      if (m.role === 'primary' && !m.peer) problems.push({ path: ['mirrors', i], message: 'a primary mirror needs peer: (the secondary\'s ws:// URL)' });
      if (m.maxExtent % m.chunkSize !== 0 || m.maxExtent > 8 * 1024 * 1024) {
        problems.push({ path: at('maxExtent'), message: `expected a multiple of chunkSize (${m.chunkSize}) of at most 8MiB, got ${m.maxExtent}` });
      }
      if (m.maxInFlight < m.maxExtent) problems.push({ path: at('maxInFlight'), message: `expected at least maxExtent (${m.maxExtent} bytes), got ${m.maxInFlight}` });
      if (m.tracking.mode === 'lvm-thin') {
        if (m.role !== 'primary') problems.push({ path: at('tracking'), message: 'tracking applies to primary mirrors only' });
        if (!m.lvm) problems.push({ path: ['mirrors', i], message: 'tracking.mode lvm-thin needs lvm: { pool: VG/POOL }' });
        const dev = /^\/dev\/([^/]+)\/[^/]+$/.exec(m.volume);
        if (!dev) problems.push({ path: at('volume'), message: `tracking.mode lvm-thin needs volume: /dev/VG/LV, got ${m.volume}` });
        else if (m.lvm && dev[1] !== m.lvm.vg) problems.push({ path: at('lvm'), message: `the pool ${m.lvm.vg}/${m.lvm.pool} is not in the volume group of ${m.volume}` });
      } else if (m.lvm) {
        problems.push({ path: at('lvm'), message: 'lvm: is used only with tracking.mode lvm-thin' });
      }
      if (m.bandwidth !== undefined && !m.peer) problems.push({ path: at('bandwidth'), message: 'bandwidth caps what this side sends as primary, to peer:; a mirror without peer: takes none' });
      if (m.reconnectMin > m.reconnectMax) problems.push({ path: at('reconnect'), message: 'min must not exceed max' });
    });
    if (config.metrics && config.listen && config.metrics.port === config.listen.port && config.metrics.host === config.listen.host) {
      problems.push({ path: ['metrics', 'port'], message: `expected a port other than listen's (${config.listen.host}:${config.listen.port})` });
    }
    if (!config.listen && mirrors.some((m) => m.role === 'secondary')) {
      problems.push({ path: [], message: 'listen: { host, port } is required on a host with secondary mirrors' });
    }
  }
  if (problems.length > 0) {
    const lines = problems.map((p) => `${sourcePath}:${position(doc, lc, p.path)}: ${keyPath(p.path)}: ${p.message}`);
    throw new TmError(ErrorCodes.CONFIG, `invalid config:\n${lines.join('\n')}`);
  }
  return config!;
}

/** Read and validate a config file. */
export async function loadConfig(file: string): Promise<DaemonConfig> {
  let text: string;
  try {
    text = await fsp.readFile(file, 'utf8');
  } catch (e) {
    throw new TmError(ErrorCodes.CONFIG, `cannot read config ${file}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`, { cause: e });
  }
  return parseConfig(text, file);
}
