//! Watch, differentially: the same watch streams and writes against a fresh etcd 3.4 and a fresh
//! `spindle serve`, compared response by response (per watch id, events flattened, since the two
//! may batch a burst of revisions differently). Header identities (`cluster_id`, `member_id`,
//! `raft_term`) are dropped; revisions, events, prev_kvs, ids, created/canceled flags, cancel
//! reasons and compact revisions are compared exactly. `etcdctl watch` output is compared too.
//!
//! Needs `etcd` and `etcdctl` 3.4 on PATH (`tools/test` installs them).

use std::collections::BTreeMap;
use std::time::Duration;

use spindle::bench::client::Client;
use spindle::proto::etcdserverpb as pb;

mod common;
use common::process::{spawn_piped, text};
use common::server::{Kind, Server};

fn start(kind: Kind) -> Server {
    Server::start(kind, &["--max-request-bytes", "4096"])
}

/// A response with the identities that differ between clusters removed.
fn norm(mut r: pb::WatchResponse) -> pb::WatchResponse {
    if let Some(h) = r.header.as_mut() {
        h.cluster_id = 0;
        h.member_id = 0;
        h.raft_term = 0;
    }
    r
}

/// What one scenario observed, per watch id: control responses (events stripped) and all
/// events in order.
type Observed = BTreeMap<i64, (Vec<pb::WatchResponse>, Vec<spindle::proto::mvccpb::Event>)>;

fn create(key: &str, end: &str, f: impl FnOnce(&mut pb::WatchCreateRequest)) -> pb::WatchRequest {
    let mut c = pb::WatchCreateRequest {
        key: key.as_bytes().to_vec().into(),
        range_end: end.as_bytes().to_vec().into(),
        ..Default::default()
    };
    f(&mut c);
    pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::CreateRequest(c)),
    }
}

fn cancel(id: i64) -> pb::WatchRequest {
    pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::CancelRequest(
            pb::WatchCancelRequest { watch_id: id },
        )),
    }
}

fn progress() -> pb::WatchRequest {
    pb::WatchRequest {
        request_union: Some(pb::watch_request::RequestUnion::ProgressRequest(
            pb::WatchProgressRequest {},
        )),
    }
}

fn put(key: &str, value: &str) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
            key: key.as_bytes().to_vec().into(),
            value: value.as_bytes().to_vec().into(),
            ..Default::default()
        })),
    }
}

fn scenario(port: u16) -> Observed {
    spindle::runtime::run_local(move || async move {
        let ep = format!("127.0.0.1:{port}");
        let mut c = Client::connect(&ep).await.unwrap();
        let mut w = c
            .stream::<pb::WatchResponse>("/etcdserverpb.Watch/Watch")
            .await
            .unwrap();
        let mut seen = Observed::new();
        // Reads until the stream is quiet for a moment.
        async fn drain(
            w: &mut spindle::bench::client::GrpcStream<pb::WatchResponse>,
            seen: &mut Observed,
        ) {
            loop {
                let next = futures_lite::future::or(async { Some(w.recv().await) }, async {
                    glommio::timer::sleep(Duration::from_millis(700)).await;
                    None
                })
                .await;
                let Some(r) = next else { return };
                let mut r = norm(r.expect("watch stream failed").expect("stream ended"));
                let e = seen.entry(r.watch_id).or_default();
                let events = std::mem::take(&mut r.events);
                if events.is_empty() || r.created || r.canceled {
                    e.0.push(r);
                }
                e.1.extend(events);
            }
        }
        let unary = |c: &mut Client, op: pb::RequestOp| {
            let mut c = c.clone();
            async move {
                let t = pb::TxnRequest {
                    success: vec![op],
                    ..Default::default()
                };
                let _: pb::TxnResponse = c.unary("/etcdserverpb.KV/Txn", &t).await.unwrap();
            }
        };
        // Watch ids chosen by the server (0, then 1) and by the client (7); refusals.
        w.send(&create("foo", "", |c| c.prev_kv = true)).unwrap();
        w.send(&create("foo", "fop", |_| {})).unwrap();
        w.send(&create("foo", "", |c| c.watch_id = 7)).unwrap();
        w.send(&create("x", "", |c| c.watch_id = 7)).unwrap();
        w.send(&create("b", "a", |_| {})).unwrap();
        w.send(&create("", "\0", |c| {
            c.filters = vec![pb::watch_create_request::FilterType::Noput as i32]
        }))
        .unwrap();
        drain(&mut w, &mut seen).await;
        unary(&mut c, put("foo", "1")).await;
        unary(&mut c, put("foo/bar", "2")).await;
        // One txn writing several keys (several shards on spindle).
        let t = pb::TxnRequest {
            success: vec![put("foo/z", "3"), put("foo/a", "4"), put("foo", "5")],
            ..Default::default()
        };
        let _: pb::TxnResponse = c.unary("/etcdserverpb.KV/Txn", &t).await.unwrap();
        let d = pb::DeleteRangeRequest {
            key: "foo".into(),
            range_end: "fop".into(),
            ..Default::default()
        };
        let _: pb::DeleteRangeResponse = c.unary("/etcdserverpb.KV/DeleteRange", &d).await.unwrap();
        drain(&mut w, &mut seen).await;
        w.send(&cancel(0)).unwrap();
        w.send(&cancel(99)).unwrap();
        drain(&mut w, &mut seen).await;
        unary(&mut c, put("foo", "6")).await;
        drain(&mut w, &mut seen).await;
        w.send(&progress()).unwrap();
        drain(&mut w, &mut seen).await;
        // History, then a compacted start.
        w.send(&create("foo", "fop", |c| {
            c.start_revision = 3;
            c.watch_id = 20;
            c.prev_kv = true;
        }))
        .unwrap();
        drain(&mut w, &mut seen).await;
        let cr = pb::CompactionRequest {
            revision: 5,
            physical: false,
        };
        let _: pb::CompactionResponse = c.unary("/etcdserverpb.KV/Compact", &cr).await.unwrap();
        w.send(&create("foo", "", |c| {
            c.start_revision = 2;
            c.watch_id = 21;
        }))
        .unwrap();
        drain(&mut w, &mut seen).await;
        seen
    })
}

