import { expect } from 'chai';
import { existsSync, promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { stringify } from 'yaml';
import { DaemonProcess } from '../../src/cli/daemon-process.js';
import type { DaemonStatus, MirrorStatusEntry } from '../../src/daemon/control.js';
import type { LastReload } from '../../src/daemon/reload.js';
import { createSampleVolume } from '../../src/util/sample.js';
import { testKeyText } from '../helpers/config.js';
import { freePort, sha256File } from '../helpers/pair-config.js';

const MiB = 1024 * 1024;
const NAMES = ['A', 'B', 'C', 'D', 'E'] as const;

/** Poll `check` until it returns something other than undefined; fail with `what` and `detail()` after the deadline. */
async function until<T>(check: () => Promise<T | undefined>, what: string, detail: () => string, timeoutMs = 60_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await check();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}\n${detail()}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

function mirrorOf(st: DaemonStatus, name: string): MirrorStatusEntry | undefined {
  return st.mirrors.find((m) => m.name === name);
}

describe('integration: SIGHUP reloads the config (added start, removed stop, changed restart, unchanged keep their session)', function () {
  this.timeout(180_000);
  let dir: string;
  let port: number;
  let psk: string;
  let primaryCfg: string;
  let secondaryCfg: string;
  let primaryState: string;
  let secondaryState: string;
  let primary: DaemonProcess | null = null;
  let secondary: DaemonProcess | null = null;
  const source = (n: string) => path.join(dir, `${n}-source.img`);
  const target = (n: string) => path.join(dir, `${n}-target.img`);

  const secondaryDoc = (names: string[], o: { port?: number } = {}) => ({
    node: { name: 'site-b', stateDir: secondaryState },
    listen: { host: '127.0.0.1', port: o.port ?? port },
    auth: { pskFile: psk },
    mirrors: names.map((n) => ({ name: n, role: 'secondary', volume: target(n) })),
  });
  const primaryDoc = (mirrors: Record<string, Record<string, unknown>>) => ({
    node: { name: 'site-a', stateDir: primaryState },
    auth: { pskFile: psk },
    mirrors: Object.entries(mirrors).map(([n, extra]) => ({
      name: n,
      role: 'primary',
      volume: source(n),
      peer: `ws://127.0.0.1:${port}`,
      chunkSize: '64KiB',
      tracking: { mode: 'scan', interval: '500ms' },
      ...extra,
    })),
  });
  const write = (file: string, doc: unknown) => fsp.writeFile(file, stringify(doc));

  /** SIGHUP, then wait until GET /status shows a reload newer than the last one. */
  async function hup(d: DaemonProcess): Promise<{ st: DaemonStatus; r: LastReload }> {
    const before = (await d.status()).config.lastReload?.at ?? null;
    expect(d.child.kill('SIGHUP'), 'SIGHUP sent').to.equal(true);
    const st = await d.waitFor((s) => s.config.lastReload !== null && s.config.lastReload.at !== before, 60_000, 'the reload to finish');
    return { st, r: st.config.lastReload! };
  }

  async function inSync(d: DaemonProcess, names: string[], what: string): Promise<DaemonStatus> {
    return d.waitFor(
      (s) =>
        names.every((n) => {
          const m = mirrorOf(s, n);
          return m !== undefined && m.state === 'in-sync' && m.committedGeneration >= 1 && m.connectedSince !== null;
        }),
      60_000,
      what,
    );
  }

  async function expectSameImage(n: string): Promise<void> {
    expect(await sha256File(target(n)), `mirror ${n}: target sha256 equals the source's`).to.equal(await sha256File(source(n)));
  }

  before(async () => {
    dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'tm-it-reload-'));
    port = await freePort();
    psk = path.join(dir, 'psk');
    await fsp.writeFile(psk, testKeyText('reload'), { mode: 0o600 });
    primaryCfg = path.join(dir, 'primary.yaml');
    secondaryCfg = path.join(dir, 'secondary.yaml');
    primaryState = path.join(dir, 'state-a');
    secondaryState = path.join(dir, 'state-b');
    for (const [i, n] of NAMES.entries()) await createSampleVolume(source(n), { size: 32 * MiB, allocated: 2 * MiB, extents: 2, seed: 11 + i });
  });

  after(async () => {
    for (const d of [primary, secondary]) d?.kill('SIGKILL');
    await Promise.all([primary?.exited, secondary?.exited]);
    if (process.env.TM_KEEP_TEST_DIRS) console.log(`kept ${dir}`);
    else if (dir) await fsp.rm(dir, { recursive: true, force: true });
  });

  let before1: DaemonStatus;

  it('remove A, change C, add D, keep B: D syncs, A stops with its state kept, C reconnects, B keeps its session', async () => {
    await write(secondaryCfg, secondaryDoc(['A', 'B', 'C', 'D']));
    await write(primaryCfg, primaryDoc({ A: {}, B: {}, C: {} }));
    secondary = new DaemonProcess(secondaryCfg, secondaryState, path.join(dir, 'secondary.log'));
    await secondary.waitReady();
    primary = new DaemonProcess(primaryCfg, primaryState, path.join(dir, 'primary.log'));
    await primary.waitReady();
    before1 = await inSync(primary, ['A', 'B', 'C'], 'A, B and C in sync');
    expect(before1.config.lastReload).to.equal(null);
    expect(before1.config.path).to.equal(primaryCfg);
    const secBefore = await secondary.status();
    const B0 = mirrorOf(before1, 'B')!;
    const C0 = mirrorOf(before1, 'C')!;
    expect(B0.sessions).to.be.at.least(1);

    await write(primaryCfg, primaryDoc({ B: {}, C: { maxInFlight: '8MiB' }, D: {} }));
    const { r } = await hup(primary);
    expect(r.ok, JSON.stringify(r.error)).to.equal(true);
    expect(r.error).to.equal(null);
    expect({ added: r.added, removed: r.removed, changed: r.changed, unchanged: r.unchanged }).to.deep.equal({ added: ['D'], removed: ['A'], changed: ['C'], unchanged: ['B'] });

    const st = await inSync(primary, ['B', 'C', 'D'], 'B, C and D in sync after the reload');
    expect(st.mirrors.map((m) => m.name), 'A is gone, the order is the new config\'s').to.deep.equal(['B', 'C', 'D']);
    expect(st.config.loadedAt > before1.config.loadedAt, 'config.loadedAt moved').to.equal(true);
    await expectSameImage('D');
    await expectSameImage('C');

    // B: the same mirror object and session on both sides.
    const B1 = mirrorOf(st, 'B')!;
    expect(B1.sessions, 'B reconnected').to.equal(B0.sessions);
    expect(B1.connectedSince).to.equal(B0.connectedSince);
    expect(B1.committedGeneration).to.be.at.least(B0.committedGeneration);
    expect(B1.state).to.equal('in-sync');
    // C: a new mirror object with a new session.
    const C1 = mirrorOf(st, 'C')!;
    expect(C1.connectedSince).not.to.equal(C0.connectedSince);
    expect(C1.connectedSince! > C0.connectedSince!, 'C reconnected after the reload').to.equal(true);

    const sec = await secondary.waitFor((s) => mirrorOf(s, 'A')!.connectedSince === null && mirrorOf(s, 'D')!.sessions >= 1, 30_000, 'A closed and D connected on the secondary');
    expect(mirrorOf(sec, 'B')!.sessions, 'the secondary saw no new session of B').to.equal(mirrorOf(secBefore, 'B')!.sessions);
    expect(mirrorOf(sec, 'B')!.connectedSince).to.equal(mirrorOf(secBefore, 'B')!.connectedSince);
    expect(mirrorOf(sec, 'C')!.sessions, 'the secondary saw C connect again').to.be.greaterThan(mirrorOf(secBefore, 'C')!.sessions);

    // A stopped cleanly: its state is on disk, committed, nothing pending.
    const stateFile = path.join(primaryState, 'A', 'state.json');
    expect(existsSync(stateFile), stateFile).to.equal(true);
    const aState = JSON.parse(await fsp.readFile(stateFile, 'utf8')) as { committedGeneration: number; pending: number | null };
    expect(aState.committedGeneration).to.be.at.least(1);
    expect(aState.pending).to.equal(null);
    expect(primary.running).to.equal(true);
    await until(async () => (primary!.logTail(200).includes('config reloaded') ? true : undefined), 'the reload report in the log', () => primary!.logTail());
  });

  it('a broken config (YAML error, then an unknown key) is rejected with TM_ERR_CONFIG; B, C and D keep running', async () => {
    const good = await primary!.status();
    for (const [what, text, expected] of [
      ['a YAML error', 'node: { name: site-a\nmirrors: [\n', 'YAML'],
      ['an unknown key', stringify(primaryDoc({ B: {}, C: { maxInFlight: '8MiB' }, D: { compresion: 'lz4' } })), 'mirrors[2].compresion: unknown key'],
    ] as const) {
      await fsp.writeFile(primaryCfg, text);
      const { st, r } = await hup(primary!);
      expect(r.ok, what).to.equal(false);
      expect(r.error!.code, what).to.equal('TM_ERR_CONFIG');
      expect(r.error!.message, what).to.contain(primaryCfg).and.contain(expected);
      expect({ added: r.added, removed: r.removed, changed: r.changed, unchanged: r.unchanged }).to.deep.equal({ added: [], removed: [], changed: [], unchanged: [] });
      expect(primary!.running, `the daemon is up after ${what}`).to.equal(true);
      expect(st.config.loadedAt, 'the old config is still the one in force').to.equal(good.config.loadedAt);
      expect(st.mirrors.map((m) => m.name)).to.deep.equal(['B', 'C', 'D']);
      for (const n of ['B', 'C', 'D']) {
        const m = mirrorOf(st, n)!;
        expect(m.error, n).to.equal(null);
        expect(m.sessions, `${n} kept its session`).to.equal(mirrorOf(good, n)!.sessions);
        expect(m.connectedSince, `${n} kept its session`).to.equal(mirrorOf(good, n)!.connectedSince);
      }
      await until(
        async () => {
          const log = primary!.logTail(400);
          return log.includes('config reload failed') && log.includes('TM_ERR_CONFIG') && log.includes(expected) ? true : undefined;
        },
        `the error of ${what} in the daemon's log`,
        () => primary!.logTail(),
      );
    }
    await inSync(primary!, ['B', 'C', 'D'], 'B, C and D still in sync');
  });

  it('a listen change is rejected with TM_ERR_RELOAD naming the key; the secondary keeps serving', async () => {
    const st0 = await secondary!.status();
    const other = await freePort();
    await write(secondaryCfg, secondaryDoc(['A', 'B', 'C', 'D'], { port: other }));
    const { st, r } = await hup(secondary!);
    expect(r.ok).to.equal(false);
    expect(r.error!.code).to.equal('TM_ERR_RELOAD');
    expect(r.error!.message).to.contain('listen').and.contain('restart the daemon');
    expect(st.listen).to.deep.equal(st0.listen);
    expect(st.config.loadedAt).to.equal(st0.config.loadedAt);
    for (const n of ['B', 'C', 'D']) expect(mirrorOf(st, n)!.sessions, n).to.equal(mirrorOf(st0, n)!.sessions);
    await until(async () => (secondary!.logTail(200).includes('TM_ERR_RELOAD') ? true : undefined), 'TM_ERR_RELOAD in the log', () => secondary!.logTail());
    // The primary did not notice.
    const p = await inSync(primary!, ['B', 'C', 'D'], 'the primary still in sync');
    expect(p.mirrors.every((m) => m.error === null)).to.equal(true);
  });

  it('a secondary mirror added by reload on the secondary, then on the primary, syncs; the others keep their sessions', async () => {
    const sec0 = await secondary!.status();
    const pri0 = await primary!.status();
    await write(secondaryCfg, secondaryDoc(['A', 'B', 'C', 'D', 'E']));
    const s = await hup(secondary!);
    expect(s.r.ok, JSON.stringify(s.r.error)).to.equal(true);
    expect({ added: s.r.added, removed: s.r.removed, changed: s.r.changed }).to.deep.equal({ added: ['E'], removed: [], changed: [] });
    expect(s.r.unchanged).to.deep.equal(['A', 'B', 'C', 'D']);
    expect(mirrorOf(s.st, 'E')!.state).to.equal('waiting');
    for (const n of ['B', 'C', 'D']) expect(mirrorOf(s.st, n)!.sessions, `${n} on the secondary`).to.equal(mirrorOf(sec0, n)!.sessions);

    await write(primaryCfg, primaryDoc({ B: {}, C: { maxInFlight: '8MiB' }, D: {}, E: {} }));
    const p = await hup(primary!);
    expect(p.r.ok, JSON.stringify(p.r.error)).to.equal(true);
    expect({ added: p.r.added, removed: p.r.removed, changed: p.r.changed, unchanged: p.r.unchanged }).to.deep.equal({ added: ['E'], removed: [], changed: [], unchanged: ['B', 'C', 'D'] });
    const st = await inSync(primary!, ['B', 'C', 'D', 'E'], 'E in sync');
    await expectSameImage('E');
    for (const n of ['B', 'C', 'D']) {
      expect(mirrorOf(st, n)!.sessions, `${n} on the primary`).to.equal(mirrorOf(pri0, n)!.sessions);
      expect(mirrorOf(st, n)!.connectedSince, `${n} on the primary`).to.equal(mirrorOf(pri0, n)!.connectedSince);
    }
    // Both still stop cleanly.
    expect(await primary!.stop()).to.deep.equal({ code: 0, signal: null });
    expect(await secondary!.stop()).to.deep.equal({ code: 0, signal: null });
  });
});
