import { expect } from 'chai';
import { stringify } from 'yaml';
import { parseConfig, type DaemonConfig } from '../../src/daemon/config.js';
import { canonicalJson, checkReloadable, diffMirrors, reportOf, restartOnlyChanges } from '../../src/daemon/reload.js';
import { MirrorMetrics } from '../../src/daemon/metrics.js';
import { ErrorCodes, TmError } from '../../src/errors.js';
import type { MirrorStatus } from '../../src/mirror/status.js';
import { parseExposition } from '../helpers/prometheus.js';

type Raw = Record<string, unknown> & { mirrors: Record<string, unknown>[] };

function primary(name: string, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return { name, role: 'primary', volume: `/srv/${name}.img`, peer: 'ws://127.0.0.1:7890', ...extra };
}

function raw(mirrors: Record<string, unknown>[], extra: Record<string, unknown> = {}): Raw {
  return { node: { name: 'site-a', stateDir: '/var/lib/thinmirror' }, auth: { pskFile: '/etc/thinmirror/psk' }, mirrors, ...extra };
}

/** Through the real parser, so that defaults and resolved paths are what the daemon compares. */
function cfg(r: Raw): DaemonConfig {
  return parseConfig(stringify(r), '/etc/thinmirror/thinmirror.yaml');
}

function reloadError(fn: () => void): TmError {
  try {
    fn();
  } catch (e) {
    expect(e).to.be.instanceOf(TmError);
    return e as TmError;
  }
  throw new Error('expected TM_ERR_RELOAD');
}

describe('reload: diffing configs (SIGHUP)', () => {
  it('canonicalJson ignores key order and undefined members, not array order', () => {
    expect(canonicalJson({ a: 1, b: { c: 2, d: [1, 2] } })).to.equal(canonicalJson({ b: { d: [1, 2], c: 2 }, a: 1, e: undefined }));
    expect(canonicalJson({ d: [1, 2] })).not.to.equal(canonicalJson({ d: [2, 1] }));
  });

  it('added, removed, changed and unchanged mirrors by name, in the new config order', () => {
    const old = cfg(raw([primary('A'), primary('B'), primary('C', { tracking: { interval: '30s' } })]));
    const next = cfg(raw([primary('D'), primary('C', { tracking: { interval: '5s' } }), primary('B')]));
    const d = diffMirrors(old.mirrors, next.mirrors);
    expect(reportOf(d)).to.deep.equal({ added: ['D'], removed: ['A'], changed: ['C'], unchanged: ['B'] });
    expect(d.changed[0]!.tracking.interval, 'changed holds the new config').to.equal(5);
    expect(d.removed[0]!.volume).to.equal('/srv/A.img');
  });

  it('a default written out is no change; any resolved difference is (sizes, peer, role, nested keys)', () => {
    const base = cfg(raw([primary('A'), primary('B'), primary('C'), primary('D'), { name: 'E', role: 'secondary', volume: '/srv/E.img' }], { listen: { host: '127.0.0.1', port: 7890 } }));
    const next = cfg(
      raw(
        [
          primary('A', { chunkSize: '64KiB', maxInFlight: '16MiB', tracking: { mode: 'auto', interval: '30s' } }), // the defaults, spelt out
          primary('B', { maxInFlight: '32MiB' }),
          primary('C', { peer: 'ws://127.0.0.1:7891' }),
          primary('D', { reconnect: { max: '1m' } }),
          { name: 'E', role: 'secondary', volume: 'E.img' }, // relative: /etc/thinmirror/E.img
        ],
        { listen: { host: '127.0.0.1', port: 7890 } },
      ),
    );
    expect(reportOf(diffMirrors(base.mirrors, next.mirrors))).to.deep.equal({ added: [], removed: [], changed: ['B', 'C', 'D', 'E'], unchanged: ['A'] });
  });

  it('a role change under the same name is a change', () => {
    const old = cfg(raw([primary('A'), primary('B')], { listen: { host: '127.0.0.1', port: 7890 } }));
    const next = cfg(raw([{ name: 'A', role: 'secondary', volume: '/srv/A.img' }, primary('B')], { listen: { host: '127.0.0.1', port: 7890 } }));
    expect(reportOf(diffMirrors(old.mirrors, next.mirrors))).to.deep.equal({ added: [], removed: [], changed: ['A'], unchanged: ['B'] });
  });

  it('restartAll (a new pre-shared key) and restart (mirrors that failed to start) turn unchanged into changed', () => {
    const old = cfg(raw([primary('A'), primary('B'), primary('C')]));
    const next = cfg(raw([primary('A'), primary('B'), primary('D')]));
    expect(reportOf(diffMirrors(old.mirrors, next.mirrors, { restartAll: true }))).to.deep.equal({ added: ['D'], removed: ['C'], changed: ['A', 'B'], unchanged: [] });
    expect(reportOf(diffMirrors(old.mirrors, next.mirrors, { restart: ['B', 'C'] }))).to.deep.equal({ added: ['D'], removed: ['C'], changed: ['B'], unchanged: ['A'] });
  });

  it('the same config: everything unchanged, nothing needs a restart', () => {
    const r = raw([primary('A'), primary('B')], { listen: { host: '127.0.0.1', port: 7890 }, metrics: { host: '127.0.0.1', port: 9464 } });
    const a = cfg(r);
    const b = cfg(structuredClone(r));
    expect(reportOf(diffMirrors(a.mirrors, b.mirrors))).to.deep.equal({ added: [], removed: [], changed: [], unchanged: ['A', 'B'] });
    expect(restartOnlyChanges(a, b)).to.deep.equal([]);
    expect(() => checkReloadable(a, b)).not.to.throw();
  });

  it('node.logLevel, auth.pskFile and the mirrors may change by a reload', () => {
    const a = cfg(raw([primary('A')]));
    const b = cfg(raw([primary('A', { maxInFlight: '8MiB' }), primary('B')], { node: { name: 'site-a', stateDir: '/var/lib/thinmirror', logLevel: 'debug' }, auth: { pskFile: '/etc/thinmirror/psk2' } }));
    expect(restartOnlyChanges(a, b)).to.deep.equal([]);
    expect(() => checkReloadable(a, b)).not.to.throw();
  });

  it('node.name, node.stateDir, listen, metrics (and any other top-level key such as tls) need a restart: TM_ERR_RELOAD names them', () => {
    const r = raw([primary('A')], { listen: { host: '127.0.0.1', port: 7890 } });
    const a = cfg(r);
    const listen = cfg({ ...r, listen: { host: '127.0.0.1', port: 7891 } });
    const e = reloadError(() => checkReloadable(a, listen));
    expect(e.code).to.equal(ErrorCodes.RELOAD);
    expect(e.message).to.contain('listen').and.contain('restart the daemon').and.contain('/etc/thinmirror/thinmirror.yaml');

    const node = cfg({ ...r, node: { name: 'site-x', stateDir: '/var/lib/other' } });
    expect(restartOnlyChanges(a, node)).to.deep.equal(['node.name', 'node.stateDir']);
    expect(reloadError(() => checkReloadable(a, node)).message).to.contain('node.name, node.stateDir changed');

    const metrics = cfg({ ...r, metrics: { host: '127.0.0.1', port: 9464 } });
    expect(restartOnlyChanges(a, metrics), 'a listener added').to.deep.equal(['metrics']);
    expect(restartOnlyChanges(metrics, a), 'a listener removed').to.deep.equal(['metrics']);

    // Keys the parser may grow (tls: another change) are compared the same way, without a list to keep current.
    const tls = { ...a, tls: { ca: '/etc/thinmirror/ca.pem', cert: '/etc/thinmirror/a.pem', key: '/etc/thinmirror/a.key' } } as DaemonConfig;
    const tls2 = { ...a, tls: { ca: '/etc/thinmirror/ca.pem', cert: '/etc/thinmirror/a2.pem', key: '/etc/thinmirror/a.key' } } as DaemonConfig;
    expect(restartOnlyChanges(a, tls)).to.deep.equal(['tls']);
    expect(restartOnlyChanges(tls, tls2)).to.deep.equal(['tls']);
    expect(restartOnlyChanges(tls, structuredClone(tls))).to.deep.equal([]);
  });
});

