/**
 * At most one log line per `intervalMs` for a kind of event that an outsider
 * can repeat at will (refused connections, failed handshakes): the first one
 * is logged, the others in the interval only counted, and the count goes into
 * the next line that is logged. A write to the log per attempt would let an
 * attacker spend the daemon's time (and disk) on logging.
 */
export class LogLimiter {
  private last = -Infinity;
  private unlogged = 0;

  constructor(readonly intervalMs = 5000) {}

  /** Null: do not log this one (it is counted). Otherwise log it, with `unlogged` events since the last line. */
  take(now = Date.now()): { unlogged: number } | null {
    if (now - this.last < this.intervalMs) {
      this.unlogged++;
      return null;
    }
    const unlogged = this.unlogged;
    this.last = now;
    this.unlogged = 0;
    return { unlogged };
  }
}
