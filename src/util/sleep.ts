/** Resolve after `ms`, or early (without error) when `signal` aborts or `also` settles. */
export function sleep(ms: number, signal?: AbortSignal, also?: Promise<unknown>): Promise<void> {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve();
    const done = () => {
      clearTimeout(timer);
      signal?.removeEventListener('abort', done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal?.addEventListener('abort', done, { once: true });
    also?.then(done, done);
  });
}
