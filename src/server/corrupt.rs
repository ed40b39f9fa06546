//! etcd's periodic corruption check (`--experimental-corrupt-check-time`): the leader compares
//! its HashKV at its current revision with every voting member's at the same revision (asked
//! over the peer connection); a member whose hash differs while its compaction revision is the
//! leader's gets the CORRUPT alarm, raised through the log, after which every member refuses
//! writes with etcd's `etcdserver: corrupt cluster` (see `quota::check`). A member that has not
//! applied the revision yet, or cannot be reached, is skipped until the next round.

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;

use super::{forward, snapshot, Ctx};
use crate::alarm::CORRUPT;
use crate::proto::etcdserverpb as pb;

const HASH_KV: &str = "/etcdserverpb.Maintenance/HashKV";

/// Core 0's loop on every member; only the leader checks.
pub(super) async fn periodic(ctx: Rc<Ctx>, every: Duration) {
    loop {
        glommio::timer::sleep(every).await;
        if ctx.drain.draining.load(Ordering::Acquire) {
            return;
        }
        if !ctx.db.is_cluster_member() || ctx.db.leader() != ctx.member_id {
            continue;
        }
        for id in mismatched(&ctx).await {
            super::quota::raise(&ctx, id, CORRUPT).await;
        }
    }
}

/// Members whose hash at the leader's revision differs from the leader's.
async fn mismatched(ctx: &Rc<Ctx>) -> Vec<u64> {
    let (mine, ask) = match own_hash(ctx).await {
        Ok(h) => h,
        Err(e) => {
            tracing::debug!(error = %e.message, "corruption check: no local hash");
            return Vec::new();
        }
    };
    let rev = revision_of(&mine);
    let mut out = Vec::new();
    let alarmed = ctx.db.alarms().get().list(CORRUPT);
    for id in voting_peers(ctx) {
        if alarmed.iter().any(|a| a.member == id) {
            continue;
        }
        let Ok(theirs) = their_hash(ctx, id, &ask, Duration::ZERO).await else {
            continue;
        };
        if theirs.compact_revision == mine.compact_revision && theirs.hash != mine.hash {
            tracing::error!(
                member = %format_args!("{id:x}"),
                revision = rev,
                hash = theirs.hash,
                expected = mine.hash,
                leader = %format_args!("{:x}", ctx.member_id),
                "corruption check: member's hash differs from the leader's at the same revision"
            );
            out.push(id);
        }
    }
    out
}

/// This member's HashKV at its current revision, and the encoded request that asks another
/// member for its hash at that same revision.
async fn own_hash(ctx: &Rc<Ctx>) -> Result<(pb::HashKvResponse, Bytes), super::Status> {
    let mine = snapshot::hash_kv(ctx, pb::HashKvRequest { revision: 0 }).await?;
    let ask = Bytes::from(prost::Message::encode_to_vec(&pb::HashKvRequest {
        revision: revision_of(&mine),
    }));
    Ok((mine, ask))
}

fn revision_of(h: &pb::HashKvResponse) -> i64 {
    h.header.as_ref().map_or(0, |h| h.revision)
}

/// The other voting members (learners hold no vote and may lag).
fn voting_peers(ctx: &Ctx) -> Vec<u64> {
    ctx.db
        .members()
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.id != ctx.member_id && !m.is_learner)
        .map(|m| m.id)
        .collect()
}

/// Member `id`'s answer to `ask` over the peer relay, retried for up to `patience` while it
/// cannot be reached (its connection is dialed lazily, or it is starting too).
async fn their_hash(
    ctx: &Rc<Ctx>,
    id: u64,
    ask: &Bytes,
    patience: Duration,
) -> Result<pb::HashKvResponse, String> {
    let deadline = std::time::Instant::now() + patience;
    loop {
        match forward::relay(&ctx.db, id, HASH_KV, std::slice::from_ref(ask)).await {
            Ok(resp) => {
                return <pb::HashKvResponse as prost::Message>::decode(resp)
                    .map_err(|e| format!("undecodable HashKV answer: {e}"))
            }
            Err(_) if std::time::Instant::now() < deadline => {
                glommio::timer::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(format!("{e:?}")),
        }
    }
}

/// Holds client listeners until `--experimental-initial-corrupt-check` has passed, as etcd
/// serves no client before its initial hash check.
pub(super) struct Gate {
    open: std::sync::atomic::AtomicBool,
    opened: event_listener::Event,
}

impl Gate {
    pub(super) fn new(open: bool) -> Gate {
        Gate {
            open: std::sync::atomic::AtomicBool::new(open),
            opened: event_listener::Event::new(),
        }
    }

    pub(super) async fn wait(&self) {
        loop {
            if self.open.load(Ordering::Acquire) {
                return;
            }
            let listener = self.opened.listen();
            if self.open.load(Ordering::Acquire) {
                return;
            }
            listener.await;
        }
    }

    fn open(&self) {
        self.open.store(true, Ordering::Release);
        self.opened.notify(usize::MAX);
    }
}

/// How long the initial check keeps asking a member that does not answer yet (its peer
/// connection is dialed lazily, or it is starting too).
const INITIAL_ASK_FOR: Duration = Duration::from_secs(5);

/// etcd's `--experimental-initial-corrupt-check`: before clients are served, this member's
/// HashKV at its own revision is compared with every other voting member's at that revision.
/// A member at the same compaction revision with another hash means this member's data (or
/// theirs) is damaged: the process exits with etcd's "found data inconsistency with peers",
/// naming both hashes. Members that cannot be asked, or compacted past that revision, are
/// skipped with a warning, as etcd does.
pub(super) async fn initial(ctx: Rc<Ctx>, gate: std::sync::Arc<Gate>) {
    if ctx.db.is_cluster_member() {
        if let Some(msg) = initial_mismatch(&ctx).await {
            tracing::error!("{msg}");
            eprintln!("spindle: {msg}");
            std::process::exit(1);
        }
        tracing::info!("initial corruption check passed");
    }
    gate.open();
}

async fn initial_mismatch(ctx: &Rc<Ctx>) -> Option<String> {
    let (mine, ask) = match own_hash(ctx).await {
        Ok(h) => h,
        Err(e) => {
            return Some(format!(
                "checkInitialHashKV failed: no local hash: {}",
                e.message
            ))
        }
    };
    let rev = revision_of(&mine);
    let mut mismatches = Vec::new();
    for id in voting_peers(ctx) {
        let theirs = match their_hash(ctx, id, &ask, INITIAL_ASK_FOR).await {
            Ok(h) => h,
            Err(error) => {
                tracing::warn!(
                    member = %format_args!("{id:x}"),
                    %error,
                    "initial corruption check: cannot fetch hash from remote peer"
                );
                continue;
            }
        };
        if theirs.compact_revision != mine.compact_revision {
            tracing::warn!(
                member = %format_args!("{id:x}"),
                "initial corruption check: peer's compaction revision differs; skipped"
            );
        } else if theirs.hash != mine.hash {
            mismatches.push(format!(
                "member {id:x} hashes {} at revision {rev}, this member {}",
                theirs.hash, mine.hash
            ));
        }
    }
    (!mismatches.is_empty()).then(|| {
        format!(
            "checkInitialHashKV failed: {:x} found data inconsistency with peers ({})",
            ctx.member_id,
            mismatches.join("; ")
        )
    })
}
