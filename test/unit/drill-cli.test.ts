import { expect } from 'chai';
import { execFile as execFileCb } from 'node:child_process';
import { promises as fsp } from 'node:fs';
import type * as http from 'node:http';
import * as os from 'node:os';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { formatDrills } from '../../src/cli/drill.js';
import { cliPath } from '../../src/cli/daemon-process.js';
import { controlCall, controlGet, startControlServer, type DrillHandlers } from '../../src/daemon/control.js';
import { ErrorCodes, TmError } from '../../src/errors.js';
import type { DrillInfo, DrillStarted } from '../../src/mirror/drill.js';
import { testKeyText } from '../helpers/config.js';
import { rejection } from '../helpers/rejection.js';

const execFile = promisify(execFileCb);

async function cli(...args: string[]): Promise<{ code: number; out: string; err: string }> {
  try {
    const r = await execFile(process.execPath, [cliPath(), ...args], { encoding: 'utf8', timeout: 20_000 });
    return { code: 0, out: r.stdout, err: r.stderr };
  } catch (e) {
    const x = e as { code?: number; stdout?: string; stderr?: string };
    return { code: typeof x.code === 'number' ? x.code : -1, out: x.stdout ?? '', err: x.stderr ?? '' };
  }
}

const info: DrillInfo = { mirror: 'vm1', name: 'd1', path: '/srv/vm1.img.drill-d1', generation: 7, createdAt: '2025-01-02T03:04:05.000Z', ageSeconds: 65 };

