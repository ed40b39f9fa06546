//! v3lock and v3election: the gRPC services (raw calls), etcdctl's client-side recipes
//! (`etcdctl lock`, `etcdctl elect`) over KV/Lease/Watch, mutual exclusion under contention,
//! election failover with Observe, and etcd 3.4's error codes and messages side by side.
//!
//! Needs `etcd` and `etcdctl` 3.4 on PATH (`tools/test` installs them).

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use spindle::bench::client::Client;
use spindle::proto::etcdserverpb as pb;
use spindle::proto::v3electionpb as epb;
use spindle::proto::v3lockpb as lpb;
use spindle::server::grpc::Status;

mod common;
use common::http::post;
use common::process::{next_line, signal, spawn_lines};
use common::server::Server;

async fn grant(c: &mut Client, ttl: i64) -> i64 {
    let r: pb::LeaseGrantResponse = c
        .unary(
            "/etcdserverpb.Lease/LeaseGrant",
            &pb::LeaseGrantRequest { ttl, id: 0 },
        )
        .await
        .expect("grant");
    r.id
}

async fn lock(c: &mut Client, name: &str, lease: i64) -> Result<lpb::LockResponse, Status> {
    c.unary(
        "/v3lockpb.Lock/Lock",
        &lpb::LockRequest {
            name: name.as_bytes().to_vec().into(),
            lease,
        },
    )
    .await
}

async fn get(c: &mut Client, key: &str) -> Vec<spindle::proto::mvccpb::KeyValue> {
    let r: pb::RangeResponse = c
        .unary(
            "/etcdserverpb.KV/Range",
            &pb::RangeRequest {
                key: key.as_bytes().to_vec().into(),
                ..Default::default()
            },
        )
        .await
        .expect("range");
    r.kvs
}

async fn sleep_ms(ms: u64) {
    glommio::timer::sleep(Duration::from_millis(ms)).await;
}

#[test]
fn etcdctl_lock_and_elect_recipes() {
    let s = Server::spindle(&[]);
    // The client-side lock recipe (KV, Lease, Watch): runs the command while holding the lock.
    let out = s.etcdctl(&["lock", "mylock", "--", "sh", "-c", "echo locked"]);
    assert!(out.ok, "etcdctl lock: {out:?}");
    assert_eq!(out.stdout.trim(), "locked");
    // The lock key is gone once the command finished.
    let keys = s.etcdctl(&["get", "mylock", "--prefix", "--keys-only"]);
    assert_eq!(keys.stdout.trim(), "");

    // `etcdctl elect`: an observer sees the proposal, and then the next leader.
    let (_obs, obs_lines) = spawn_lines(&mut s.etcdctl_cmd(&["elect", "-l", "myelection"]));
    let (mut a, a_lines) = spawn_lines(&mut s.etcdctl_cmd(&["elect", "myelection", "v1"]));
    let a_key = next_line(&a_lines, "the first candidate");
    assert!(a_key.starts_with("myelection/"), "{a_key}");
    assert_eq!(next_line(&a_lines, "the first candidate"), "v1");
    assert_eq!(next_line(&obs_lines, "the observer"), a_key);
    assert_eq!(next_line(&obs_lines, "the observer"), "v1");
    let (_b, b_lines) = spawn_lines(&mut s.etcdctl_cmd(&["elect", "myelection", "v2"]));
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        b_lines.try_recv().is_err(),
        "second candidate won while the first leads"
    );
    // The first candidate goes away; its lease is revoked on SIGINT, so the second one wins.
    signal(a.child(), libc::SIGINT);
    let _ = a.child().wait();
    let b_key = next_line(&b_lines, "the second candidate");
    assert_ne!(b_key, a_key);
    assert_eq!(next_line(&b_lines, "the second candidate"), "v2");
    assert_eq!(next_line(&obs_lines, "the observer"), b_key);
    assert_eq!(next_line(&obs_lines, "the observer"), "v2");
}

