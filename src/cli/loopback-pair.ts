import { promises as fsp } from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { stringify } from 'yaml';
import { writeKeyFile } from '../daemon/psk.js';
import { DaemonProcess } from './daemon-process.js';

/**
 * A primary and a secondary daemon on 127.0.0.1 with their files in one
 * directory, as `thinmirror demo` runs them: site-b (secondary) listens,
 * site-a (primary) connects, both read one pre-shared key. Building the config
 * documents ({@link loopbackPair}) is apart from writing them
 * ({@link writeLoopbackPair}) so that a caller can add keys in between.
 */

/** A TCP port free on 127.0.0.1 right now. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const a = s.address() as net.AddressInfo;
      s.close(() => resolve(a.port));
    });
  });
}

/** One mirror of a loopback pair: `source` on site-a is copied to `target` on site-b. */
export interface LoopbackMirror {
  name: string;
  source: string;
  target: string;
}

/** Where a loopback pair's configs and state directories are. */
export interface PairConfigs {
  primary: string;
  secondary: string;
  primaryState: string;
  secondaryState: string;
}

/** A mirror entry or a whole config document, as the YAML file will hold it. */
type Doc = Record<string, unknown>;

/** A loopback pair not written yet: its paths and the two config documents. */
export interface LoopbackPair {
  files: PairConfigs;
  pskFile: string;
  primary: Doc & { mirrors: Doc[] };
  secondary: Doc & { mirrors: Doc[] };
}

/**
 * The configs of two daemons in `dir` for `mirrors`: the secondary listens on
 * 127.0.0.1:`port`; the primary tracks each source in scan mode with 64 KiB
 * chunks, one cycle every `interval` (e.g. '1s').
 */
export function loopbackPair(o: { dir: string; port: number; mirrors: LoopbackMirror[]; interval: string }): LoopbackPair {
  const files: PairConfigs = {
    primary: path.join(o.dir, 'primary.yaml'),
    secondary: path.join(o.dir, 'secondary.yaml'),
    primaryState: path.join(o.dir, 'state-a'),
    secondaryState: path.join(o.dir, 'state-b'),
  };
  const pskFile = path.join(o.dir, 'psk');
  return {
    files,
    pskFile,
    secondary: {
      node: { name: 'site-b', stateDir: files.secondaryState },
      listen: { host: '127.0.0.1', port: o.port },
      auth: { pskFile },
      mirrors: o.mirrors.map((m) => ({ name: m.name, role: 'secondary', volume: m.target })),
    },
    primary: {
      node: { name: 'site-a', stateDir: files.primaryState },
      auth: { pskFile },
      mirrors: o.mirrors.map((m) => ({
        name: m.name,
        role: 'primary',
        volume: m.source,
        peer: `ws://127.0.0.1:${o.port}`,
        chunkSize: '64KiB',
        tracking: { mode: 'scan', interval: o.interval },
      })),
    },
  };
}

/** Write the pair's pre-shared key (a new one, as `thinmirror keygen` makes) and both configs; returns where they are. */
export async function writeLoopbackPair(pair: LoopbackPair): Promise<PairConfigs> {
  await writeKeyFile(pair.pskFile, { force: true });
  await fsp.writeFile(pair.files.secondary, stringify(pair.secondary));
  await fsp.writeFile(pair.files.primary, stringify(pair.primary));
  return pair.files;
}

/**
 * Start the secondary of `cfg`, wait until it is ready, then start the
 * primary; each is pushed to `daemons` as soon as it exists, so the caller's
 * cleanup stops whatever started. Logs go to `logDir`/{secondary,primary}.log.
 * `t0` is `performance.now()` just before the primary starts.
 */
export async function startPair(cfg: PairConfigs, logDir: string, daemons: DaemonProcess[]): Promise<{ secondary: DaemonProcess; primary: DaemonProcess; t0: number }> {
  const secondary = new DaemonProcess(cfg.secondary, cfg.secondaryState, path.join(logDir, 'secondary.log'));
  daemons.push(secondary);
  await secondary.waitReady();
  const t0 = performance.now();
  const primary = new DaemonProcess(cfg.primary, cfg.primaryState, path.join(logDir, 'primary.log'));
  daemons.push(primary);
  return { secondary, primary, t0 };
}
