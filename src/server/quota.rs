//! etcd's backend quota and the write refusals alarms cause.
//!
//! The size compared against the quota is what Status reports as `dbSize` (checkpoints plus
//! the WAL's records, see `db::Status::disk_bytes`), sampled by core 0 twice a second. As in
//! etcd, a write that would take the store past the quota is refused and raises this member's
//! NOSPACE alarm through the log, so every member refuses writes that add data until a client
//! disarms it; a write after a disarm raises it again if the store is still too big.

use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;

use super::grpc::{Code, Status};
use super::{Ctx, Hop};
use crate::alarm::{self, NOSPACE};
use crate::proto::etcdserverpb as pb;

/// etcd's default quota (`--quota-backend-bytes` 0).
pub const DEFAULT_QUOTA_BYTES: u64 = 2 << 30;
/// etcd's suggested maximum: a larger quota is used, with a warning.
pub const MAX_QUOTA_BYTES: u64 = 8 << 30;

/// etcd's estimate of what storing a key's metadata costs, added to a put's key and value.
pub const KV_OVERHEAD: u64 = 256;
/// etcd's estimate of what storing a lease costs.
pub const LEASE_OVERHEAD: u64 = 64;

/// How often core 0 samples the store's size.
const SAMPLE_EVERY: Duration = Duration::from_millis(500);

pub const ALARM: &str = "/etcdserverpb.Maintenance/Alarm";

/// `--quota-backend-bytes` as etcd reads it: negative disables the quota, 0 means the default,
/// and more than the maximum is used but warned about.
pub fn effective(flag: i64) -> Option<u64> {
    match flag {
        f if f < 0 => {
            tracing::info!("disabled backend quota");
            None
        }
        0 => {
            tracing::info!(
                quota_size_bytes = DEFAULT_QUOTA_BYTES,
                "enabled backend quota with default value"
            );
            Some(DEFAULT_QUOTA_BYTES)
        }
        f => {
            let f = f as u64;
            if f > MAX_QUOTA_BYTES {
                tracing::warn!(
                    quota_size_bytes = f,
                    quota_maximum_size_bytes = MAX_QUOTA_BYTES,
                    "quota exceeds the maximum value"
                );
            } else {
                tracing::info!(quota_size_bytes = f, "enabled backend quota");
            }
            Some(f)
        }
    }
}

/// The quota and the last sampled size, shared by every core.
#[derive(Debug, Default)]
pub struct Quota {
    limit: Option<u64>,
    size: AtomicU64,
    /// A write was refused for space: core 0 raises this member's NOSPACE alarm.
    raise: AtomicBool,
    /// Notified with `raise`, so core 0's loop sleeps until it has something to do.
    raised: event_listener::Event,
}

impl Quota {
    pub fn new(limit: Option<u64>) -> Quota {
        Quota {
            limit,
            ..Default::default()
        }
    }

    pub fn note_size(&self, bytes: u64) {
        self.size.store(bytes, Ordering::Release);
    }

    /// Whether `cost` more bytes fit (etcd's `Quota.Available`).
    fn available(&self, cost: u64) -> bool {
        self.limit
            .is_none_or(|limit| self.size.load(Ordering::Acquire) + cost <= limit)
    }
}

pub fn no_space() -> Status {
    Status::new(
        Code::ResourceExhausted,
        "etcdserver: mvcc: database space exceeded",
    )
}

/// etcd's refusal of every write while the CORRUPT alarm is raised.
pub fn corrupt() -> Status {
    Status::new(Code::DataLoss, "etcdserver: corrupt cluster")
}

/// Whether a write that adds `cost` bytes (0: one that adds nothing, a delete, a compaction, a
/// revoke) may run: nothing is written while CORRUPT is raised, and nothing that adds data
/// while NOSPACE is raised or when it would not fit.
pub(super) fn check(ctx: &Ctx, cost: u64) -> Result<(), Status> {
    let alarms = ctx.db.alarms();
    if alarms.corrupt() {
        return Err(corrupt());
    }
    if cost == 0 {
        return Ok(());
    }
    if alarms.nospace() {
        return Err(no_space());
    }
    if !ctx.quota.available(cost) {
        ctx.quota.raise.store(true, Ordering::Release);
        ctx.quota.raised.notify(1);
        return Err(no_space());
    }
    Ok(())
}

pub fn put_cost(p: &pb::PutRequest) -> u64 {
    KV_OVERHEAD + p.key.len() as u64 + p.value.len() as u64
}

