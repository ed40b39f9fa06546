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
    let mine = match snapshot::hash_kv(ctx, pb::HashKvRequest { revision: 0 }).await {
        Ok(h) => h,
        Err(e) => {
            tracing::debug!(error = %e.message, "corruption check: no local hash");
            return Vec::new();
        }
    };
    let rev = mine.header.as_ref().map_or(0, |h| h.revision);
    let ask = Bytes::from(prost::Message::encode_to_vec(&pb::HashKvRequest {
        revision: rev,
    }));
    let mut out = Vec::new();
    let alarmed = ctx.db.alarms().get().list(CORRUPT);
    for m in ctx.db.members().unwrap_or_default() {
        if m.id == ctx.member_id || m.is_learner || alarmed.iter().any(|a| a.member == m.id) {
            continue;
        }
        let Ok(resp) = forward::relay(&ctx.db, m.id, HASH_KV, std::slice::from_ref(&ask)).await
        else {
            continue;
        };
        let Ok(theirs) = <pb::HashKvResponse as prost::Message>::decode(resp) else {
            continue;
        };
        if theirs.compact_revision == mine.compact_revision && theirs.hash != mine.hash {
            tracing::error!(
                member = %format_args!("{:x}", m.id),
                revision = rev,
                hash = theirs.hash,
                expected = mine.hash,
                leader = %format_args!("{:x}", ctx.member_id),
                "corruption check: member's hash differs from the leader's at the same revision"
            );
            out.push(m.id);
        }
    }
    out
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
    let mine = match snapshot::hash_kv(ctx, pb::HashKvRequest { revision: 0 }).await {
        Ok(h) => h,
        Err(e) => {
            return Some(format!(
                "checkInitialHashKV failed: no local hash: {}",
                e.message
            ))
        }
    };
    let rev = mine.header.as_ref().map_or(0, |h| h.revision);
    let ask = Bytes::from(prost::Message::encode_to_vec(&pb::HashKvRequest {
        revision: rev,
    }));
    let mut mismatches = Vec::new();
    for m in ctx.db.members().unwrap_or_default() {
        if m.id == ctx.member_id || m.is_learner {
            continue;
        }
        let deadline = std::time::Instant::now() + INITIAL_ASK_FOR;
        let theirs = loop {
            match forward::relay(&ctx.db, m.id, HASH_KV, std::slice::from_ref(&ask)).await {
                Ok(resp) => break <pb::HashKvResponse as prost::Message>::decode(resp).ok(),
                Err(_) if std::time::Instant::now() < deadline => {
                    glommio::timer::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    tracing::warn!(
                        member = %format_args!("{:x}", m.id),
                        error = ?e,
                        "initial corruption check: cannot fetch hash from remote peer"
                    );
                    break None;
                }
            }
        };
        let Some(theirs) = theirs else { continue };
        if theirs.compact_revision != mine.compact_revision {
            tracing::warn!(
                member = %format_args!("{:x}", m.id),
                "initial corruption check: peer's compaction revision differs; skipped"
            );
        } else if theirs.hash != mine.hash {
            mismatches.push(format!(
                "member {:x} hashes {} at revision {rev}, this member {}",
                m.id, theirs.hash, mine.hash
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
