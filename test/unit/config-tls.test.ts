import { expect } from 'chai';
import { copyFileSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { isLoopbackHost, loadConfig, parseConfig } from '../../src/daemon/config.js';
import { TmError } from '../../src/errors.js';
import { readTlsFiles } from '../../src/wire/tls.js';
import { makeCa, issue } from '../helpers/certs.js';
import { configProblems as problems } from '../helpers/config.js';

const CONFIG_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', 'config');

const HEAD = 'node: { name: a, stateDir: /s }\nauth: { pskFile: /p }\n';

/** A primary mirror (line 5 is its peer when `top` is empty). */
function primary(peer: string, extra = '', top = ''): string {
  return `${HEAD}${top}mirrors:\n  - name: m\n    role: primary\n    peer: ${peer}\n    volume: /v.img\n${extra}`;
}


describe('config: tls and insecure (mutual TLS, plain ws:// only on loopback)', () => {
  it('loopback hosts: 127.0.0.0/8, ::1 and localhost; nothing else', () => {
    for (const h of ['127.0.0.1', '127.3.2.1', '[::1]', '::1', 'localhost', 'LOCALHOST', 'db.localhost', '::ffff:127.0.0.1']) expect(isLoopbackHost(h), h).to.equal(true);
    for (const h of ['10.0.0.2', '0.0.0.0', '::', '[::]', '128.0.0.1', 'site-b', 'localhost.example', '[fe80::1]', '1.127.0.0']) expect(isLoopbackHost(h), h).to.equal(false);
  });

  it('a plain ws:// peer on loopback needs nothing', () => {
    for (const peer of ['ws://127.0.0.1:7890', 'ws://127.9.9.9:1', 'ws://[::1]:7890', 'ws://localhost:7890']) {
      const m = parseConfig(primary(peer), '/c.yaml').mirrors[0]!;
      expect(m.insecure, peer).to.equal(false);
      expect(m.tls, peer).to.equal(undefined);
    }
  });

  it('a plain ws:// peer off loopback is refused at load unless the mirror says insecure: true', () => {
    const msg = problems(primary('ws://10.0.0.2:7890'));
    expect(msg).to.match(/^\/etc\/tm\.yaml:6:11: mirrors\[0\]\.peer: peer ws:\/\/10\.0\.0\.2:7890 is plain ws:\/\/ to a host that is not loopback: use wss:\/\/ with tls: \{ ca, cert, key \}, or set insecure: true on this mirror$/m);
    expect(problems(primary('ws://site-b:7890'))).to.contain('peer ws://site-b:7890 is plain ws://');
    expect(problems(primary('ws://[fe80::1]:7890'))).to.contain('mirrors[0].peer');
    const m = parseConfig(primary('ws://10.0.0.2:7890', '    insecure: true\n'), '/c.yaml').mirrors[0]!;
    expect(m.insecure).to.equal(true);
    expect(problems(primary('ws://10.0.0.2:7890', '    insecure: yes please\n'))).to.match(/:8:\d+: mirrors\[0\]\.insecure: /);
  });

  it('a wss:// peer needs tls: on the mirror or at the top level', () => {
    const msg = problems(primary('wss://10.0.0.2:7890'));
    expect(msg).to.match(/\/etc\/tm\.yaml:6:11: mirrors\[0\]\.peer: peer wss:\/\/10\.0\.0\.2:7890 is wss:\/\/ but no tls: \{ ca, cert, key \} is configured/);
    // insecure does not stand in for certificates
    expect(problems(primary('wss://10.0.0.2:7890', '    insecure: true\n'))).to.contain('is wss:// but no tls');
  });

  it('the top-level tls: applies to wss:// primaries, paths resolved against the config file; a mirror\'s own tls: overrides it', () => {
    const top = 'tls: { ca: tls/ca.pem, cert: tls/a.pem, key: /k/a.key }\n';
    const c = parseConfig(primary('wss://10.0.0.2:7890', '', top), '/etc/thinmirror/tm.yaml');
    expect(c.tls).to.deep.equal({ ca: '/etc/thinmirror/tls/ca.pem', cert: '/etc/thinmirror/tls/a.pem', key: '/k/a.key' });
    expect(c.mirrors[0]!.tls).to.deep.equal({ ca: '/etc/thinmirror/tls/ca.pem', cert: '/etc/thinmirror/tls/a.pem', key: '/k/a.key', origin: 'node' });
    const own = parseConfig(primary('wss://10.0.0.2:7890', '    tls: { ca: other/ca.pem, cert: other/a.pem, key: other/a.key }\n', top), '/etc/thinmirror/tm.yaml');
    expect(own.mirrors[0]!.tls).to.deep.equal({ ca: '/etc/thinmirror/other/ca.pem', cert: '/etc/thinmirror/other/a.pem', key: '/etc/thinmirror/other/a.key', origin: 'mirror' });
    // A ws:// peer on loopback does not use the node's tls.
    expect(parseConfig(primary('ws://127.0.0.1:7890', '', top), '/c.yaml').mirrors[0]!.tls).to.equal(undefined);
    // insecure: true where it is not needed is allowed (and changes nothing).
    expect(parseConfig(primary('wss://10.0.0.2:7890', '    insecure: true\n', top), '/c.yaml').mirrors[0]!.insecure).to.equal(true);
  });

  it('tls: takes exactly ca, cert and key; is refused on a ws:// mirror and on a secondary', () => {
    expect(problems(primary('wss://h:1', '', 'tls: { ca: a, cert: b }\n'))).to.match(/:3:\d+: tls\.key: /);
    expect(problems(primary('wss://h:1', '', 'tls: { ca: a, cert: b, key: c, passphrase: x }\n'))).to.contain('tls.passphrase: unknown key');
    expect(problems(primary('wss://h:1', '', 'tls: { ca: "", cert: b, key: c }\n'))).to.contain('tls.ca: expected a path');
    expect(problems(primary('ws://127.0.0.1:1', '    tls: { ca: a, cert: b, key: c }\n'))).to.match(/:8:\d+: mirrors\[0\]\.tls: tls: is used with a wss:\/\/ peer; peer ws:\/\/127\.0\.0\.1:1 is plain ws:\/\//);
    const sec = `${HEAD}listen: { host: 127.0.0.1, port: 7890 }\nmirrors:\n  - name: r\n    role: secondary\n    volume: /r.img\n    tls: { ca: a, cert: b, key: c }\n`;
    expect(problems(sec)).to.match(/:8:\d+: mirrors\[0\]\.tls: a secondary mirror takes no tls: the listener uses the top-level tls:/);
  });

  it('a listener off loopback without tls: needs insecure: true on every secondary mirror', () => {
    const sec = (host: string, top = '', extra = '') =>
      `${HEAD}listen: { host: ${host}, port: 7890 }\n${top}mirrors:\n  - name: r1\n    role: secondary\n    volume: /r1.img\n${extra}  - name: r2\n    role: secondary\n    volume: /r2.img\n    insecure: true\n`;
    const msg = problems(sec('0.0.0.0'));
    expect(msg).to.match(/\/etc\/tm\.yaml:5:5: mirrors\[0\]: listen\.host 0\.0\.0\.0 is not loopback and there is no top-level tls: .*insecure: true on this mirror/);
    expect(msg, 'r2 says insecure: true').not.to.contain('mirrors[1]');
    expect(parseConfig(sec('0.0.0.0', '', '    insecure: true\n'), '/c.yaml').mirrors.map((m) => m.insecure)).to.deep.equal([true, true]);
    expect(parseConfig(sec('10.0.0.2', 'tls: { ca: ca.pem, cert: b.pem, key: b.key }\n'), '/etc/tm/c.yaml').tls).to.deep.equal({ ca: '/etc/tm/ca.pem', cert: '/etc/tm/b.pem', key: '/etc/tm/b.key' });
    expect(() => parseConfig(sec('127.0.0.1'), '/c.yaml')).not.to.throw();
    expect(() => parseConfig(sec('localhost'), '/c.yaml')).not.to.throw();
    expect(() => parseConfig(sec('::1'), '/c.yaml')).not.to.throw();
  });

  it('the example configs in config/ load', async () => {
    for (const f of ['primary.example.yaml', 'secondary.example.yaml']) {
      const c = await loadConfig(path.join(CONFIG_DIR, f));
      expect(c.tls, f).to.not.equal(undefined);
    }
    const p = await loadConfig(path.join(CONFIG_DIR, 'primary.example.yaml'));
    expect(p.mirrors[0]!.peer).to.match(/^wss:\/\//);
    expect(p.mirrors[0]!.tls).to.deep.include({ origin: 'node' });
  });

  describe('readTlsFiles (certificates generated with openssl)', function () {
    this.timeout(30_000);
    let dir: string;
    let files: { ca: string; cert: string; key: string };
    before(() => {
      dir = mkdtempSync(path.join(os.tmpdir(), 'tm-tlscfg-'));
      const ca = makeCa(dir, 'ca');
      const leaf = issue(ca, 'site-a', 'client');
      files = { ca: ca.cert, cert: leaf.cert, key: leaf.key };
    });
    after(() => rmSync(dir, { recursive: true, force: true }));

    async function configError(p: Promise<unknown>): Promise<string> {
      try {
        await p;
      } catch (e) {
        expect((e as TmError).code).to.equal('TM_ERR_CONFIG');
        return (e as Error).message;
      }
      return expect.fail('expected TM_ERR_CONFIG');
    }

    it('reads a CA, certificate and matching key; notAfter is the certificate\'s expiry', async () => {
      const t = await readTlsFiles(files, 'tls');
      expect(t.ca.toString()).to.contain('BEGIN CERTIFICATE');
      expect(t.key.toString()).to.contain('PRIVATE KEY');
      expect(t.notAfter.getTime()).to.be.greaterThan(Date.now());
    });

    it('a missing file is TM_ERR_CONFIG naming the key and the path', async () => {
      const missing = path.join(dir, 'nope.pem');
      expect(await configError(readTlsFiles({ ...files, cert: missing }, 'tls'))).to.equal(`cannot read tls.cert ${missing}: ENOENT`);
      expect(await configError(readTlsFiles({ ...files, ca: missing }, 'mirror db1: tls'))).to.equal(`cannot read mirror db1: tls.ca ${missing}: ENOENT`);
    });

    it('a certificate or CA that is not PEM, or a key of another certificate, is TM_ERR_CONFIG', async () => {
      const junk = path.join(dir, 'junk.pem');
      writeFileSync(junk, 'not a certificate\n');
      expect(await configError(readTlsFiles({ ...files, cert: junk }, 'tls'))).to.contain(`tls.cert ${junk} is not a PEM certificate`);
      expect(await configError(readTlsFiles({ ...files, ca: junk }, 'tls'))).to.contain(`tls.ca ${junk} holds no PEM certificate`);
      expect(await configError(readTlsFiles({ ...files, ca: files.key }, 'tls'))).to.contain('holds no PEM certificate');
      const other = path.join(dir, 'other.key');
      copyFileSync(path.join(dir, 'ca', 'ca.key'), other);
      expect(await configError(readTlsFiles({ ...files, key: other }, 'tls'))).to.contain('tls: cannot use').and.contain(other);
    });
  });
});
