//! The lease service over the engine: grant, revoke, keep-alive, time-to-live, list, and expiry.
//!
//! The lease table ([`crate::mvcc::lease::LeaseTable`]) is shared by every core; this module owns the
//! clock and the durable side. A grant is logged (`LeaseGrant`) in the log of shard
//! [`log_shard`]`(id)` before it is acknowledged; a revoke first makes the lease unusable, then
//! deletes its keys in one ordinary write (a txn of deletes guarded by "still attached" compares,
//! so one revision across shards, and none when nothing is attached), then logs `LeaseRevoke`.
//! Keep-alives only touch memory, as in etcd. Expiry runs on core 0 (the single node's
//! "leader") through the same revoke.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;
use crate::mvcc::lease::{
    log_shard, LeaseGrantResponse, LeaseKeepAliveResponse, LeaseLeasesResponse,
    LeaseRevokeResponse, LeaseTimeToLiveResponse,
};

/// What a lease operation asks of one shard.
pub(super) enum LeaseOp {
    /// Durably log a grant (`Some(ttl)`) or a revoke (`None`).
    Log(i64, Option<i64>, Reply<()>),
    /// The shard's keys attached to a lease.
    Keys(i64, Reply<Vec<Bytes>>),
    /// Shard 0 only: validate, log and install an auth change (`Shard::log_auth`). It rides
    /// here because, like lease records, it is a record of shard 0's log with no revision.
    Auth(
        crate::auth::AuthOp,
        Reply<std::result::Result<crate::auth::AuthReply, crate::auth::AuthError>>,
    ),
    /// Shard 0 only: log and install an alarm change (`Shard::log_alarm`), for the same reason.
    Alarm(crate::alarm::AlarmOp, Reply<Option<crate::alarm::Alarm>>),
}

impl LeaseOp {
    pub(super) fn reply_err(self, err: Error) {
        match self {
            LeaseOp::Log(_, _, r) => drop(r.send(Err(err))),
            LeaseOp::Keys(_, r) => drop(r.send(Err(err))),
            LeaseOp::Auth(_, r) => drop(r.send(Err(err))),
            LeaseOp::Alarm(_, r) => drop(r.send(Err(err))),
        }
    }

    pub(super) async fn run(self, shard: &Shard) {
        match self {
            LeaseOp::Log(id, grant, r) => drop(r.send(shard.log_lease(id, grant).await)),
            LeaseOp::Keys(id, r) => drop(r.send(shard.lease_keys(id).await)),
            LeaseOp::Auth(op, r) => drop(r.send(shard.log_auth(op).await)),
            LeaseOp::Alarm(op, r) => drop(r.send(shard.log_alarm(op).await)),
        }
    }
}

/// How often the expiry task looks for expired leases (etcd checks every 500 ms).
const EXPIRY_CHECK: Duration = Duration::from_millis(500);

/// A revoke retries when a key left the lease between gathering and deleting; keys can only
/// leave (no put can attach to a lease being revoked), so this converges quickly.
const REVOKE_ATTEMPTS: usize = 16;

/// Where lease operations run: inside an executor ([`LocalDb`]) or from any thread ([`Db`]).
trait Backend {
    fn shared(&self) -> &Shared;
    async fn shard_call<T>(&self, shard: u32, make: impl FnOnce(Reply<T>) -> ShardOp) -> Result<T>;
    async fn write(&self, txn: TxnRequest) -> Result<TxnResponse>;
}

impl Backend for LocalDb {
    fn shared(&self) -> &Shared {
        &self.core.shared
    }
    async fn shard_call<T>(&self, shard: u32, make: impl FnOnce(Reply<T>) -> ShardOp) -> Result<T> {
        self.core.call(shard, make).await
    }
    async fn write(&self, txn: TxnRequest) -> Result<TxnResponse> {
        self.txn_unchecked(txn).await
    }
}

