//! Differential tests against etcd 3.4: each scenario sends the same requests to a fresh `etcd`
//! and a fresh `spindle serve` and compares the answers field by field.
//!
//! Before comparing, only the identities that legitimately differ between two clusters are
//! dropped: `cluster_id`, `member_id` and `raft_term` from every response header, and in Status
//! the fields describing the build and the storage (`version`, `dbSize`, `dbSizeInUse`, `leader`,
//! `raftIndex`, `raftTerm`, `raftAppliedIndex`). Revisions, create/mod revisions, versions,
//! values, `more`, `count`, error codes and error messages are compared exactly.
//!
//! Requests go through `etcdctl` (its `-w json` output, its simple output, and the gRPC code and
//! message of a failure) and, for the request forms etcdctl cannot express, through the JSON
//! gateway with a hand-written HTTP/1.1 POST (HTTP status and JSON body are compared).
//!
//! A fresh etcd is at revision 1 and a fresh spindle at revision 0 (see
//! `fresh_stores_are_at_the_same_revision`). So that every other scenario still compares
//! revisions exactly, [`Pair::start`] levels the counters first when, and only when, spindle is
//! exactly one behind: spindle alone puts a scratch key, then both put and delete it, which
//! leaves both stores empty at the same revision. Once spindle starts at etcd's revision this is
//! a no-op.
//!
//! Needs `etcd` and `etcdctl` 3.4 on PATH (`tools/test` installs them).

use std::process::Child;

use base64::Engine as _;
use serde_json::{json, Value};

mod common;
use common::etcdctl;
use common::server::{Kind, Server};

/// `--max-request-bytes` for both servers, so that "request is too large" is cheap to provoke.
const MAX_REQUEST_BYTES: &str = "4096";

// ---------------------------------------------------------------------------------------------
// etcdctl
// ---------------------------------------------------------------------------------------------

/// What one etcdctl run produced.
#[derive(Debug)]
struct Ctl {
    ok: bool,
    stdout: String,
    /// The failure as etcdctl reports it: the gRPC `code = … desc = …` from its client log line
    /// and its `Error: …` line.
    errors: Vec<String>,
}

fn spawn_etcdctl(s: &Server, args: &[&str], stdin: Option<&str>) -> Child {
    etcdctl::spawn_with_input(s.etcdctl_cmd(args), stdin)
}

fn finish_etcdctl(s: &mut Server, child: Child, what: &str) -> Ctl {
    let out = child.wait_with_output().expect("wait for etcdctl");
    let ctl = Ctl {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        errors: etcdctl::error_lines(&String::from_utf8_lossy(&out.stderr)),
    };
    let transport = ctl.errors.iter().any(|e| {
        e.contains("context deadline exceeded")
            || e.contains("DeadlineExceeded")
            || e.contains("connection refused")
            || e.contains("code = Unavailable")
    });
    if transport {
        s.assert_alive();
        panic!(
            "{what}: could not talk to {}: {:?}\nlast log lines:\n{}",
            s.name(),
            ctl.errors,
            s.log_tail(30)
        );
    }
    ctl
}

/// Shortens what a failure message shows of a long request.
fn clip(text: &str) -> String {
    const MAX: usize = 2000;
    if text.len() <= MAX {
        return text.to_string();
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes in all)", &text[..end], text.len())
}

fn describe(args: &[&str], stdin: Option<&str>) -> String {
    let mut d = clip(&format!("etcdctl {}", args.join(" ")));
    if let Some(text) = stdin {
        d.push_str(&format!(" <<EOF\n{}EOF", clip(text)));
    }
    d
}

fn wants_json(args: &[&str]) -> bool {
    args.windows(2).any(|w| w == ["-w", "json"]) || args.contains(&"--write-out=json")
}

/// Parses etcdctl's JSON output (one or more documents) and normalises it.
fn parse_json_stream(text: &str) -> Option<Value> {
    let docs: Result<Vec<Value>, _> = serde_json::Deserializer::from_str(text)
        .into_iter::<Value>()
        .collect();
    let mut v = Value::Array(docs.ok()?);
    normalize(&mut v);
    Some(v)
}

// ---------------------------------------------------------------------------------------------
// JSON gateway
// ---------------------------------------------------------------------------------------------

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = body.windows(2).position(|w| w == b"\r\n") else {
            panic!("truncated chunked body");
        };
        let size_text = String::from_utf8_lossy(&body[..eol]);
        let size_text = size_text.split(';').next().unwrap().trim();
        let size = usize::from_str_radix(size_text, 16)
            .unwrap_or_else(|_| panic!("bad chunk size {size_text:?}"));
        body = &body[eol + 2..];
        if size == 0 {
            return out; // trailers follow; not compared
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

/// POSTs `body` to `path` and returns the HTTP status and the parsed JSON body.
fn post(port: u16, path: &str, body: &str) -> (u16, Value) {
    let raw = common::http::post_raw(port, path, body);
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP header end in {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    let rest = &raw[split + 4..];
    let body = if head.contains("transfer-encoding: chunked") {
        dechunk(rest)
    } else {
        rest.to_vec()
    };
    let value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    (status, value)
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s.as_bytes())
}

// ---------------------------------------------------------------------------------------------
// Normalisation and comparison
// ---------------------------------------------------------------------------------------------

/// Drops the header fields that legitimately differ between two clusters, at every depth.
fn normalize(v: &mut Value) {
    match v {
        Value::Object(m) => {
            if let Some(Value::Object(h)) = m.get_mut("header") {
                for f in ["cluster_id", "member_id", "raft_term"] {
                    h.remove(f);
                }
            }
            m.values_mut().for_each(normalize);
        }
        Value::Array(a) => a.iter_mut().for_each(normalize),
        _ => {}
    }
}

/// Status fields that describe the server build and storage rather than the data.
const STATUS_IDENTITY: [&str; 7] = [
    "version",
    "dbSize",
    "dbSizeInUse",
    "leader",
    "raftIndex",
    "raftTerm",
    "raftAppliedIndex",
];

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap()
}

fn report(what: &str, etcd: &str, spindle: &str) -> ! {
    panic!(
        "etcd and spindle differ on {what}\n----- etcd -----\n{etcd}\n----- spindle -----\n{spindle}\n"
    );
}

/// A gateway answer: HTTP status and normalised JSON body.
#[derive(Clone, Debug, PartialEq)]
struct Gw {
    status: u16,
    body: Value,
}

impl Gw {
    fn show(&self) -> String {
        format!("HTTP {}\n{}", self.status, pretty(&self.body))
    }
}

fn rev_of(v: &Value) -> i64 {
    match &v["header"]["revision"] {
        Value::Null => 0,
        Value::String(s) => s.parse().unwrap(),
        Value::Number(n) => n.as_i64().unwrap(),
        other => panic!("bad revision {other}"),
    }
}

fn num(v: &Value) -> i64 {
    match v {
        Value::Null => 0,
        Value::String(s) => s.parse().unwrap(),
        Value::Number(n) => n.as_i64().unwrap(),
        other => panic!("not a number: {other}"),
    }
}

fn kvs(v: &Value) -> &[Value] {
    v["kvs"].as_array().map(Vec::as_slice).unwrap_or(&[])
}

// ---------------------------------------------------------------------------------------------
// The pair of servers
// ---------------------------------------------------------------------------------------------

struct Pair {
    etcd: Server,
    spindle: Server,
}

impl Pair {
    /// Both servers fresh, at the same revision.
    fn start() -> Pair {
        let pair = Pair::start_fresh();
        pair.level_revisions();
        pair
    }

    /// Both servers fresh, untouched.
    fn start_fresh() -> Pair {
        let extra = ["--max-request-bytes", MAX_REQUEST_BYTES];
        let mut etcd = Server::spawn(Kind::Etcd, &extra);
        let mut spindle = Server::spawn(Kind::Spindle, &extra);
        spindle.wait_ready();
        etcd.wait_ready();
        Pair { etcd, spindle }
    }

    /// See the module documentation: only the known start-revision offset is levelled.
    fn level_revisions(&self) {
        let probe = json!({ "key": b64("~level") }).to_string();
        let (_, e) = post(self.etcd.port, "/v3/kv/range", &probe);
        let (_, s) = post(self.spindle.port, "/v3/kv/range", &probe);
        let (e, s) = (rev_of(&e), rev_of(&s));
        if e == s {
            return;
        }
        assert_eq!(
            s + 1,
            e,
            "fresh stores: etcd at revision {e}, spindle at {s}"
        );
        let put = json!({ "key": b64("~level"), "value": b64("x") }).to_string();
        assert_eq!(post(self.spindle.port, "/v3/kv/put", &put).0, 200);
        self.gw_ok(
            "/v3/kv/put",
            json!({ "key": b64("~level"), "value": b64("x") }),
        );
        let del = self.gw_ok("/v3/kv/deleterange", json!({ "key": b64("~level") }));
        assert_eq!(num(&del["deleted"]), 1);
    }

