//! Auth end to end: an etcdctl session (users, roles, permission forms, allowed and denied
//! reads, writes and txns, enable/disable, wrong and missing credentials) run against etcd 3.4
//! and spindle with exit codes and outputs compared, and a spindle restart that must keep
//! users, roles and permissions while refusing tokens issued before it.
//!
//! Needs `etcd` and `etcdctl` 3.4 on PATH (`tools/test` installs them).

use std::time::Duration;

use serde_json::Value;

mod common;
use common::etcdctl;
use common::server::{Kind, Server};

/// One etcdctl run, normalized: exit status, stdout, and the failure as etcdctl reports it
/// (the gRPC error of its client log line and its `Error:` line).
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    ok: bool,
    stdout: String,
    errors: Vec<String>,
}

fn run(s: &Server, args: &[&str], stdin: Option<&str>) -> Outcome {
    let out = etcdctl::spawn_with_input(s.etcdctl_cmd(args), stdin)
        .wait_with_output()
        .expect("wait for etcdctl");
    let errors = etcdctl::error_lines(&String::from_utf8_lossy(&out.stderr));
    // Endpoints differ between the two servers.
    let endpoint = s.endpoint();
    let norm = |t: &str| t.replace(&endpoint, "<endpoint>");
    Outcome {
        ok: out.status.success(),
        stdout: norm(&String::from_utf8_lossy(&out.stdout)),
        errors: errors.iter().map(|e| norm(e)).collect(),
    }
}

fn txn_script(compares: &[&str], success: &[&str], failure: &[&str]) -> String {
    let mut s = String::new();
    for part in [compares, success, failure] {
        for line in part {
            s.push_str(line);
            s.push('\n');
        }
        s.push('\n');
    }
    s
}

const ROOT: &str = "--user=root:pw";

/// bcrypt's lowest cost for both servers: etcdctl authenticates within its dial timeout (3 s),
/// which cost 10 in an unoptimized build on a loaded 2-CPU machine does not always manage.
const FAST_BCRYPT: &[&str] = &["--bcrypt-cost", "4"];
const U: &str = "--user=u:pw";

