//! The Rust `etcd-client` crate against one endpoint: KV, Watch, Lease, Lock and Election,
//! unchanged. Exits non-zero with a message on the first mismatch.

use std::time::Duration;

use etcd_client::{Client, EventType, LockOptions, PutOptions, WatchOptions};

fn check(cond: bool, what: &str) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(format!("check failed: {what}"))
    }
}

async fn run(endpoint: &str) -> Result<(), Box<dyn std::error::Error>> {
    let mut client = Client::connect([endpoint], None).await?;

    // KV
    client.put("rs/a", "1", None).await?;
    let got = client.get("rs/a", None).await?;
    check(
        got.kvs().first().map(|kv| kv.value()) == Some(b"1"),
        "get after put",
    )?;

    // Watch: a prefix watch with prev_kv sees a put and a delete in order.
    let (mut watcher, mut stream) = client
        .watch(
            "rs/w/",
            Some(WatchOptions::new().with_prefix().with_prev_key()),
        )
        .await?;
    client.put("rs/w/x", "v1", None).await?;
    client.put("rs/w/x", "v2", None).await?;
    client.delete("rs/w/x", None).await?;
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let resp = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await??
            .ok_or("watch stream ended")?;
        for e in resp.events() {
            let kv = e.kv().ok_or("event without kv")?;
            let prev = e.prev_kv().map(|p| p.value().to_vec());
            seen.push((e.event_type(), kv.value().to_vec(), prev));
        }
    }
    watcher.cancel().await?;
    check(
        seen == vec![
            (EventType::Put, b"v1".to_vec(), None),
            (EventType::Put, b"v2".to_vec(), Some(b"v1".to_vec())),
            (EventType::Delete, Vec::new(), Some(b"v2".to_vec())),
        ],
        &format!("watch events {seen:?}"),
    )?;

    // Lease: grant, attach, keep alive, time to live with keys, revoke deletes the key.
    let lease = client.lease_grant(10, None).await?;
    client
        .put(
            "rs/leased",
            "x",
            Some(PutOptions::new().with_lease(lease.id())),
        )
        .await?;
    let (mut keeper, mut responses) = client.lease_keep_alive(lease.id()).await?;
    keeper.keep_alive().await?;
    let renewed = responses
        .message()
        .await?
        .ok_or("keep-alive stream ended")?;
    check(renewed.ttl() == 10, "keep-alive answers the full TTL")?;
    let ttl = client
        .lease_time_to_live(
            lease.id(),
            Some(etcd_client::LeaseTimeToLiveOptions::new().with_keys()),
        )
        .await?;
    check(
        ttl.keys() == [b"rs/leased".to_vec()],
        "time-to-live lists the key",
    )?;
    client.lease_revoke(lease.id()).await?;
    check(
        client.get("rs/leased", None).await?.kvs().is_empty(),
        "revoke deletes the key",
    )?;

    // Lock service: a second locker waits until the first unlocks.
    let l1 = client.lease_grant(10, None).await?.id();
    let l2 = client.lease_grant(10, None).await?.id();
    let first = client
        .lock("rs/lock", Some(LockOptions::new().with_lease(l1)))
        .await?;
    let mut other = client.clone();
    let second = tokio::spawn(async move {
        other
            .lock("rs/lock", Some(LockOptions::new().with_lease(l2)))
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    check(
        !second.is_finished(),
        "a held lock makes the second locker wait",
    )?;
    client.unlock(first.key()).await?;
    let second = tokio::time::timeout(Duration::from_secs(10), second).await???;
    client.unlock(second.key()).await?;

    // Election: campaign, leader, proclaim.
    let el = client.lease_grant(10, None).await?.id();
    let won = client.campaign("rs/election", "v1", el).await?;
    let leader_key = won.leader().ok_or("campaign without leader key")?.clone();
    let leader = client.leader("rs/election").await?;
    check(
        leader.kv().map(|kv| kv.value()) == Some(b"v1"),
        "leader is the campaigner",
    )?;
    client
        .proclaim(
            "v2",
            Some(etcd_client::ProclaimOptions::new().with_leader(leader_key.clone())),
        )
        .await?;
    let leader = client.leader("rs/election").await?;
    check(
        leader.kv().map(|kv| kv.value()) == Some(b"v2"),
        "proclaimed value",
    )?;
    client
        .resign(Some(
            etcd_client::ResignOptions::new().with_leader(leader_key),
        ))
        .await?;
    println!("ok");
    Ok(())
}

/// Whether `r` failed with a gRPC status whose message contains `needle`.
fn refused<T>(r: Result<T, etcd_client::Error>, needle: &str) -> bool {
    matches!(r, Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains(needle))
}

/// Authenticated run (auth enabled by the test: root, user u with readwrite on auth/, user
/// nobody without roles): user/password clients put and get; refusals stay refusals.
async fn run_auth(endpoint: &str) -> Result<(), Box<dyn std::error::Error>> {
    let opts = |user: &str| Some(etcd_client::ConnectOptions::new().with_user(user, "pw"));
    let mut root = Client::connect([endpoint], opts("root")).await?;
    root.put("auth/root", "r", None).await?;
    let got = root.get("auth/root", None).await?;
    check(
        got.kvs().first().map(|kv| kv.value()) == Some(b"r"),
        "root get after put",
    )?;
    let mut u = Client::connect([endpoint], opts("u")).await?;
    u.put("auth/u", "1", None).await?;
    let got = u.get("auth/u", None).await?;
    check(
        got.kvs().first().map(|kv| kv.value()) == Some(b"1"),
        "u get after put",
    )?;
    check(
        refused(u.put("outside", "x", None).await, "permission denied"),
        "u outside its range",
    )?;
    let mut nobody = Client::connect([endpoint], opts("nobody")).await?;
    check(
        refused(nobody.get("auth/u", None).await, "permission denied"),
        "nobody reads",
    )?;
    let mut anon = Client::connect([endpoint], None).await?;
    check(
        refused(anon.get("auth/u", None).await, "user name is empty"),
        "no credentials",
    )?;
    println!("ok");
    Ok(())
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let endpoint = args
        .next()
        .expect("usage: spindle-rust-client-check HOST:PORT [auth]");
    let result = if args.next().as_deref() == Some("auth") {
        run_auth(&endpoint).await
    } else {
        run(&endpoint).await
    };
    if let Err(e) = result {
        eprintln!("{e}");
        std::process::exit(1);
    }
}
