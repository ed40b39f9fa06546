"""The Python etcd3 client (PyPI "etcd3") against one endpoint: KV, Watch, Lease and its lock
recipe, unchanged. Exits non-zero with a message on the first mismatch."""
import sys
import threading

import etcd3

host, port = sys.argv[1].rsplit(":", 1)
auth_mode = sys.argv[2:] == ["auth"]


def check(cond, what):
    if not cond:
        raise SystemExit(f"check failed: {what}")


def refused(f, needle):
    """Whether f() fails with a gRPC error whose details contain `needle`."""
    try:
        f()
    except Exception as e:  # etcd3 re-raises grpc.RpcError for these codes
        details = e.details() if hasattr(e, "details") else str(e)
        return needle in details
    return False


def as_user(name):
    """A client authenticated as `name`. gRPC Python sends call credentials only over TLS, so on
    this plain channel the token goes in the metadata etcd3 also sets (as with etcd itself)."""
    c = etcd3.client(host=host, port=int(port), timeout=10, user=name, password="pw")
    c.call_credentials = None
    return c


if auth_mode:
    # Auth enabled by the test: root, user u with readwrite on auth/, user nobody without roles.
    root = as_user("root")
    root.put("auth/root", "r")
    check(root.get("auth/root")[0] == b"r", "root get after put")
    u = as_user("u")
    u.put("auth/u", "1")
    check(u.get("auth/u")[0] == b"1", "u get after put")
    check(refused(lambda: u.put("outside", "x"), "permission denied"), "u outside its range")
    nobody = as_user("nobody")
    check(refused(lambda: nobody.get("auth/u"), "permission denied"), "nobody reads")
    anon = etcd3.client(host=host, port=int(port), timeout=10)
    check(refused(lambda: anon.get("auth/u"), "user name is empty"), "no credentials")
    print("ok")
    sys.exit(0)

client = etcd3.client(host=host, port=int(port), timeout=10)

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