describe('reload: metrics forget a removed or restarted mirror', () => {
  function status(name: string, p: Partial<MirrorStatus> = {}): MirrorStatus {
    return {
      name,
      role: 'primary',
      state: 'in-sync',
      volume: `/v/${name}.img`,
      peer: null,
      trackingMode: 'scan',
      chunkSize: 65536,
      volumeBytes: 1 << 30,
      allocatedBytes: 1 << 28,
      sentBytes: 1000,
      appliedBytes: 0,
      wireBytes: 800,
      dirtyBytes: 0,
      generation: 3,
      committedGeneration: 3,
      lagSeconds: 0,
      progress: null,
      lastCycle: { generation: 3, changedBytes: 65536, readBytes: 65536, wireBytes: 800, durationSeconds: 1 },
      error: { code: 'TM_ERR_CONNECTION', message: 'cut' },
      sessions: 1,
      connectedSince: null,
      ...p,
    };
  }
  const seriesOf = (m: Map<string, number>, mirror: string) => [...m.keys()].filter((k) => k.includes(`mirror="${mirror}"`));

  it('every series of the mirror goes; the others stay; a mirror observed again starts afresh', async () => {
    let mirrors = [status('A'), status('B')];
    const metrics = new MirrorMetrics(() => mirrors.map((s) => ({ status: () => s })), { node: 'n', version: '0', defaultMetrics: false });
    let m = parseExposition(await metrics.scrape());
    expect(seriesOf(m, 'A').length).to.be.greaterThan(10);
    const b = seriesOf(m, 'B');
    mirrors = [status('B')];
    await metrics.forget('A');
    m = parseExposition(await metrics.scrape());
    expect(seriesOf(m, 'A')).to.deep.equal([]);
    expect(seriesOf(m, 'B')).to.deep.equal(b);
    expect(metrics.rateOf('A')).to.equal(null);
    // Restarted (changed) as a secondary: no primary series left behind, totals from its own count.
    mirrors = [status('A', { role: 'secondary', state: 'waiting', sentBytes: 0, appliedBytes: 5, error: null, lastCycle: null }), status('B')];
    m = parseExposition(await metrics.scrape());
    expect(seriesOf(m, 'A').some((k) => k.includes('role="primary"'))).to.equal(false);
    expect(m.get('thinmirror_mirror_applied_bytes_total{mirror="A",role="secondary"}')).to.equal(5);
    expect(m.get('thinmirror_mirror_payload_bytes_total{mirror="A",role="secondary"}')).to.equal(0);
  });
});
