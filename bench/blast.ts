/**
 * A raw TCP transfer, to measure what a link carries (bench/link.ts checks the
 * shaped link with it):
 *
 *   node --import tsx bench/blast.ts sink HOST PORT      prints `listening`, then one JSON line
 *   node --import tsx bench/blast.ts source HOST PORT BYTES
 *
 * The sink counts what one connection delivers and prints
 * {bytes, seconds, bytesPerSecond}, timed from its first byte to the end of
 * the stream.
 */
import * as net from 'node:net';

const [mode, host, port, bytes] = process.argv.slice(2);
if (mode === 'sink') {
  const server = net.createServer((s) => {
    let n = 0;
    let t0 = 0;
    s.on('data', (d) => {
      if (n === 0) t0 = performance.now();
      n += d.length;
    });
    s.on('end', () => {
      const seconds = (performance.now() - t0) / 1000;
      console.log(JSON.stringify({ bytes: n, seconds, bytesPerSecond: n / seconds }));
      s.end();
      server.close();
    });
  });
  server.listen(Number(port), host, () => console.log('listening'));
} else if (mode === 'source') {
  const total = Number(bytes);
  const buf = Buffer.alloc(1 << 20, 0x5a);
  const s = net.connect(Number(port), host, () => {
    let sent = 0;
    const pump = () => {
      while (sent < total) {
        sent += buf.length;
        if (!s.write(buf)) return void s.once('drain', pump);
      }
      s.end();
    };
    pump();
  });
  s.on('error', (e) => {
    console.error(e);
    process.exit(1);
  });
  s.resume();
} else {
  console.error('usage: blast.ts sink HOST PORT | source HOST PORT BYTES');
  process.exit(2);
}
