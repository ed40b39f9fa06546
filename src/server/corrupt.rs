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