#[test]
fn grpc_lock_is_mutually_exclusive() {
    const LOCKERS: usize = 8;
    let s = Server::spindle(&[]);
    let ep = s.endpoint();
    spindle::runtime::run_local(move || async move {
        let holders = Rc::new(Cell::new(0usize));
        let done = Rc::new(Cell::new(0usize));
        let mut tasks = Vec::new();
        for i in 0..LOCKERS {
            let (ep, holders, done) = (ep.clone(), holders.clone(), done.clone());
            tasks.push(glommio::spawn_local(async move {
                let mut c = Client::connect(&ep).await.unwrap();
                let lease = grant(&mut c, 30).await;
                let r = lock(&mut c, "mx", lease).await.expect("lock");
                assert_eq!(r.key, format!("mx/{lease:x}").as_bytes());
                holders.set(holders.get() + 1);
                assert_eq!(holders.get(), 1, "two lock holders at once");
                let me = format!("holder-{i}");
                let _: pb::PutResponse = c
                    .unary(
                        "/etcdserverpb.KV/Put",
                        &pb::PutRequest {
                            key: "mx-owner".into(),
                            value: me.clone().into_bytes().into(),
                            ..Default::default()
                        },
                    )
                    .await
                    .unwrap();
                sleep_ms(30).await;
                assert_eq!(get(&mut c, "mx-owner").await[0].value, me.as_bytes());
                holders.set(holders.get() - 1);
                let _: lpb::UnlockResponse = c
                    .unary("/v3lockpb.Lock/Unlock", &lpb::UnlockRequest { key: r.key })
                    .await
                    .expect("unlock");
                done.set(done.get() + 1);
            }));
        }
        for t in tasks {
            t.await;
        }
        assert_eq!(done.get(), LOCKERS);
        let mut c = Client::connect(&ep).await.unwrap();
        let r: pb::RangeResponse = c
            .unary(
                "/etcdserverpb.KV/Range",
                &pb::RangeRequest {
                    key: "mx/".into(),
                    range_end: "mx0".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert!(r.kvs.is_empty(), "lock keys left behind: {:?}", r.kvs);
    });
}

fn leader_key_str(l: &epb::LeaderKey) -> String {
    String::from_utf8_lossy(&l.key).into_owned()
}

#[test]
fn grpc_election_failover_and_observe() {
    let s = Server::spindle(&[]);
    let ep = s.endpoint();
    spindle::runtime::run_local(move || async move {
        let mut c = Client::connect(&ep).await.unwrap();
        // Observe from before there is any leader.
        let mut obs = c
            .stream::<epb::LeaderResponse>("/v3electionpb.Election/Observe")
            .await
            .unwrap();
        obs.send(&epb::LeaderRequest { name: "el".into() }).unwrap();
        obs.close_send();

        let (la, lb) = (grant(&mut c, 60).await, grant(&mut c, 60).await);
        let campaign = |lease: i64, value: &'static str| {
            let ep = ep.clone();
            async move {
                let mut c = Client::connect(&ep).await.unwrap();
                c.unary::<_, epb::CampaignResponse>(
                    "/v3electionpb.Election/Campaign",
                    &epb::CampaignRequest {
                        name: "el".into(),
                        lease,
                        value: value.into(),
                    },
                )
                .await
            }
        };
        let a = campaign(la, "a1")
            .await
            .expect("A campaigns")
            .leader
            .unwrap();
        assert_eq!(leader_key_str(&a), format!("el/{la:x}"));
        assert_eq!(a.lease, la);
        let b_done = Rc::new(Cell::new(false));
        let b_task = {
            let (done, fut) = (b_done.clone(), campaign(lb, "b1"));
            glommio::spawn_local(async move {
                let r = fut.await;
                done.set(true);
                r
            })
        };
        sleep_ms(300).await;
        assert!(!b_done.get(), "B won while A leads");

        let leader = |c: &mut Client| {
            let mut c = c.clone();
            async move {
                c.unary::<_, epb::LeaderResponse>(
                    "/v3electionpb.Election/Leader",
                    &epb::LeaderRequest { name: "el".into() },
                )
                .await
            }
        };
        let l = leader(&mut c).await.unwrap().kv.unwrap();
        assert_eq!(
            (l.key.as_ref(), l.value.as_ref()),
            (a.key.as_ref(), &b"a1"[..])
        );

        let _: epb::ProclaimResponse = c
            .unary(
                "/v3electionpb.Election/Proclaim",
                &epb::ProclaimRequest {
                    leader: Some(a.clone()),
                    value: "a2".into(),
                },
            )
            .await
            .expect("A proclaims");

        // A's lease goes: B takes over.
        let _: pb::LeaseRevokeResponse = c
            .unary(
                "/etcdserverpb.Lease/LeaseRevoke",
                &pb::LeaseRevokeRequest { id: la },
            )
            .await
            .unwrap();
        let b = b_task.await.expect("B campaigns").leader.unwrap();
        assert_eq!(leader_key_str(&b), format!("el/{lb:x}"));
        let l = leader(&mut c).await.unwrap().kv.unwrap();
        assert_eq!(
            (l.key.as_ref(), l.value.as_ref()),
            (b.key.as_ref(), &b"b1"[..])
        );

        // Campaigning again with another value proclaims it; the leader key stays.
        let again = campaign(lb, "b2").await.expect("B again").leader.unwrap();
        assert_eq!((again.key.as_ref(), again.rev), (b.key.as_ref(), b.rev));
        let l = leader(&mut c).await.unwrap().kv.unwrap();
        assert_eq!(l.value.as_ref(), &b"b2"[..]);

        // Observe saw every leader and proclamation, in order.
        let mut seen = Vec::new();
        for _ in 0..4 {
            let r = futures_lite::future::or(async { Some(obs.recv().await) }, async {
                sleep_ms(5000).await;
                None
            })
            .await
            .expect("observe timed out")
            .expect("observe failed")
            .expect("observe ended");
            let kv = r.kv.unwrap();
            assert!(r.header.unwrap().revision >= kv.mod_revision);
            seen.push((
                String::from_utf8_lossy(&kv.key).into_owned(),
                String::from_utf8_lossy(&kv.value).into_owned(),
            ));
        }
        let (ka, kb) = (leader_key_str(&a), leader_key_str(&b));
        assert_eq!(
            seen,
            vec![
                (ka.clone(), "a1".into()),
                (ka, "a2".into()),
                (kb.clone(), "b1".into()),
                (kb, "b2".into())
            ]
        );

        // B resigns: no leader left.
        let _: epb::ResignResponse = c
            .unary(
                "/v3electionpb.Election/Resign",
                &epb::ResignRequest { leader: Some(b) },
            )
            .await
            .unwrap();
        let err = leader(&mut c).await.unwrap_err();
        assert_eq!(err.message, "election: no leader");
    });
}

/// What a call returned, reduced to what must match etcd: `ok` or the gRPC code and message.
fn outcome<T>(r: Result<T, Status>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(s) => format!("{}: {}", s.code as i32, s.message),
    }
}