describe('drill commands: control routes, CLI options, list format', function () {
  this.timeout(60_000);
  let dir: string;
  let server: http.Server;
  const calls: unknown[][] = [];
  /** Fake handlers: mirror "vm1" exists; drill "busy" is in use. */
  const handlers: DrillHandlers = {
    async start(mirror, name) {
      calls.push(['start', mirror, name]);
      if (mirror !== 'vm1') throw new TmError(ErrorCodes.UNKNOWN_MIRROR, `no mirror ${mirror}`);
      if (name === 'exists') throw new TmError(ErrorCodes.DRILL_EXISTS, 'exists');
      if (name === 'ext4') throw new TmError(ErrorCodes.DRILL_UNSUPPORTED, 'the target is on ext4');
      return { ...info, name: name ?? 'drill-7-20250102T030405Z', from: 'base', seconds: 0.01 } satisfies DrillStarted;
    },
    async list() {
      calls.push(['list']);
      return [info];
    },
    async stop(mirror, name, force) {
      calls.push(['stop', mirror, name, force]);
      if (name === 'busy' && !force) throw new TmError(ErrorCodes.DRILL_BUSY, 'held by loop device /dev/loop3');
      if (name !== 'd1' && name !== 'busy') throw new TmError(ErrorCodes.DRILL_UNKNOWN, `no drill ${name}`);
      return { mirror, name, path: info.path, deleted: true, users: [], uninspected: 0 };
    },
  };

  before(async () => {
    dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'tm-drill-cli-'));
    server = await startControlServer(dir, { status: async () => ({}) as never, metrics: async () => ({ contentType: 'text/plain', body: '' }), drills: handlers });
    await fsp.writeFile(path.join(dir, 'psk'), testKeyText('drill-cli'), { mode: 0o600 });
    await fsp.writeFile(path.join(dir, 'b.yaml'), `node: { name: b, stateDir: ${dir} }\nlisten: { host: 127.0.0.1, port: 1 }\nauth: { pskFile: ./psk }\nmirrors:\n  - { name: vm1, role: secondary, volume: ./t.img }\n`);
  });
  after(async () => {
    await new Promise((r) => server.close(r));
    await fsp.rm(dir, { recursive: true, force: true });
  });
  beforeEach(() => (calls.length = 0));

  it('routes: POST /mirrors/M/drills (201), GET /drills, DELETE /mirrors/M/drills/D[?force=1]; names are URL-decoded', async () => {
    const s = await controlCall<{ drill: DrillStarted }>(dir, 'POST', '/mirrors/vm1/drills', { name: 'a.b_c-1' });
    expect(s.drill.name).to.equal('a.b_c-1');
    await controlCall(dir, 'POST', '/mirrors/vm1/drills', {});
    expect((await controlCall<{ drills: DrillInfo[] }>(dir, 'GET', '/drills')).drills).to.deep.equal([info]);
    await controlCall(dir, 'DELETE', '/mirrors/vm1/drills/busy?force=1');
    await controlCall(dir, 'DELETE', `/mirrors/${encodeURIComponent('vm1')}/drills/d1`);
    expect(calls).to.deep.equal([
      ['start', 'vm1', 'a.b_c-1'],
      ['start', 'vm1', undefined],
      ['list'],
      ['stop', 'vm1', 'busy', true],
      ['stop', 'vm1', 'd1', false],
    ]);
    expect((await controlGet(dir, '/mirrors/vm1/drills')).statusCode).to.equal(404);
  });

  it('a refusal comes back with its code and an HTTP status: 409 busy/exists/unsupported, 404 unknown, 400 bad body', async () => {
    const cases: [Promise<unknown>, string][] = [
      [controlCall(dir, 'DELETE', '/mirrors/vm1/drills/busy'), 'TM_ERR_DRILL_BUSY'],
      [controlCall(dir, 'POST', '/mirrors/vm1/drills', { name: 'exists' }), 'TM_ERR_DRILL_EXISTS'],
      [controlCall(dir, 'POST', '/mirrors/vm1/drills', { name: 'ext4' }), 'TM_ERR_DRILL_UNSUPPORTED'],
      [controlCall(dir, 'POST', '/mirrors/nope/drills', {}), 'TM_ERR_UNKNOWN_MIRROR'],
      [controlCall(dir, 'DELETE', '/mirrors/vm1/drills/zz'), 'TM_ERR_DRILL_UNKNOWN'],
      [controlCall(dir, 'POST', '/mirrors/vm1/drills', { name: 5 }), 'TM_ERR_USAGE'],
    ];
    for (const [p, code] of cases) expect((await rejection(p)).code).to.equal(code);
    const raw = await controlGet(dir, '/drills');
    expect(raw.statusCode).to.equal(200);
  });

  it('the CLI: usage errors exit 2 before asking the daemon; answers and refusals through the socket', async () => {
    const cfg = path.join(dir, 'b.yaml');
    for (const args of [
      ['drill', '--config', cfg],
      ['drill', 'frob', '--config', cfg],
      ['drill', 'start', '--config', cfg],
      ['drill', 'start', 'vm1', 'x', '--config', cfg],
      ['drill', 'stop', 'vm1', '--config', cfg],
      ['drill', 'list', 'vm1', '--config', cfg],
      ['drill', 'list', '--force', '--config', cfg],
      ['drill', 'stop', 'vm1', 'd1', '--name', 'x', '--config', cfg],
      ['drill', 'start', 'vm1', '--name', '../x', '--config', cfg],
      ['drill', 'start', 'vm1'],
    ]) {
      const r = await cli(...args);
      expect(r.code, args.join(' ')).to.equal(2);
      expect(r.err, args.join(' ')).to.contain('TM_ERR_USAGE');
    }
    expect(calls).to.deep.equal([]);
    const start = await cli('drill', 'start', 'vm1', '--name', 'd9', '--config', cfg);
    expect(start.code, start.err).to.equal(0);
    expect(start.out).to.contain('vm1: drill d9 started: /srv/vm1.img.drill-d1 holds generation 7 (cloned from the base image');
    const busy = await cli('drill', 'stop', 'vm1', 'busy', '--config', cfg);
    expect(busy.code).to.equal(1);
    expect(busy.err).to.contain('thinmirror: TM_ERR_DRILL_BUSY: held by loop device /dev/loop3');
    expect((await cli('drill', 'stop', 'vm1', 'busy', '--force', '--config', cfg)).code).to.equal(0);
    const list = await cli('drill', 'list', '--config', cfg, '--json');
    expect(JSON.parse(list.out)).to.deep.equal([info]);
  });

  it('formatDrills: a table, or "no drills"', () => {
    expect(formatDrills([])).to.equal('no drills');
    expect(formatDrills([info]).split('\n')).to.deep.equal([
      'MIRROR  DRILL  GEN  AGE    CREATED                   PATH',
      'vm1     d1     7    1m05s  2025-01-02T03:04:05.000Z  /srv/vm1.img.drill-d1',
    ]);
  });
});