#[test]
fn watch_streams_match_etcd() {
    let etcd = start(Kind::Etcd);
    let spindle = start(Kind::Spindle);
    let want = scenario(etcd.port);
    let got = scenario(spindle.port);
    assert!(!want.is_empty());
    for id in want.keys().chain(got.keys()) {
        assert_eq!(
            got.get(id),
            want.get(id),
            "watch id {id}: {} vs {}",
            spindle.name(),
            etcd.name()
        );
    }
}

#[test]
fn etcdctl_watch_output_matches_etcd() {
    let run = |s: &Server| -> String {
        let ctl = |args: &[&str]| {
            let out = s.etcdctl(args);
            assert!(out.ok, "{args:?}: {out:?}");
        };
        ctl(&["put", "k1", "a"]);
        ctl(&["put", "k2", "b"]);
        ctl(&["del", "k1"]);
        // History replay from revision 2, then the live tail, ended by a timeout.
        let watch =
            spawn_piped(&mut s.etcdctl_cmd(&["watch", "--rev=2", "--prefix", "k", "--prev-kv"]));
        std::thread::sleep(Duration::from_millis(500));
        ctl(&["put", "k3", "c"]);
        std::thread::sleep(Duration::from_millis(700));
        text(&watch.kill_and_output().stdout)
    };
    let etcd = start(Kind::Etcd);
    let spindle = start(Kind::Spindle);
    let want = run(&etcd);
    assert!(want.contains("k3"), "{want}");
    assert_eq!(run(&spindle), want);
}

/// Runs `spindle bench ARGS --endpoints S --json`, asserting a clean exit and no errors.
fn bench(s: &Server, args: &[&str]) -> serde_json::Value {
    let report = common::server::bench(&[args, &["--endpoints", &s.endpoint(), "--json"]].concat());
    assert_eq!(report["errors"], serde_json::json!({}), "{report}");
    report
}

#[test]
fn bench_watch_delivers_every_event_to_every_watcher() {
    let s = start(Kind::Spindle);
    let report = bench(
        &s,
        &[
            "watch",
            "--watchers",
            "6",
            "--total",
            "200",
            "--clients",
            "4",
            "--conns",
            "2",
            "--key-space-size",
            "50",
            "--cores",
            "2",
        ],
    );
    assert_eq!(report["ops"], 6 * 200, "{report}");
}

#[test]
fn json_gateway_watch_matches_etcd() {
    let run = |s: &Server| -> Vec<serde_json::Value> {
        let body = r#"{"create_request":{"key":"Zm9v","range_end":"Zm9w","prev_kv":true}}"#;
        let raw = format!(
            "POST /v3/watch HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let text = common::http::stream_during(s.port, &raw, || {
            for (k, v) in [("foo", "1"), ("foo/x", "2"), ("foo", "3")] {
                assert!(s.etcdctl(&["put", k, v]).ok);
            }
        });
        text.lines()
            .filter(|l| l.starts_with("{\"result\""))
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                if let Some(h) = v["result"]["header"].as_object_mut() {
                    h.remove("cluster_id");
                    h.remove("member_id");
                    h.remove("raft_term");
                }
                v
            })
            .collect()
    };
    let etcd = start(Kind::Etcd);
    let spindle = start(Kind::Spindle);
    let want = run(&etcd);
    assert_eq!(want.len(), 4, "{want:?}");
    assert_eq!(run(&spindle), want);
}