/// The error cases of both services, as seen by one server.
fn error_cases(ep: String) -> Vec<(&'static str, String)> {
    spindle::runtime::run_local(move || async move {
        let mut c = Client::connect(&ep).await.unwrap();
        let stale = epb::LeaderKey {
            name: "el".into(),
            key: "el/1234".into(),
            rev: 99,
            lease: 0x1234,
        };
        let mut out = Vec::new();
        let r = c
            .unary::<_, epb::LeaderResponse>(
                "/v3electionpb.Election/Leader",
                &epb::LeaderRequest { name: "el".into() },
            )
            .await;
        out.push(("leader without a leader", outcome(r)));
        let r = c
            .unary::<_, epb::ProclaimResponse>(
                "/v3electionpb.Election/Proclaim",
                &epb::ProclaimRequest {
                    leader: Some(stale.clone()),
                    value: "v".into(),
                },
            )
            .await;
        out.push(("proclaim with a stale leader key", outcome(r)));
        let r = c
            .unary::<_, epb::ProclaimResponse>(
                "/v3electionpb.Election/Proclaim",
                &epb::ProclaimRequest {
                    leader: None,
                    value: "v".into(),
                },
            )
            .await;
        out.push(("proclaim without a leader key", outcome(r)));
        let r = c
            .unary::<_, epb::ProclaimResponse>(
                "/v3electionpb.Election/Proclaim",
                &epb::ProclaimRequest {
                    leader: Some(epb::LeaderKey {
                        rev: 0,
                        ..stale.clone()
                    }),
                    value: "v".into(),
                },
            )
            .await;
        out.push(("proclaim on a missing key at rev 0", outcome(r)));
        let r = c
            .unary::<_, epb::ResignResponse>(
                "/v3electionpb.Election/Resign",
                &epb::ResignRequest {
                    leader: Some(stale.clone()),
                },
            )
            .await;
        out.push(("resign with a stale leader key", outcome(r)));
        let r = c
            .unary::<_, epb::ResignResponse>(
                "/v3electionpb.Election/Resign",
                &epb::ResignRequest { leader: None },
            )
            .await;
        out.push(("resign without a leader key", outcome(r)));
        out.push((
            "lock with an unknown lease",
            outcome(lock(&mut c, "l", 0x7777).await),
        ));
        let r = c
            .unary::<_, epb::CampaignResponse>(
                "/v3electionpb.Election/Campaign",
                &epb::CampaignRequest {
                    name: "el".into(),
                    lease: 0x7777,
                    value: "v".into(),
                },
            )
            .await;
        out.push(("campaign with an unknown lease", outcome(r)));
        let r = c
            .unary::<_, lpb::UnlockResponse>(
                "/v3lockpb.Lock/Unlock",
                &lpb::UnlockRequest { key: "".into() },
            )
            .await;
        out.push(("unlock without a key", outcome(r)));

        // A waiter whose client goes away: does its key stay?
        let holder = grant(&mut c, 60).await;
        let waiter = grant(&mut c, 60).await;
        lock(&mut c, "gone", holder).await.expect("first lock");
        {
            let mut w = Client::connect(&ep).await.unwrap();
            let r = futures_lite::future::or(
                async { Some(lock(&mut w, "gone", waiter).await) },
                async {
                    sleep_ms(300).await;
                    None
                },
            )
            .await;
            assert!(r.is_none(), "second lock did not wait");
        }
        sleep_ms(500).await;
        let left = get(&mut c, &format!("gone/{waiter:x}")).await.len();
        out.push(("abandoned waiter's key left", left.to_string()));
        out
    })
}

