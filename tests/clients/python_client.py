"""The Python etcd3 client (PyPI "etcd3") against one endpoint: KV, Watch, Lease and its lock
recipe, unchanged. Exits non-zero with a message on the first mismatch."""
import sys
import threading

import etcd3

host, port = sys.argv[1].rsplit(":", 1)
client = etcd3.client(host=host, port=int(port), timeout=10)


def check(cond, what):
    if not cond:
        raise SystemExit(f"check failed: {what}")


# KV
client.put("py/a", "1")
value, meta = client.get("py/a")
check(value == b"1", f"get after put: {value!r}")

# Watch: a prefix watch sees a put and a delete, in order.
events, cancel = client.watch_prefix("py/w/")
client.put("py/w/x", "v1")
client.delete("py/w/x")
got = []
for ev in events:
    got.append((type(ev).__name__, ev.key, ev.value))
    if len(got) == 2:
        break
cancel()
check(got == [("PutEvent", b"py/w/x", b"v1"), ("DeleteEvent", b"py/w/x", b"")], f"watch {got}")

# Lease: grant, attach, refresh, time to live, revoke deletes the key.
lease = client.lease(10)
client.put("py/leased", "x", lease=lease)
refreshed = list(lease.refresh())
check(refreshed and refreshed[0].TTL == 10, f"refresh {refreshed}")
check(0 < lease.remaining_ttl <= 10, f"remaining ttl {lease.remaining_ttl}")
check(lease.keys == [b"py/leased"], f"lease keys {lease.keys}")
lease.revoke()
check(client.get("py/leased")[0] is None, "revoke deletes the key")

# Lock recipe: only one holder at a time.
holders = []
overlap = []


def work():
    with client.lock("py/lock", ttl=10):
        holders.append(1)
        overlap.append(len(holders))
        threading.Event().wait(0.1)
        holders.pop()


threads = [threading.Thread(target=work) for _ in range(3)]
for t in threads:
    t.start()
for t in threads:
    t.join(30)
check(overlap == [1, 1, 1], f"lock holders at once: {overlap}")
print("ok")
