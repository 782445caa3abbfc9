import { expect } from 'chai';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync, closeSync, openSync, writeSync, ftruncateSync } from 'node:fs';
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
});
