//! etcd's v3lock service (`v3lockpb.Lock`), and the waiting both it and v3election rely on.
//!
//! As in etcd's server, a lock is a key `name/<lease in hex>` attached to the caller's lease; the
//! holder is the key with the smallest create revision under `name/`. A waiter watches only its
//! predecessor (the key created just before its own) and re-checks when that key goes, so a
//! release wakes one waiter instead of all of them.

use std::rc::Rc;

use bytes::{Bytes, BytesMut};

use super::grpc::{Code, Status};
use super::{check_space, enc, one, Ctx};
use crate::db::{WatchRequest, WatchUpdate};
use crate::kv::{
    Compare, CompareResult, DeleteRangeRequest, KeyValue, PutRequest, RangeRequest, RangeResponse,
    RequestOp, ResponseOp, SortOrder, SortTarget, TxnRequest, TxnResponse,
};
use crate::mvcc::EventKind;
use crate::proto::v3lockpb as lpb;

pub const LOCK: &str = "/v3lockpb.Lock/Lock";
pub const UNLOCK: &str = "/v3lockpb.Lock/Unlock";

/// TTL of the lease etcd's server grants when a request names lease 0 (its session default).
const DEFAULT_SESSION_TTL: i64 = 60;

/// The unary Lock calls.
pub(super) async fn call(ctx: &Rc<Ctx>, path: &str, msgs: Vec<Bytes>) -> Result<Bytes, Status> {
    match path {
        LOCK => {
            let req: lpb::LockRequest = one(msgs)?;
            let (key, revision) = lock(ctx, &req.name, req.lease).await.map_err(as_etcd)?;
            Ok(enc(&lpb::LockResponse {
                header: Some(ctx.header(revision)),
                key,
            }))
        }
        UNLOCK => {
            let req: lpb::UnlockRequest = one(msgs)?;
            let resp = ctx
                .db
                .delete_range(DeleteRangeRequest::key(req.key))
                .await
                .map_err(|e| as_etcd(e.into()))?;
            Ok(enc(&lpb::UnlockResponse {
                header: Some(ctx.header(resp.header.revision)),
            }))
        }
        _ => Err(Status::unimplemented(path)),
    }
}

/// etcd 3.4 serves v3lock and v3election through an in-process client that drops gRPC codes:
/// every error a handler returns reaches the caller as Unknown with etcd's message.
pub(super) fn as_etcd(s: Status) -> Status {
    Status::new(Code::Unknown, s.message)
}

/// etcd's server opens a session on the given lease, or grants a fresh one for lease 0.
pub(super) async fn session_lease(ctx: &Ctx, lease: i64) -> Result<i64, Status> {
    if lease != 0 {
        return Ok(lease);
    }
    check_space(ctx, super::quota::KV_OVERHEAD)?;
    Ok(ctx.db.lease_grant(0, DEFAULT_SESSION_TTL).await?.id)
}

/// `prefix + lease` as Go's `%x` prints an int64 (a sign, not two's complement).
pub(super) fn lease_key(prefix: &[u8], lease: i64) -> Bytes {
    let mut k = BytesMut::from(prefix);
    if lease < 0 {
        k.extend_from_slice(format!("-{:x}", lease.unsigned_abs()).as_bytes());
    } else {
        k.extend_from_slice(format!("{lease:x}").as_bytes());
    }
    k.freeze()
}

/// `name + "/"`: every participant's key lives under it.
pub(super) fn prefix_of(name: &[u8]) -> Bytes {
    let mut p = BytesMut::from(name);
    p.extend_from_slice(b"/");
    p.freeze()
}

/// The key under `prefix` with the smallest create revision: the holder or leader.
pub(super) fn first_created(prefix: &Bytes) -> RangeRequest {
    RangeRequest {
        limit: 1,
        sort_order: SortOrder::Ascend,
        sort_target: SortTarget::Create,
        ..RangeRequest::prefix(prefix.clone())
    }
}

/// The range result of the `i`th op of a txn's response.
pub(super) fn range_at(resp: &TxnResponse, i: usize) -> Result<&RangeResponse, Status> {
    match resp.responses.get(i) {
        Some(ResponseOp::Range(r)) => Ok(r),
        _ => Err(Status::new(
            Code::Internal,
            "internal: txn response lacks its range",
        )),
    }
}

/// Deletes a participant's key when the request that made it is abandoned while it waits (the
/// client cancelled or went away), as etcd's server does, so a dead waiter does not block others
/// until its lease expires. With `create_rev` the delete only happens if the key is still the one
/// created at that revision (etcd's Resign); without, unconditionally (etcd's Unlock).
pub(super) struct AbandonGuard {
    ctx: Rc<Ctx>,
    key: Bytes,
    create_rev: Option<i64>,
    armed: bool,
}

impl AbandonGuard {
    pub(super) fn new(ctx: &Rc<Ctx>, key: Bytes, create_rev: Option<i64>) -> AbandonGuard {
        AbandonGuard {
            ctx: ctx.clone(),
            key,
            create_rev,
            armed: true,
        }
    }