#[test]
fn error_cases_match_etcd() {
    let (sp, et) = (Server::spindle(&[]), Server::etcd(&[]));
    let ours = error_cases(sp.endpoint());
    let theirs = error_cases(et.endpoint());
    assert_eq!(ours, theirs, "spindle (left) vs etcd (right)");
    // The expectations themselves, so the comparison cannot pass on two wrong answers. etcd 3.4
    // serves both services through an in-process client that turns every error into Unknown (2).
    let find = |what: &str| &ours.iter().find(|(w, _)| *w == what).unwrap().1;
    assert_eq!(find("leader without a leader"), "2: election: no leader");
    assert_eq!(
        find("proclaim with a stale leader key"),
        "2: election: not leader"
    );
    // Proclaim puts with the leader's lease, so an unknown one is what fails first.
    assert_eq!(
        find("proclaim on a missing key at rev 0"),
        "2: etcdserver: requested lease not found"
    );
    // etcd's server deletes the key of a lock waiter whose client went away.
    assert_eq!(find("abandoned waiter's key left"), "0");
    assert_eq!(
        find("lock with an unknown lease"),
        "2: etcdserver: requested lease not found"
    );
}

#[test]
fn service_lock_excludes_the_etcdctl_recipe_and_the_gateway_serves_both() {
    let s = Server::spindle(&[]);
    let ep = s.endpoint();
    // Held through the gRPC service...
    let key = spindle::runtime::run_local(move || async move {
        let mut c = Client::connect(&ep).await.unwrap();
        let lease = grant(&mut c, 30).await;
        lock(&mut c, "shared", lease).await.expect("lock").key
    });
    // ...so etcdctl's recipe on the same name waits until it is released.
    let (_waiter, lines) =
        spawn_lines(&mut s.etcdctl_cmd(&["lock", "shared", "--", "sh", "-c", "echo got"]));
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        lines.try_recv().is_err(),
        "etcdctl lock ran while the service lock was held"
    );
    let ep = s.endpoint();
    spindle::runtime::run_local(move || async move {
        let mut c = Client::connect(&ep).await.unwrap();
        let _: lpb::UnlockResponse = c
            .unary("/v3lockpb.Lock/Unlock", &lpb::UnlockRequest { key })
            .await
            .expect("unlock");
    });
    assert_eq!(next_line(&lines, "etcdctl lock"), "got");

    // The JSON gateway: base64 names, int64 as strings.
    let grant = post(s.port, "/v3/lease/grant", "{\"TTL\":30}");
    let id = grant
        .split("\"ID\":\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or_else(|| panic!("no lease id in {grant}"));
    let locked = post(
        s.port,
        "/v3/lock/lock",
        &format!("{{\"name\":\"Z3c=\",\"lease\":\"{id}\"}}"),
    );
    let hex = format!("gw/{:x}", id.parse::<i64>().unwrap());
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, hex);
    assert!(locked.contains(&format!("\"key\":\"{b64}\"")), "{locked}");
    let none = post(s.port, "/v3/election/leader", "{\"name\":\"ZWw=\"}");
    assert!(none.contains("election: no leader"), "{none}");
    let won = post(
        s.port,
        "/v3/election/campaign",
        &format!("{{\"name\":\"ZWw=\",\"lease\":\"{id}\",\"value\":\"djE=\"}}"),
    );
    assert!(won.contains("\"leader\""), "{won}");
    let leader = post(s.port, "/v3/election/leader", "{\"name\":\"ZWw=\"}");
    assert!(leader.contains("\"value\":\"djE=\""), "{leader}");
}

