import { expect } from 'chai';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { cliPath, DaemonProcess } from '../../src/cli/daemon-process.js';
import { sdNotify } from '../../src/daemon/notify.js';
import { Pair } from '../helpers/pair.js';

const UNIT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', 'systemd', 'thinmirror.service');
const SYSTEMD_ANALYZE = '/usr/bin/systemd-analyze';

function requireTool(file: string, pkg: string): void {
  if (!existsSync(file)) throw new Error(`${file} is missing: apt-get install -y ${pkg}`);
}

/** systemd-analyze verify of a unit file: exit code and everything it printed (warnings included). */
function verify(unitFile: string): { code: number | null; out: string } {
  const r = spawnSync(SYSTEMD_ANALYZE, ['verify', '--man=no', unitFile], { encoding: 'utf8', timeout: 30_000 });
  return { code: r.status, out: `${r.stdout}${r.stderr}`.trim() };
}

describe('systemd: unit file and readiness notification', function () {
  this.timeout(60_000);
  let dir: string;
  before(() => (dir = mkdtempSync(path.join(os.tmpdir(), 'tm-sd-'))));
  after(() => rmSync(dir, { recursive: true, force: true }));

  /** The unit with ExecStart pointing at this node and this checkout's dist/cli.js (everything else unchanged). */
  function localCopy(name: string, edit: (text: string) => string = (t) => t): string {
    const text = readFileSync(UNIT, 'utf8');
    const execStart = 'ExecStart=/usr/bin/node /opt/thinmirror/dist/cli.js run --config /etc/thinmirror/thinmirror.yaml';
    expect(text).to.contain(execStart);
    const file = path.join(dir, name);
    writeFileSync(file, edit(text.replace(execStart, `ExecStart=${process.execPath} ${cliPath()} run --config /etc/thinmirror/thinmirror.yaml`)));
    return file;
  }

  it('systemd-analyze verify accepts the unit without a single warning (and the check does catch a bad key)', () => {
    requireTool(SYSTEMD_ANALYZE, 'systemd');
    expect(existsSync(cliPath()), `${cliPath()} (run npx tsc -p tsconfig.json)`).to.equal(true);
    const ok = verify(localCopy('thinmirror.service'));
    expect(ok.out, 'systemd-analyze verify output').to.equal('');
    expect(ok.code).to.equal(0);
    // The harness is honest: a misspelt key and an unknown Type are reported.
    const bad = verify(localCopy('thinmirror-bad.service', (t) => t.replace('NotifyAccess=main', 'NotifyAcess=main').replace('Type=notify', 'Type=notifyy')));
    expect(bad.out).to.contain("Unknown key 'NotifyAcess'").and.contain('notifyy');
  });

  it('the unit: Type=notify from the main process, restart on failure, hardening, a comment for every capability kept', () => {
    const text = readFileSync(UNIT, 'utf8');
    const settings = text.split('\n').filter((l) => /^[A-Za-z]+=/.test(l));
    for (const s of [
      'Type=notify',
      'NotifyAccess=main',
      'Restart=on-failure',
      'ProtectSystem=strict',
      'StateDirectory=thinmirror',
      'NoNewPrivileges=yes',
      'PrivateTmp=yes',
      'ProtectHome=yes',
      'ProtectKernelTunables=yes',
      'ReadWritePaths=/var/lib/thinmirror',
    ]) {
      expect(settings, s).to.include(s);
    }
    expect(settings.some((s) => s.startsWith('PrivateDevices=')), 'PrivateDevices would hide the block devices').to.equal(false);
    const caps = settings.find((s) => s.startsWith('CapabilityBoundingSet='))!.slice('CapabilityBoundingSet='.length).split(/\s+/);
    expect(caps.length).to.be.within(1, 4);
    for (const cap of caps) expect(text, `a comment saying why ${cap} is kept`).to.match(new RegExp(`^#\\s+${cap}\\s+\\S`, 'm'));
  });

  it('sdNotify sends nothing without NOTIFY_SOCKET', () => {
    expect(sdNotify('READY=1', '')).to.equal(false);
    expect(sdNotify('READY=1', undefined)).to.equal(false);
  });

  describe('the daemon notifies READY=1 once it answers, STOPPING=1 on SIGTERM (python3 datagram receiver as NOTIFY_SOCKET)', () => {
    let pair: Pair;
    let receiver: ChildProcess | undefined;
    afterEach(async () => {
      receiver?.kill('SIGKILL');
      await pair?.cleanup();
    });

    it('READY=1 arrives when the control socket already answers with every mirror loaded', async () => {
      const python = spawnSync('python3', ['--version'], { encoding: 'utf8' });
      if (python.status !== 0) throw new Error('python3 is missing: apt-get install -y python3');
      pair = await Pair.create();
      await pair.writeConfigs();
      const notifySocket = path.join(pair.dir, 'notify.sock');
      const control = path.join(pair.cfg.secondaryState, 'control.sock');
      // On READY=1 the receiver itself asks the control socket for /status, so
      // the order is checked where the message arrives, not by timing.
      const script = String.raw`
import json, socket, sys
path, control = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(path)
print(json.dumps({"bound": path}), flush=True)
while True:
    msg = s.recv(4096).decode()
    ev = {"message": msg}
    if "READY=1" in msg.split("\n"):
        try:
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.settimeout(10)
            c.connect(control)
            c.sendall(b"GET /status HTTP/1.0\r\nHost: thinmirror\r\n\r\n")
            data = b""
            while True:
                b = c.recv(65536)
                if not b:
                    break
                data += b
            head, _, body = data.partition(b"\r\n\r\n")
            ev["statusLine"] = head.split(b"\r\n")[0].decode()
            ev["status"] = json.loads(body)
        except Exception as e:
            ev["controlError"] = repr(e)
    print(json.dumps(ev), flush=True)
`;
      const events: Record<string, unknown>[] = [];
      let wake: () => void = () => {};
      receiver = spawn('python3', ['-c', script, notifySocket, control], { stdio: ['ignore', 'pipe', 'inherit'] });
      let buf = '';
      receiver.stdout!.on('data', (d: Buffer) => {
        buf += d.toString('utf8');
        for (let i = buf.indexOf('\n'); i >= 0; i = buf.indexOf('\n')) {
          events.push(JSON.parse(buf.slice(0, i)) as Record<string, unknown>);
          buf = buf.slice(i + 1);
        }
        wake();
      });
      const next = async (pred: (e: Record<string, unknown>) => boolean, what: string) => {
        for (;;) {
          const e = events.find(pred);
          if (e) return e;
          if (receiver!.exitCode !== null) throw new Error(`the python3 receiver exited (${receiver!.exitCode}) before ${what}`);
          await new Promise<void>((r) => {
            wake = r;
            setTimeout(r, 200);
          });
        }
      };
      await next((e) => 'bound' in e, 'binding');

      const saved = process.env.NOTIFY_SOCKET;
      process.env.NOTIFY_SOCKET = notifySocket;
      let daemon: DaemonProcess;
      try {
        daemon = pair.startSecondary();
      } finally {
        if (saved === undefined) delete process.env.NOTIFY_SOCKET;
        else process.env.NOTIFY_SOCKET = saved;
      }
      const ready = await Promise.race([
        next((e) => String(e.message).split('\n').includes('READY=1'), 'READY=1'),
        daemon.exited.then((x) => Promise.reject(new Error(`daemon exited ${JSON.stringify(x)}:\n${daemon.logTail()}`))),
      ]);
      expect(ready.controlError, 'the control socket answered when READY=1 arrived').to.equal(undefined);
      expect(ready.statusLine).to.match(/^HTTP\/1\.[01] 200/);
      const st = ready.status as { pid: number; mirrors: { name: string; state: string; error: unknown }[] };
      expect(st.pid).to.equal(daemon.pid);
      expect(st.mirrors.map((m) => m.name)).to.deep.equal([pair.mirror]);
      expect(st.mirrors[0]!.state, 'the mirror was loaded (not a placeholder)').to.equal('waiting');
      expect(st.mirrors[0]!.error).to.equal(null);
      expect(String(ready.message)).to.contain('STATUS=');

      expect(await daemon.stop()).to.deep.equal({ code: 0, signal: null });
      await next((e) => String(e.message).split('\n').includes('STOPPING=1'), 'STOPPING=1');
      expect(daemon.logTail(50)).to.contain('notified systemd');
    });
  });
});
