import { expect } from 'chai';
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmodSync, existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync, closeSync, openSync, writeSync, ftruncateSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { cliPath } from '../../src/cli/daemon-process.js';

/** Run the built CLI (dist/cli.js, as an operator would). */
function cli(...args: string[]) {
  const r = spawnSync(process.execPath, [cliPath(), ...args], { encoding: 'utf8', timeout: 20_000 });
  return { code: r.status, out: r.stdout, err: r.stderr };
}

describe('cli: options, exit codes, map and status', () => {
  let dir: string;
  before(() => (dir = mkdtempSync(path.join(os.tmpdir(), 'tm-cli-'))));
  after(() => rmSync(dir, { recursive: true, force: true }));

  it('--help and --version exit 0; no command exits 2 with the usage', () => {
    expect(cli('--help')).to.include({ code: 0 }).and.have.property('out').that.contains('thinmirror run --config FILE');
    expect(cli('--version').out.trim()).to.match(/^\d+\.\d+\.\d+$/);
    const none = cli();
    expect(none.code).to.equal(2);
    expect(none.out).to.contain('Usage');
  });

  it('bad usage exits 2 with TM_ERR_USAGE', () => {
    for (const args of [['frobnicate'], ['run'], ['status', '--bogus'], ['map'], ['map', 'a', 'b'], ['map', 'x', '--chunk-size', '3000']]) {
      const r = cli(...args);
      expect(r.code, args.join(' ')).to.equal(2);
      expect(r.err, args.join(' ')).to.contain('TM_ERR_USAGE');
    }
  });

  it('map prints extents and totals; --json has them as numbers', () => {
    const f = path.join(dir, 'v.img');
    const fd = openSync(f, 'w');
    writeSync(fd, Buffer.alloc(8192, 1), 0, 8192, 1 << 20);
    ftruncateSync(fd, 4 << 20);
    closeSync(fd);
    const r = cli('map', f, '--chunk-size', '64KiB');
    expect(r.code).to.equal(0);
    expect(r.out).to.contain('1 extent').and.contain('65536 of 4194304 bytes');
    const j = JSON.parse(cli('map', f, '--json').out);
    expect(j).to.deep.include({ size: 4 << 20, chunkSize: 65536, allocatedBytes: 65536 });
    expect(j.extents).to.deep.equal([{ offset: 1 << 20, length: 65536 }]);
  });

  it('map of a missing file exits 1 with TM_ERR_VOLUME_IO naming it', () => {
    const r = cli('map', path.join(dir, 'missing.img'));
    expect(r.code).to.equal(1);
    expect(r.err).to.contain('TM_ERR_VOLUME_IO').and.contain('missing.img');
  });

  it('run with a broken config exits 1 naming file, line and key; status without a daemon exits 1', () => {
    const cfg = path.join(dir, 'bad.yaml');
    writeFileSync(cfg, 'node: { name: a, stateDir: ./s }\nauth: { pskFile: ./k }\nmirrors:\n  - { name: m, role: primary, volume: ./v, peer: ws://h:1, chunkSize: 3000 }\n');
    const r = cli('run', '--config', cfg);
    expect(r.code).to.equal(1);
    expect(r.err).to.contain('TM_ERR_CONFIG').and.contain(`${cfg}:4:`).and.contain('mirrors[0].chunkSize');
    const ok = path.join(dir, 'ok.yaml');
    writeFileSync(ok, 'node: { name: a, stateDir: ./s }\nauth: { pskFile: ./k }\nmirrors:\n  - { name: m, role: primary, volume: ./v, peer: ws://127.0.0.1:1 }\n');
    const s = cli('status', '--config', ok);
    expect(s.code).to.equal(1);
    expect(s.err).to.contain('TM_ERR_CONTROL').and.contain('control.sock');
  });

  it('keygen FILE writes a 0600 base64 key of 32 bytes; an existing FILE exits 1 (untouched) unless --force; no FILE exits 2', () => {
    const f = path.join(dir, 'psk-keygen');
    const r = cli('keygen', f);
    expect(r.code, r.err).to.equal(0);
    expect(r.out).to.contain(f);
    expect(statSync(f).mode & 0o777).to.equal(0o600);
    const key = readFileSync(f, 'utf8');
    expect(Buffer.from(key.trim(), 'base64')).to.have.length(32);
    expect(r.out, 'the key is never printed').not.to.contain(key.trim());
    const again = cli('keygen', f);
    expect(again.code).to.equal(1);
    expect(again.err).to.contain('TM_ERR_CONFIG').and.contain('--force');
    expect(readFileSync(f, 'utf8')).to.equal(key);
    expect(cli('keygen', '--force', f).code).to.equal(0);
    expect(readFileSync(f, 'utf8')).not.to.equal(key);
    expect(cli('keygen').code).to.equal(2);
    expect(cli('keygen', '--help').out).to.contain('thinmirror keygen FILE [--force]');
  });

  it('run refuses, exit 1 TM_ERR_CONFIG before anything starts: a key file readable by others, a stateDir under /proc (it used to hang), a mirror named ..', () => {
    const key = path.join(dir, 'psk-run');
    writeFileSync(key, `${randomBytes(32).toString('base64')}\n`, { mode: 0o644 });
    chmodSync(key, 0o644);
    const state = path.join(dir, 'run-state');
    const cfg = (stateDir: string, name = 'm') =>
      `node: { name: a, stateDir: ${stateDir} }\nlisten: { host: 127.0.0.1, port: 1 }\nauth: { pskFile: ${key} }\nmirrors:\n  - { name: "${name}", role: secondary, volume: ./v }\n`;
    const file = path.join(dir, 'run.yaml');
    writeFileSync(file, cfg(state));
    const open = cli('run', '--config', file);
    expect(open.code).to.equal(1);
    expect(open.err).to.contain('TM_ERR_CONFIG').and.contain('mode 0644').and.contain(`run: chmod 600 ${key}`);
    chmodSync(key, 0o600);
    writeFileSync(file, cfg('/proc/thinmirror-test-state'));
    const proc = cli('run', '--config', file);
    expect(proc.code, 'exited (not killed by the timeout)').to.equal(1);
    expect(proc.err).to.contain('TM_ERR_CONFIG').and.contain('node.stateDir /proc/thinmirror-test-state is on proc');
    writeFileSync(file, cfg(state, '..'));
    const dots = cli('run', '--config', file);
    expect(dots.code).to.equal(1);
    expect(dots.err).to.contain('TM_ERR_CONFIG').and.contain('mirrors[0].name');
    expect(existsSync(path.join(dir, 'state.json')), 'nothing written into the parent of stateDir').to.equal(false);
  });
});
