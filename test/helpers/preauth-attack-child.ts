import { PreauthAttack } from './preauth-attack.js';

/** The attacking process of attackFromChild: argv URL CONNECTIONS ADDRESSES; 'stop' ends it and sends back the counters. */
const [url, connections, addresses] = process.argv.slice(2);
const attack = new PreauthAttack(url!, { connections: Number(connections), addresses: addresses!.split(',') }).start();
process.on('message', (m) => {
  if (m !== 'stop') return;
  void attack.stop().then(() => {
    process.send!(attack.counters, () => process.exit(0));
  });
});