impl Backend for Db {
    fn shared(&self) -> &Shared {
        &self.inner.shared
    }
    async fn shard_call<T>(&self, shard: u32, make: impl FnOnce(Reply<T>) -> ShardOp) -> Result<T> {
        let (tx, rx) = oneshot();
        let core = self.inner.shared.core_of(shard);
        self.send(core, Msg::Shard(shard, make(tx)))?;
        wait_async(rx).await
    }
    async fn write(&self, txn: TxnRequest) -> Result<TxnResponse> {
        wait_async(self.submit_txn(txn)?).await
    }
}

fn table(shared: &Shared) -> std::sync::RwLockWriteGuard<'_, crate::mvcc::lease::LeaseTable> {
    shared.leases.write().unwrap_or_else(|p| p.into_inner())
}

fn header(shared: &Shared) -> ResponseHeader {
    ResponseHeader {
        revision: shared.clock.read_revision(),
    }
}

async fn grant(b: &impl Backend, id: i64, ttl: i64) -> Result<LeaseGrantResponse> {
    let shared = b.shared();
    let (id, ttl) = table(shared).reserve(id, ttl, Instant::now())?;
    let shard = log_shard(id, shared.nshards);
    let logged = b
        .shard_call(shard, |r| ShardOp::Lease(LeaseOp::Log(id, Some(ttl), r)))
        .await;
    match logged {
        Ok(()) => table(shared).confirm(id, Instant::now()),
        Err(e) => {
            table(shared).cancel(id);
            return Err(e);
        }
    }
    Ok(LeaseGrantResponse {
        header: header(shared),
        id,
        ttl,
    })
}

/// Every shard's keys attached to `id`, in key order.
async fn attached(b: &impl Backend, id: i64) -> Result<Vec<Bytes>> {
    let mut keys = Vec::new();
    for s in 0..b.shared().nshards {
        keys.extend(
            b.shard_call(s, |r| ShardOp::Lease(LeaseOp::Keys(id, r)))
                .await?,
        );
    }
    keys.sort();
    Ok(keys)
}

async fn revoke(b: &impl Backend, id: i64) -> Result<LeaseRevokeResponse> {
    let shared = b.shared();
    table(shared).begin_revoke(id)?;
    let result = async {
        delete_attached(b, id).await?;
        let shard = log_shard(id, shared.nshards);
        b.shard_call(shard, |r| ShardOp::Lease(LeaseOp::Log(id, None, r)))
            .await
    }
    .await;
    match result {
        Ok(()) => table(shared).finish_revoke(id),
        Err(e) => {
            table(shared).abort_revoke(id);
            return Err(e);
        }
    }
    Ok(LeaseRevokeResponse {
        header: header(shared),
    })
}

/// Deletes every key attached to `id` at one revision: a txn whose compares require each key to
/// still carry the lease (a key re-put without it meanwhile must survive, as in etcd, where a
/// revoke is one atomic step).
async fn delete_attached(b: &impl Backend, id: i64) -> Result<()> {
    for _ in 0..REVOKE_ATTEMPTS {
        let keys = attached(b, id).await?;
        if keys.is_empty() {
            return Ok(());
        }
        let txn = TxnRequest {
            compare: keys
                .iter()
                .map(|k| Compare::lease(k.clone(), CompareResult::Equal, id))
                .collect(),
            success: keys
                .into_iter()
                .map(|key| {
                    RequestOp::DeleteRange(DeleteRangeRequest {
                        key,
                        range_end: Bytes::new(),
                        prev_kv: false,
                    })
                })
                .collect(),
            failure: vec![],
        };
        if b.write(txn).await?.succeeded {
            return Ok(());
        }
    }
    Err(Error::InvalidArgument(format!(
        "lease {id}: its keys kept changing during revoke"
    )))
}

