import { expect } from 'chai';
import { formatEta, formatStatus, lagCell, payloadCell, progressBar, progressCell } from '../../src/cli/status.js';
import type { DaemonStatus, MirrorStatusEntry } from '../../src/daemon/control.js';

const MiB = 1024 * 1024;

function mirror(p: Partial<MirrorStatusEntry>): MirrorStatusEntry {
  return {
    name: 'vm1',
    role: 'primary',
    state: 'in-sync',
    volume: '/v/vm1.img',
    peer: 'ws://10.0.0.2:7890',
    trackingMode: 'scan',
    chunkSize: 65536,
    volumeBytes: 4096 * MiB,
    allocatedBytes: 1024 * MiB,
    sentBytes: 0,
    appliedBytes: 0,
    wireBytes: 0,
    dirtyBytes: 0,
    generation: 1,
    committedGeneration: 1,
    lagSeconds: 0,
    progress: null,
    lastCycle: null,
    error: null,
    sessions: 1,
    connectedSince: '2025-01-01T00:00:01.000Z',
    rateBytesPerSecond: null,
    ...p,
  };
}

function daemon(mirrors: MirrorStatusEntry[]): DaemonStatus {
  return { node: 'site-a', pid: 42, version: '0.1.0', startedAt: '2025-01-01T00:00:00.000Z', listen: null, metrics: { host: '127.0.0.1', port: 9464 }, config: { path: '/etc/thinmirror/thinmirror.yaml', loadedAt: '2025-01-01T00:00:00.000Z', lastReload: null }, mirrors };
}

