import { expect } from 'chai';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync, chmodSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { APT_LINE, APT_PACKAGES, missingPrerequisites, TOOLS } from '../helpers/prerequisites.mjs';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const SCRIPT = path.join(ROOT, 'test', 'helpers', 'prerequisites.mjs');

/** Where `cmd` is on this process's PATH. */
function which(cmd: string): string {
  const r = spawnSync('sh', ['-c', `command -v ${cmd}`], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`${cmd} is not installed here: the suite's prerequisites are not met`);
  return r.stdout.trim();
}

/** A directory of symlinks to `cmds` (and node), to be the whole PATH of a child. */
function binDir(dir: string, cmds: string[]): string {
  const bin = mkdtempSync(path.join(dir, 'bin-'));
  for (const c of new Set([...cmds, 'node'])) symlinkSync(which(c), path.join(bin, c));
  return bin;
}

function check(env: NodeJS.ProcessEnv, pre: string[] = []) {
  const [cmd, ...args] = [...pre, process.execPath, SCRIPT];
  const r = spawnSync(cmd!, args, { env, encoding: 'utf8' });
  return { code: r.status, out: r.stdout, err: r.stderr };
}

describe('prerequisites: npm test checks root and the system tools once, up front, in one line', () => {
  let dir: string;
  before(() => (dir = mkdtempSync(path.join(os.tmpdir(), 'tm-prereq-'))));
  after(() => rmSync(dir, { recursive: true, force: true }));

  it('on this machine (root, every tool installed) it passes silently', () => {
    expect(missingPrerequisites()).to.deep.equal([]);
    expect(check(process.env)).to.deep.equal({ code: 0, out: '', err: '' });
  });

  it('a PATH lacking mkfs.xfs: exit 1, one line on stderr naming it, the apt-get command and root', () => {
    const bin = binDir(dir, TOOLS.map(([c]) => c).filter((c) => c !== 'mkfs.xfs'));
    const r = check({ PATH: bin });
    expect(r.code).to.equal(1);
    expect(r.out).to.equal('');
    const lines = r.err.trimEnd().split('\n');
    expect(lines, r.err).to.have.length(1);
    expect(lines[0]).to.equal(`npm test cannot run: missing mkfs.xfs. On Debian, as root: ${APT_LINE}; then run npm test as root.`);
  });

  it('a PATH with node alone: every tool named, still one line', () => {
    const r = check({ PATH: binDir(dir, []) });
    expect(r.code).to.equal(1);
    expect(r.err.trimEnd().split('\n')).to.have.length(1);
    for (const [cmd] of TOOLS) expect(r.err).to.contain(cmd);
  });

  it('not root: exit 1 naming root (run as nobody through setpriv)', () => {
    const r = check({ PATH: process.env.PATH }, [which('setpriv'), '--reuid=65534', '--regid=65534', '--clear-groups']);
    expect(r.code, r.err).to.equal(1);
    expect(r.err.trimEnd().split('\n')).to.have.length(1);
    expect(r.err).to.contain('missing root (the tests mount loop devices)');
  });

  it('no loop devices and no native addon are named too', () => {
    const missing = missingPrerequisites({ uid: 0, loopControl: path.join(dir, 'no-loop-control'), root: dir });
    expect(missing).to.deep.equal(['loop devices (/dev/loop-control: modprobe loop)', 'the native addon (run npm install)']);
  });

  it('the README quick start has the same apt-get line, and .ci/run installs every package of it', () => {
    const readme = readFileSync(path.join(ROOT, 'README.md'), 'utf8');
    expect(readme).to.contain(APT_LINE);
    const ci = readFileSync(path.join(ROOT, '.ci', 'run'), 'utf8');
    const installed = /apt-get install -y -qq ([^>]+)>/.exec(ci)?.[1]?.trim().split(/\s+/) ?? [];
    expect(installed).to.include.members(APT_PACKAGES);
    // package.json runs the check before building or testing.
    const scripts = (JSON.parse(readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { scripts: Record<string, string> }).scripts;
    expect(scripts.test).to.match(/^node test\/helpers\/prerequisites\.mjs && /);
  });

  it('.ci/run still ends with its result line when the prerequisites fail (npm ci and apt-get faked, npm test real)', () => {
    const cmds = ['bash', 'sh', 'dirname', 'mktemp', 'rm', 'id', 'env'];
    const bin = binDir(dir, cmds);
    const npm = which('npm');
    writeFileSync(path.join(bin, 'npm'), `#!/bin/sh\nif [ "$1" = ci ]; then exit 0; fi\nexec ${npm} "$@"\n`);
    writeFileSync(path.join(bin, 'apt-get'), '#!/bin/sh\nexit 0\n');
    chmodSync(path.join(bin, 'npm'), 0o755);
    chmodSync(path.join(bin, 'apt-get'), 0o755);
    const r = spawnSync(which('bash'), [path.join(ROOT, '.ci', 'run')], { env: { PATH: bin, HOME: process.env.HOME ?? '/root' }, encoding: 'utf8', timeout: 60_000 });
    expect(r.status).to.equal(1);
    expect(r.stdout.trimEnd().split('\n').at(-1)).to.equal('tests: 0 passed, 1 failed');
    expect(r.stderr).to.contain('npm test cannot run: missing mkfs.xfs').and.contain(APT_LINE);
    expect(r.stdout, 'nothing was built or run').not.to.match(/passing|failing/);
  });
});