    // -- etcdctl ------------------------------------------------------------------------------

    fn run_ctl(&mut self, args: &[&str], stdin: Option<&str>) -> (Ctl, Ctl) {
        let what = describe(args, stdin);
        let e = spawn_etcdctl(&self.etcd, args, stdin);
        let s = spawn_etcdctl(&self.spindle, args, stdin);
        let e = finish_etcdctl(&mut self.etcd, e, &what);
        let s = finish_etcdctl(&mut self.spindle, s, &what);
        (e, s)
    }

    /// Runs etcdctl against both and compares exit status, output and error lines.
    fn ctl_in(&mut self, args: &[&str], stdin: Option<&str>) -> Ctl {
        let what = describe(args, stdin);
        let (e, s) = self.run_ctl(args, stdin);
        let show = |c: &Ctl, out: &str| {
            format!(
                "exit: {}\nstdout:\n{out}\nerrors: {:#?}",
                if c.ok { "success" } else { "failure" },
                c.errors
            )
        };
        let (eo, so) = if wants_json(args) {
            match (parse_json_stream(&e.stdout), parse_json_stream(&s.stdout)) {
                (Some(a), Some(b)) if a == b => (None, None),
                (Some(a), Some(b)) => (Some(pretty(&a)), Some(pretty(&b))),
                _ if e.stdout == s.stdout => (None, None),
                _ => (Some(e.stdout.clone()), Some(s.stdout.clone())),
            }
        } else if e.stdout == s.stdout {
            (None, None)
        } else {
            (Some(e.stdout.clone()), Some(s.stdout.clone()))
        };
        if eo.is_some() || e.ok != s.ok || e.errors != s.errors {
            let eo = eo.unwrap_or_else(|| e.stdout.clone());
            let so = so.unwrap_or_else(|| s.stdout.clone());
            report(&what, &show(&e, &eo), &show(&s, &so));
        }
        e
    }

    /// Same output from both, and etcd succeeded; returns etcd's output (JSON when `-w json`).
    fn ctl(&mut self, args: &[&str]) -> Value {
        self.ctl_ok_in(args, None)
    }

    fn ctl_ok_in(&mut self, args: &[&str], stdin: Option<&str>) -> Value {
        let c = self.ctl_in(args, stdin);
        assert!(
            c.ok,
            "{} failed on etcd: {:?}",
            describe(args, stdin),
            c.errors
        );
        if wants_json(args) {
            let mut v = parse_json_stream(&c.stdout).expect("etcdctl -w json output");
            match v.as_array_mut() {
                Some(a) if a.len() == 1 => a.pop().unwrap(),
                _ => v,
            }
        } else {
            Value::String(c.stdout)
        }
    }

    /// Same failure from both, and etcd's error says `expected`.
    fn ctl_err_in(&mut self, args: &[&str], stdin: Option<&str>, expected: &str) {
        let c = self.ctl_in(args, stdin);
        assert!(
            !c.ok && c.errors.iter().any(|e| e.contains(expected)),
            "{}: etcd did not fail with {expected:?}: {c:?}",
            describe(args, stdin)
        );
    }

    fn ctl_err(&mut self, args: &[&str], expected: &str) {
        self.ctl_err_in(args, None, expected)
    }

    // -- JSON gateway -------------------------------------------------------------------------

    fn gw_pair(&self, path: &str, body: &Value) -> (Gw, Gw) {
        let text = body.to_string();
        let (es, mut eb) = post(self.etcd.port, path, &text);
        let (ss, mut sb) = post(self.spindle.port, path, &text);
        normalize(&mut eb);
        normalize(&mut sb);
        (
            Gw {
                status: es,
                body: eb,
            },
            Gw {
                status: ss,
                body: sb,
            },
        )
    }

    /// POSTs to both gateways and compares status and body; returns etcd's answer.
    fn gw(&self, path: &str, body: Value) -> Gw {
        let (e, s) = self.gw_pair(path, &body);
        if e != s {
            report(&clip(&format!("POST {path} {body}")), &e.show(), &s.show());
        }
        e
    }

    fn gw_ok(&self, path: &str, body: Value) -> Value {
        let what = clip(&format!("POST {path} {body}"));
        let r = self.gw(path, body);
        assert_eq!(r.status, 200, "{what} failed on etcd: {}", r.show());
        r.body
    }

    /// Same error from both gateways; etcd's is the gRPC `code` with `message`.
    fn gw_err(&self, path: &str, body: Value, code: i64, message: &str) {
        let what = clip(&format!("POST {path} {body}"));
        let r = self.gw(path, body);
        assert!(
            r.status != 200 && num(&r.body["code"]) == code && r.body["message"] == message,
            "{what}: etcd did not fail with code {code} {message:?}: {}",
            r.show()
        );
    }

    fn put(&self, key: &str, value: &str) -> i64 {
        rev_of(&self.gw_ok(
            "/v3/kv/put",
            json!({ "key": b64(key), "value": b64(value) }),
        ))
    }

    fn revision(&self) -> i64 {
        rev_of(&self.gw_ok("/v3/kv/range", json!({ "key": b64("~") })))
    }
}

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

/// Five keys `name(a)` … `name(e)` whose key, version, create revision, mod revision and value
/// orders all differ and have no ties, plus neighbours `before` and `after` outside their range.
/// Returns the revision after.
fn seed_sortable(p: &Pair, name: impl Fn(&str) -> String, before: &str, after: &str) -> i64 {
    p.put(before, "outside-before");
    for (k, v) in [
        ("c", "x1"),
        ("a", "x1"),
        ("e", "v2"),
        ("b", "x1"),
        ("d", "x1"),
        ("a", "x2"),
        ("b", "x2"),
        ("d", "x2"),
        ("a", "x3"),
        ("b", "x3"),
        ("c", "v1"),
        ("a", "x4"),
        ("b", "v5"),
        ("a", "v3"),
        ("d", "v4"),
    ] {
        p.put(&name(k), v);
    }
    p.put(after, "outside-after");
    p.put("~later", "outside-later");
    p.revision()
}

/// The sortable keys in one directory (`s/a` …: one spindle shard) and spread over directories
/// (`m/a/k` …: several shards, so ranges are merged across them).
fn seed_both_sortable(p: &Pair) -> i64 {
    seed_sortable(p, |k| format!("s/{k}"), "r", "s0");
    seed_sortable(p, |k| format!("m/{k}/k"), "l", "m0")
}