describe('status: readable table (progress bar, rate, ETA, lag)', () => {
  it('formatEta: seconds, minutes, hours, days', () => {
    expect(formatEta(0)).to.equal('0s');
    expect(formatEta(41.2)).to.equal('42s');
    expect(formatEta(725)).to.equal('12m05s');
    expect(formatEta(3 * 3600 + 7 * 60 + 30)).to.equal('3h07m');
    expect(formatEta(2 * 86400 + 5 * 3600)).to.equal('2d05h');
  });

  it('progressBar: width 20, clamped, one decimal', () => {
    expect(progressBar(0, 100)).to.equal('[....................]   0.0%');
    expect(progressBar(25, 100)).to.equal('[#####...............]  25.0%');
    expect(progressBar(100, 100)).to.equal('[####################] 100.0%');
    expect(progressBar(150, 100)).to.equal('[####################] 100.0%');
  });

  it('progressCell: bar, bytes, rate and ETA from the remaining bytes; empty without a generation in flight', () => {
    const p = { generation: 1, doneBytes: 256 * MiB, totalBytes: 1024 * MiB };
    expect(progressCell({ progress: p, rateBytesPerSecond: 64 * MiB })).to.equal('[#####...............]  25.0%  256 MiB of 1.00 GiB  64.0 MiB/s, ETA 12s');
    expect(progressCell({ progress: p, rateBytesPerSecond: null })).to.equal('[#####...............]  25.0%  256 MiB of 1.00 GiB  rate: measuring');
    expect(progressCell({ progress: p, rateBytesPerSecond: 0 })).to.contain('stalled');
    expect(progressCell({ progress: p, rateBytesPerSecond: 1 * MiB })).to.contain('ETA 12m48s');
    expect(progressCell({ progress: null, rateBytesPerSecond: null })).to.equal('');
    expect(progressCell({ progress: { generation: 1, doneBytes: 0, totalBytes: 0 }, rateBytesPerSecond: null })).to.equal('');
  });

  it('lagCell: one decimal under 100 s, then as a duration; "-" when unknown', () => {
    expect(lagCell({ lagSeconds: null })).to.equal('-');
    expect(lagCell({ lagSeconds: 0 })).to.equal('0.0s');
    expect(lagCell({ lagSeconds: 3.14 })).to.equal('3.1s');
    expect(lagCell({ lagSeconds: 725 })).to.equal('12m05s');
  });

  it('formatStatus: the syncing mirror has its bar in PROGRESS, the mirror in sync its lag, errors below', () => {
    const out = formatStatus(
      daemon([
        mirror({ name: 'vm1', state: 'initial-sync', generation: 1, committedGeneration: 0, lagSeconds: 30, progress: { generation: 1, doneBytes: 512 * MiB, totalBytes: 1024 * MiB }, rateBytesPerSecond: 128 * MiB }),
        mirror({ name: 'db1', state: 'in-sync', generation: 9, committedGeneration: 9, lagSeconds: 0, sentBytes: 300 * MiB }),
        mirror({ name: 'bk1', role: 'secondary', state: 'error', lagSeconds: null, appliedBytes: 700 * MiB, error: { code: 'TM_ERR_NO_SPACE', message: 'target full' } }),
      ]),
    );
    const lines = out.split('\n');
    expect(lines[0]).to.equal('node site-a (pid 42, thinmirror 0.1.0), metrics on http://127.0.0.1:9464/metrics');
    const head = lines[1]!;
    expect(head).to.match(/^MIRROR\s+ROLE\s+STATE\s+GEN\s+COMMITTED\s+VOLUME\s+ALLOCATED\s+PAYLOAD\s+WIRE\s+DIRTY\s+LAG\s+PROGRESS$/);
    const col = (line: string, name: string) => line.slice(head.indexOf(name)).split(/\s{2,}/)[0];
    const vm1 = lines.find((l) => l.startsWith('vm1 '))!;
    const db1 = lines.find((l) => l.startsWith('db1 '))!;
    const bk1 = lines.find((l) => l.startsWith('bk1 '))!;
    expect(col(vm1, 'STATE')).to.equal('initial-sync');
    expect(col(vm1, 'LAG')).to.equal('30.0s');
    expect(vm1.slice(head.indexOf('PROGRESS'))).to.equal('[##########..........]  50.0%  512 MiB of 1.00 GiB  128 MiB/s, ETA 4s');
    expect(col(db1, 'LAG')).to.equal('0.0s');
    expect(col(db1, 'COMMITTED')).to.equal('9');
    expect(db1.slice(head.indexOf('PROGRESS')), 'no progress cell').to.equal('');
    expect(col(bk1, 'LAG')).to.equal('-');
    expect(col(db1, 'PAYLOAD'), 'a primary: what it sent').to.equal('300 MiB');
    expect(col(bk1, 'PAYLOAD'), 'a secondary: what it applied').to.equal('700 MiB');
    expect(lines.at(-1)).to.equal('bk1: TM_ERR_NO_SPACE: target full');
  });

  it('payloadCell: sentBytes of a primary, appliedBytes of a secondary (sentBytes of a secondary of an older daemon)', () => {
    expect(payloadCell({ role: 'primary', sentBytes: 2 * MiB, appliedBytes: 0 })).to.equal('2.00 MiB');
    expect(payloadCell({ role: 'secondary', sentBytes: 0, appliedBytes: 3 * MiB })).to.equal('3.00 MiB');
    expect(payloadCell({ role: 'secondary', sentBytes: 5 * MiB } as MirrorStatusEntry)).to.equal('5.00 MiB');
  });

  it('formatStatus: the drills of a secondary are listed below the table', () => {
    const out = formatStatus(daemon([mirror({ role: 'secondary', drills: [{ name: 'pre-upgrade', path: '/srv/vm1.img.drill-pre-upgrade', generation: 42, ageSeconds: 725 }] })]));
    expect(out.split('\n').at(-1)).to.equal('vm1: drill pre-upgrade, generation 42, 12m05s old: /srv/vm1.img.drill-pre-upgrade');
  });

  it('formatStatus: a daemon without the rate field (older) still formats, rate shown as measuring', () => {
    const m = mirror({ state: 'syncing', progress: { generation: 3, doneBytes: 1, totalBytes: 2 } }) as Partial<MirrorStatusEntry>;
    delete m.rateBytesPerSecond;
    const st = { ...daemon([m as MirrorStatusEntry]), metrics: undefined } as unknown as DaemonStatus;
    const out = formatStatus(st);
    expect(out.split('\n')[0]).to.equal('node site-a (pid 42, thinmirror 0.1.0)');
    expect(out).to.contain('rate: measuring');
  });
});
