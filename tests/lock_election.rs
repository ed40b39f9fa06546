//! v3lock and v3election: the gRPC services (raw calls), etcdctl's client-side recipes
//! (`etcdctl lock`, `etcdctl elect`) over KV/Lease/Watch, mutual exclusion under contention,
//! election failover with Observe, and etcd 3.4's error codes and messages side by side.
//!
//! Needs `etcd` and `etcdctl` 3.4 on PATH (`tools/test` installs them).

use std::cell::Cell;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use spindle::bench::client::Client;
use spindle::proto::etcdserverpb as pb;
use spindle::proto::v3electionpb as epb;
use spindle::proto::v3lockpb as lpb;
use spindle::server::grpc::Status;

/// A server process this test started; killed by its own pid when dropped.
struct Server {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn free_ports(n: usize) -> Vec<u16> {
    let ls: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port"))
        .collect();
    ls.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

fn spawn(cmd: &mut Command, port: u16, dir: tempfile::TempDir) -> Server {
    let log = dir.path().join("server.log");
    let f = File::create(&log).unwrap();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .expect("start server");
    Server {
        child,
        port,
        log,
        _dir: dir,
    }
}

fn spindle() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let port = free_ports(1)[0];
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_spindle"));
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--listen-client-urls", &format!("http://127.0.0.1:{port}")])
        .args(["--cores", "2"]);
    let mut s = spawn(&mut cmd, port, dir);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !s.log().contains("ready to serve client requests") {
        assert!(
            s.child.try_wait().unwrap().is_none(),
            "spindle exited:\n{}",
            s.log()
        );
        assert!(Instant::now() < deadline, "spindle not ready:\n{}", s.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    s
}

fn etcd() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let ports = free_ports(2);
    let client = format!("http://127.0.0.1:{}", ports[0]);
    let peer = format!("http://127.0.0.1:{}", ports[1]);
    let mut cmd = Command::new("etcd");
    cmd.arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--name", "default"])
        .args(["--listen-client-urls", &client])
        .args(["--advertise-client-urls", &client])
        .args(["--listen-peer-urls", &peer])
        .args(["--initial-advertise-peer-urls", &peer])
        .args(["--initial-cluster", &format!("default={peer}")]);
    let mut s = spawn(&mut cmd, ports[0], dir);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(
            s.child.try_wait().unwrap().is_none(),
            "etcd exited:\n{}",
            s.log()
        );
        if TcpStream::connect(("127.0.0.1", s.port)).is_ok()
            && etcdctl(&s, &["endpoint", "health"]).status.success()
        {
            return s;
        }
        assert!(Instant::now() < deadline, "etcd not healthy:\n{}", s.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn etcdctl_cmd(s: &Server, args: &[&str]) -> Command {
    let mut c = Command::new("etcdctl");
    c.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", s.endpoint()))
        .args(["--dial-timeout=2s", "--command-timeout=5s"])
        .args(args)
        .stdin(Stdio::null());
    c
}

fn etcdctl(s: &Server, args: &[&str]) -> std::process::Output {
    etcdctl_cmd(s, args).output().expect("run etcdctl")
}

/// Lines a child prints on stdout, delivered as they come.
fn lines_of(child: &mut Child) -> flume::Receiver<String> {
    let (tx, rx) = flume::unbounded();
    let out = child.stdout.take().expect("piped stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

fn next_line(rx: &flume::Receiver<String>, what: &str) -> String {
    rx.recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("no output from {what}"))
}

/// Kills a child this test started, by its own handle.
struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

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
    let s = spindle();
    // The client-side lock recipe (KV, Lease, Watch): runs the command while holding the lock.
    let out = etcdctl(&s, &["lock", "mylock", "--", "sh", "-c", "echo locked"]);
    assert!(out.status.success(), "etcdctl lock: {out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "locked");
    // The lock key is gone once the command finished.
    let keys = etcdctl(&s, &["get", "mylock", "--prefix", "--keys-only"]);
    assert_eq!(String::from_utf8_lossy(&keys.stdout).trim(), "");

    // `etcdctl elect`: an observer sees the proposal, and then the next leader.
    let mut obs = etcdctl_cmd(&s, &["elect", "-l", "myelection"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let obs_lines = lines_of(&mut obs);
    let _obs = Kill(obs);
    let mut a = etcdctl_cmd(&s, &["elect", "myelection", "v1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let a_lines = lines_of(&mut a);
    let a_key = next_line(&a_lines, "the first candidate");
    assert!(a_key.starts_with("myelection/"), "{a_key}");
    assert_eq!(next_line(&a_lines, "the first candidate"), "v1");
    assert_eq!(next_line(&obs_lines, "the observer"), a_key);
    assert_eq!(next_line(&obs_lines, "the observer"), "v1");
    let mut b = etcdctl_cmd(&s, &["elect", "myelection", "v2"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let b_lines = lines_of(&mut b);
    let _b = Kill(b);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        b_lines.try_recv().is_err(),
        "second candidate won while the first leads"
    );
    // The first candidate goes away; its lease is revoked on SIGINT, so the second one wins.
    unsafe_interrupt(&a);
    let _ = a.wait();
    let b_key = next_line(&b_lines, "the second candidate");
    assert_ne!(b_key, a_key);
    assert_eq!(next_line(&b_lines, "the second candidate"), "v2");
    assert_eq!(next_line(&obs_lines, "the observer"), b_key);
    assert_eq!(next_line(&obs_lines, "the observer"), "v2");
}

/// Sends SIGINT to a child this test started (etcdctl resigns and revokes on it).
fn unsafe_interrupt(c: &Child) {
    let st = Command::new("kill")
        .args(["-INT", &c.id().to_string()])
        .status()
        .expect("run kill");
    assert!(st.success());
}

#[test]
fn grpc_lock_is_mutually_exclusive() {
    const LOCKERS: usize = 8;
    let s = spindle();
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
    let s = spindle();
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
    let (sp, et) = (spindle(), etcd());
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

/// One HTTP/1.1 POST to the JSON gateway; the whole response as text.
fn post(port: u16, path: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn service_lock_excludes_the_etcdctl_recipe_and_the_gateway_serves_both() {
    let s = spindle();
    let ep = s.endpoint();
    // Held through the gRPC service...
    let key = spindle::runtime::run_local(move || async move {
        let mut c = Client::connect(&ep).await.unwrap();
        let lease = grant(&mut c, 30).await;
        lock(&mut c, "shared", lease).await.expect("lock").key
    });
    // ...so etcdctl's recipe on the same name waits until it is released.
    let mut waiter = etcdctl_cmd(&s, &["lock", "shared", "--", "sh", "-c", "echo got"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = lines_of(&mut waiter);
    let _waiter = Kill(waiter);
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