/// `POST /v3/election/observe` on the JSON gateway streams `{"result": LeaderResponse}` lines:
/// the leader now, then each proclamation, as etcd's gateway does.
#[test]
fn gateway_observe_streams_leaders_like_etcd() {
    // The JSON document of a gateway answer (the body after the head; HTTP/1.1 with
    // Connection: close, so one document, possibly chunked).
    let doc = |raw: String| -> serde_json::Value {
        let body = raw.split("\r\n\r\n").nth(1).unwrap_or_default();
        let json = body
            .lines()
            .find(|l| l.starts_with('{'))
            .unwrap_or_default();
        serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {raw}"))
    };
    let run = |s: &Server| -> Vec<String> {
        let grant = doc(post(s.port, "/v3/lease/grant", "{\"TTL\":30}"));
        let id = grant["ID"].as_str().unwrap().to_string();
        let won = doc(post(
            s.port,
            "/v3/election/campaign",
            &format!("{{\"name\":\"b2Jz\",\"lease\":\"{id}\",\"value\":\"djE=\"}}"),
        ));
        let body = r#"{"name":"b2Jz"}"#;
        let raw = format!(
            "POST /v3/election/observe HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let text = common::http::stream_during(s.port, &raw, || {
            let proclaim = serde_json::json!({ "leader": won["leader"], "value": "djI=" });
            let out = post(s.port, "/v3/election/proclaim", &proclaim.to_string());
            assert!(out.contains("header"), "{out}");
        });
        text.lines()
            .filter(|l| l.starts_with("{\"result\""))
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                let kv = &v["result"]["kv"];
                format!("{} {}", kv["value"], kv["version"])
            })
            .collect()
    };
    let etcd = Server::etcd(&[]);
    let want = run(&etcd);
    assert_eq!(want.len(), 2, "{want:?}");
    assert_eq!(run(&Server::spindle(&[])), want);
}
