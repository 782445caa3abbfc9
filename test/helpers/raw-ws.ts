import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import * as net from 'node:net';

/**
 * A WebSocket client written by hand on a TCP socket, for peers that misbehave
 * below what `ws` lets a client do: it upgrades, then sends whatever frames it
 * is told and never answers anything (no close frame, no pong). Frames are
 * masked with a zero key (as the primary's are), so payloads travel as given.
 */
export interface RawWebSocket {
  socket: net.Socket;
  /** Resolves when the server has closed or reset the connection. */
  closed: Promise<void>;
  /** Send one binary (or `opcode`) frame holding `payload`. */
  send(payload: Buffer, opcode?: number): void;
  /** Bytes received from the server after the upgrade answer. */
  received(): number;
  /** The payload of the next data frame from the server (control frames are skipped, never answered). */
  nextFrame(): Promise<Buffer>;
}

/** The header of one final, masked (zero key) frame of `length` payload bytes. */
export function frameHeader(length: number, opcode = 2): Buffer {
  const first = 0x80 | opcode;
  if (length < 126) return Buffer.from([first, 0x80 | length, 0, 0, 0, 0]);
  if (length < 65536) {
    const h = Buffer.from([first, 0x80 | 126, 0, 0, 0, 0, 0, 0]);
    h.writeUInt16BE(length, 2);
    return h;
  }
  const h = Buffer.alloc(14);
  h[0] = first;
  h[1] = 0x80 | 127;
  h.writeBigUInt64BE(BigInt(length), 2);
  return h; // bytes 10..13: the zero mask
}

/**
 * An 8 MiB frame payload holding millions of empty maps (msgpack array32 of
 * fixmap 0): valid msgpack that costs seconds and hundreds of MiB to decode.
 */
export function mapBomb(bytes = 8 * 1024 * 1024): Buffer {
  const b = Buffer.alloc(bytes, 0x80);
  b[0] = 0xdd;
  b.writeUInt32BE(bytes - 5, 1);
  return b;
}

/** Connect to ws://127.0.0.1:`port` from `localAddress` (any 127.x.y.z on Linux) and upgrade. */
export async function rawWebSocket(port: number, o: { localAddress?: string } = {}): Promise<RawWebSocket> {
  const socket = net.connect({ host: '127.0.0.1', port, ...(o.localAddress ? { localAddress: o.localAddress } : {}) });
  const closed = new Promise<void>((resolve) => socket.once('close', () => resolve()));
  socket.on('error', () => {});
  await once(socket, 'connect');
  socket.write(
    `GET / HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n` +
      `Sec-WebSocket-Key: ${randomBytes(16).toString('base64')}\r\nSec-WebSocket-Version: 13\r\n\r\n`,
  );
  let head = '';
  let after = 0;
  let buf = Buffer.alloc(0);
  const frames: Buffer[] = [];
  const waiting: ((b: Buffer) => void)[] = [];
  const parse = () => {
    for (;;) {
      if (buf.length < 2) return;
      let len = buf[1]! & 0x7f;
      let at = 2;
      if (len === 126) {
        if (buf.length < 4) return;
        len = buf.readUInt16BE(2);
        at = 4;
      } else if (len === 127) {
        if (buf.length < 10) return;
        len = Number(buf.readBigUInt64BE(2));
        at = 10;
      }
      if (buf.length < at + len) return;
      const opcode = buf[0]! & 0x0f;
      const payload = Buffer.from(buf.subarray(at, at + len));
      buf = buf.subarray(at + len);
      if (opcode >= 8) continue;
      const w = waiting.shift();
      if (w) w(payload);
      else frames.push(payload);
    }
  };
  const take = (d: Buffer) => {
    after += d.length;
    buf = Buffer.concat([buf, d]);
    parse();
  };
  await new Promise<void>((resolve, reject) => {
    const onData = (d: Buffer) => {
      head += d.toString('latin1');
      const end = head.indexOf('\r\n\r\n');
      if (end < 0) return;
      socket.off('data', onData);
      if (!head.startsWith('HTTP/1.1 101')) return reject(new Error(`upgrade refused: ${head.split('\r\n')[0]}`));
      socket.on('data', take);
      take(Buffer.from(head.slice(end + 4), 'latin1'));
      resolve();
    };
    socket.on('data', onData);
    socket.once('close', () => reject(new Error('closed during the upgrade')));
  });
  return {
    socket,
    closed,
    send(payload, opcode = 2) {
      socket.write(frameHeader(payload.length, opcode));
      socket.write(payload);
    },
    received: () => after,
    nextFrame: () => new Promise<Buffer>((resolve) => (frames.length > 0 ? resolve(frames.shift()!) : waiting.push(resolve))),
  };
}

/**
 * Open a TCP connection from `localAddress` and ask for `/` over HTTP:
 * 'served' when an answer came (the listener admitted it; the socket stays
 * open, keep-alive, and is returned), 'refused' when the connection was closed
 * without one.
 */
export async function probe(port: number, localAddress: string): Promise<{ result: 'served' | 'refused'; socket: net.Socket }> {
  const socket = net.connect({ host: '127.0.0.1', port, localAddress });
  socket.on('error', () => {});
  const result = await new Promise<'served' | 'refused'>((resolve) => {
    socket.once('connect', () => socket.write(`GET / HTTP/1.1\r\nHost: x\r\n\r\n`));
    socket.once('data', () => resolve('served'));
    socket.once('close', () => resolve('refused'));
  });
  return { result, socket };
}
