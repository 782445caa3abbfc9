import { setImmediate as nextTurn } from 'node:timers/promises';

/** Default slice of the event loop a long synchronous loop may take before it yields (ms). */
export const SLICE_MS = 4;

/**
 * Lets a long loop of synchronous work (system calls, hashing) give the event
 * loop back every `sliceMs`: call {@link Pacer.pace} between steps; it yields
 * one turn (setImmediate: timers, I/O and other callbacks run) once the slice
 * is used up, and costs one clock read otherwise. Keeps the event-loop delay
 * of hashing many small chunks (digestRange) at a few ms.
 */
export class Pacer {
  private sliceStart = performance.now();

  constructor(private readonly sliceMs = SLICE_MS) {}

  /** Resolves at once while the slice lasts, else after one turn of the event loop. */
  async pace(): Promise<void> {
    if (performance.now() - this.sliceStart < this.sliceMs) return;
    await nextTurn();
    this.sliceStart = performance.now();
  }
}
