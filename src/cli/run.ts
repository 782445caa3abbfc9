import { loadConfig } from '../daemon/config.js';
import { Daemon } from '../daemon/daemon.js';

/**
 * `run --config FILE`: start the daemon and keep it until SIGTERM/SIGINT, then
 * stop every mirror with its state persisted and exit 0.
 */
export async function runDaemon(configPath: string): Promise<never> {
  const config = await loadConfig(configPath);
  const daemon = await Daemon.start(config);
  await new Promise<void>((resolve) => {
    const onSignal = (sig: NodeJS.Signals) => {
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