fn keep_alive(shared: &Shared, id: i64) -> LeaseKeepAliveResponse {
    let ttl = table(shared).renew(id, Instant::now()).unwrap_or(0);
    LeaseKeepAliveResponse {
        header: header(shared),
        id,
        ttl,
    }
}

async fn time_to_live(b: &impl Backend, id: i64, keys: bool) -> Result<LeaseTimeToLiveResponse> {
    let shared = b.shared();
    let hdr = header(shared);
    let found = shared
        .leases
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .time_to_live(id, Instant::now());
    let Some(t) = found else {
        return Ok(LeaseTimeToLiveResponse {
            header: hdr,
            id,
            ttl: -1,
            ..Default::default()
        });
    };
    Ok(LeaseTimeToLiveResponse {
        header: hdr,
        id,
        ttl: t.remaining,
        granted_ttl: t.granted,
        keys: if keys { attached(b, id).await? } else { vec![] },
    })
}

fn leases(shared: &Shared) -> LeaseLeasesResponse {
    let ids = shared
        .leases
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .ids();
    LeaseLeasesResponse {
        header: header(shared),
        leases: ids,
    }
}

/// Revokes expired leases every [`EXPIRY_CHECK`]; runs on core 0 for the life of the store.
pub(super) async fn expiry_loop(db: LocalDb) {
    let mut leading = db.core.shared.cluster.is_none();
    loop {
        glommio::timer::sleep(EXPIRY_CHECK).await;
        if let Some(cl) = &db.core.shared.cluster {
            // Expiry runs where writes do: on the node that leads every shard. Keep-alives reach
            // only that node, so a node that takes over gives every lease a full TTL from now,
            // as etcd's new leaders do.
            let now_leading = cl.gate.all();
            if now_leading && !leading {
                refresh_all(&db.core.shared, Instant::now());
            }
            leading = now_leading;
            if !leading {
                continue;
            }
        }
        let expired = table(&db.core.shared).expired(Instant::now());
        for id in expired {
            match revoke(&db, id).await {
                Ok(_) => tracing::debug!(lease = id, "lease expired and was revoked"),
                Err(Error::LeaseNotFound) => {} // revoked by a client meanwhile
                Err(Error::Closed) => return,
                Err(e) => {
                    tracing::warn!(lease = id, error = %e, "revoking an expired lease failed")
                }
            }
        }
    }
}

/// Every lease expires a full granted TTL from `now`.
fn refresh_all(shared: &Shared, now: Instant) {
    let Ok(mut t) = shared.leases.write() else {
        return;
    };
    for id in t.ids() {
        if let Some(ttl) = t.time_to_live(id, now) {
            t.restore(id, ttl.granted, now);
        }
    }
}

impl LocalDb {
    /// The node's auth state, shared by every core.
    pub fn auth(&self) -> &std::sync::Arc<crate::auth::SharedAuth> {
        &self.core.shared.auth
    }

    /// Logs an auth change in shard 0's log and installs it (etcd's Auth admin calls). The
    /// outer error is the store's (not leader, no room, …); the inner one is the op's own
    /// refusal, with etcd's message, after which nothing was logged.
    pub async fn auth_change(
        &self,
        op: crate::auth::AuthOp,
    ) -> Result<std::result::Result<crate::auth::AuthReply, crate::auth::AuthError>> {
        self.core.wait_writable().await?;
        self.core
            .call(0, |r| ShardOp::Lease(LeaseOp::Auth(op, r)))
            .await
    }

    /// The node's alarms, shared by every core.
    pub fn alarms(&self) -> &std::sync::Arc<crate::alarm::SharedAlarms> {
        &self.core.shared.alarms
    }

    /// Raises or disarms an alarm through shard 0's log (etcd's Alarm call, and the quota and
    /// corruption checks); `None` when the set already was that way.
    pub async fn alarm_change(
        &self,
        op: crate::alarm::AlarmOp,
    ) -> Result<Option<crate::alarm::Alarm>> {
        self.core.wait_writable().await?;
        self.core
            .call(0, |r| ShardOp::Lease(LeaseOp::Alarm(op, r)))
            .await
    }

