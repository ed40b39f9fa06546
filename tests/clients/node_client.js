// The Node etcd3 client (npm "etcd3") against one endpoint: KV, Watch, Lease and its lock
// recipe, unchanged. Exits non-zero with a message on the first mismatch.
const { Etcd3 } = require('etcd3');

const endpoint = process.argv[2];
const authMode = process.argv[3] === 'auth';
const client = new Etcd3({ hosts: endpoint });

function check(cond, what) {
  if (!cond) {
    throw new Error(`check failed: ${what}`);
  }
}

async function withTimeout(p, ms, what) {
  let t;
  const timeout = new Promise((_, rej) => { t = setTimeout(() => rej(new Error(`timeout: ${what}`)), ms); });
  try { return await Promise.race([p, timeout]); } finally { clearTimeout(t); }
}

async function main() {
  // KV
  await client.put('node/a').value('1');
  check((await client.get('node/a').string()) === '1', 'get after put');

  // Watch: a prefix watcher sees a put and a delete, in order, with prev_kv.
  const events = [];
  const watcher = await client.watch().prefix('node/w/').withPreviousKV().create();
  const done = new Promise((resolve) => {
    watcher.on('put', (kv, prev) => { events.push(['put', kv.key.toString(), kv.value.toString(), prev && prev.value.toString()]); });
    watcher.on('delete', (kv) => { events.push(['delete', kv.key.toString()]); if (events.length >= 3) resolve(); });
  });
  await client.put('node/w/x').value('v1');
  await client.put('node/w/x').value('v2');
  await client.delete().key('node/w/x');
  await withTimeout(done, 10000, 'watch events');
  await watcher.cancel();
  check(JSON.stringify(events) === JSON.stringify([
    ['put', 'node/w/x', 'v1', undefined],
    ['put', 'node/w/x', 'v2', 'v1'],
    ['delete', 'node/w/x'],
  ]), `watch events ${JSON.stringify(events)}`);

  // Lease: grant, attach a key, keep alive, time to live, revoke removes the key.
  const lease = client.lease(10, { autoKeepAlive: false });
  await lease.grant();
  await lease.put('node/leased').value('x');
  const renewed = await withTimeout(lease.keepaliveOnce(), 10000, 'keep-alive');
  check(Number(renewed.TTL) === 10, `keep-alive TTL ${renewed.TTL}`);
  await lease.revoke();
  check((await client.get('node/leased').string()) === null, 'revoke deletes the key');

  // Lock recipe (KV + lease): held locks refuse a second holder until released.
  const first = client.lock('node/lock');
  await first.acquire();
  let refused = false;
  try {
    await client.lock('node/lock').acquire();
  } catch (e) {
    refused = true;
  }
  check(refused, 'a held lock refuses a second holder');
  await first.release();
  const second = client.lock('node/lock');
  await second.acquire();
  await second.release();

  client.close();
  console.log('ok');
}

// Authenticated run (auth enabled by the test: root, user u with readwrite on auth/, user
// nobody without roles): user/password clients put and get; a refused user stays refused.
async function mainAuth() {
  const as = (username) => new Etcd3({ hosts: endpoint, auth: { username, password: 'pw' } });
  const root = as('root');
  await root.put('auth/root').value('r');
  check((await root.get('auth/root').string()) === 'r', 'root get after put');
  const u = as('u');
  await u.put('auth/u').value('1');
  check((await u.get('auth/u').string()) === '1', 'u get after put');
  let refused = null;
  try {
    await u.put('outside').value('x');
  } catch (e) {
    refused = e;
  }
  check(refused && /permission denied/.test(refused.message), `u outside its range: ${refused}`);
  const nobody = as('nobody');
  refused = null;
  try {
    await nobody.get('auth/u').string();
  } catch (e) {
    refused = e;
  }
  check(refused && /permission denied/.test(refused.message), `nobody reads: ${refused}`);
  refused = null;
  try {
    await client.get('auth/u').string();
  } catch (e) {
    refused = e;
  }
  check(refused && /user name is empty/.test(refused.message), `no credentials: ${refused}`);
  for (const c of [root, u, nobody, client]) c.close();
  console.log('ok');
}

(authMode ? mainAuth() : main()).catch((e) => { console.error(e && e.stack ? e.stack : e); process.exit(1); });