/// Checks that etcd's answer really is ordered by `target` in `order` without ties, so the
/// comparison pins a deterministic order.
fn assert_strictly_sorted(v: &Value, target: &str, order: &str) {
    let ks = kvs(v);
    assert!(ks.len() >= 2, "expected several kvs: {v}");
    let key_of = |kv: &Value| -> (i64, String) {
        match target {
            "KEY" => (0, kv["key"].as_str().unwrap().to_string()),
            "VALUE" => (0, kv["value"].as_str().unwrap_or("").to_string()),
            "VERSION" => (num(&kv["version"]), String::new()),
            "CREATE" => (num(&kv["create_revision"]), String::new()),
            "MODIFY" => (num(&kv["mod_revision"]), String::new()),
            _ => unreachable!(),
        }
    };
    // Keys and values are base64 in JSON; decode to compare bytes.
    let decode = |(n, s): (i64, String)| {
        (
            n,
            base64::engine::general_purpose::STANDARD
                .decode(s)
                .unwrap_or_default(),
        )
    };
    let sorted: Vec<_> = ks.iter().map(|kv| decode(key_of(kv))).collect();
    for w in sorted.windows(2) {
        let ok = match order {
            "ASCEND" => w[0] < w[1],
            "DESCEND" => w[0] > w[1],
            _ => unreachable!(),
        };
        assert!(ok, "etcd's answer is not strictly {order} by {target}: {v}");
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

// ---------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------

#[test]
fn fresh_stores_are_at_the_same_revision() {
    let mut p = Pair::start_fresh();
    let e = p.ctl(&["get", "missing", "-w", "json"]);
    assert_eq!(rev_of(&e), 1, "etcd's fresh revision");
    p.gw_ok("/v3/kv/range", json!({ "key": b64("missing") }));
    let e = p.ctl(&["put", "first", "1", "-w", "json"]);
    assert_eq!(rev_of(&e), 2, "etcd's first write");
    p.ctl(&["get", "first", "-w", "json"]);
}

#[test]
fn put_forms() {
    let mut p = Pair::start();
    assert_eq!(p.ctl(&["put", "k", "v1"]), "OK\n");
    let r = p.ctl(&["put", "k", "v2", "-w", "json"]);
    assert!(r.get("prev_kv").is_none());
    let r = p.ctl(&["put", "k", "v3", "--prev-kv", "-w", "json"]);
    assert_eq!(r["prev_kv"]["value"], b64("v2"));
    p.ctl(&["put", "k", "v4", "--prev-kv"]);
    // ignore_value keeps the value and bumps version and mod revision.
    let r = p.ctl(&["put", "k", "--ignore-value", "--prev-kv", "-w", "json"]);
    assert_eq!(r["prev_kv"]["value"], b64("v4"));
    let r = p.ctl(&["get", "k", "-w", "json"]);
    assert_eq!(kvs(&r)[0]["value"], b64("v4"));
    assert_eq!(num(&kvs(&r)[0]["version"]), 5);
    // ignore_lease on a key without a lease.
    p.ctl(&[
        "put",
        "k",
        "v5",
        "--ignore-lease",
        "--prev-kv",
        "-w",
        "json",
    ]);
    p.ctl(&["put", "k", "--ignore-value", "--ignore-lease", "-w", "json"]);
    p.ctl(&["get", "k", "-w", "json"]);
    // Values with spaces, empty values, binary-ish and long keys.
    p.ctl(&["put", "sp ace", "a value with spaces", "-w", "json"]);
    p.ctl(&["put", "empty", "", "--prev-kv", "-w", "json"]);
    p.ctl(&["put", "empty", "now-set", "--prev-kv", "-w", "json"]);
    let long = "k".repeat(300);
    p.ctl(&["put", &long, "long key", "-w", "json"]);
    p.ctl(&["get", "", "--prefix", "-w", "json"]);
    // The same forms through the gateway.
    p.gw_ok(
        "/v3/kv/put",
        json!({ "key": b64("g"), "value": b64("1"), "prev_kv": true }),
    );
    p.gw_ok(
        "/v3/kv/put",
        json!({ "key": b64("g"), "value": b64("2"), "prev_kv": true }),
    );
    p.gw_ok(
        "/v3/kv/put",
        json!({ "key": b64("g"), "ignore_value": true, "prev_kv": true }),
    );
    p.gw_ok(
        "/v3/kv/put",
        json!({ "key": b64("g"), "value": b64("3"), "ignore_lease": true, "prev_kv": true }),
    );
    p.gw_ok("/v3/kv/put", json!({ "key": b64("g") }));
    let r = p.gw_ok("/v3/kv/range", json!({ "key": b64("g") }));
    assert_eq!(num(&kvs(&r)[0]["version"]), 5);
}

#[test]
fn range_forms() {
    let mut p = Pair::start();
    seed_both_sortable(&p);
    // Single keys, present and missing, JSON and simple output.
    p.ctl(&["get", "s/a", "-w", "json"]);
    p.ctl(&["get", "m/b/k", "-w", "json"]);
    p.ctl(&["get", "s/zz", "-w", "json"]);
    assert_eq!(p.ctl(&["get", "s/a"]), "s/a\nv3\n");
    p.ctl(&["get", "s/zz"]);
    // Prefix, from-key, [a, b), empty and inverted ranges.
    for prefix in ["s/", "m/"] {
        let r = p.ctl(&["get", prefix, "--prefix", "-w", "json"]);
        assert_eq!(kvs(&r).len(), 5);
        p.ctl(&["get", prefix, "--prefix"]);
    }
    p.ctl(&["get", "s/c", "--from-key", "-w", "json"]);
    p.ctl(&["get", "m/c", "--from-key", "-w", "json"]);
    p.ctl(&["get", "", "--from-key", "-w", "json"]);
    p.ctl(&["get", "", "--prefix", "--keys-only"]);
    let r = p.ctl(&["get", "s/b", "s/d", "-w", "json"]);
    assert_eq!(kvs(&r).len(), 2);
    let r = p.ctl(&["get", "m/b", "m/d", "-w", "json"]);
    assert_eq!(kvs(&r).len(), 2);
    p.ctl(&["get", "s/d", "s/b", "-w", "json"]);
    p.ctl(&["get", "s/b", "s/b", "-w", "json"]);
    p.ctl(&["get", "q", "r", "-w", "json"]);
    // Limit: more and count.
    for prefix in ["s/", "m/"] {
        let r = p.ctl(&["get", prefix, "--prefix", "--limit", "2", "-w", "json"]);
        assert_eq!(r["more"], true);
        assert_eq!(num(&r["count"]), 5);
        for limit in ["1", "4", "5", "6", "0"] {
            p.ctl(&["get", prefix, "--prefix", "--limit", limit, "-w", "json"]);
        }
    }
    p.ctl(&["get", "", "--from-key", "--limit", "3", "-w", "json"]);
    p.ctl(&["get", "s/a", "s/e", "--limit", "1", "-w", "json"]);
    // Sort by every target in both orders (no ties in any target), within one directory and
    // across directories.
    for prefix in ["s/", "m/"] {
        for target in ["KEY", "VERSION", "CREATE", "MODIFY", "VALUE"] {
            let sort = format!("--sort-by={target}");
            for order in ["ASCEND", "DESCEND"] {
                let ord = format!("--order={order}");
                let r = p.ctl(&["get", prefix, "--prefix", &sort, &ord, "-w", "json"]);
                assert_eq!(kvs(&r).len(), 5);
                assert_strictly_sorted(&r, target, order);
                let r = p.ctl(&[
                    "get", prefix, "--prefix", &sort, &ord, "--limit", "3", "-w", "json",
                ]);
                assert_eq!(kvs(&r).len(), 3);
                assert_eq!(r["more"], true);
                assert_strictly_sorted(&r, target, order);
                p.ctl(&["get", prefix, "--prefix", &sort, &ord, "--keys-only"]);
                p.ctl(&["get", prefix, "--prefix", &sort, &ord, "--print-value-only"]);
            }
            // A sort target without an order.
            p.ctl(&["get", prefix, "--prefix", &sort, "-w", "json"]);
        }
        // An order without a target.
        p.ctl(&["get", prefix, "--prefix", "--order=DESCEND", "-w", "json"]);
        p.ctl(&["get", prefix, "--prefix", "--order=ASCEND", "-w", "json"]);
    }
    // keys-only and print-value-only, JSON and simple.
    let r = p.ctl(&["get", "s/", "--prefix", "--keys-only", "-w", "json"]);
    assert!(kvs(&r).iter().all(|kv| kv.get("value").is_none()));
    p.ctl(&["get", "m/", "--prefix", "--keys-only"]);
    assert_eq!(
        p.ctl(&["get", "s/", "--prefix", "--print-value-only"]),
        "v3\nv5\nv1\nv4\nv2\n"
    );
    p.ctl(&[
        "get",
        "m/",
        "--prefix",
        "--keys-only",
        "--limit",
        "2",
        "-w",
        "json",
    ]);
    p.ctl(&["get", "m/", "--prefix", "--consistency=s", "-w", "json"]);
    // count_only (not an etcdctl 3.4 flag), keys_only and combinations through the gateway.
    for (key, end) in [("s/", "s0"), ("m/", "m0")] {
        let with = |extra: Value| {
            let mut v = json!({ "key": b64(key), "range_end": b64(end) });
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            v
        };
        let r = p.gw_ok("/v3/kv/range", with(json!({ "count_only": true })));
        assert_eq!(num(&r["count"]), 5);
        p.gw_ok(
            "/v3/kv/range",
            with(json!({ "count_only": true, "limit": "2" })),
        );
        p.gw_ok(
            "/v3/kv/range",
            with(json!({ "keys_only": true, "limit": "2", "sort_target": "VALUE", "sort_order": "DESCEND" })),
        );
        p.gw_ok(
            "/v3/kv/range",
            with(json!({ "sort_target": "MOD", "sort_order": "ASCEND" })),
        );
        p.gw_ok("/v3/kv/range", with(json!({ "sort_target": "CREATE" })));
        p.gw_ok("/v3/kv/range", with(json!({ "sort_order": "DESCEND" })));
        p.gw_ok("/v3/kv/range", with(json!({ "limit": "-1" })));
    }
    // Binary keys (not UTF-8), ordered by bytes, across the whole key space.
    let raw = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let binary: [&[u8]; 8] = [
        &[0x00],
        &[0x00, 0x01],
        &[0x7f],
        &[0x80],
        &[0x80, b'/', 0xfe],
        &[0xff],
        &[0xff, 0x00],
        &[0xff, 0xff],
    ];
    for (i, k) in binary.iter().enumerate() {
        p.gw_ok(
            "/v3/kv/put",
            json!({ "key": raw(k), "value": raw(&[0xff - i as u8, 0x00]) }),
        );
    }
    for (key, end) in [
        (raw(&[0x00]), raw(&[0x00])),
        (raw(&[0x80]), raw(&[0x00])),
        (raw(&[0x00]), raw(&[0x80])),
        (raw(&[0xff]), raw(&[0x00])),
        (raw(&[0x00]), raw(&[0x00, 0x01])),
    ] {
        let r = p.gw_ok(
            "/v3/kv/range",
            json!({ "key": key, "range_end": end, "keys_only": true }),
        );
        assert!(!kvs(&r).is_empty(), "{r}");
        for order in ["ASCEND", "DESCEND"] {
            for target in ["KEY", "VALUE", "MOD"] {
                p.gw_ok(
                    "/v3/kv/range",
                    json!({ "key": key, "range_end": end, "sort_order": order,
                            "sort_target": target, "limit": "3" }),
                );
            }
        }
    }
}

#[test]
fn history_reads() {
    let mut p = Pair::start();
    let base = p.revision();
    p.put("h/a/k", "a1"); // base+1
    p.put("h/b/k", "b1"); // base+2
    p.put("h/a/k", "a2"); // base+3
    p.ctl(&["del", "h/b/k"]); // base+4
    p.put("h/b/k", "b2"); // base+5: recreated, version 1 again
    p.put("h/c/k", "c1"); // base+6
    p.ctl(&["del", "h/", "--prefix"]); // base+7
    p.put("h/a/k", "a3"); // base+8
    assert_eq!(p.revision(), base + 8);
    for rev in base..=base + 8 {
        let rev = rev.to_string();
        let r = p.ctl(&["get", "h/", "--prefix", "--rev", &rev, "-w", "json"]);
        assert_eq!(rev_of(&r), base + 8, "header revision is the current one");
        p.ctl(&["get", "h/b/k", "--rev", &rev, "-w", "json"]);
        p.ctl(&["get", "h/", "--prefix", "--rev", &rev, "--keys-only"]);
        p.ctl(&[
            "get",
            "h/",
            "--prefix",
            "--rev",
            &rev,
            "--sort-by=MODIFY",
            "--order=DESCEND",
            "--limit",
            "1",
            "-w",
            "json",
        ]);
    }
    let r = p.ctl(&[
        "get",
        "h/",
        "--prefix",
        "--rev",
        &(base + 6).to_string(),
        "-w",
        "json",
    ]);
    assert_eq!(kvs(&r).len(), 3);
    assert_eq!(num(&kvs(&r)[1]["version"]), 1);
    // Through the gateway, with filters at a past revision.
    p.gw_ok(
        "/v3/kv/range",
        json!({ "key": b64("h/"), "range_end": b64("h0"), "revision": (base + 6).to_string(),
                "min_create_revision": (base + 2).to_string() }),
    );
    p.gw_ok(
        "/v3/kv/range",
        json!({ "key": b64("h/"), "range_end": b64("h0"), "revision": (base + 6).to_string(),
                "count_only": true }),
    );
}

#[test]
fn delete_forms() {
    let mut p = Pair::start();
    for k in ["da", "db", "dc", "dd", "de", "df", "e", "f", "g"] {
        p.put(k, &format!("val-{k}"));
    }
    assert_eq!(p.ctl(&["del", "da"]), "1\n");
    let r = p.ctl(&["del", "db", "--prev-kv", "-w", "json"]);
    assert_eq!(num(&r["deleted"]), 1);
    assert_eq!(kvs(&r).len(), 0);
    assert_eq!(r["prev_kvs"].as_array().unwrap().len(), 1);
    // A delete that removes nothing takes no revision.
    let before = p.revision();
    let r = p.ctl(&["del", "dmissing", "-w", "json"]);
    assert_eq!(rev_of(&r), before);
    p.ctl(&["del", "dmissing", "--prev-kv"]);
    p.ctl(&["del", "dzz", "dzzz", "--prev-kv", "-w", "json"]);
    // Range [a, b) with prev kvs, simple and JSON.
    p.ctl(&["del", "dc", "de", "--prev-kv"]);
    p.ctl(&["get", "d", "--prefix", "-w", "json"]);
    // Prefix.
    let r = p.ctl(&["del", "d", "--prefix", "--prev-kv", "-w", "json"]);
    assert_eq!(num(&r["deleted"]), 2);
    p.ctl(&["del", "d", "--prefix", "-w", "json"]);
    // From key.
    let r = p.ctl(&["del", "f", "--from-key", "--prev-kv", "-w", "json"]);
    assert_eq!(num(&r["deleted"]), 2);
    p.ctl(&["get", "", "--from-key", "-w", "json"]);
    // Through the gateway, and a recreated key starts over at version 1.
    p.put("x/1", "a");
    p.put("x/2", "b");
    p.gw_ok(
        "/v3/kv/deleterange",
        json!({ "key": b64("x/"), "range_end": b64("x0"), "prev_kv": true }),
    );
    p.gw_ok("/v3/kv/deleterange", json!({ "key": b64("x/1") }));
    p.put("x/1", "again");
    let r = p.ctl(&["get", "x/1", "-w", "json"]);
    assert_eq!(num(&kvs(&r)[0]["version"]), 1);
}

#[test]
fn etcdctl_txn() {
    let mut p = Pair::start();
    p.put("ta", "1");
    p.put("tb", "2");
    p.put("tc", "3");
    p.put("tc", "3b");
    let rev = p.revision();
    let (ca, mc) = ((rev - 3).to_string(), rev.to_string());
    // Every compare target holds: the success branch runs (writes first, then reads).
    let script = txn_script(
        &[
            "value(\"ta\") = \"1\"",
            "version(\"tc\") = \"2\"",
            "version(\"tb\") > \"0\"",
            &format!("create(\"ta\") = \"{ca}\""),
            &format!("mod(\"tc\") = \"{mc}\""),
            "mod(\"ta\") < \"1000\"",
            "value(\"tb\") != \"zzz\"",
            "value(\"tc\") > \"3\"",
            "create(\"tmissing\") = \"0\"",
        ],
        &[
            "put ta 10 --prev-kv",
            "put tnew n",
            "del tb --prev-kv",
            "get t --prefix",
            "get ta --keys-only",
            "get t --prefix --limit=1 --sort-by=MODIFY --order=DESCEND",
        ],
        &["put tfail f"],
    );
    let r = p.ctl_ok_in(&["txn", "-w", "json"], Some(&script));
    assert_eq!(r["succeeded"], true);
    assert_eq!(r["responses"].as_array().unwrap().len(), 6);
    // A failing compare runs the failure branch.
    let script = txn_script(
        &["value(\"ta\") = \"1\"", "version(\"tzzz\") = \"0\""],
        &["put tx should-not-exist"],
        &[
            "put tf fail-branch",
            "del tnothing --prev-kv",
            "get tf",
            "get tx",
        ],
    );
    let r = p.ctl_ok_in(&["txn", "-w", "json"], Some(&script));
    assert!(r.get("succeeded").is_none());
    // Compares on a missing key: VALUE is false, the numeric targets see zero.
    for compare in [
        "value(\"tmissing\") = \"\"",
        "version(\"tmissing\") = \"0\"",
        "mod(\"tmissing\") < \"1\"",
        "value(\"tmissing\") != \"x\"",
        "version(\"ta\") > \"100\"",
        "create(\"ta\") != \"0\"",
    ] {
        let script = txn_script(&[compare], &["get ta"], &["get tnew"]);
        p.ctl_ok_in(&["txn", "-w", "json"], Some(&script));
        p.ctl_ok_in(&["txn"], Some(&script));
    }
    // Simple output of a writing txn, and an empty txn.
    let script = txn_script(
        &["version(\"tf\") = \"1\""],
        &["put tf second", "del tnew", "get tf"],
        &[],
    );
    p.ctl_ok_in(&["txn"], Some(&script));
    p.ctl_ok_in(&["txn", "-w", "json"], Some(&txn_script(&[], &[], &[])));
    // A read-only txn: no revision taken.
    let before = p.revision();
    let r = p.ctl_ok_in(
        &["txn", "-w", "json"],
        Some(&txn_script(&[], &["get t --prefix", "get ta"], &[])),
    );
    assert_eq!(rev_of(&r), before);
    p.ctl(&["get", "t", "--prefix", "-w", "json"]);
}

/// In etcd a read inside a writing txn that comes before the txn's first write reports the
/// revision before the txn in its header (`storeTxnWrite.Range`); later ops report the new one.
#[test]
fn txn_read_before_write_reports_the_previous_revision() {
    let mut p = Pair::start();
    p.put("w/a", "1");
    let script = txn_script(&[], &["get w/a", "put w/b 2", "get w/b"], &[]);
    let r = p.ctl_ok_in(&["txn", "-w", "json"], Some(&script));
    let before = rev_of(&r) - 1;
    assert_eq!(
        num(&r["responses"][0]["Response"]["ResponseRange"]["header"]["revision"]),
        before
    );
    p.gw_ok(
        "/v3/kv/txn",
        json!({ "success": [
            { "request_range": { "key": b64("w/a") } },
            { "request_put": { "key": b64("w/c"), "value": b64("3") } },
        ] }),
    );
}

#[test]
fn compaction() {
    let mut p = Pair::start();
    let base = p.revision();
    for i in 1..=6 {
        p.put("c/a/k", &format!("a{i}")); // base+1 ..= base+6
    }
    p.put("c/b/k", "b1"); // base+7
    p.ctl(&["del", "c/a/k"]); // base+8
    p.put("c/c/k", "c1"); // base+9
    let at = (base + 4).to_string();
    let below = (base + 3).to_string();
    let r = p.ctl(&["compaction", &at]);
    assert_eq!(r, format!("compacted revision {at}\n"));
    // Reads below the compaction fail; at and above it they work.
    p.ctl_err(
        &["get", "c/a/k", "--rev", &below],
        "etcdserver: mvcc: required revision has been compacted",
    );
    p.ctl_err(
        &["get", "c/", "--prefix", "--rev", "1"],
        "etcdserver: mvcc: required revision has been compacted",
    );
    for rev in base + 4..=base + 9 {
        let rev = rev.to_string();
        p.ctl(&["get", "c/", "--prefix", "--rev", &rev, "-w", "json"]);
    }
    p.ctl(&["get", "c/", "--prefix", "-w", "json"]);
    // Compacting again at or below the compacted revision, or into the future.
    p.ctl_err(
        &["compaction", &at],
        "etcdserver: mvcc: required revision has been compacted",
    );
    p.ctl_err(
        &["compaction", &below],
        "etcdserver: mvcc: required revision has been compacted",
    );
    p.ctl_err(
        &["compaction", &(base + 100).to_string()],
        "etcdserver: mvcc: required revision is a future revision",
    );
    // Physical compaction past the delete; the deleted key's history is gone.
    let at2 = (base + 8).to_string();
    assert_eq!(
        p.ctl(&["compaction", &at2, "--physical"]),
        format!("compacted revision {at2}\n")
    );
    p.ctl_err(
        &["get", "c/a/k", "--rev", &(base + 7).to_string()],
        "etcdserver: mvcc: required revision has been compacted",
    );
    p.ctl(&["get", "c/", "--prefix", "--rev", &at2, "-w", "json"]);
    // Through the gateway, including a txn reading at a compacted revision.
    p.gw_err(
        "/v3/kv/range",
        json!({ "key": b64("c/b/k"), "revision": (base + 7).to_string() }),
        11,
        "etcdserver: mvcc: required revision has been compacted",
    );
    p.gw_err(
        "/v3/kv/txn",
        json!({ "success": [ { "request_range": { "key": b64("c/b/k"), "revision": (base + 2).to_string() } } ] }),
        11,
        "etcdserver: mvcc: required revision has been compacted",
    );
    p.gw_ok(
        "/v3/kv/compaction",
        json!({ "revision": (base + 9).to_string() }),
    );
    p.gw_err(
        "/v3/kv/compaction",
        json!({ "revision": (base + 9).to_string() }),
        11,
        "etcdserver: mvcc: required revision has been compacted",
    );
    p.gw_err(
        "/v3/kv/compaction",
        json!({ "revision": (base + 50).to_string(), "physical": true }),
        11,
        "etcdserver: mvcc: required revision is a future revision",
    );
    p.put("c/d/k", "after");
    p.gw_ok(
        "/v3/kv/range",
        json!({ "key": b64("c/"), "range_end": b64("c0"), "revision": (base + 9).to_string() }),
    );
}

#[test]
fn gateway_range_filters() {
    let p = Pair::start();
    let s_base = seed_sortable(&p, |k| format!("s/{k}"), "r", "s0");
    let m_base = seed_sortable(&p, |k| format!("m/{k}/k"), "l", "m0");
    for (key, end, base) in [("s/", "s0", s_base), ("m/", "m0", m_base)] {
        let range = |extra: Value| {
            let mut v = json!({ "key": b64(key), "range_end": b64(end) });
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            v
        };
        // base is the revision after seeding; the five keys were written in [base-16, base-2].
        let mid = (base - 6).to_string();
        let early = (base - 15).to_string();
        for filter in [
            json!({ "min_mod_revision": mid }),
            json!({ "max_mod_revision": mid }),
            json!({ "min_create_revision": early }),
            json!({ "max_create_revision": early }),
            json!({ "min_mod_revision": early, "max_mod_revision": mid }),
            json!({ "min_create_revision": early, "max_mod_revision": mid }),
        ] {
            let r = p.gw_ok("/v3/kv/range", range(filter.clone()));
            let n = kvs(&r).len();
            assert!(n > 0 && n < 5, "{filter} should select some keys: {r}");
            let mut with = filter.clone();
            let m = with.as_object_mut().unwrap();
            m.insert("limit".into(), json!("1"));
            p.gw_ok("/v3/kv/range", range(with.clone()));
            let m = with.as_object_mut().unwrap();
            m.insert("sort_order".into(), json!("DESCEND"));
            m.insert("sort_target".into(), json!("VALUE"));
            p.gw_ok("/v3/kv/range", range(with.clone()));
            let m = with.as_object_mut().unwrap();
            m.insert("count_only".into(), json!(true));
            p.gw_ok("/v3/kv/range", range(with.clone()));
            let mut keys = filter.clone();
            let m = keys.as_object_mut().unwrap();
            m.insert("keys_only".into(), json!(true));
            p.gw_ok("/v3/kv/range", range(keys));
        }
        // A filter that matches nothing.
        p.gw_ok(
            "/v3/kv/range",
            range(json!({ "min_mod_revision": (base + 10).to_string() })),
        );
        // From-key (range_end "\0") with a filter.
        p.gw_ok(
            "/v3/kv/range",
            json!({ "key": b64(key), "range_end": "AA==", "min_create_revision": early }),
        );
    }
    // Filters on a single key.
    p.gw_ok(
        "/v3/kv/range",
        json!({ "key": b64("s/a"), "max_create_revision": "1" }),
    );
    p.gw_ok(
        "/v3/kv/range",
        json!({ "key": b64("s/a"), "min_mod_revision": (s_base - 4).to_string() }),
    );
}

#[test]
fn gateway_txn_forms() {
    let p = Pair::start();
    for (k, v) in [("ga", "1"), ("gb", "1"), ("gc", "1"), ("h", "x")] {
        p.put(k, v);
    }
    let cmp = |key: &str, target: &str, result: &str, field: &str, value: Value| {
        let mut c = json!({ "key": b64(key), "target": target, "result": result });
        c.as_object_mut().unwrap().insert(field.into(), value);
        c
    };
    let range_cmp = |target: &str, result: &str, field: &str, value: Value| {
        let mut c = cmp("g", target, result, field, value);
        c.as_object_mut()
            .unwrap()
            .insert("range_end".into(), json!(b64("h")));
        c
    };
    // Reads its own writes: put then range, delete then range.
    let r = p.gw_ok(
        "/v3/kv/txn",
        json!({ "success": [
            { "request_put": { "key": b64("ga"), "value": b64("2"), "prev_kv": true } },
            { "request_range": { "key": b64("ga") } },
            { "request_delete_range": { "key": b64("gb"), "prev_kv": true } },
            { "request_range": { "key": b64("g"), "range_end": b64("h") } },
            { "request_put": { "key": b64("gd"), "value": b64("new") } },
            { "request_range": { "key": b64("gd") } },
        ] }),
    );
    assert_eq!(
        r["responses"][1]["response_range"]["kvs"][0]["value"],
        b64("2")
    );
    // Range compares: every key in [g/, g0) must satisfy the compare.
    for (c, holds) in [
        (range_cmp("VERSION", "GREATER", "version", json!("0")), true),
        (range_cmp("VALUE", "EQUAL", "value", json!(b64("1"))), false),
        (
            range_cmp("VALUE", "NOT_EQUAL", "value", json!(b64("zz"))),
            true,
        ),
        (
            range_cmp("CREATE", "LESS", "create_revision", json!("1000")),
            true,
        ),
        (
            range_cmp("MOD", "GREATER", "mod_revision", json!("1000")),
            false,
        ),
        (range_cmp("LEASE", "EQUAL", "lease", json!("0")), true),
    ] {
        let r = p.gw_ok(
            "/v3/kv/txn",
            json!({ "compare": [c],
                    "success": [ { "request_range": { "key": b64("gc") } } ],
                    "failure": [ { "request_range": { "key": b64("h") } } ] }),
        );
        assert_eq!(r["succeeded"] == true, holds, "{c}: {r}");
    }
    // A range compare over an empty range, and from-key range compares.
    let mut empty = range_cmp("VALUE", "EQUAL", "value", json!(b64("1")));
    empty["key"] = json!(b64("nothing"));
    empty["range_end"] = json!(b64("nothinh"));
    p.gw_ok("/v3/kv/txn", json!({ "compare": [empty] }));
    let mut from = cmp("g", "VERSION", "GREATER", "version", json!("0"));
    from["range_end"] = json!("AA==");
    p.gw_ok("/v3/kv/txn", json!({ "compare": [from] }));
    // LEASE compares on a key without a lease and on a missing key.
    for c in [
        cmp("h", "LEASE", "EQUAL", "lease", json!("0")),
        cmp("h", "LEASE", "NOT_EQUAL", "lease", json!("0")),
        cmp("h", "LEASE", "GREATER", "lease", json!("0")),
        cmp("h", "LEASE", "LESS", "lease", json!("5")),
        cmp("missing", "LEASE", "EQUAL", "lease", json!("0")),
    ] {
        p.gw_ok(
            "/v3/kv/txn",
            json!({ "compare": [c],
                    "success": [ { "request_put": { "key": b64("lease/yes"), "value": b64("y") } } ],
                    "failure": [ { "request_put": { "key": b64("lease/no"), "value": b64("n") } } ] }),
        );
    }
    p.gw_ok(
        "/v3/kv/range",
        json!({ "key": b64("lease/"), "range_end": b64("lease0") }),
    );
    // Several compares; one false makes the whole txn fail.
    p.gw_ok(
        "/v3/kv/txn",
        json!({ "compare": [
                    cmp("h", "VERSION", "EQUAL", "version", json!("1")),
                    cmp("h", "MOD", "LESS", "mod_revision", json!("2")),
                ],
                "success": [ { "request_put": { "key": b64("multi"), "value": b64("s") } } ],
                "failure": [ { "request_put": { "key": b64("multi"), "value": b64("f") } },
                             { "request_range": { "key": b64("multi") } } ] }),
    );
}

/// etcd leaves the header of a nested txn's response empty (revision 0); only the outermost
/// response header carries the revision.
#[test]
fn nested_txns() {
    let p = Pair::start();
    for (k, v) in [("ga", "2"), ("gc", "1"), ("h", "x")] {
        p.put(k, v);
    }
    let cmp = |key: &str, target: &str, result: &str, field: &str, value: Value| {
        let mut c = json!({ "key": b64(key), "target": target, "result": result });
        c.as_object_mut().unwrap().insert(field.into(), value);
        c
    };
    // Nested txns, in the success and the failure branch, with their own compares.
    let inner = |value: &str| {
        json!({ "request_txn": {
            "compare": [ cmp("h", "VALUE", "EQUAL", "value", json!(b64(value))) ],
            "success": [
                { "request_put": { "key": b64("nin-ok"), "value": b64(value), "prev_kv": true } },
                { "request_range": { "key": b64("n"), "range_end": b64("o") } },
            ],
            "failure": [
                { "request_put": { "key": b64("nin-fail"), "value": b64(value) } },
                { "request_delete_range": { "key": b64("gc"), "prev_kv": true } },
            ],
        } })
    };
    let r = p.gw_ok(
        "/v3/kv/txn",
        json!({ "compare": [ cmp("ga", "VALUE", "EQUAL", "value", json!(b64("2"))) ],
                "success": [
                    { "request_put": { "key": b64("nouter"), "value": b64("o") } },
                    inner("x"),
                    { "request_range": { "key": b64("n"), "range_end": b64("o") } },
                ],
                "failure": [ inner("x") ] }),
    );
    assert_eq!(r["succeeded"], true);
    assert!(r["responses"][1]["response_txn"].is_object(), "{r}");
    p.gw_ok(
        "/v3/kv/txn",
        json!({ "compare": [ cmp("ga", "VALUE", "EQUAL", "value", json!(b64("nope"))) ],
                "success": [ inner("x") ],
                "failure": [ inner("nope"), { "request_range": { "key": b64("n"), "range_end": b64("o") } } ] }),
    );
    // Two levels deep.
    p.gw_ok(
        "/v3/kv/txn",
        json!({ "success": [ { "request_txn": { "success": [ inner("x") ] } } ] }),
    );
    p.gw_ok(
        "/v3/kv/range",
        json!({ "key": b64("g"), "range_end": b64("o") }),
    );
}

#[test]
fn errors() {
    let mut p = Pair::start();
    p.put("e/a", "1");
    p.put("e/b", "2");
    let now = p.revision();
    // Future revision, through etcdctl and the gateway.
    p.ctl_err(
        &["get", "e/a", "--rev", &(now + 1).to_string()],
        "etcdserver: mvcc: required revision is a future revision",
    );
    p.gw_err(
        "/v3/kv/range",
        json!({ "key": b64("e/"), "range_end": b64("e0"), "revision": (now + 5).to_string() }),
        11,
        "etcdserver: mvcc: required revision is a future revision",
    );
    // Compacted revision.
    p.ctl(&["compaction", &now.to_string()]);
    p.ctl_err(
        &["get", "e/a", "--rev", &(now - 1).to_string()],
        "etcdserver: mvcc: required revision has been compacted",
    );
    // Empty key.
    p.ctl_err(&["put", "", "v"], "etcdserver: key is not provided");
    p.ctl_err(&["get", ""], "etcdserver: key is not provided");
    p.ctl_err(&["del", ""], "etcdserver: key is not provided");
    for path in ["/v3/kv/range", "/v3/kv/put", "/v3/kv/deleterange"] {
        p.gw_err(path, json!({}), 3, "etcdserver: key is not provided");
    }
    p.gw_err(
        "/v3/kv/txn",
        json!({ "success": [ { "request_put": { "value": b64("v") } } ] }),
        3,
        "etcdserver: key is not provided",
    );
    p.gw_err(
        "/v3/kv/txn",
        json!({ "compare": [ { "target": "VALUE", "result": "EQUAL", "value": b64("v") } ] }),
        3,
        "etcdserver: key is not provided",
    );
    // Duplicate keys in a txn.
    let dup = txn_script(&[], &["put e/a 1", "put e/a 2"], &[]);
    p.ctl_err_in(
        &["txn"],
        Some(&dup),
        "etcdserver: duplicate key given in txn request",
    );
    let dup = txn_script(&[], &["put e/a 1", "del e/ --prefix"], &[]);
    p.ctl_err_in(
        &["txn"],
        Some(&dup),
        "etcdserver: duplicate key given in txn request",
    );
    p.gw_err(
        "/v3/kv/txn",
        json!({ "failure": [
            { "request_put": { "key": b64("e/x"), "value": b64("1") } },
            { "request_put": { "key": b64("e/x"), "value": b64("2") } },
        ] }),
        3,
        "etcdserver: duplicate key given in txn request",
    );
    p.gw_err(
        "/v3/kv/txn",
        json!({ "success": [
            { "request_put": { "key": b64("e/x"), "value": b64("1") } },
            { "request_txn": { "success": [ { "request_put": { "key": b64("e/x"), "value": b64("2") } } ] } },
        ] }),
        3,
        "etcdserver: duplicate key given in txn request",
    );
    // The same key in a delete and a put of one branch; in both branches it is allowed.
    p.gw_err(
        "/v3/kv/txn",
        json!({ "success": [
            { "request_delete_range": { "key": b64("e/a") } },
            { "request_put": { "key": b64("e/a"), "value": b64("3") } },
        ] }),
        3,
        "etcdserver: duplicate key given in txn request",
    );
    p.gw_ok(
        "/v3/kv/txn",
        json!({ "success": [ { "request_put": { "key": b64("e/y"), "value": b64("s") } } ],
                "failure": [ { "request_put": { "key": b64("e/y"), "value": b64("f") } } ] }),
    );
    // Too many operations: 128 are allowed, 129 are not.
    let ops = |prefix: &str, n: usize| -> Vec<Value> {
        (0..n)
            .map(|i| json!({ "request_put": { "key": b64(&format!("{prefix}{i}")), "value": "eA==" } }))
            .collect()
    };
    p.gw_err(
        "/v3/kv/txn",
        json!({ "success": ops("m", 129) }),
        3,
        "etcdserver: too many operations in txn request",
    );
    p.gw_ok("/v3/kv/txn", json!({ "success": ops("m", 128) }));
    // Nested txns share the budget: 100 outer ops leave a nested txn fewer than 28.
    let mut nested = ops("m", 100);
    nested.push(json!({ "request_txn": { "success": ops("o", 30) } }));
    p.gw_err(
        "/v3/kv/txn",
        json!({ "success": nested }),
        3,
        "etcdserver: too many operations in txn request",
    );
    let puts: Vec<String> = (0..129).map(|i| format!("put n{i} x")).collect();
    let puts: Vec<&str> = puts.iter().map(String::as_str).collect();
    p.ctl_err_in(
        &["txn"],
        Some(&txn_script(&[], &puts, &[])),
        "etcdserver: too many operations in txn request",
    );
    // Requests above --max-request-bytes.
    let big = "x".repeat(5000);
    p.ctl_err(&["put", "e/big", &big], "etcdserver: request is too large");
    p.gw_err(
        "/v3/kv/put",
        json!({ "key": b64("e/big"), "value": b64(&big) }),
        3,
        "etcdserver: request is too large",
    );
    p.gw_err(
        "/v3/kv/txn",
        json!({ "success": [ { "request_put": { "key": b64("e/big"), "value": b64(&big) } } ] }),
        3,
        "etcdserver: request is too large",
    );
    // ignore_value / ignore_lease on a missing key, or with a value / lease given.
    p.ctl_err(
        &["put", "e/missing", "--ignore-value"],
        "etcdserver: key not found",
    );
    p.ctl_err(
        &["put", "e/missing", "v", "--ignore-lease"],
        "etcdserver: key not found",
    );
    p.gw_err(
        "/v3/kv/put",
        json!({ "key": b64("e/missing"), "ignore_value": true }),
        3,
        "etcdserver: key not found",
    );
    p.gw_err(
        "/v3/kv/txn",
        json!({ "success": [ { "request_put": { "key": b64("e/missing"), "ignore_value": true } } ] }),
        3,
        "etcdserver: key not found",
    );
    p.gw_err(
        "/v3/kv/put",
        json!({ "key": b64("e/a"), "value": b64("v"), "ignore_value": true }),
        3,
        "etcdserver: value is provided",
    );
    p.gw_err(
        "/v3/kv/put",
        json!({ "key": b64("e/a"), "lease": "7", "ignore_lease": true }),
        3,
        "etcdserver: lease is provided",
    );
    // The stores still hold the same data.
    p.ctl(&["get", "", "--from-key", "-w", "json"]);
}

/// Lease IDs are checked on put even though the Lease service itself is not served yet.
#[test]
fn put_with_a_missing_lease() {
    let mut p = Pair::start();
    p.put("l/a", "1");
    p.ctl_err(
        &["put", "l/a", "v", "--lease=3039"],
        "etcdserver: requested lease not found",
    );
    p.gw_err(
        "/v3/kv/put",
        json!({ "key": b64("l/a"), "value": b64("v"), "lease": "12345" }),
        5,
        "etcdserver: requested lease not found",
    );
    p.gw_err(
        "/v3/kv/txn",
        json!({ "success": [ { "request_put": { "key": b64("l/b"), "value": b64("v"), "lease": "12345" } } ] }),
        5,
        "etcdserver: requested lease not found",
    );
    p.ctl(&["get", "l/", "--prefix", "-w", "json"]);
}

/// A DeleteRange over an empty interval (`range_end <= key`) deletes nothing and, like any
/// delete that deletes nothing, answers at the current revision.
#[test]
fn delete_of_an_empty_interval_reports_the_current_revision() {
    let mut p = Pair::start();
    p.put("ea", "1");
    p.put("eb", "2");
    let now = p.revision();
    let r = p.ctl(&["del", "ez", "ea", "-w", "json"]);
    assert_eq!(rev_of(&r), now);
    p.gw_ok(
        "/v3/kv/deleterange",
        json!({ "key": b64("eb"), "range_end": b64("eb"), "prev_kv": true }),
    );
    p.gw_ok(
        "/v3/kv/txn",
        json!({ "success": [ { "request_delete_range": { "key": b64("ez"), "range_end": b64("ea") } } ] }),
    );
}

/// etcd 3.4 does not validate enum values: a range with an unknown sort order is served
/// unsorted, and a compare with an unknown result or target is evaluated (as true). (An unknown
/// sort *target* makes etcd 3.4 itself crash, so it is not sent.)
#[test]
#[ignore = "known difference: spindle rejects unknown sort_order / compare result / compare target values with InvalidArgument (\"etcdserver: invalid sort option\", \"invalid argument: invalid compare result 7\"); etcd 3.4 accepts them"]
fn unknown_enum_values_are_accepted() {
    let p = Pair::start();
    p.put("u/a", "1");
    p.gw_ok(
        "/v3/kv/range",
        json!({ "key": b64("u/a"), "sort_order": 5 }),
    );
    p.gw_ok(
        "/v3/kv/txn",
        json!({ "compare": [ { "key": b64("u/a"), "target": "VALUE", "result": 7, "value": b64("1") } ] }),
    );
    p.gw_ok(
        "/v3/kv/txn",
        json!({ "compare": [ { "key": b64("u/a"), "target": 9, "result": "EQUAL", "value": b64("1") } ] }),
    );
}

/// A RequestOp with no request in it: etcd 3.4's check answers "key not found".
#[test]
#[ignore = "known difference: an empty RequestOp in a txn gets \"invalid argument: etcdserver: request op is empty\" from spindle; etcd 3.4 answers InvalidArgument \"etcdserver: key not found\""]
fn empty_request_op_in_a_txn() {
    let p = Pair::start();
    p.gw_err(
        "/v3/kv/txn",
        json!({ "success": [ {} ] }),
        3,
        "etcdserver: key not found",
    );
}

/// A request beyond `--max-request-bytes` plus gRPC's overhead allowance is refused by gRPC
/// itself, whose message names the size received.
#[test]
fn request_above_the_grpc_receive_limit() {
    let mut p = Pair::start();
    let huge = "x".repeat(600_000);
    p.ctl_err_in(
        &["put", "huge"],
        Some(&huge),
        "grpc: received message larger than max",
    );
    p.gw_err(
        "/v3/kv/put",
        json!({ "key": b64("huge"), "value": b64(&huge) }),
        8,
        "grpc: received message larger than max (600010 vs. 528384)",
    );
}

#[test]
fn status() {
    let mut p = Pair::start();
    p.put("st/a", "1");
    p.ctl(&["del", "st/a"]);
    let path = "/v3/maintenance/status";
    let (mut e, mut s) = p.gw_pair(path, &json!({}));
    assert_eq!(e.status, 200, "{}", e.show());
    for f in STATUS_IDENTITY {
        assert!(
            e.body.get(f).is_some(),
            "etcd's status has {f}: {}",
            e.show()
        );
        e.body.as_object_mut().unwrap().remove(f);
        if let Some(m) = s.body.as_object_mut() {
            m.remove(f);
        }
    }
    if e != s {
        report(&format!("POST {path} {{}}"), &e.show(), &s.show());
    }
    assert_eq!(rev_of(&e.body), p.revision());
    // etcdctl endpoint status: the same, minus the endpoint address each was reached at.
    let (e, s) = p.run_ctl(&["endpoint", "status", "-w", "json"], None);
    assert!(e.ok && s.ok, "{e:?}\n{s:?}");
    let strip = |c: &Ctl| {
        let mut v = parse_json_stream(&c.stdout).expect("endpoint status JSON");
        for ep in v[0].as_array_mut().expect("a list of endpoints") {
            let m = ep.as_object_mut().unwrap();
            m.remove("Endpoint");
            if let Some(Value::Object(st)) = m.get_mut("Status") {
                for f in STATUS_IDENTITY {
                    st.remove(f);
                }
            }
        }
        v
    };
    let (ev, sv) = (strip(&e), strip(&s));
    if ev != sv {
        report(
            "etcdctl endpoint status -w json",
            &pretty(&ev),
            &pretty(&sv),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Leases
// ---------------------------------------------------------------------------------------------

/// etcdctl's lease commands print flat JSON (header fields at the top level) and list leases and
/// attached keys in map order; this drops the cluster identities and the `mask`ed fields, sorts
/// those lists, and compares. Remaining TTLs are compared with one second of tolerance (the two
/// servers are asked a few milliseconds apart). Returns etcd's answer.
fn lease_ctl(p: &mut Pair, args: &[&str], mask: &[&str]) -> Value {
    let what = describe(args, None);
    let (e, s) = p.run_ctl(args, None);
    if e.ok != s.ok || e.errors != s.errors {
        report(
            &what,
            &format!("{} {:?}", e.stdout, e.errors),
            &format!("{} {:?}", s.stdout, s.errors),
        );
    }
    let clean = |text: &str| -> Value {
        let mut v: Value = serde_json::from_str(text)
            .unwrap_or_else(|err| panic!("{what}: not JSON ({err}): {text}"));
        normalize(&mut v);
        if let Value::Object(m) = &mut v {
            for f in ["cluster_id", "member_id", "raft_term"].iter().chain(mask) {
                m.remove(*f);
            }
            for list in ["keys", "leases"] {
                if let Some(Value::Array(a)) = m.get_mut(list) {
                    a.sort_by_key(|x| x.to_string());
                }
            }
        }
        v
    };
    if !e.ok {
        return Value::Null;
    }
    let (mut ev, mut sv) = (clean(&e.stdout), clean(&s.stdout));
    if let (Some(a), Some(b)) = (ev["ttl"].as_i64(), sv["ttl"].as_i64()) {
        if a > 0 && (a - b).abs() <= 1 {
            sv["ttl"] = ev["ttl"].clone();
        }
    }
    if ev != sv {
        report(&what, &pretty(&ev), &pretty(&sv));
    }
    ev.take()
}

#[test]
fn leases() {
    let mut p = Pair::start();
    // Grants: ids chosen by the client so both servers use the same ones; a TTL below etcd's
    // minimum is raised to it; duplicates and huge TTLs fail alike.
    p.gw_ok("/v3/lease/grant", json!({ "ID": "4660", "TTL": "1" }));
    p.gw_ok("/v3/lease/grant", json!({ "ID": "4661", "TTL": "100" }));
    p.gw_ok("/v3/lease/grant", json!({ "ID": "4662", "TTL": "100" }));
    p.gw_err(
        "/v3/lease/grant",
        json!({ "ID": "4660", "TTL": "5" }),
        9,
        "etcdserver: lease already exists",
    );
    p.gw_err(
        "/v3/lease/grant",
        json!({ "TTL": "9000000001" }),
        11,
        "etcdserver: too large lease TTL",
    );
    // Server-chosen ids differ; everything else must not.
    lease_ctl(&mut p, &["lease", "grant", "1", "-w", "json"], &["ID"]);
    let (e, s) = p.run_ctl(&["lease", "grant", "7"], None);
    let masked = |t: &str| {
        t.split_whitespace()
            .enumerate()
            .map(|(i, w)| if i == 1 { "ID" } else { w })
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(masked(&e.stdout), masked(&s.stdout));
    lease_ctl(&mut p, &["lease", "grant", "9000000001", "-w", "json"], &[]);

    // Puts with leases (0x1235 = 4661 …), across directories and so across shards.
    for key in ["l/a", "m/b", "n/c", "o"] {
        p.ctl(&["put", key, "v", "--lease=1235", "-w", "json"]);
    }
    p.ctl(&["put", "q/k", "v", "--lease=1236", "-w", "json"]);
    p.ctl_err(
        &["put", "x", "v", "--lease=99"],
        "etcdserver: requested lease not found",
    );
    p.gw_ok(
        "/v3/kv/txn",
        json!({ "success": [ { "request_put": { "key": b64("t/x"), "value": b64("v"), "lease": "4661" } } ] }),
    );
    // ignore_lease keeps the lease; a plain put detaches; deleting detaches.
    p.gw_ok(
        "/v3/kv/put",
        json!({ "key": b64("o"), "value": b64("w"), "ignore_lease": true }),
    );
    p.ctl(&["put", "n/c", "plain", "-w", "json"]);
    p.ctl(&["del", "m/b", "-w", "json"]);
    p.ctl(&["get", "", "--prefix", "-w", "json"]);

    // Keep-alive, time-to-live (with and without keys), list; unknown leases.
    lease_ctl(
        &mut p,
        &["lease", "keep-alive", "--once", "1235", "-w", "json"],
        &[],
    );
    let (e, s) = p.run_ctl(&["lease", "keep-alive", "--once", "99"], None);
    assert!(!e.ok && !s.ok && e.errors == s.errors, "{e:?} {s:?}");
    let ttl = lease_ctl(
        &mut p,
        &["lease", "timetolive", "1235", "--keys", "-w", "json"],
        &[],
    );
    assert_eq!(ttl["keys"].as_array().map(Vec::len), Some(3), "{ttl}");
    lease_ctl(&mut p, &["lease", "timetolive", "1236", "-w", "json"], &[]);
    lease_ctl(&mut p, &["lease", "timetolive", "99", "-w", "json"], &[]);
    p.ctl(&["lease", "timetolive", "99"]);
    lease_ctl(&mut p, &["lease", "list", "-w", "json"], &["leases"]);
    p.gw("/v3/lease/timetolive", json!({ "ID": "99", "keys": true }));
    p.gw("/v3/kv/lease/timetolive", json!({ "ID": "99" }));
    p.gw("/v3/lease/keepalive", json!({ "ID": "99" }));
    p.gw_ok("/v3/lease/keepalive", json!({ "ID": "4661" }));

    // Revoke deletes the attached keys at one revision (same revision on both servers); a lease
    // without keys is revoked without a revision; unknown leases fail.
    let before = p.revision();
    let r = p.ctl(&["lease", "revoke", "1235", "-w", "json"]);
    assert_eq!(rev_of(&r), before + 1);
    p.ctl(&["get", "", "--prefix", "-w", "json"]);
    p.ctl_err(
        &["lease", "revoke", "1235"],
        "etcdserver: requested lease not found",
    );
    p.ctl_err(
        &["put", "l/a", "v", "--lease=1235"],
        "etcdserver: requested lease not found",
    );
    let r = p.gw_ok("/v3/lease/revoke", json!({ "ID": "4660" }));
    assert_eq!(rev_of(&r), before + 1);
    p.gw_ok("/v3/kv/lease/revoke", json!({ "ID": "4662" }));
    p.gw_err(
        "/v3/kv/lease/revoke",
        json!({ "ID": "4662" }),
        5,
        "etcdserver: requested lease not found",
    );
    p.ctl(&["get", "", "--prefix", "-w", "json"]);

    // Edge ids: negative ids are ordinary leases, 0 is never one; a negative TTL gets the minimum.
    p.gw_ok("/v3/lease/grant", json!({ "ID": "-5", "TTL": "10" }));
    p.gw_ok("/v3/lease/grant", json!({ "ID": "5", "TTL": "-10" }));
    p.gw_ok(
        "/v3/kv/put",
        json!({ "key": b64("neg"), "value": b64("v"), "lease": "-5" }),
    );
    p.gw_err(
        "/v3/lease/revoke",
        json!({ "ID": "0" }),
        5,
        "etcdserver: requested lease not found",
    );
    p.gw_ok("/v3/lease/timetolive", json!({ "ID": "0" }));
    let before = p.revision();
    let r = p.gw_ok("/v3/lease/revoke", json!({ "ID": "-5" }));
    assert_eq!(rev_of(&r), before + 1);
    p.ctl(&["get", "", "--prefix", "-w", "json"]);
}