    /// etcd's LeaseGrant: `id` 0 picks a fresh id; durable when it returns.
    pub async fn lease_grant(&self, id: i64, ttl: i64) -> Result<LeaseGrantResponse> {
        self.core.wait_writable().await?;
        grant(self, id, ttl).await
    }

    /// etcd's LeaseRevoke: deletes the attached keys (one revision), then the lease.
    pub async fn lease_revoke(&self, id: i64) -> Result<LeaseRevokeResponse> {
        self.core.wait_writable().await?;
        revoke(self, id).await
    }

    /// One keep-alive: renews to the full TTL; TTL 0 if the lease does not exist.
    pub fn lease_keep_alive(&self, id: i64) -> LeaseKeepAliveResponse {
        keep_alive(&self.core.shared, id)
    }

    pub async fn lease_time_to_live(&self, id: i64, keys: bool) -> Result<LeaseTimeToLiveResponse> {
        time_to_live(self, id, keys).await
    }

    pub fn lease_leases(&self) -> LeaseLeasesResponse {
        leases(&self.core.shared)
    }

    /// Every live lease with its granted TTL, by id (what a snapshot records).
    pub fn lease_grants(&self) -> Vec<(i64, i64)> {
        let now = Instant::now();
        let leases = self
            .core
            .shared
            .leases
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<(i64, i64)> = leases
            .ids()
            .into_iter()
            .filter_map(|id| leases.time_to_live(id, now).map(|t| (id, t.granted)))
            .collect();
        out.sort_unstable();
        out
    }
}

impl Db {
    /// etcd's LeaseGrant: `id` 0 picks a fresh id; durable when it returns.
    pub fn lease_grant(&self, id: i64, ttl: i64) -> Result<LeaseGrantResponse> {
        futures_lite::future::block_on(self.lease_grant_async(id, ttl))
    }

    pub async fn lease_grant_async(&self, id: i64, ttl: i64) -> Result<LeaseGrantResponse> {
        self.check_open()?;
        grant(self, id, ttl).await
    }

    /// etcd's LeaseRevoke: deletes the attached keys (one revision), then the lease.
    pub fn lease_revoke(&self, id: i64) -> Result<LeaseRevokeResponse> {
        futures_lite::future::block_on(self.lease_revoke_async(id))
    }

    pub async fn lease_revoke_async(&self, id: i64) -> Result<LeaseRevokeResponse> {
        self.check_open()?;
        revoke(self, id).await
    }

    /// One keep-alive: renews to the full TTL; TTL 0 if the lease does not exist.
    pub fn lease_keep_alive(&self, id: i64) -> Result<LeaseKeepAliveResponse> {
        self.check_open()?;
        Ok(keep_alive(&self.inner.shared, id))
    }

    pub async fn lease_keep_alive_async(&self, id: i64) -> Result<LeaseKeepAliveResponse> {
        self.lease_keep_alive(id)
    }

    /// Remaining and granted TTL (TTL -1 for an unknown lease), and the keys if asked.
    pub fn lease_time_to_live(&self, id: i64, keys: bool) -> Result<LeaseTimeToLiveResponse> {
        futures_lite::future::block_on(self.lease_time_to_live_async(id, keys))
    }

    pub async fn lease_time_to_live_async(
        &self,
        id: i64,
        keys: bool,
    ) -> Result<LeaseTimeToLiveResponse> {
        self.check_open()?;
        time_to_live(self, id, keys).await
    }

    pub fn lease_leases(&self) -> Result<LeaseLeasesResponse> {
        self.check_open()?;
        Ok(leases(&self.inner.shared))
    }

    pub async fn lease_leases_async(&self) -> Result<LeaseLeasesResponse> {
        self.lease_leases()
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        Ok(())
    }
}