    pub(super) fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for AbandonGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (ctx, key, create_rev) = (self.ctx.clone(), self.key.clone(), self.create_rev);
        glommio::spawn_local(async move {
            let compare = create_rev
                .map(|rev| {
                    vec![Compare::create_revision(
                        key.clone(),
                        CompareResult::Equal,
                        rev,
                    )]
                })
                .unwrap_or_default();
            let txn = TxnRequest {
                compare,
                success: vec![RequestOp::DeleteRange(DeleteRangeRequest::key(key))],
                failure: vec![],
            };
            if let Err(e) = ctx.db.txn(txn).await {
                tracing::warn!(error = %e, "could not remove an abandoned lock/election key");
            }
        })
        .detach();
    }
}

/// etcd's `Mutex.Lock` run by the server: returns the lock key and the revision of the header.
async fn lock(ctx: &Rc<Ctx>, name: &[u8], lease: i64) -> Result<(Bytes, i64), Status> {
    let lease = session_lease(ctx, lease).await?;
    check_space(ctx, super::quota::KV_OVERHEAD)?;
    let prefix = prefix_of(name);
    let key = lease_key(&prefix, lease);
    let txn = TxnRequest {
        compare: vec![Compare::create_revision(
            key.clone(),
            CompareResult::Equal,
            0,
        )],
        success: vec![
            RequestOp::Put(PutRequest {
                lease,
                ..PutRequest::new(key.clone(), Bytes::new())
            }),
            RequestOp::Range(first_created(&prefix)),
        ],
        failure: vec![
            RequestOp::Range(RangeRequest::key(key.clone())),
            RequestOp::Range(first_created(&prefix)),
        ],
    };
    let resp = ctx.db.txn(txn).await?;
    let my_rev = if resp.succeeded {
        resp.header.revision
    } else {
        own_create_revision(range_at(&resp, 0)?)?
    };
    let owner = range_at(&resp, 1)?;
    if owner
        .kvs
        .first()
        .is_none_or(|kv| kv.create_revision == my_rev)
    {
        return Ok((key, resp.header.revision));
    }
    let guard = AbandonGuard::new(ctx, key.clone(), None);
    let revision = wait_deletes(ctx, &prefix, my_rev - 1).await?;
    guard.disarm();
    Ok((key, revision))
}

fn own_create_revision(r: &RangeResponse) -> Result<i64, Status> {
    r.kvs.first().map(|kv| kv.create_revision).ok_or_else(|| {
        Status::new(
            Code::Internal,
            "internal: participant key vanished inside its txn",
        )
    })
}

/// etcd's `waitDeletes`: until no key under `prefix` was created at or below `max_create_rev`,
/// waits for the deletion of the latest such key. Returns the revision of the final check.
pub(super) async fn wait_deletes(
    ctx: &Ctx,
    prefix: &Bytes,
    max_create_rev: i64,
) -> Result<i64, Status> {
    loop {
        let req = RangeRequest {
            limit: 1,
            sort_order: SortOrder::Descend,
            sort_target: SortTarget::Create,
            max_create_revision: max_create_rev,
            ..RangeRequest::prefix(prefix.clone())
        };
        let resp = ctx.db.range(req).await?;
        let Some(last) = resp.kvs.into_iter().next() else {
            return Ok(resp.header.revision);
        };
        wait_delete(ctx, last.key, resp.header.revision).await?;
    }
}

/// Waits until `key` is deleted at or after revision `from`.
async fn wait_delete(ctx: &Ctx, key: Bytes, from: i64) -> Result<(), Status> {
    let mut w = KeyWatch::start(ctx, key, Bytes::new(), from);
    loop {
        let (_, events) = w.next().await?;
        if events.iter().any(|(kind, _)| *kind == EventKind::Delete) {
            return Ok(());
        }
    }
}

/// A watch on the core's hub, cancelled when dropped.
pub(super) struct KeyWatch<'a> {
    ctx: &'a Ctx,
    id: u64,
    rx: flume::Receiver<(i64, WatchUpdate)>,
}

impl<'a> KeyWatch<'a> {
    pub(super) fn start(ctx: &'a Ctx, key: Bytes, range_end: Bytes, from: i64) -> KeyWatch<'a> {
        let (sink, rx) = flume::bounded(16);
        let req = WatchRequest {
            key,
            range_end,
            start_revision: from,
            ..Default::default()
        };
        let sink_id = ctx.db.new_watch_sink();
        let id = ctx.db.watch(&req, sink_id, 0, sink);
        KeyWatch { ctx, id, rx }
    }

    /// The next batch of events: the revision it brings the watch to, and the events.
    pub(super) async fn next(&mut self) -> Result<(i64, Vec<(EventKind, KeyValue)>), Status> {
        loop {
            match self.rx.recv_async().await {
                Ok((_, WatchUpdate::Events { revision, events })) => {
                    let evs = events.iter().map(|e| (e.kind, e.kv.clone())).collect();
                    return Ok((revision, evs));
                }
                Ok((_, WatchUpdate::Progress { .. })) => continue,
                Ok((_, WatchUpdate::Compacted { .. })) => {
                    return Err(crate::error::Error::Compacted.into())
                }
                Err(_) => return Err(crate::error::Error::Closed.into()),
            }
        }
    }
}

impl Drop for KeyWatch<'_> {
    fn drop(&mut self) {
        self.ctx.db.watch_cancel(self.id);
    }
}
