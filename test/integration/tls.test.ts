import { expect } from 'chai';
import { existsSync, mkdtempSync, promises as fsp, readFileSync, rmSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { stringify } from 'yaml';
import { DaemonProcess } from '../../src/cli/daemon-process.js';
import type { MirrorStatus } from '../../src/mirror/status.js';
import { createSampleVolume } from '../../src/util/sample.js';
import { makeTestPki, type CertFiles, type TestPki } from '../helpers/certs.js';
import { testKeyText } from '../helpers/config.js';
import { freePort } from '../helpers/pair-config.js';
import { Pair, sha256File } from '../helpers/pair.js';

const MiB = 1024 * 1024;
const PSK = testKeyText('tls');

/** Poll a daemon's log file until it holds `text` (the line may trail the status by a moment). */
async function waitForLog(d: DaemonProcess, text: string, timeoutMs = 10_000): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const log = existsSync(d.logFile) ? readFileSync(d.logFile, 'utf8') : '';
    if (log.includes(text)) return log;
    if (Date.now() > deadline) throw new Error(`${d.logFile} does not contain ${JSON.stringify(text)}:\n${d.logTail(30)}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

describe('integration: mutual TLS (wss://)', function () {
  this.timeout(120_000);
  let pkiDir: string;
  let pki: TestPki;
  let pair: Pair | undefined;

  before(() => {
    pkiDir = mkdtempSync(path.join(os.tmpdir(), 'tm-pki-'));
    pki = makeTestPki(pkiDir); // fails (never skips) without the openssl CLI
  });
  after(() => rmSync(pkiDir, { recursive: true, force: true }));
  afterEach(async () => {
    await pair?.cleanup();
    pair = undefined;
  });

  /**
   * Configs of a pair over wss:// on 127.0.0.1. The secondary's files are
   * copied beside its config and named relative to it; the primary names
   * absolute paths. `client`/`server`: the certificates each side presents.
   */
  async function writeTlsConfigs(p: Pair, o: { client?: CertFiles; server?: CertFiles; primaryPsk?: string } = {}): Promise<void> {
    const port = await freePort();
    const client = o.client ?? pki.client;
    const server = o.server ?? pki.server;
    const tlsDir = path.join(p.dir, 'tls');
    await fsp.mkdir(tlsDir);
    await fsp.copyFile(pki.ca.cert, path.join(tlsDir, 'ca.pem'));
    await fsp.copyFile(server.cert, path.join(tlsDir, 'site-b.pem'));
    await fsp.copyFile(server.key, path.join(tlsDir, 'site-b.key'));
    const psk = path.join(p.dir, 'psk');
    const primaryPsk = path.join(p.dir, 'psk-a');
    await fsp.writeFile(psk, PSK, { mode: 0o600 });
    await fsp.writeFile(primaryPsk, o.primaryPsk ?? PSK, { mode: 0o600 });
    const cfg = {
      primary: path.join(p.dir, 'primary.yaml'),
      secondary: path.join(p.dir, 'secondary.yaml'),
      primaryState: path.join(p.dir, 'state-a'),
      secondaryState: path.join(p.dir, 'state-b'),
    };
    await fsp.writeFile(
      cfg.secondary,
      stringify({
        node: { name: 'site-b', stateDir: 'state-b' },
        listen: { host: '127.0.0.1', port },
        tls: { ca: 'tls/ca.pem', cert: 'tls/site-b.pem', key: 'tls/site-b.key' },
        auth: { pskFile: 'psk' },
        mirrors: [{ name: p.mirror, role: 'secondary', volume: p.target }],
      }),
    );
    await fsp.writeFile(
      cfg.primary,
      stringify({
        node: { name: 'site-a', stateDir: cfg.primaryState },
        auth: { pskFile: primaryPsk },
        tls: { ca: pki.ca.cert, cert: client.cert, key: client.key },
        mirrors: [
          {
            name: p.mirror,
            role: 'primary',
            volume: p.source,
            peer: `wss://127.0.0.1:${port}`,
            tracking: { mode: 'scan', interval: '1s' },
            reconnect: { min: '1s', max: '2s' },
          },
        ],
      }),
    );
    p.cfg = cfg;
  }

  /** Start both, wait for the primary's mirror to report an error; the refusal must be coded TM_ERR_TLS. */
  async function expectRefused(p: Pair): Promise<MirrorStatus> {
    await p.startSecondary().waitReady();
    await p.startPrimary().waitReady();
    const st = await p.primary!.waitFor((s) => s.mirrors[0]!.error !== null, 30_000, 'the refusal');
    const m = st.mirrors[0]!;
    expect(m.error!.code, JSON.stringify(m.error)).to.equal('TM_ERR_TLS');
    expect(m.error!.message).to.contain('wss://127.0.0.1:');
    expect(m.committedGeneration).to.equal(0);
    expect(m.sentBytes).to.equal(0);
    // A refusal backs off to reconnect.max (2 s here) like the other refusals.
    await waitForLog(p.primary!, '"retryInSeconds":2');
    return m;
  }

  it('a primary and a secondary with certificates of one CA sync over wss://; status shows the TLS listener', async () => {
    pair = await Pair.create();
    await createSampleVolume(pair.source, { size: 32 * MiB, allocated: 4 * MiB, extents: 4 });
    await writeTlsConfigs(pair);
    const sst = await pair.startSecondary().waitReady();
    expect(sst.listen).to.deep.include({ host: '127.0.0.1', tls: true });
    await pair.startPrimary().waitReady();
    const m = await pair.waitInSync(1);
    expect(m.error).to.equal(null);
    expect(m.peer).to.match(/^wss:\/\/127\.0\.0\.1:\d+$/);
    expect(await sha256File(pair.target)).to.equal(await sha256File(pair.source));
    expect((await pair.secondaryMirror()).committedGeneration).to.equal(1);
    expect(pair.secondary!.logTail(40)).not.to.contain('TM_ERR_TLS');
  });

  it('a client certificate from another CA is refused with TM_ERR_TLS on both sides; no target is created', async () => {
    pair = await Pair.create();
    await createSampleVolume(pair.source, { size: 16 * MiB, allocated: 2 * MiB, extents: 2 });
    await writeTlsConfigs(pair, { client: pki.otherClient });
    const m = await expectRefused(pair);
    expect(m.error!.message).to.contain('UNABLE_TO_VERIFY_LEAF_SIGNATURE').and.contain('refused');
    const log = await waitForLog(pair.secondary!, 'TM_ERR_TLS');
    expect(log).to.contain('UNABLE_TO_VERIFY_LEAF_SIGNATURE').and.contain('"remote":"127.0.0.1:');
    expect(log).not.to.contain('session established');
    expect(existsSync(pair.target), 'target created on a refused session').to.equal(false);
    const sm = await pair.secondaryMirror();
    expect(sm.committedGeneration).to.equal(0);
  });

  it('an expired client certificate is refused with TM_ERR_TLS; an existing target is left untouched', async () => {
    pair = await Pair.create();
    await createSampleVolume(pair.source, { size: 16 * MiB, allocated: 2 * MiB, extents: 2 });
    await createSampleVolume(pair.target, { size: 16 * MiB, allocated: 1 * MiB, extents: 1, seed: 5 });
    const before = await sha256File(pair.target);
    expect(before).not.to.equal(await sha256File(pair.source));
    await writeTlsConfigs(pair, { client: pki.expiredClient });
    const m = await expectRefused(pair);
    expect(m.error!.message).to.contain('CERT_HAS_EXPIRED');
    // The primary warned at start that its own certificate had expired.
    expect(readFileSync(pair.primary!.logFile, 'utf8')).to.match(/tls\.cert .* expired on 2020-01-02/);
    const log = await waitForLog(pair.secondary!, 'TM_ERR_TLS');
    expect(log).to.contain('CERT_HAS_EXPIRED');
    expect(await sha256File(pair.target)).to.equal(before);
    expect((await pair.secondaryMirror()).committedGeneration).to.equal(0);
  });

  for (const [what, server, reason] of [
    ['an expired', 'expiredServer', 'CERT_HAS_EXPIRED'],
    ['another CA\'s', 'otherServer', 'UNABLE_TO_VERIFY_LEAF_SIGNATURE'],
    ['another host\'s', 'wrongHostServer', 'ERR_TLS_CERT_ALTNAME_INVALID'],
  ] as const) {
    it(`the primary refuses ${what} server certificate with TM_ERR_TLS (${reason}); nothing is sent`, async () => {
      pair = await Pair.create();
      await createSampleVolume(pair.source, { size: 16 * MiB, allocated: 2 * MiB, extents: 2 });
      await writeTlsConfigs(pair, { server: pki[server] });
      const m = await expectRefused(pair);
      expect(m.error!.message).to.contain(reason).and.contain('secondary wss://127.0.0.1:');
      expect(m.wireBytes).to.equal(0);
      expect(existsSync(pair.target)).to.equal(false);
      // The secondary sees the handshake end and logs it with the code and the primary's address.
      expect(await waitForLog(pair.secondary!, 'TM_ERR_TLS')).to.contain('"remote":"127.0.0.1:');
    });
  }

  it('the pre-shared key handshake still runs inside TLS: a verified client with another key is TM_ERR_AUTH_FAILED', async () => {
    pair = await Pair.create();
    await createSampleVolume(pair.source, { size: 16 * MiB, allocated: 1 * MiB, extents: 1 });
    await writeTlsConfigs(pair, { primaryPsk: testKeyText('tls, another key') });
    await pair.startSecondary().waitReady();
    await pair.startPrimary().waitReady();
    const st = await pair.primary!.waitFor((s) => s.mirrors[0]!.error !== null, 30_000, 'the refusal');
    expect(st.mirrors[0]!.error!.code).to.equal('TM_ERR_AUTH_FAILED');
    expect(existsSync(pair.target)).to.equal(false);
    expect(pair.secondary!.logTail(40)).not.to.contain('TM_ERR_TLS');
  });

  it('a listener certificate that cannot be read stops the daemon at start with TM_ERR_CONFIG naming tls.cert and the file', async () => {
    pair = await Pair.create();
    await writeTlsConfigs(pair);
    await fsp.rm(path.join(pair.dir, 'tls', 'site-b.pem'));
    const d = pair.startSecondary();
    const exit = await d.exited;
    expect(exit.code).to.equal(1);
    expect(d.logTail()).to.contain('TM_ERR_CONFIG').and.contain(`tls.cert ${path.join(pair.dir, 'tls', 'site-b.pem')}`).and.contain('ENOENT');
  });
});