#[test]
fn bench_txn_mixed_and_watch_latency_run_clean() {
    let s = start(Kind::Spindle);
    let mixed = bench(
        &s,
        &[
            "--cores",
            "1",
            "txn-mixed",
            "--rw-ratio",
            "3",
            "--total",
            "400",
            "--clients",
            "8",
        ],
    );
    assert_eq!(mixed["ops"], 400);
    // 3 watchers, 100 puts paced at 500/s: every event arrives, latencies are recorded.
    let lat = bench(
        &s,
        &[
            "--cores",
            "1",
            "watch-latency",
            "--watchers",
            "3",
            "--total",
            "100",
            "--clients",
            "1",
            "--rate",
            "500",
        ],
    );
    assert_eq!(lat["ops"], 300);
    assert!(lat["latency_us"]["p50"].as_f64().unwrap() > 0.0);
}

/// Progress notices for an idle `progress_notify` watch, and none while events flow, with a short
/// `--experimental-watch-progress-notify-interval` on both servers: the session's timer paces
/// them, re-armed after each notice. Returns the notices of 1.6 idle seconds, and the events and
/// the late notices (after the first interval) of 1.6 busy seconds.
fn idle_progress(port: u16) -> (Vec<pb::WatchResponse>, usize, usize) {
    spindle::runtime::run_local(move || async move {
        let ep = format!("127.0.0.1:{port}");
        let mut c = Client::connect(&ep).await.unwrap();
        let put = |c: &mut Client, v: &'static str| {
            let mut c = c.clone();
            async move {
                let req = pb::PutRequest {
                    key: "idle".as_bytes().to_vec().into(),
                    value: v.as_bytes().to_vec().into(),
                    ..Default::default()
                };
                let _: pb::PutResponse = c.unary("/etcdserverpb.KV/Put", &req).await.unwrap();
            }
        };
        put(&mut c, "a").await;
        let mut w = c
            .stream::<pb::WatchResponse>("/etcdserverpb.Watch/Watch")
            .await
            .unwrap();
        w.send(&create("idle", "", |c| c.progress_notify = true))
            .unwrap();
        // Collects what arrives for `ms` milliseconds: progress notices with their arrival
        // (ms from the start), and the number of events.
        async fn collect(
            w: &mut spindle::bench::client::GrpcStream<pb::WatchResponse>,
            ms: u64,
        ) -> (Vec<(u128, pb::WatchResponse)>, usize) {
            let start = std::time::Instant::now();
            let until = start + Duration::from_millis(ms);
            let (mut notices, mut events) = (Vec::new(), 0);
            loop {
                let left = until.saturating_duration_since(std::time::Instant::now());
                let next = futures_lite::future::or(async { Some(w.recv().await) }, async {
                    glommio::timer::sleep(left).await;
                    None
                })
                .await;
                let Some(r) = next else {
                    return (notices, events);
                };
                let r = norm(r.expect("watch stream failed").expect("stream ended"));
                if r.created {
                    continue;
                }
                if r.events.is_empty() {
                    notices.push((start.elapsed().as_millis(), r));
                } else {
                    events += r.events.len();
                }
            }
        }
        let (idle, _) = collect(&mut w, 1_600).await;
        // A write every 100 ms keeps the watch busy: once the interval that began idle is
        // over, no notice is due while events flow.
        let busy = async {
            for _ in 0..16 {
                put(&mut c, "b").await;
                glommio::timer::sleep(Duration::from_millis(100)).await;
            }
        };
        let ((busy_notices, events), ()) =
            futures_lite::future::zip(collect(&mut w, 1_650), busy).await;
        let late = busy_notices.iter().filter(|(at, _)| *at > 500).count();
        (idle.into_iter().map(|(_, r)| r).collect(), events, late)
    })
}

#[test]
fn idle_watches_hear_progress_at_the_configured_interval_like_etcd() {
    let args = ["--experimental-watch-progress-notify-interval", "400ms"];
    let etcd = Server::start(Kind::Etcd, &args);
    let spindle = Server::start(Kind::Spindle, &args);
    for s in [&etcd, &spindle] {
        let (idle, events, late) = idle_progress(s.port);
        // 1.6 s idle at a 400 ms interval: about four notices, allowing for timer slack.
        assert!(
            (2..=5).contains(&idle.len()),
            "{:?}: {} notices while idle",
            s.kind,
            idle.len()
        );
        for n in &idle {
            assert_eq!(n.watch_id, 0, "{:?}", s.kind);
            assert_eq!(
                n.header.as_ref().map(|h| h.revision),
                Some(2),
                "{:?}",
                s.kind
            );
        }
        assert_eq!(events, 16, "{:?}", s.kind);
        assert_eq!(late, 0, "{:?}: notices while events flowed", s.kind);
    }
}