/// The session both servers run: (args, stdin).
fn session() -> Vec<(Vec<&'static str>, Option<String>)> {
    let plain = |a: &[&'static str]| (a.to_vec(), None);
    let denied_compare = txn_script(&["value(\"c\") = \"1\""], &["put p/t yes"], &["put p/t no"]);
    let allowed_txn = txn_script(&["value(\"a\") = \"1\""], &["put p/t yes", "get a"], &[]);
    let denied_op = txn_script(&["value(\"a\") = \"1\""], &["put p/t yes"], &["put a no"]);
    vec![
        plain(&["user", "add", "root:pw"]),
        plain(&["role", "add", "root"]),
        plain(&["user", "grant-role", "root", "root"]),
        plain(&["user", "list"]),
        plain(&["auth", "enable"]),
        plain(&[ROOT, "put", "a", "1"]),
        plain(&[ROOT, "put", "b", "2"]),
        plain(&[ROOT, "put", "c", "3"]),
        plain(&[ROOT, "put", "x", "4"]),
        plain(&[ROOT, "get", "a"]),
        // No credentials, wrong password, unknown user.
        plain(&["get", "a"]),
        plain(&["put", "a", "9"]),
        plain(&["--user=root:wrong", "get", "a"]),
        plain(&["--user=nobody:pw", "get", "a"]),
        plain(&[ROOT, "role", "add", "r"]),
        plain(&[ROOT, "role", "add", "r"]),
        plain(&[ROOT, "role", "grant-permission", "r", "read", "a", "c"]),
        plain(&[
            ROOT,
            "role",
            "grant-permission",
            "r",
            "--prefix=true",
            "readwrite",
            "p/",
        ]),
        plain(&[
            ROOT,
            "role",
            "grant-permission",
            "r",
            "--from-key",
            "write",
            "x",
        ]),
        plain(&[ROOT, "user", "add", "u:pw"]),
        plain(&[ROOT, "user", "grant-role", "u", "r"]),
        plain(&[ROOT, "user", "grant-role", "u", "missing"]),
        // Reads: allowed inside [a, c) and p/, denied elsewhere.
        plain(&[U, "get", "a"]),
        plain(&[U, "get", "b"]),
        plain(&[U, "get", "a", "c"]),
        plain(&[U, "get", "c"]),
        plain(&[U, "get", "a", "d"]),
        plain(&[U, "get", "--prefix", "p/"]),
        plain(&[U, "get", "x"]),
        plain(&[U, "get", "--from-key", "a"]),
        // Writes: allowed in p/ and from x on, denied elsewhere.
        plain(&[U, "put", "p/1", "v"]),
        plain(&[U, "put", "y", "v"]),
        plain(&[U, "put", "a", "v"]),
        plain(&[U, "del", "a"]),
        plain(&[U, "del", "--prefix", "p/"]),
        (vec![U, "txn"], Some(denied_compare)),
        (vec![U, "txn"], Some(allowed_txn)),
        (vec![U, "txn"], Some(denied_op)),
        // Admin calls: root only, except a user's own record and a held role.
        plain(&[ROOT, "user", "list"]),
        plain(&[ROOT, "role", "list"]),
        plain(&[ROOT, "role", "get", "r"]),
        plain(&[ROOT, "user", "get", "u"]),
        plain(&[U, "user", "list"]),
        plain(&[U, "role", "list"]),
        plain(&[U, "user", "get", "u"]),
        plain(&[U, "user", "get", "root"]),
        plain(&[U, "role", "get", "r"]),
        plain(&[U, "role", "add", "r2"]),
        plain(&[U, "auth", "disable"]),
        plain(&[ROOT, "user", "delete", "root"]),
        plain(&[ROOT, "role", "revoke-permission", "r", "a", "c"]),
        plain(&[ROOT, "role", "revoke-permission", "r", "a", "c"]),
        plain(&[U, "get", "a"]),
        plain(&[ROOT, "user", "revoke-role", "u", "r"]),
        plain(&[U, "get", "--prefix", "p/"]),
        // Watch, maintenance and compaction rules.
        plain(&[U, "watch", "c"]),
        plain(&[
            U,
            "snapshot",
            "save",
            "/tmp/spindle-auth-test-never-written.db",
        ]),
        plain(&[
            "snapshot",
            "save",
            "/tmp/spindle-auth-test-never-written.db",
        ]),
        plain(&[U, "defrag"]),
        plain(&[U, "endpoint", "hashkv"]),
        plain(&["endpoint", "hashkv"]),
        plain(&[U, "compaction", "1"]),
        plain(&[ROOT, "auth", "disable"]),
        plain(&["get", "a"]),
        plain(&["user", "list"]),
        plain(&["role", "delete", "r"]),
        plain(&["user", "delete", "u"]),
        plain(&["--user=root:pw", "get", "a"]),
    ]
}

#[test]
fn etcdctl_auth_session_matches_etcd() {
    session_matches_etcd(FAST_BCRYPT);
}

/// Runs [`session`] against a fresh etcd and a fresh spindle started with `args`; every
/// command must print the same and exit the same on both.
fn session_matches_etcd(args: &[&str]) {
    let mut etcd = Server::spawn(Kind::Etcd, args);
    let mut spindle = Server::spawn(Kind::Spindle, args);
    spindle.wait_ready();
    etcd.wait_ready();
    for (args, stdin) in session() {
        let e = run(&etcd, &args, stdin.as_deref());
        let s = run(&spindle, &args, stdin.as_deref());
        assert_eq!(
            s,
            e,
            "etcdctl {} (stdin {:?}): spindle (left) differs from etcd (right)",
            args.join(" "),
            stdin
        );
    }
    spindle.assert_alive();
}

/// Leases with keys: revoking one, or putting with it, needs write permission on every key it
/// holds; TimeToLive shows the keys to anyone (etcd 3.4). Lease ids differ between the servers,
/// so each server's id is replaced in the outputs.
/// etcdctl commands that make `root` and a user `u` who may read and write `p/...`, then
/// enable auth.
const PREFIX_USER_SETUP: &[&[&str]] = &[
    &["user", "add", "root:pw"],
    &["user", "grant-role", "root", "root"],
    &["role", "add", "r"],
    &[
        "role",
        "grant-permission",
        "r",
        "--prefix=true",
        "readwrite",
        "p/",
    ],
    &["user", "add", "u:pw"],
    &["user", "grant-role", "u", "r"],
    &["auth", "enable"],
];

#[test]
fn lease_key_permissions_match_etcd() {
    let mut etcd = Server::spawn(Kind::Etcd, FAST_BCRYPT);
    let mut spindle = Server::spawn(Kind::Spindle, FAST_BCRYPT);
    spindle.wait_ready();
    etcd.wait_ready();
    let mut outcomes = Vec::new();
    for s in [&etcd, &spindle] {
        for args in PREFIX_USER_SETUP {
            ok(run(s, args, None), &args.join(" "));
        }
        let granted = ok(
            run(s, &[ROOT, "lease", "grant", "100"], None),
            "lease grant",
        );
        let id = granted
            .split_whitespace()
            .nth(1)
            .expect("lease id")
            .to_string();
        let mut mine = Vec::new();
        for args in [
            vec![ROOT, "put", "zz", "1", "--lease"],
            vec![U, "lease", "timetolive", "--keys"],
            vec![U, "put", "p/k", "v", "--lease"],
            vec![U, "lease", "revoke"],
            vec![ROOT, "del", "zz"],
            vec![U, "put", "p/k", "v", "--lease"],
            vec![U, "lease", "revoke"],
        ] {
            let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            if args.last().is_some_and(|a| a == "--lease") {
                let last = args.pop().unwrap();
                args.push(format!("{last}={id}"));
            } else if args.contains(&"revoke".to_string())
                || args.contains(&"timetolive".to_string())
            {
                args.insert(3, id.clone());
            }
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut o = run(s, &refs, None);
            o.stdout = o.stdout.replace(&id, "<id>");
            // TimeToLive's remaining seconds may tick between the two servers.
            o.stdout = o.stdout.replace("remaining(99s)", "remaining(100s)");
            mine.push((args.join(" ").replace(&id, "<id>"), o));
        }
        outcomes.push(mine);
    }
    assert_eq!(
        outcomes[1], outcomes[0],
        "spindle (left) differs from etcd (right)"
    );
}

/// A raw JSON POST to the gateway with an `Authorization` header (the token, none if empty);
/// HTTP status and JSON body.
fn post_with_token(port: u16, path: &str, body: &str, token: &str) -> (u16, Value) {
    post_with_header(port, path, body, "Authorization", token)
}

/// As [`post_with_token`] with the token in header `name`.
fn post_with_header(port: u16, path: &str, body: &str, name: &str, token: &str) -> (u16, Value) {
    let auth = if token.is_empty() {
        String::new()
    } else {
        format!("{name}: {token}\r\n")
    };
    let raw = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
         {auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let out = common::http::request(port, raw.as_bytes(), Duration::from_secs(10));
    let text = String::from_utf8_lossy(&out).into_owned();
    let code: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    // A chunked body: take the JSON object.
    let json = body
        .find('{')
        .and_then(|start| body.rfind('}').map(|end| &body[start..=end]))
        .unwrap_or("null");
    (code, serde_json::from_str(json).unwrap_or(Value::Null))
}

fn authenticate(port: u16, user: &str, password: &str) -> String {
    let body = serde_json::json!({ "name": user, "password": password }).to_string();
    let (code, v) = post_with_token(port, "/v3/auth/authenticate", &body, "");
    assert_eq!(code, 200, "authenticate {user}: {v}");
    v["token"].as_str().expect("a token").to_string()
}

fn ok(o: Outcome, what: &str) -> String {
    assert!(o.ok, "{what}: {o:?}");
    o.stdout
}

#[test]
fn restart_keeps_auth_state_and_refuses_tokens_from_before() {
    let mut s = Server::spindle(FAST_BCRYPT);
    for args in [
        &["user", "add", "root:pw"][..],
        &["user", "grant-role", "root", "root"],
        &["role", "add", "r"],
        &["role", "grant-permission", "r", "read", "a", "c"],
        &["user", "add", "u:pw"],
        &["user", "grant-role", "u", "r"],
        &["auth", "enable"],
        &[ROOT, "put", "a", "1"],
        &[ROOT, "put", "c", "3"],
        // A checkpoint of every shard: what follows is replayed from the WAL.
        &[ROOT, "defrag"],
        &[
            ROOT,
            "role",
            "grant-permission",
            "r",
            "--prefix=true",
            "readwrite",
            "p/",
        ],
        &[ROOT, "user", "add", "v:pw"],
        &[ROOT, "user", "delete", "v"],
    ] {
        ok(run(&s, args, None), &args.join(" "));
    }
    let before: Vec<String> = [
        &[ROOT, "user", "list"][..],
        &[ROOT, "role", "list"],
        &[ROOT, "role", "get", "r"],
        &[ROOT, "user", "get", "u"],
    ]
    .iter()
    .map(|a| ok(run(&s, a, None), &a.join(" ")))
    .collect();

    // A token works through the gateway's Authorization header, for what it may read only.
    let token = authenticate(s.port, "u", "pw");
    let range_a = r#"{"key":"YQ=="}"#; // "a"
    let range_c = r#"{"key":"Yw=="}"#; // "c"
    let (code, v) = post_with_token(s.port, "/v3/kv/range", range_a, &token);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["count"], "1");
    let (code, v) = post_with_token(s.port, "/v3/kv/range", range_c, &token);
    assert_eq!(
        (code, v["message"].as_str()),
        (403, Some("etcdserver: permission denied"))
    );
    let (code, v) = post_with_token(s.port, "/v3/kv/range", range_a, "");
    assert_eq!(code, 400, "{v}");
    assert_eq!(v["message"], "etcdserver: user name is empty");

    // A watch on a range the user may not read is created cancelled, as etcd does.
    let watch = r#"{"create_request":{"key":"Yw=="}}"#;
    let raw = format!(
        "POST /v3/watch HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json\r\n\
         Authorization: {token}\r\nContent-Length: {}\r\n\r\n{watch}",
        s.port,
        watch.len()
    );
    let streamed = common::http::stream_during(s.port, &raw, || {});
    assert!(
        streamed.contains("\"canceled\":true")
            && streamed.contains(
                "rpc error: code = PermissionDenied desc = etcdserver: permission denied"
            ),
        "{streamed}"
    );

    s.terminate();
    s.restart();

    let after: Vec<String> = [
        &[ROOT, "user", "list"][..],
        &[ROOT, "role", "list"],
        &[ROOT, "role", "get", "r"],
        &[ROOT, "user", "get", "u"],
    ]
    .iter()
    .map(|a| ok(run(&s, a, None), &a.join(" ")))
    .collect();
    assert_eq!(after, before, "the auth store after the restart");

    // Tokens live in memory: one from before the restart is refused, a new one works.
    let (code, v) = post_with_token(s.port, "/v3/kv/range", range_a, &token);
    assert_eq!(code, 401, "{v}");
    assert_eq!(v["message"], "etcdserver: invalid auth token");
    let token = authenticate(s.port, "u", "pw");
    let (code, v) = post_with_token(s.port, "/v3/kv/range", range_a, &token);
    assert_eq!(code, 200, "{v}");
    let (code, _) = post_with_token(s.port, "/v3/kv/range", range_c, &token);
    assert_eq!(code, 403);
    // Still enabled, with the same rules, through etcdctl too.
    let o = run(&s, &["get", "a"], None);
    assert!(!o.ok);
    assert!(
        o.errors
            .iter()
            .any(|e| e == "Error: etcdserver: user name is empty"),
        "{o:?}"
    );
    assert_eq!(
        ok(run(&s, &[U, "put", "p/1", "x"], None), "put p/1"),
        "OK\n"
    );
    let o = run(&s, &["--user=v:pw", "get", "a"], None);
    assert!(
        o.errors
            .iter()
            .any(|e| e == "Error: etcdserver: authentication failed, invalid user ID or password"),
        "{o:?}"
    );
}

/// Runs etcdctl until it succeeds (a cluster may be between leaders), at most `secs` seconds.
fn until_ok(s: &Server, args: &[&str], secs: u64) -> Outcome {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let o = run(s, args, None);
        if o.ok || std::time::Instant::now() >= deadline {
            return o;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn is_leader(s: &Server) -> bool {
    let o = run(s, &["endpoint", "status"], None);
    // `endpoint, id, version, size, is leader, is learner, …`
    o.ok && o.stdout.split(", ").nth(4) == Some("true")
}

/// Three members: auth changes made through a follower are relayed to the leader and applied
/// everywhere; each member checks its clients' tokens and permissions; a change made after the
/// leader was killed reaches it when it comes back, through the checkpoint it installs (the
/// survivors cut checkpoints every 10 entries per shard meanwhile).
#[test]
fn cluster_members_share_the_auth_state() {
    use common::server::Ports;
    let mut servers = common::cluster::start_spindle(
        "a",
        "auth-test",
        &Ports::free(3),
        &["--snapshot-count", "10", "--bcrypt-cost", "4"],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let leader = loop {
        if let Some(i) = servers.iter().position(is_leader) {
            break i;
        }
        assert!(std::time::Instant::now() < deadline, "no leader");
        std::thread::sleep(Duration::from_millis(100));
    };
    let f1 = (leader + 1) % 3;
    let f2 = (leader + 2) % 3;
    for args in PREFIX_USER_SETUP {
        ok(until_ok(&servers[f1], args, 10), &args.join(" "));
    }
    // The other follower applied it all: its clients are checked against it.
    let users = until_ok(&servers[f2], &[ROOT, "user", "list"], 10);
    assert_eq!(ok(users, "user list"), "root\nu\n");
    assert_eq!(
        ok(run(&servers[f2], &[U, "put", "p/1", "x"], None), "put"),
        "OK\n"
    );
    let o = run(&servers[f2], &[U, "put", "a", "x"], None);
    assert!(
        o.errors
            .contains(&"Error: etcdserver: permission denied".to_string()),
        "{o:?}"
    );
    let o = run(&servers[f2], &["get", "p/1"], None);
    assert!(
        o.errors
            .contains(&"Error: etcdserver: user name is empty".to_string()),
        "{o:?}"
    );

    // The leader dies; a change through a survivor reaches it when it returns.
    servers[leader].kill();
    ok(
        until_ok(&servers[f2], &[ROOT, "user", "add", "w:pw"], 15),
        "user add w",
    );
    // Enough writes on every shard that the survivors' logs no longer reach back to it.
    let token = authenticate(servers[f2].port, "root", "pw");
    for i in 0..60 {
        let put = format!(r#"{{"key":"{}","value":"dg=="}}"#, b64(&format!("k{i}")));
        let (code, v) = post_with_token(servers[f2].port, "/v3/kv/put", &put, &token);
        assert_eq!(code, 200, "{v}");
    }
    servers[leader].restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let o = run(&servers[leader], &[ROOT, "user", "list"], None);
        if o.ok && o.stdout == "root\nu\nw\n" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{o:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let o = run(&servers[leader], &["--user=w:pw", "get", "p/1"], None);
    assert!(
        o.errors
            .contains(&"Error: etcdserver: permission denied".to_string()),
        "{o:?}"
    );
    let got = ok(run(&servers[leader], &[U, "get", "p/1"], None), "get p/1");
    assert_eq!(got, "p/1\nx\n");
    assert!(
        servers[leader]
            .log()
            .contains("installed the leader's checkpoint"),
        "the returning member caught up from a checkpoint"
    );
}

fn b64(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Writes a fresh key pair for `sign-method` into `dir` and returns the `--auth-token` value
/// naming it (`extra` appended, e.g. `,ttl=2s`): ES384 keys (PKCS#8) from rcgen; RSA and ES256
/// keys from the `openssl` CLI (rcgen cannot generate RSA keys; `ecparam` writes the SEC1 form
/// etcd's docs use).
fn jwt_flag(dir: &std::path::Path, method: &str, extra: &str) -> String {
    let (private, public) = (dir.join("jwt.key"), dir.join("jwt.pub"));
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .output()
            .expect("the openssl CLI generates the RSA and ES256 test keys");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    let (k, p) = (private.to_str().unwrap(), public.to_str().unwrap());
    match method {
        "ES256" => {
            openssl(&[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                k,
            ]);
            openssl(&["ec", "-in", k, "-pubout", "-out", p]);
            let pem = std::fs::read_to_string(&private).unwrap();
            assert!(pem.starts_with("-----BEGIN EC PRIVATE KEY-----"), "{pem}");
        }
        "ES384" => {
            let pair =
                rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("EC key");
            std::fs::write(&private, pair.serialize_pem()).unwrap();
            std::fs::write(&public, pair.public_key_pem()).unwrap();
        }
        _ => {
            openssl(&["genrsa", "-out", k, "2048"]);
            openssl(&["rsa", "-in", k, "-pubout", "-out", p]);
        }
    }
    format!(
        "jwt,pub-key={},priv-key={},sign-method={method}{extra}",
        public.display(),
        private.display()
    )
}

/// The whole etcdctl session above, with both servers issuing JWTs from the same key.
#[test]
fn jwt_etcdctl_session_matches_etcd() {
    let keys = tempfile::tempdir().unwrap();
    let flag = jwt_flag(keys.path(), "ES256", "");
    session_matches_etcd(&["--auth-token", flag.as_str(), "--bcrypt-cost", "4"]);
}

/// The HTTP status and what a gateway answer says: the error message, or the keys and count of
/// a range.
fn gist(code: u16, v: &Value) -> (u16, String) {
    match v["message"].as_str() {
        Some(m) => (code, m.to_string()),
        None => (code, format!("count={} kvs={}", v["count"], v["kvs"])),
    }
}

/// JWT lifecycles against etcd with the same key (RS256, ttl 2s): a token's claims, refusal of
/// a token from before an auth change (`revision of auth store is old`), of a forged or
/// garbage token and of an expired one.
#[test]
fn jwt_tokens_match_etcd() {
    let keys = tempfile::tempdir().unwrap();
    let flag = jwt_flag(keys.path(), "RS256", ",ttl=2s");
    let args = ["--auth-token", flag.as_str(), "--bcrypt-cost", "4"];
    let mut etcd = Server::spawn(Kind::Etcd, &args);
    let mut spindle = Server::spawn(Kind::Spindle, &args);
    spindle.wait_ready();
    etcd.wait_ready();
    let range_a = r#"{"key":"YQ=="}"#;
    let mut seen = Vec::new();
    for s in [&etcd, &spindle] {
        for args in [
            &["user", "add", "root:pw"][..],
            &["user", "grant-role", "root", "root"],
            &["auth", "enable"],
            &[ROOT, "put", "a", "1"],
        ] {
            ok(run(s, args, None), &args.join(" "));
        }
        let mut mine = Vec::new();
        let token = authenticate(s.port, "root", "pw");
        let claims = token.split('.').nth(1).expect("a JWT payload");
        let claims: Value = {
            use base64::Engine as _;
            let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(claims)
                .expect("base64url claims");
            serde_json::from_slice(&raw).expect("JSON claims")
        };
        let exp = claims["exp"].as_u64().expect("exp");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!((now..=now + 3).contains(&exp), "{claims}");
        // etcd's auth revision does not move on `auth enable`, spindle's does (see the design
        // doc), so the two claims differ by one here: only its presence is compared.
        assert!(
            claims["revision"].as_u64().is_some_and(|r| r > 0),
            "{claims}"
        );
        mine.push(("claims".to_string(), 200, claims["username"].to_string()));
        let mut probe = |what: &str, token: &str| {
            let (code, v) = post_with_token(s.port, "/v3/kv/range", range_a, token);
            let (code, g) = gist(code, &v);
            mine.push((what.to_string(), code, g));
        };
        probe("fresh", &token);
        let mut forged: Vec<&str> = token.split('.').collect();
        let payload = b64url(r#"{"exp":9999999999,"revision":99,"username":"root"}"#);
        forged[1] = &payload;
        probe("forged", &forged.join("."));
        probe("garbage", "not-a-jwt");
        ok(run(s, &[ROOT, "role", "add", "r"], None), "role add");
        probe("stale", &token);
        let token = authenticate(s.port, "root", "pw");
        probe("renewed", &token);
        std::thread::sleep(Duration::from_millis(3500));
        probe("expired", &token);
        seen.push(mine);
    }
    assert_eq!(seen[1], seen[0], "spindle (left) differs from etcd (right)");
    let expect = [
        ("stale", 400, "etcdserver: revision of auth store is old"),
        ("expired", 401, "etcdserver: invalid auth token"),
        ("forged", 401, "etcdserver: invalid auth token"),
    ];
    for (what, code, msg) in expect {
        assert!(
            seen[1].contains(&(what.to_string(), code, msg.to_string())),
            "{what}: {:?}",
            seen[1]
        );
    }
}

fn b64url(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

/// Three members with one key pair, the third given only the public key: a token minted on one
/// member works on the others (no per-member table); the verify-only member refuses to mint
/// with etcd's error; a bad `--auth-token` refuses the start naming the option.
#[test]
fn jwt_tokens_work_on_every_cluster_member() {
    use common::server::Ports;
    let keys = tempfile::tempdir().unwrap();
    let flag = jwt_flag(keys.path(), "ES384", "");
    let verify_only = flag.replace(
        &format!(",priv-key={}", keys.path().join("jwt.key").display()),
        "",
    );
    assert_ne!(flag, verify_only);
    let ports = Ports::free(3);
    let urls: Vec<String> = ports.iter().map(|p| p.peer_url()).collect();
    let initial = common::cluster::initial_cluster("j", &urls);
    let mut servers: Vec<Server> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let url = p.peer_url();
            let mut args = common::cluster::spindle_member(
                &format!("j{i}"),
                &initial,
                "new",
                "jwt-test",
                &url,
                &url,
            );
            let token_flag = if i == 2 { &verify_only } else { &flag };
            args.extend(["--auth-token", token_flag, "--bcrypt-cost", "4"].map(String::from));
            Server::spawn_on(Kind::Spindle, *p, &args)
        })
        .collect();
    for s in &mut servers {
        s.wait_ready();
    }
    for args in PREFIX_USER_SETUP {
        // The first waits for the members to elect a leader.
        ok(until_ok(&servers[0], args, 30), &args.join(" "));
    }
    ok(
        until_ok(&servers[1], &[U, "put", "p/1", "x"], 10),
        "put p/1",
    );
    let token = authenticate(servers[0].port, "u", "pw");
    let range_p1 = format!(r#"{{"key":"{}"}}"#, b64("p/1"));
    let range_a = r#"{"key":"YQ=="}"#;
    for s in &servers {
        // A member that has not applied the auth state yet sees a token from the future.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let (code, v) = loop {
            let (code, v) = post_with_token(s.port, "/v3/kv/range", &range_p1, &token);
            if code == 200 || std::time::Instant::now() >= deadline {
                break (code, v);
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        assert_eq!(
            (code, &v["count"]),
            (200, &Value::from("1")),
            "member {}: {v}",
            s.port
        );
        let (code, v) = post_with_token(s.port, "/v3/kv/range", range_a, &token);
        assert_eq!(
            gist(code, &v),
            (403, "etcdserver: permission denied".to_string()),
            "member {}",
            s.port
        );
    }
    // The verify-only member cannot mint (etcd: code Unknown, HTTP 500 through the gateway).
    let body = r#"{"name":"u","password":"pw"}"#;
    let (code, v) = post_with_token(servers[2].port, "/v3/auth/authenticate", body, "");
    assert_eq!(
        (code, v["message"].as_str(), v["code"].as_i64()),
        (
            500,
            Some("auth: token signing attempted with verify-only key"),
            Some(2)
        )
    );
    let o = run(&servers[2], &[U, "get", "p/1"], None);
    assert!(
        o.errors
            .iter()
            .any(|e| e.contains("auth: token signing attempted with verify-only key")),
        "{o:?}"
    );

    // Bad options refuse the start with a message naming the option.
    let missing = keys.path().join("missing.pem");
    for (bad, needle) in [
        ("jwt,priv-key=x".to_string(), "sign-method"),
        (
            format!("jwt,sign-method=ES384,priv-key={}", missing.display()),
            "priv-key",
        ),
        ("jwt,sign-method=ES384".to_string(), "missing key data"),
        ("jwt,sign-method=ES384,ttl=soon".to_string(), "ttl"),
        (flag.replace("ES384", "ES256"), "priv-key"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_spindle"))
            .args(["serve", "--auth-token", &bad, "--data-dir"])
            .arg(keys.path().join("never"))
            .args(["--listen-client-urls", "http://127.0.0.1:1"])
            .output()
            .expect("run spindle");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad}: started");
        assert!(err.contains(needle), "{bad}: {err}");
    }
}

/// Who a gateway request in [`gateway_script`] comes from.
#[derive(Clone, Copy, Debug)]
enum Who {
    Nobody,
    /// The token of the last `authenticate` as this user.
    Token(&'static str),
    /// That token with a `Bearer ` prefix, which etcd's gateway does not strip.
    Bearer(&'static str),
    /// That token in a `token` header, which etcd's gateway does not pass on.
    TokenHeader(&'static str),
}

/// Gateway requests (path, JSON body, who): the `/v3/auth/*` routes end to end, then
/// permission checks of other routes with the token in the `Authorization` header.
fn gateway_script() -> Vec<(&'static str, Value, Who)> {
    use serde_json::json;
    use Who::*;
    let (a, c, p, q) = (b64("a"), b64("c"), b64("p/"), b64("p0"));
    vec![
        (
            "/v3/auth/user/add",
            json!({"name": "root", "password": "pw"}),
            Nobody,
        ),
        (
            "/v3/auth/user/add",
            json!({"name": "root", "password": "pw"}),
            Nobody,
        ),
        (
            "/v3/auth/user/add",
            json!({"name": "", "password": "pw"}),
            Nobody,
        ),
        ("/v3/auth/role/add", json!({"name": "root"}), Nobody),
        (
            "/v3/auth/user/grant",
            json!({"user": "root", "role": "root"}),
            Nobody,
        ),
        ("/v3/auth/role/add", json!({"name": "r"}), Nobody),
        (
            "/v3/auth/role/grant",
            json!({"name": "r", "perm": {"permType": "READ", "key": a, "range_end": c}}),
            Nobody,
        ),
        (
            "/v3/auth/role/grant",
            json!({"name": "r", "perm": {"permType": "READWRITE", "key": p, "range_end": q}}),
            Nobody,
        ),
        (
            "/v3/auth/role/grant",
            json!({"name": "missing", "perm": {"key": a}}),
            Nobody,
        ),
        (
            "/v3/auth/user/add",
            json!({"name": "u", "password": "pw"}),
            Nobody,
        ),
        (
            "/v3/auth/user/grant",
            json!({"user": "u", "role": "r"}),
            Nobody,
        ),
        (
            "/v3/auth/user/grant",
            json!({"user": "u", "role": "nope"}),
            Nobody,
        ),
        ("/v3/auth/user/list", json!({}), Nobody),
        ("/v3/auth/role/list", json!({}), Nobody),
        ("/v3/auth/user/get", json!({"name": "u"}), Nobody),
        ("/v3/auth/user/get", json!({"name": "missing"}), Nobody),
        ("/v3/auth/role/get", json!({"role": "r"}), Nobody),
        ("/v3/auth/role/get", json!({"role": "missing"}), Nobody),
        (
            "/v3/auth/authenticate",
            json!({"name": "root", "password": "pw"}),
            Nobody,
        ),
        ("/v3/auth/enable", json!({}), Nobody),
        ("/v3/auth/enable", json!({}), Nobody),
        ("/v3/auth/user/list", json!({}), Nobody),
        (
            "/v3/auth/authenticate",
            json!({"name": "root", "password": "no"}),
            Nobody,
        ),
        (
            "/v3/auth/authenticate",
            json!({"name": "root", "password": "pw"}),
            Nobody,
        ),
        (
            "/v3/auth/authenticate",
            json!({"name": "u", "password": "pw"}),
            Nobody,
        ),
        ("/v3/auth/user/list", json!({}), Token("root")),
        ("/v3/auth/user/list", json!({}), Bearer("root")),
        ("/v3/auth/user/list", json!({}), TokenHeader("root")),
        ("/v3/auth/role/get", json!({"role": "r"}), Token("root")),
        ("/v3/auth/user/get", json!({"name": "u"}), Token("u")),
        ("/v3/auth/user/get", json!({"name": "root"}), Token("u")),
        ("/v3/auth/role/get", json!({"role": "r"}), Token("u")),
        ("/v3/auth/user/list", json!({}), Token("u")),
        ("/v3/auth/role/add", json!({"name": "r2"}), Token("u")),
        ("/v3/auth/disable", json!({}), Token("u")),
        (
            "/v3/kv/put",
            json!({"key": b64("p/1"), "value": b64("v")}),
            Token("u"),
        ),
        (
            "/v3/kv/put",
            json!({"key": a, "value": b64("v")}),
            Token("u"),
        ),
        (
            "/v3/kv/range",
            json!({"key": p, "range_end": q}),
            Token("u"),
        ),
        ("/v3/kv/range", json!({"key": b64("x")}), Token("u")),
        ("/v3/kv/range", json!({"key": a}), Nobody),
        ("/v3/kv/deleterange", json!({"key": b64("p/1")}), Token("u")),
        (
            "/v3/auth/user/delete",
            json!({"name": "root"}),
            Token("root"),
        ),
        (
            "/v3/auth/role/delete",
            json!({"role": "root"}),
            Token("root"),
        ),
        (
            "/v3/auth/role/revoke",
            json!({"role": "r", "key": a, "range_end": c}),
            Token("root"),
        ),
        (
            "/v3/auth/role/revoke",
            json!({"role": "r", "key": a, "range_end": c}),
            Token("root"),
        ),
        ("/v3/auth/role/get", json!({"role": "r"}), Token("root")),
        (
            "/v3/auth/user/changepw",
            json!({"name": "u", "password": "pw2"}),
            Token("root"),
        ),
        // A new password ends the user's tokens.
        ("/v3/auth/user/get", json!({"name": "u"}), Token("u")),
        (
            "/v3/auth/authenticate",
            json!({"name": "u", "password": "pw2"}),
            Nobody,
        ),
        (
            "/v3/auth/user/revoke",
            json!({"name": "u", "role": "r"}),
            Token("root"),
        ),
        (
            "/v3/auth/user/revoke",
            json!({"name": "u", "role": "r"}),
            Token("root"),
        ),
        (
            "/v3/kv/range",
            json!({"key": p, "range_end": q}),
            Token("u"),
        ),
        ("/v3/auth/user/delete", json!({"name": "u"}), Token("root")),
        ("/v3/auth/role/delete", json!({"role": "r"}), Token("root")),
        ("/v3/auth/role/delete", json!({"role": "r"}), Token("root")),
        ("/v3/auth/disable", json!({}), Token("root")),
        ("/v3/auth/user/list", json!({}), Nobody),
        ("/v3/auth/role/list", json!({}), Nobody),
    ]
}

/// Drops what legitimately differs between two clusters: header identities and revision (a
/// fresh etcd is at revision 1, spindle at 0) and the token's text.
fn normalize_gateway(v: &mut Value) {
    if let Some(h) = v.get_mut("header").and_then(Value::as_object_mut) {
        for f in ["cluster_id", "member_id", "raft_term", "revision"] {
            h.remove(f);
        }
    }
    if let Some(t) = v.get_mut("token") {
        *t = Value::from("<token>");
    }
}

/// The `/v3/auth/*` gateway routes and the `Authorization` header, request by request against
/// etcd 3.4's gateway: HTTP status and JSON body compared.
#[test]
fn gateway_auth_routes_match_etcd() {
    let mut etcd = Server::spawn(Kind::Etcd, FAST_BCRYPT);
    let mut spindle = Server::spawn(Kind::Spindle, FAST_BCRYPT);
    spindle.wait_ready();
    etcd.wait_ready();
    let mut tokens: [std::collections::HashMap<String, String>; 2] = Default::default();
    let mut seen = Vec::new();
    for (path, body, who) in gateway_script() {
        let mut answers = Vec::new();
        for (i, s) in [&etcd, &spindle].into_iter().enumerate() {
            let token = match who {
                Who::Nobody => String::new(),
                Who::Token(u) => tokens[i].get(u).cloned().unwrap_or_default(),
                Who::Bearer(u) => {
                    format!("Bearer {}", tokens[i].get(u).cloned().unwrap_or_default())
                }
                Who::TokenHeader(u) => tokens[i].get(u).cloned().unwrap_or_default(),
            };
            let header = match who {
                Who::TokenHeader(_) => "token",
                _ => "Authorization",
            };
            let (code, mut v) = post_with_header(s.port, path, &body.to_string(), header, &token);
            if let (Some(t), Some(name)) = (v["token"].as_str(), body["name"].as_str()) {
                tokens[i].insert(name.to_string(), t.to_string());
            }
            normalize_gateway(&mut v);
            answers.push((code, v));
        }
        assert_eq!(
            answers[1], answers[0],
            "POST {path} {body} as {who:?}: spindle (left) differs from etcd (right)"
        );
        seen.push(answers.pop().expect("spindle's answer"));
    }
    // The script reaches what it means to: answers, refusals by permission and by token.
    let texts: Vec<String> = seen.iter().map(|(c, v)| format!("{c} {v}")).collect();
    for expected in [
        r#"200 {"header":{},"users":["root","u"]}"#,
        r#"200 {"header":{},"token":"<token>"}"#,
        r#"403 {"code":7,"error":"etcdserver: permission denied","message":"etcdserver: permission denied"}"#,
        r#"401 {"code":16,"error":"etcdserver: invalid auth token","message":"etcdserver: invalid auth token"}"#,
    ] {
        assert!(
            texts.iter().any(|t| t == expected),
            "{expected} in {texts:#?}"
        );
    }
    assert_eq!(
        texts.last().map(String::as_str),
        Some(r#"200 {"header":{},"roles":["root"]}"#)
    );
    spindle.assert_alive();
}
