//! `spindle grpc-proxy start` and `spindle gateway start`: the same etcdctl requests through
//! `spindle grpc-proxy --namespace=/ns/` in front of spindle and through `etcd grpc-proxy start
//! --namespace=/ns/` in front of etcd give the same answers and leave the same keys in the
//! store; identical watches share one upstream watch; the proxy keeps serving (watches
//! included) when an endpoint dies; the gateway splices etcdctl to a live endpoint.

mod common;

use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::etcdctl::{self, error_lines, Ctl};
use common::http::http;
use common::pki::{Pki, Usage};
use common::process::{free_ports, spawn_piped, Kill};
use common::server::{Kind, Server, SPINDLE};
use common::wait_for;

/// A proxy (or gateway) process this test started, listening on `port`.
struct Front {
    port: u16,
    _child: Kill,
}

impl Front {
    fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn ctl(&self, args: &[&str]) -> Ctl {
        etcdctl::run(&self.endpoint(), args)
    }
}

/// Starts `cmd` (which listens on `port`) and waits until it accepts connections.
fn start_front(mut cmd: Command, port: u16) -> Front {
    let child = spawn_piped(cmd.stderr(Stdio::null()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{cmd:?} did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    Front {
        port,
        _child: child,
    }
}

/// A gRPC proxy of `kind` in front of `endpoints` with `--namespace=namespace`.
fn grpc_proxy(kind: Kind, endpoints: &[String], namespace: &str) -> Front {
    let port = free_ports(1)[0];
    let mut cmd = Command::new(match kind {
        Kind::Spindle => SPINDLE,
        Kind::Etcd => "etcd",
    });
    cmd.args(["grpc-proxy", "start"])
        .arg(format!("--endpoints={}", endpoints.join(",")))
        .arg(format!("--listen-addr=127.0.0.1:{port}"))
        .arg(format!("--namespace={namespace}"));
    let f = start_front(cmd, port);
    // Ready once a call goes through to the cluster.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f.ctl(&["get", "probe"]).ok {
        assert!(Instant::now() < deadline, "{kind:?} proxy never served");
        std::thread::sleep(Duration::from_millis(100));
    }
    f
}

/// What an etcdctl run printed, with the parts that differ between any two clusters (lease ids,
/// the seconds a lease has left) made equal.
fn normalized(c: &Ctl) -> String {
    let text = if c.ok {
        c.stdout.clone()
    } else {
        error_lines(&c.stderr).join("\n")
    };
    let mut out = String::new();
    for word in text.split_inclusive(|ch: char| ch.is_whitespace() || ch == '/' || ch == '(') {
        let w = word.trim_end_matches(|ch: char| ch.is_whitespace() || ch == '/' || ch == '(');
        let tail = &word[w.len()..];
        let is_id = w.len() >= 12 && w.chars().all(|ch| ch.is_ascii_hexdigit());
        if is_id {
            out.push_str("ID");
        } else if w.starts_with("remaining") {
            out.push_str("remaining(N)");
            out.push_str(&w[w.find(')').map_or(w.len(), |i| i + 1)..]);
        } else {
            out.push_str(w);
        }
        out.push_str(tail);
    }
    format!("ok={} {out}", c.ok)
}

/// The etcdctl runs both proxies get, in order: (arguments, stdin).
fn script() -> Vec<(Vec<&'static str>, Option<&'static str>)> {
    let v = |a: &[&'static str]| (a.to_vec(), None);
    vec![
        v(&["put", "a", "1"]),
        v(&["put", "b", "2"]),
        v(&["put", "b", "3", "--prev-kv"]),
        v(&["put", "c/x", "4"]),
        v(&["put", "c/y", "5"]),
        v(&["get", "", "--prefix"]),
        v(&["get", "", "--from-key"]),
        v(&["get", "b", "--from-key", "--keys-only"]),
        v(&["get", "a", "c"]),
        v(&["get", "c/", "--prefix", "--count-only"]),
        v(&["get", "c", "--prefix", "--limit=1", "--sort-by=KEY", "--order=DESCEND"]),
        // An empty key is refused by the namespace layer itself.
        v(&["put", "", "x"]),
        v(&["get", ""]),
        (
            vec!["txn"],
            Some("value(\"a\") = \"1\"\nmod(\"c/\") > \"0\"\n\nput d 6\nget \"\" --prefix --keys-only\n\nput e 7\n\n"),
        ),
        (
            vec!["txn"],
            Some("value(\"a\") = \"2\"\n\nput f 8\n\ndel c/ --prefix --prev-kv\nget d\n\n"),
        ),
        v(&["del", "b", "--prev-kv"]),
        v(&["del", "x", "--from-key"]),
        v(&["get", "", "--prefix"]),
        v(&["lock", "mylock", "--", "sh", "-c", "echo $ETCD_LOCK_KEY"]),
    ]
}

#[test]
fn namespaced_proxy_answers_as_etcds_and_keeps_keys_under_the_namespace() {
    let mut servers = [
        Server::spawn(Kind::Spindle, &[]),
        Server::spawn(Kind::Etcd, &[]),
    ];
    for s in &mut servers {
        s.wait_ready();
    }
    let proxies: Vec<Front> = servers
        .iter()
        .map(|s| grpc_proxy(s.kind, &[s.endpoint()], "/ns/"))
        .collect();
    for (args, stdin) in script() {
        let out: Vec<String> = proxies
            .iter()
            .map(|p| {
                normalized(&match stdin {
                    Some(i) => etcdctl::run_with_input(&p.endpoint(), &args, i),
                    None => p.ctl(&args),
                })
            })
            .collect();
        assert_eq!(
            out[0], out[1],
            "etcdctl {args:?}: spindle's proxy, then etcd's"
        );
    }
    // Leases: grant, attach, time-to-live with keys, keep-alive.
    let lease: Vec<String> = proxies
        .iter()
        .map(|p| {
            let g = p.ctl(&["lease", "grant", "100"]);
            assert!(g.ok, "{}", g.stderr);
            let id = g.stdout.split_whitespace().nth(1).unwrap().to_string();
            let mut out = normalized(&g);
            for args in [
                vec!["put", "leased", "v", "--lease", &id],
                vec!["lease", "timetolive", &id, "--keys"],
                vec!["lease", "keep-alive", "--once", &id],
                vec!["get", "leased", "-w", "fields"],
            ] {
                let r = p.ctl(&args);
                // `fields` names the lease id and revisions; keep the key's lines.
                let r = Ctl {
                    stdout: r
                        .stdout
                        .lines()
                        .filter(|l| l.starts_with("\"Key\"") || l.starts_with("\"Value\""))
                        .chain(if args[0] == "get" {
                            None
                        } else {
                            Some(r.stdout.as_str())
                        })
                        .collect::<Vec<_>>()
                        .join("\n"),
                    ..r
                };
                out.push_str(&normalized(&r));
            }
            out
        })
        .collect();
    assert_eq!(lease[0], lease[1], "leases: spindle's proxy, then etcd's");
    assert!(lease[0].contains("attached keys([leased])"), "{}", lease[0]);

    // The stores hold the same keys, all under the namespace.
    let stored: Vec<String> = servers
        .iter()
        .map(|s| {
            let r = s.etcdctl(&["get", "", "--from-key"]);
            assert!(r.ok, "{}", r.stderr);
            r.stdout
        })
        .collect();
    assert_eq!(stored[0], stored[1], "the stores: spindle's, then etcd's");
    let keys: Vec<&str> = stored[0].lines().step_by(2).collect();
    assert_eq!(keys, ["/ns/a", "/ns/e", "/ns/leased"], "{}", stored[0]);

    // A lock held through the proxy is a key under the namespace in the store.
    for (p, s) in proxies.iter().zip(&servers) {
        let inner = format!(
            "ETCDCTL_API=3 etcdctl --endpoints={} get /ns/held --prefix --keys-only",
            s.endpoint()
        );
        let r = p.ctl(&["lock", "held", "--", "sh", "-c", &inner]);
        assert!(r.ok, "{}", r.stderr);
        assert!(
            r.stdout.starts_with("/ns/held/"),
            "{}: {}",
            s.name(),
            r.stdout
        );
    }
    // So is an election's leader key; the campaigner sees it without the namespace.
    let elected: Vec<String> = proxies
        .iter()
        .zip(&servers)
        .map(|(p, s)| {
            let (mut child, lines) = common::process::spawn_lines(&mut etcdctl::command(
                &p.endpoint(),
                &["elect", "el", "me"],
            ));
            let key = common::process::next_line(&lines, "etcdctl elect");
            let value = common::process::next_line(&lines, "etcdctl elect");
            let stored = s
                .etcdctl(&["get", "/ns/el/", "--prefix", "--keys-only"])
                .stdout;
            let _ = child.child().kill();
            assert_eq!(stored.trim(), format!("/ns/{key}"), "{}", s.name());
            normalized(&Ctl {
                ok: true,
                stdout: format!("{key}\n{value}\n"),
                stderr: String::new(),
            })
        })
        .collect();
    assert_eq!(
        elected[0], elected[1],
        "elections: spindle's proxy, then etcd's"
    );
}

/// Starts `etcdctl watch ARGS` through `front`; its output once `during` has run.
fn watch_output(front: &Front, args: &[&str], during: impl FnOnce()) -> String {
    let mut cmd = etcdctl::command(&front.endpoint(), &["watch"]);
    cmd.args(args);
    let child = spawn_piped(cmd.stderr(Stdio::null()));
    std::thread::sleep(Duration::from_millis(800));
    during();
    std::thread::sleep(Duration::from_millis(800));
    String::from_utf8_lossy(&child.kill_and_output().stdout).into_owned()
}

#[test]
fn namespaced_watches_match_etcds() {
    let mut servers = [
        Server::spawn(Kind::Spindle, &[]),
        Server::spawn(Kind::Etcd, &[]),
    ];
    for s in &mut servers {
        s.wait_ready();
    }
    let outs: Vec<[String; 3]> = servers
        .iter()
        .map(|s| {
            let p = grpc_proxy(s.kind, &[s.endpoint()], "/ns/");
            // Outside the namespace: never seen through the proxy.
            assert!(s.etcdctl(&["put", "w/out", "0"]).ok);
            let ops = || {
                for args in [
                    &["put", "w/1", "a"][..],
                    &["put", "w/1", "b"],
                    &["put", "x", "c"],
                    &["del", "w/1"],
                ] {
                    assert!(p.ctl(args).ok);
                }
            };
            let live = watch_output(&p, &["w/", "--prefix", "--prev-kv"], ops);
            let all = watch_output(&p, &["", "--prefix", "--rev=1"], || {});
            let one = watch_output(&p, &["x", "--rev=1"], || {});
            [live, all, one]
        })
        .collect();
    assert_eq!(outs[0], outs[1], "watches: spindle's proxy, then etcd's");
    assert!(outs[0][0].contains("PUT\nw/1\na\n"), "{}", outs[0][0]);
    assert!(outs[0][1].starts_with("PUT\nw/1\na\n"), "{}", outs[0][1]);
    assert!(!outs[0][1].contains("out"), "{}", outs[0][1]);
}

/// The proxy's gauge `name` from its /metrics.
fn gauge(front: &Front, name: &str) -> u64 {
    let text = http(
        front.port,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

#[test]
fn identical_watches_share_one_upstream_watch() {
    let server = Server::spindle(&[]);
    let p = grpc_proxy(Kind::Spindle, &[server.endpoint()], "/ns/");
    let watch = |args: &[&str]| {
        let mut cmd = etcdctl::command(&p.endpoint(), &["watch"]);
        cmd.args(args);
        spawn_piped(cmd.stderr(Stdio::null()))
    };
    let w1 = watch(&["k", "--prefix"]);
    let w2 = watch(&["k", "--prefix"]);
    wait_for("two client watches", 10, || {
        gauge(&p, "spindle_proxy_client_watches") == 2
    });
    assert_eq!(gauge(&p, "spindle_proxy_upstream_watches"), 1);
    // Another range, or a start revision, is a watch of its own.
    let w3 = watch(&["other"]);
    let w4 = watch(&["k", "--prefix", "--rev=1"]);
    wait_for("four client watches", 10, || {
        gauge(&p, "spindle_proxy_client_watches") == 4
    });
    assert_eq!(gauge(&p, "spindle_proxy_upstream_watches"), 3);
    assert!(p.ctl(&["put", "k1", "v"]).ok);
    std::thread::sleep(Duration::from_millis(500));
    for w in [w1, w2, w4] {
        let out = String::from_utf8_lossy(&w.kill_and_output().stdout).into_owned();
        assert_eq!(out, "PUT\nk1\nv\n");
    }
    drop(w3);
    // The last client gone, the upstream watches are cancelled.
    wait_for("no upstream watches", 10, || {
        gauge(&p, "spindle_proxy_upstream_watches") == 0
    });
}

#[test]
fn proxy_keeps_serving_when_an_endpoint_dies() {
    let ports = common::server::Ports::free(3);
    let mut members = common::cluster::start_spindle("m", "proxy-failover", &ports, &[]);
    let eps: Vec<String> = members[..2].iter().map(Server::endpoint).collect();
    let p = grpc_proxy(Kind::Spindle, &eps, "/ns/");
    let mut cmd = etcdctl::command(&p.endpoint(), &["watch", "k", "--prefix"]);
    let watcher = spawn_piped(cmd.stderr(Stdio::null()));
    wait_for("the watch", 10, || {
        gauge(&p, "spindle_proxy_client_watches") == 1
    });
    assert!(p.ctl(&["put", "k1", "a"]).ok);
    // The proxy talks to its first endpoint: that one dies.
    members[0].kill();
    // Writes wait for the survivors to have a leader (the dead member may have led).
    wait_for("a leader", 10, || members[1].etcdctl(&["get", "probe"]).ok);
    let put = |k: &str| {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let r = p.ctl(&["put", k, "b"]);
            if r.ok {
                return;
            }
            assert!(Instant::now() < deadline, "put {k}: {}", r.stderr);
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    put("k2");
    put("k3");
    let got = p.ctl(&["get", "k", "--prefix", "--keys-only"]);
    assert!(got.ok, "{}", got.stderr);
    assert_eq!(got.stdout, "k1\n\nk2\n\nk3\n\n");
    std::thread::sleep(Duration::from_millis(800));
    let out = String::from_utf8_lossy(&watcher.kill_and_output().stdout).into_owned();
    // Every event once, in order, across the failover.
    assert_eq!(out, "PUT\nk1\na\nPUT\nk2\nb\nPUT\nk3\nb\n");
    let stored = members[1].etcdctl(&["get", "/ns/k", "--prefix", "--keys-only"]);
    assert_eq!(stored.stdout, "/ns/k1\n\n/ns/k2\n\n/ns/k3\n\n");
}

#[test]
fn gateway_splices_to_a_live_endpoint() {
    let server = Server::spindle(&[]);
    let dead = free_ports(1)[0];
    let port = free_ports(1)[0];
    let mut cmd = Command::new(SPINDLE);
    cmd.args(["gateway", "start"])
        .arg(format!(
            "--endpoints=127.0.0.1:{dead},{}",
            server.endpoint()
        ))
        .arg(format!("--listen-addr=127.0.0.1:{port}"));
    let g = start_front(cmd, port);
    // The first endpoint refuses: the gateway goes on to the second.
    let put = g.ctl(&["put", "through", "gateway"]);
    assert!(put.ok, "{}", put.stderr);
    let got = g.ctl(&["get", "through"]);
    assert_eq!(got.stdout, "through\ngateway\n");
    assert_eq!(
        server.etcdctl(&["get", "through"]).stdout,
        "through\ngateway\n"
    );
    // And when no endpoint is left, clients are refused rather than hung.
    drop(server);
    let r = g.ctl(&["--command-timeout=2s", "get", "through"]);
    assert!(!r.ok);
}

/// A CA (`ca.pem`) and a certificate for 127.0.0.1 good for server and client use
/// (`node.pem`, `node-key.pem`) in a fresh temp dir.
fn pki() -> Pki {
    let pki = Pki::new();
    let issuer = pki.ca("spindle proxy test CA", Some("ca.pem"));
    let usages = [Usage::ServerAuth, Usage::ClientAuth];
    pki.leaf("node", "node", &["127.0.0.1"], &usages, &issuer);
    pki
}

#[test]
fn proxy_talks_tls_to_the_cluster() {
    let pki = pki();
    let path = |n: &str| pki.path(n);
    let port = free_ports(1)[0];
    let data = tempfile::tempdir().unwrap();
    let url = format!("https://127.0.0.1:{port}");
    let mut serve = Command::new(SPINDLE);
    serve
        .args(["serve", "--cores", "1", "--client-cert-auth"])
        .args(["--data-dir", data.path().to_str().unwrap()])
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args([
            "--cert-file",
            &path("node.pem"),
            "--key-file",
            &path("node-key.pem"),
        ])
        .args(["--trusted-ca-file", &path("ca.pem")]);
    let _server = start_front(serve, port);
    let proxy = |extra: &[String]| {
        let p = free_ports(1)[0];
        let mut cmd = Command::new(SPINDLE);
        cmd.args(["grpc-proxy", "start", "--namespace=/t/"])
            .arg(format!("--endpoints={url}"))
            .arg(format!("--listen-addr=127.0.0.1:{p}"))
            .args(["--cert", &path("node.pem"), "--key", &path("node-key.pem")])
            .args(extra);
        start_front(cmd, p)
    };
    let verified = proxy(&[format!("--cacert={}", path("ca.pem"))]);
    let put = verified.ctl(&["put", "k", "v"]);
    assert!(put.ok, "{}", put.stderr);
    assert_eq!(verified.ctl(&["get", "k"]).stdout, "k\nv\n");
    let skipping = proxy(&["--insecure-skip-tls-verify".to_string()]);
    assert_eq!(skipping.ctl(&["get", "k"]).stdout, "k\nv\n");
    // Without the CA the cluster's certificate is not trusted: nothing gets through.
    let untrusting = proxy(&[]);
    assert!(!untrusting.ctl(&["--command-timeout=3s", "get", "k"]).ok);
}