/// The larger branch's puts, as etcd counts a txn.
pub fn txn_cost(t: &pb::TxnRequest) -> u64 {
    use pb::request_op::Request as R;
    let branch = |ops: &[pb::RequestOp]| {
        ops.iter()
            .map(|op| match &op.request {
                Some(R::RequestPut(p)) => put_cost(p),
                Some(R::RequestTxn(n)) => txn_cost(n),
                _ => 0,
            })
            .sum::<u64>()
    };
    branch(&t.success).max(branch(&t.failure))
}

/// Whether a txn writes anything (read-only txns are served even under CORRUPT, as etcd's).
pub fn txn_writes(t: &pb::TxnRequest) -> bool {
    use pb::request_op::Request as R;
    t.success
        .iter()
        .chain(&t.failure)
        .any(|op| match &op.request {
            Some(R::RequestPut(_)) | Some(R::RequestDeleteRange(_)) => true,
            Some(R::RequestTxn(n)) => txn_writes(n),
            _ => false,
        })
}

/// Core 0's loop: samples the store's size and raises this member's NOSPACE alarm after a
/// write was refused for space (through the leader, so every member gets it).
pub(super) async fn watch(ctx: Rc<Ctx>) {
    // Without a quota no write is refused for space: nothing to sample, nothing to raise.
    if ctx.quota.limit.is_none() {
        return;
    }
    let mut next_sample = std::time::Instant::now();
    loop {
        if ctx.drain.draining.load(Ordering::Acquire) {
            return;
        }
        if std::time::Instant::now() >= next_sample {
            if let Ok(st) = ctx.db.status().await {
                ctx.quota.note_size(st.disk_bytes);
            }
            next_sample = std::time::Instant::now() + SAMPLE_EVERY;
        }
        // Sleeps until the next sample or a refusal, whichever comes first (the listener is
        // made before the flag is read, so a refusal in between is not missed).
        let refused = ctx.quota.raised.listen();
        if !ctx.quota.raise.load(Ordering::Acquire) {
            let wait = next_sample.saturating_duration_since(std::time::Instant::now());
            futures_lite::future::or(refused, glommio::timer::sleep(wait)).await;
        }
        if ctx.quota.raise.swap(false, Ordering::AcqRel) {
            let mine = alarm::Alarm {
                member: ctx.member_id,
                alarm: NOSPACE,
            };
            if !ctx.db.alarms().get().list(NOSPACE).contains(&mine) {
                raise(&ctx, ctx.member_id, NOSPACE).await;
            }
        }
    }
}

/// Raises `member`'s alarm through the cluster's leader; on failure the next refused write
/// (or the next corruption check) tries again.
pub(super) async fn raise(ctx: &Rc<Ctx>, member: u64, alarm: i32) {
    let req = pb::AlarmRequest {
        action: pb::alarm_request::AlarmAction::Activate as i32,
        member_id: member,
        alarm,
    };
    let msg = Bytes::from(prost::Message::encode_to_vec(&req));
    match super::call_anywhere(ctx, ALARM, vec![msg], None, Hop::Client).await {
        Ok(_) => tracing::warn!(
            member = %format_args!("{:x}", member),
            alarm = alarm::name(alarm),
            "alarm raised"
        ),
        Err(e) => tracing::warn!(
            alarm = alarm::name(alarm),
            error = %e.message,
            "could not raise the alarm"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_reads_as_etcd_reads_it() {
        assert_eq!(effective(-1), None);
        assert_eq!(effective(0), Some(DEFAULT_QUOTA_BYTES));
        assert_eq!(effective(1 << 20), Some(1 << 20));
        assert_eq!(effective(16 << 30), Some(16 << 30));
    }

    #[test]
    fn writes_fit_until_the_quota_and_txns_cost_their_larger_branch() {
        let q = Quota::new(Some(1000));
        q.note_size(700);
        assert!(q.available(300));
        assert!(!q.available(301));
        assert!(Quota::new(None).available(u64::MAX / 2));
        let put = |v: usize| pb::RequestOp {
            request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                key: b"k".to_vec().into(),
                value: vec![0; v].into(),
                ..Default::default()
            })),
        };
        let t = pb::TxnRequest {
            success: vec![put(10), put(10)],
            failure: vec![put(1000)],
            ..Default::default()
        };
        assert_eq!(txn_cost(&t), 1000 + 1 + KV_OVERHEAD);
        let small = pb::TxnRequest {
            failure: vec![put(1)],
            ..t
        };
        assert_eq!(txn_cost(&small), 2 * (10 + 1 + KV_OVERHEAD));
    }
}
