import { native } from '../native/index.js';

/**
 * sd_notify(3) to the socket systemd names in NOTIFY_SOCKET (Type=notify);
 * nothing when it is unset. Returns false when nothing was sent; throws
 * (TM_ERR_NATIVE or the sendto error) when sending was attempted and failed.
 */
export function sdNotify(message: string, socketPath: string | undefined = process.env.NOTIFY_SOCKET): boolean {
  if (!socketPath) return false;
  return native().sdNotify(socketPath, message);
}
