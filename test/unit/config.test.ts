import { expect } from 'chai';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { DEFAULTS, loadConfig, parseConfig } from '../../src/daemon/config.js';
import { TmError } from '../../src/errors.js';
import { configProblems as problems } from '../helpers/config.js';

const EXAMPLE = `node: { name: site-b, stateDir: /var/lib/thinmirror }
listen: { host: 127.0.0.1, port: 7890 }   # only on a host that receives mirrors
auth: { pskFile: /etc/thinmirror/psk }
mirrors:
  - name: vm1
    role: secondary
    volume: /srv/replica/vm1.img
  - name: db1
    role: primary
    volume: /var/lib/images/db1.img
    peer: ws://10.0.0.2:7890
    chunkSize: 64KiB                      # the default
    tracking: { mode: scan, interval: 30s }   # the default
    insecure: true                        # plain ws:// to a host off loopback (docs/tls.md)
`;


describe('config: YAML validated at start, errors name file, line and key', () => {
  it('parses the documented example with the defaults filled in', () => {
    const c = parseConfig(EXAMPLE, '/etc/thinmirror/thinmirror.yaml');
    expect(c.node).to.deep.equal({ name: 'site-b', stateDir: '/var/lib/thinmirror', logLevel: 'info' });
    expect(c.listen).to.deep.equal({ host: '127.0.0.1', port: 7890 });
    expect(c.auth.pskFile).to.equal('/etc/thinmirror/psk');
    expect(c.mirrors).to.have.length(2);
    expect(c.mirrors[0]).to.deep.include({ name: 'vm1', role: 'secondary', volume: '/srv/replica/vm1.img', chunkSize: DEFAULTS.chunkSize });
    expect(c.mirrors[1]).to.deep.include({
      name: 'db1',
      role: 'primary',
      peer: 'ws://10.0.0.2:7890',
      chunkSize: 65536,
      maxInFlight: 16 * 1024 * 1024,
      maxExtent: 1024 * 1024,
      checkpointBytes: 64 * 1024 * 1024,
      checkpointInterval: 5,
      tracking: { mode: 'scan', interval: 30 },
      insecure: true,
    });
  });

  it('resolves relative paths against the config file directory', () => {
    const c = parseConfig(EXAMPLE.replace('/var/lib/thinmirror', 'state').replace('/srv/replica/vm1.img', '../img/vm1.img'), '/etc/thinmirror/tm.yaml');
    expect(c.node.stateDir).to.equal('/etc/thinmirror/state');
    expect(c.mirrors[0]!.volume).to.equal('/etc/img/vm1.img');
  });

  it('names the line, column and key of a bad chunk size', () => {
    const msg = problems(EXAMPLE.replace('chunkSize: 64KiB', 'chunkSize: 3000'));
    expect(msg).to.match(/\/etc\/tm\.yaml:12:\d+: mirrors\[1\]\.chunkSize: expected a power of two between 4KiB and 4MiB/);
  });

  it('reports every problem at once, one line each', () => {
    const bad = EXAMPLE.replace('port: 7890', 'port: 70000').replace('role: primary', 'role: master').replace('interval: 30s', 'interval: soon');
    const msg = problems(bad);
    expect(msg).to.contain('listen.port');
    expect(msg).to.contain('mirrors[1].role');
    expect(msg).to.contain('mirrors[1].tracking.interval');
    expect(msg.split('\n').filter((l) => l.startsWith('/etc/tm.yaml:'))).to.have.length(3);
    expect(msg).to.match(/:2:\d+: listen\.port/);
    expect(msg).to.match(/:9:\d+: mirrors\[1\]\.role/);
  });

  it('refuses unknown keys (typos) with their line', () => {
    const msg = problems(EXAMPLE.replace('    peer: ws', '    peeer: ws://x\n    peer: ws'));
    expect(msg).to.match(/:11:\d+: mirrors\[1\]\.peeer: unknown key/);
  });

  it('cross-key rules: peer on a primary only, listen for secondaries, unique names and volumes', () => {
    expect(problems(EXAMPLE.replace('    peer: ws://10.0.0.2:7890\n', ''))).to.contain('mirrors[1]: a primary mirror needs peer');
    expect(problems(EXAMPLE.replace('    volume: /srv/replica/vm1.img', '    volume: /srv/replica/vm1.img\n    peer: ws://x:1'))).to.contain('mirrors[0].peer');
    expect(problems(EXAMPLE.replace('listen: { host: 127.0.0.1, port: 7890 }', ''))).to.contain('listen: { host, port } is required');
    expect(problems(EXAMPLE.replace('name: db1', 'name: vm1'))).to.contain('duplicate mirror name "vm1"');
    expect(problems(EXAMPLE.replace('/var/lib/images/db1.img', '/srv/replica/vm1.img'))).to.contain('mirrors[1].volume');
    expect(problems(EXAMPLE.replace('name: db1', 'name: "db 1"'))).to.contain('mirrors[1].name');
    expect(problems(EXAMPLE.replace('peer: ws://10.0.0.2:7890', 'peer: http://10.0.0.2:7890'))).to.contain('mirrors[1].peer');
    expect(problems(EXAMPLE.replace('chunkSize: 64KiB', 'chunkSize: 64KiB\n    maxExtent: 100KiB'))).to.contain('mirrors[1].maxExtent');
    expect(problems(EXAMPLE.replace('mode: scan', 'mode: psychic'))).to.contain('mirrors[1].tracking.mode');
    expect(problems('node: { name: a, stateDir: /s }\nauth: { pskFile: /k }\nmirrors: []\n')).to.contain('mirrors');
  });

  it('tracking modes: auto by default; lvm-thin needs lvm.pool in the volume group of /dev/VG/LV; lvm is refused elsewhere', () => {
    const base = `node: { name: a, stateDir: /s }\nauth: { pskFile: /p }\nmirrors:\n  - name: m\n    role: primary\n    peer: ws://127.0.0.1:1\n`;
    expect(parseConfig(`${base}    volume: /v.img\n`, '/c.yaml').mirrors[0]!.tracking.mode).to.equal('auto');
    const lvm = parseConfig(`${base}    volume: /dev/vg0/db\n    tracking: { mode: lvm-thin }\n    lvm: { pool: vg0/pool0 }\n`, '/c.yaml').mirrors[0]!;
    expect(lvm.lvm).to.deep.equal({ vg: 'vg0', pool: 'pool0' });
    expect(problems(`${base}    volume: /dev/vg0/db\n    tracking: { mode: lvm-thin }\n`)).to.match(/mirrors\[0\]: tracking.mode lvm-thin needs lvm: \{ pool: VG\/POOL \}/);
    expect(problems(`${base}    volume: /srv/db.img\n    tracking: { mode: lvm-thin }\n    lvm: { pool: vg0/pool0 }\n`)).to.contain('mirrors[0].volume: tracking.mode lvm-thin needs volume: /dev/VG/LV');
    expect(problems(`${base}    volume: /dev/vg1/db\n    tracking: { mode: lvm-thin }\n    lvm: { pool: vg0/pool0 }\n`)).to.contain('mirrors[0].lvm: the pool vg0/pool0 is not in the volume group of /dev/vg1/db');
    expect(problems(`${base}    volume: /v.img\n    lvm: { pool: vg0/pool0 }\n`)).to.contain('mirrors[0].lvm: lvm: is used only with tracking.mode lvm-thin');
    expect(problems(`${base}    volume: /v.img\n    tracking: { mode: zfs }\n`)).to.match(/:8:\d+: mirrors\[0\].tracking.mode: /);
  });

  it('mirror names: a letter or digit first, then letters, digits, . _ -, at most 64; never . or .., nor a file of the state directory', () => {
    const named = (n: string) => EXAMPLE.replace('name: db1', `name: ${JSON.stringify(n)}`);
    for (const ok of ['db1', '9', 'A.b_c-d', 'x'.repeat(64), 'control.sock2', 'daemon.lock.d']) expect(parseConfig(named(ok), '/c.yaml').mirrors[1]!.name).to.equal(ok);
    // Each refusal names the key, the line of the value and why.
    expect(problems(named('..'))).to.match(/\/etc\/tm\.yaml:8:\d+: mirrors\[1\]\.name: "\.\." cannot name a mirror/);
    expect(problems(named('.'))).to.contain('mirrors[1].name: "." cannot name a mirror');
    for (const file of ['control.sock', 'daemon.lock']) expect(problems(named(file))).to.contain(`mirrors[1].name: "${file}" is a file the daemon keeps in node.stateDir`);
    for (const bad of ['.hidden', '-x', '_x', 'a/b', 'a b', '', 'x'.repeat(65), 'é']) expect(problems(named(bad)), bad).to.contain('mirrors[1].name: expected a letter or a digit');
  });

  it('a YAML alias bomb is TM_ERR_CONFIG naming the file (it used to escape as TM_ERR_INTERNAL)', () => {
    // 9^6 = 531441 strings if expanded; the yaml package stops after 100 aliases.
    const levels = ['a: &a [x, x, x, x, x, x, x, x, x]'];
    for (const [prev, cur] of [['a', 'b'], ['b', 'c'], ['c', 'd'], ['d', 'e'], ['e', 'f']]) levels.push(`${cur}: &${cur} [${Array(9).fill(`*${prev}`).join(', ')}]`);
    const msg = problems(`${levels.join('\n')}\n`);
    expect(msg).to.contain('/etc/tm.yaml: YAML: Excessive alias count').and.contain('more than 100');
    // An alias to nothing is TM_ERR_CONFIG too.
    expect(problems('node: *nowhere\n')).to.contain('/etc/tm.yaml').and.contain('alias');
  });

  it('a YAML syntax error names its line', () => {
    const msg = problems('node: { name: a\nmirrors:\n  - [\n');
    expect(msg).to.match(/\/etc\/tm\.yaml:\d+:\d+: YAML:/);
  });

  describe('files', () => {
    let dir: string;
    before(() => (dir = mkdtempSync(path.join(os.tmpdir(), 'tm-cfg-'))));
    after(() => rmSync(dir, { recursive: true, force: true }));

    it('a missing config file is TM_ERR_CONFIG naming it', async () => {
      const f = path.join(dir, 'missing.yaml');
      try {
        await loadConfig(f);
        expect.fail('should throw');
      } catch (e) {
        expect((e as TmError).code).to.equal('TM_ERR_CONFIG');
        expect((e as Error).message).to.contain(f).and.contain('ENOENT');
      }
    });

    it('loads a file', async () => {
      const f = path.join(dir, 'tm.yaml');
      writeFileSync(f, EXAMPLE);
      expect((await loadConfig(f)).sourcePath).to.equal(f);
    });
  });
});
