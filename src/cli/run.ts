import { asTmError } from '../errors.js';
import { loadConfig } from '../daemon/config.js';
import { Daemon } from '../daemon/daemon.js';
import { sdNotify } from '../daemon/notify.js';

/**
 * `run --config FILE`: start the daemon and keep it until SIGTERM/SIGINT, then
 * stop every mirror with its state persisted and exit 0. SIGHUP reloads FILE
 * (Daemon.reload): a config that cannot be read, fails validation or changes
 * what only a restart can is logged with its error and the running one is
 * kept. Under systemd (Type=notify) READY=1 is sent once every listener
 * answers and every mirror has been loaded, STOPPING=1 when a signal asks it
 * to stop, RELOADING=1 when a reload begins and READY=1 when it is over.
 */
export async function runDaemon(configPath: string): Promise<never> {
  const config = await loadConfig(configPath);
  // SIGHUP would end the process by default: take it from now on. One that
  // arrives while the daemon starts is acted on once it has started.
  let hupWhileStarting = false;
  let onHup: () => void = () => {
    hupWhileStarting = true;
  };
  process.on('SIGHUP', () => onHup());
  const daemon = await Daemon.start(config);
  const notify = (message: string) => {
    try {
      if (sdNotify(message)) daemon.log.info({ notify: message.replace(/\n/g, ' ') }, 'notified systemd');
    } catch (e) {
      daemon.log.error({ err: e }, `cannot notify systemd at NOTIFY_SOCKET=${process.env.NOTIFY_SOCKET}`);
    }
  };
  notify(`READY=1\nSTATUS=serving ${config.mirrors.length} mirror(s)`);
  // Reloads queue in the daemon; systemd hears RELOADING=1 when the first of a
  // run begins and READY=1 when the last is over.
  let reloads = 0;
  onHup = () => {
    if (reloads++ === 0) notify(`RELOADING=1\nMONOTONIC_USEC=${process.hrtime.bigint() / 1000n}`);
    daemon.log.info({ signal: 'SIGHUP', config: configPath }, 'reloading the config');
    daemon.reloadFromFile(configPath).then(
      (r) => {
        daemon.log.info({ added: r.added, removed: r.removed, changed: r.changed, unchanged: r.unchanged }, 'config reloaded');
        return `serving ${daemon.config.mirrors.length} mirror(s)`;
      },
      (e: unknown) => {
        const err = asTmError(e);
        daemon.log.error({ code: err.code, config: configPath }, `config reload failed; the running config is kept: ${err.code}: ${err.message}`);
        return `config reload failed (${err.code}); serving ${daemon.config.mirrors.length} mirror(s) of the previous config`;
      },
    ).then((status) => {
      if (--reloads === 0) notify(`READY=1\nSTATUS=${status}`);
    });
  };
  if (hupWhileStarting) onHup();
  await new Promise<void>((resolve) => {
    const onSignal = (sig: NodeJS.Signals) => {
      notify('STOPPING=1');
      onHup = () => daemon.log.info({ signal: 'SIGHUP' }, 'stopping: the config is not reloaded');
      daemon.log.info({ signal: sig }, 'stopping');
      process.off('SIGTERM', onSignal);
      process.off('SIGINT', onSignal);
      resolve();
    };
    process.on('SIGTERM', onSignal);
    process.on('SIGINT', onSignal);
  });
  const forced = setTimeout(() => {
    daemon.log.error('stop took longer than 10 s; exiting');
    process.exit(1);
  }, 10_000);
  forced.unref();
  await daemon.stop();
  clearTimeout(forced);
  // Nothing is left to do; do not wait for sockets the peer keeps half-open.
  process.exit(0);
}
