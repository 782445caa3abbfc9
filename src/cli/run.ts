import { loadConfig } from '../daemon/config.js';
import { Daemon } from '../daemon/daemon.js';
import { sdNotify } from '../daemon/notify.js';

/**
 * `run --config FILE`: start the daemon and keep it until SIGTERM/SIGINT, then
 * stop every mirror with its state persisted and exit 0. Under systemd
 * (Type=notify) READY=1 is sent once every listener answers and every mirror
 * has been loaded, STOPPING=1 when a signal asks it to stop.
 */
export async function runDaemon(configPath: string): Promise<never> {
  const config = await loadConfig(configPath);
  const daemon = await Daemon.start(config);
  const notify = (message: string) => {
    try {
      if (sdNotify(message)) daemon.log.info({ notify: message.replace(/\n/g, ' ') }, 'notified systemd');
    } catch (e) {
      daemon.log.error({ err: e }, `cannot notify systemd at NOTIFY_SOCKET=${process.env.NOTIFY_SOCKET}`);
    }
  };
  notify(`READY=1\nSTATUS=serving ${config.mirrors.length} mirror(s)`);
  await new Promise<void>((resolve) => {
    const onSignal = (sig: NodeJS.Signals) => {
      notify('STOPPING=1');
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
