import { expect } from 'chai';
import { promises as fsp, readdirSync, readFileSync } from 'node:fs';
import { createSampleVolume } from '../../src/util/sample.js';
import { Pair, sha256File } from '../helpers/pair.js';
import { freePort } from '../helpers/pair-config.js';
import { attackFromChild, type PreauthAttack } from '../helpers/preauth-attack.js';

const MiB = 1024 * 1024;
const VOLUME = 256 * MiB;
/** Issue 14 §1's bounds. */
const MAX_SLOWDOWN = 1.5;
const MAX_RSS = 300 * MiB;

function rssBytes(pid: number, field: 'VmRSS' | 'VmHWM'): number {
  const m = new RegExp(`${field}:\\s+(\\d+) kB`).exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  if (!m) throw new Error(`no ${field} for pid ${pid}`);
  return Number(m[1]) * 1024;
}

/** User + system CPU seconds of a live process (USER_HZ = 100). */
function cpuSeconds(pid: number): number {
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = f.slice(f.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

function openFiles(pid: number): number {
  return readdirSync(`/proc/${pid}/fd`).length;
}

interface Run {
  attacked: boolean;
  seconds: number;
  peakRss: number;
  fdsBefore: number;
  fdsAfter: number;
  attack: PreauthAttack['counters'] | null;
  refusalsLogged: number;
  cpu: { secondary: number; primary: number; tester: number };
}

describe('integration: 16 attackers before authentication during an initial sync (issue 14 §1)', function () {
  this.timeout(900_000);
  const pairs: Pair[] = [];
  let attack: ReturnType<typeof attackFromChild> | null = null;
  afterEach(async () => {
    await attack?.stop();
    attack = null;
    for (const p of pairs.splice(0)) await p.cleanup();
  });

  /**
   * One initial sync of a 256 MiB volume between two fresh daemons; with
   * `attacked`, 16 connections from four addresses send 8 MiB map bombs to the
   * secondary from a second before the primary starts until the sync is done.
   * Seconds: from starting the primary to generation 1 committed.
   */
  async function syncOnce(attacked: boolean): Promise<Run> {
    const pair = await Pair.create();
    pairs.push(pair);
    await createSampleVolume(pair.source, { size: VOLUME, allocated: VOLUME, extents: 8, seed: 14 });
    const port = await freePort();
    await pair.writeConfigs({ interval: '1h', port });
    const secondary = pair.startSecondary();
    await secondary.waitReady();
    const fdsBefore = openFiles(secondary.pid);
    let peakRss = 0;
    const sampler = setInterval(() => {
      try {
        peakRss = Math.max(peakRss, rssBytes(secondary.pid, 'VmRSS'));
      } catch {
        // exited: the test fails below
      }
    }, 50);
    try {
      if (attacked) {
        attack = attackFromChild(`ws://127.0.0.1:${port}`, { connections: 16, addresses: ['127.0.0.2', '127.0.0.3', '127.0.0.4', '127.0.0.5'] });
        await new Promise((r) => setTimeout(r, 1000));
      }
      const t0 = performance.now();
      const cpu0 = { secondary: cpuSeconds(secondary.pid), tester: process.cpuUsage() };
      const primary = pair.startPrimary();
      await pair.waitInSync(1, 300_000);
      const seconds = (performance.now() - t0) / 1000;
      const tester = process.cpuUsage(cpu0.tester);
      const cpu = { secondary: cpuSeconds(secondary.pid) - cpu0.secondary, primary: cpuSeconds(primary.pid), tester: (tester.user + tester.system) / 1e6 };
      const counters = attack ? await attack.stop() : null;
      attack = null;
      peakRss = Math.max(peakRss, rssBytes(secondary.pid, 'VmHWM'));
      expect(await pair.primary!.stop()).to.deep.equal({ code: 0, signal: null });
      expect(await sha256File(pair.target)).to.equal(await sha256File(pair.source));
      // Every socket the attack and the session left goes (within the close grace period).
      let fdsAfter = openFiles(secondary.pid);
      for (let i = 0; i < 100 && fdsAfter > fdsBefore; i++) {
        await new Promise((r) => setTimeout(r, 100));
        fdsAfter = openFiles(secondary.pid);
      }
      const log = await fsp.readFile(secondary.logFile, 'utf8');
      const refusalsLogged = log.split('\n').filter((l) => l.includes('"TM_ERR_PREAUTH_LIMIT"')).length;
      await pair.cleanup();
      pairs.splice(pairs.indexOf(pair), 1);
      return { attacked, seconds, peakRss, fdsBefore, fdsAfter, attack: counters, refusalsLogged, cpu };
    } finally {
      clearInterval(sampler);
    }
  }

  it('the sync takes at most 1.5x its time without the attack; the secondary stays under 300 MiB and its open files return to the baseline', async () => {
    // Alternating runs, best of two each, so that a burst of load from elsewhere on the machine does not decide.
    const runs: Run[] = [];
    for (const attacked of [false, true, false, true]) runs.push(await syncOnce(attacked));
    for (const r of runs) {
      const a = r.attack ? `; attack: ${r.attack.opened} connections opened (${(r.attack.opened / r.seconds).toFixed(0)}/s), ${r.attack.framesSent} frames of 8 MiB sent, ${r.refusalsLogged} refusal lines logged` : '';
      console.log(
        `      ${r.attacked ? 'attacked' : 'quiet   '}: ${r.seconds.toFixed(2)} s, secondary peak RSS ${(r.peakRss / MiB).toFixed(0)} MiB, open files ${r.fdsBefore} before, ${r.fdsAfter} after; CPU s: secondary ${r.cpu.secondary.toFixed(2)}, primary ${r.cpu.primary.toFixed(2)}, test process ${r.cpu.tester.toFixed(2)}${a}`,
      );
    }
    const best = (attacked: boolean) => Math.min(...runs.filter((r) => r.attacked === attacked).map((r) => r.seconds));
    const ratio = best(true) / best(false);
    console.log(`      slowdown under attack (best of two each): ${ratio.toFixed(2)}x (bound ${MAX_SLOWDOWN}x)`);
    for (const r of runs.filter((x) => x.attacked)) {
      expect(r.attack!.framesSent, 'the attack did not run').to.be.at.least(16);
      expect(r.refusalsLogged, 'no refusal logged').to.be.greaterThan(0);
    }
    for (const r of runs) {
      expect(r.peakRss, `secondary peak RSS (${r.attacked ? 'attacked' : 'quiet'})`).to.be.lessThan(MAX_RSS);
      expect(r.fdsAfter, `open files of the secondary after the ${r.attacked ? 'attacked' : 'quiet'} run`).to.be.at.most(r.fdsBefore);
    }
    expect(ratio).to.be.at.most(MAX_SLOWDOWN);
  });
});
