//! Leases, IO-free: the lease table (grant, renew, revoke, expiry) and the per-shard index of the
//! keys attached to each lease.
//!
//! Time is always an argument (`now`), never read here, so the table's behaviour is a pure
//! function of its inputs and the tests can drive hours of lease life in microseconds. The
//! service around it (`db::lease`) owns the clock, logs grants and revokes durably, and deletes a
//! revoked lease's keys through the ordinary multi-shard write path.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::kv::ResponseHeader;

/// etcd's `MaxLeaseTTL`: larger grants fail with `etcdserver: too large lease TTL`.
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;

/// etcd raises shorter TTLs to `ceil(1.5 × election timeout)` seconds, which with its default
/// 1000 ms election timeout is 2 s (`etcdctl lease grant 1` answers TTL 2). A single node has no
/// election, but clients observe the minimum, so it is kept.
pub const MIN_LEASE_TTL: i64 = 2;

/// The TTL a grant actually gets.
pub fn effective_ttl(requested: i64) -> Result<i64> {
    if requested > MAX_LEASE_TTL {
        return Err(Error::LeaseTtlTooLarge);
    }
    Ok(requested.max(MIN_LEASE_TTL))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Reserved by a grant whose record is not durable yet: not usable, but the id is taken.
    Pending,
    Live,
    /// Being revoked: no longer usable (puts naming it fail), keys are being deleted.
    Revoking,
}

#[derive(Clone, Debug)]
struct Lease {
    /// Granted TTL in seconds (after raising to the minimum).
    ttl: i64,
    expiry: Instant,
    state: State,
}

/// `LeaseTimeToLive`'s numbers for a lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeToLive {
    /// Seconds left, truncated toward zero as etcd does (`int64(remaining.Seconds())`).
    pub remaining: i64,
    pub granted: i64,
}

/// Every lease and its expiry. Ids are never 0 (0 means "no lease" everywhere in the API).
#[derive(Debug)]
pub struct LeaseTable {
    leases: HashMap<i64, Lease>,
    /// Next candidate for a server-chosen id.
    next_id: i64,
}

impl LeaseTable {
    /// `id_seed` is where generated ids start (callers pass something time-based so ids are not
    /// reused across restarts of an empty table); it is masked to a positive value.
    pub fn new(id_seed: u64) -> Self {
        LeaseTable {
            leases: HashMap::new(),
            next_id: ((id_seed & (i64::MAX as u64)) as i64).max(1),
        }
    }

    /// A fresh positive id not in the table.
    fn generate_id(&mut self) -> i64 {
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.checked_add(1).unwrap_or(1);
            if id > 0 && !self.leases.contains_key(&id) {
                return id;
            }
        }
    }

    /// Takes an id for a grant (generating one for `id == 0`) and holds it as pending until
    /// [`Self::confirm`] or [`Self::cancel`], so two concurrent grants of one id cannot both pass.
    /// Returns the id and the granted TTL.
    pub fn reserve(&mut self, id: i64, ttl: i64, now: Instant) -> Result<(i64, i64)> {
        let ttl = effective_ttl(ttl)?;
        let id = if id == 0 { self.generate_id() } else { id };
        if self.leases.contains_key(&id) {
            return Err(Error::LeaseExists);
        }
        self.leases.insert(
            id,
            Lease {
                ttl,
                expiry: now + secs(ttl),
                state: State::Pending,
            },
        );
        Ok((id, ttl))
    }

    /// The reserved lease's grant is durable: it is usable, expiring `ttl` after `now`.
    pub fn confirm(&mut self, id: i64, now: Instant) {
        if let Some(l) = self.leases.get_mut(&id) {
            if l.state == State::Pending {
                l.state = State::Live;
                l.expiry = now + secs(l.ttl);
            }
        }
    }

    /// The reserved lease's grant failed: the id is free again.
    pub fn cancel(&mut self, id: i64) {
        if self
            .leases
            .get(&id)
            .is_some_and(|l| l.state == State::Pending)
        {
            self.leases.remove(&id);
        }
    }

    /// Inserts a lease known to be durable (recovery), expiring a full TTL after `now`.
    pub fn restore(&mut self, id: i64, ttl: i64, now: Instant) {
        if id == 0 {
            return;
        }
        self.leases.insert(
            id,
            Lease {
                ttl,
                expiry: now + secs(ttl),
                state: State::Live,
            },
        );
    }

    /// Whether puts may attach keys to `id`.
    pub fn is_live(&self, id: i64) -> bool {
        self.leases.get(&id).is_some_and(|l| l.state == State::Live)
    }

    /// Starts revoking `id`: from now on puts naming it fail. `LeaseNotFound` if it is not live
    /// (unknown, still pending, or already being revoked).
    pub fn begin_revoke(&mut self, id: i64) -> Result<i64> {
        match self.leases.get_mut(&id) {
            Some(l) if l.state == State::Live => {
                l.state = State::Revoking;
                Ok(l.ttl)
            }
            _ => Err(Error::LeaseNotFound),
        }
    }

    /// A revoke failed before it was logged: the lease is live again (with its old expiry).
    pub fn abort_revoke(&mut self, id: i64) {
        if let Some(l) = self.leases.get_mut(&id) {
            if l.state == State::Revoking {
                l.state = State::Live;
            }
        }
    }

    /// The revoke is durable: the lease is gone.
    pub fn finish_revoke(&mut self, id: i64) {
        self.leases.remove(&id);
    }

    /// etcd's renew: the lease expires a full TTL from `now`; returns that TTL. `None` when the
    /// lease is unknown, not live, or already expired (it is about to be revoked).
    pub fn renew(&mut self, id: i64, now: Instant) -> Option<i64> {
        let l = self.leases.get_mut(&id)?;
        if l.state != State::Live || l.expiry <= now {
            return None;
        }
        l.expiry = now + secs(l.ttl);
        Some(l.ttl)
    }

    /// Remaining and granted TTL of a live or revoking lease.
    pub fn time_to_live(&self, id: i64, now: Instant) -> Option<TimeToLive> {
        let l = self.leases.get(&id)?;
        if l.state == State::Pending {
            return None;
        }
        let remaining_ms = if l.expiry >= now {
            (l.expiry - now).as_millis() as i64
        } else {
            -((now - l.expiry).as_millis() as i64)
        };
        Some(TimeToLive {
            remaining: remaining_ms / 1000,
            granted: l.ttl,
        })
    }

    /// Ids of every lease that exists (live or being revoked), ascending.
    pub fn ids(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, l)| l.state != State::Pending)
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Live leases whose expiry is at or before `now`, soonest first.
    pub fn expired(&self, now: Instant) -> Vec<i64> {
        let mut out: Vec<(Instant, i64)> = self
            .leases
            .iter()
            .filter(|(_, l)| l.state == State::Live && l.expiry <= now)
            .map(|(id, l)| (l.expiry, *id))
            .collect();
        out.sort_unstable();
        out.into_iter().map(|(_, id)| id).collect()
    }

    pub fn len(&self) -> usize {
        self.leases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }
}

/// The lease table as every core shares it: puts check liveness under the read lock (a hash
/// lookup, no cross-core message); grants, renewals and revokes take the write lock briefly.
pub type SharedLeases = Arc<RwLock<LeaseTable>>;

/// Which shard's log holds lease `id`'s grant and revoke records: spread by id, fixed for a data
/// dir because its shard count is.
pub fn log_shard(id: i64, nshards: u32) -> u32 {
    ((id as u64) % u64::from(nshards.max(1))) as u32
}

/// LeaseGrant's answer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseGrantResponse {
    pub header: ResponseHeader,
    pub id: i64,
    /// The granted TTL (raised to [`MIN_LEASE_TTL`]).
    pub ttl: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseRevokeResponse {
    pub header: ResponseHeader,
}

/// One keep-alive answer; `ttl` 0 means the lease does not exist (etcd's convention).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseKeepAliveResponse {
    pub header: ResponseHeader,
    pub id: i64,
    pub ttl: i64,
}

/// `ttl` -1 (and `granted_ttl` 0) means the lease does not exist, as etcd answers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseTimeToLiveResponse {
    pub header: ResponseHeader,
    pub id: i64,
    pub ttl: i64,
    pub granted_ttl: i64,
    /// Attached keys in key order, when asked for.
    pub keys: Vec<Bytes>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseLeasesResponse {
    pub header: ResponseHeader,
    pub leases: Vec<i64>,
}

fn secs(s: i64) -> Duration {
    Duration::from_secs(s.max(0) as u64)
}

/// Which keys (of one shard) are attached to which lease. The MVCC store keeps it in step with
/// every change of a key's latest state, so revoke and `TimeToLive --keys` need no scan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseKeys {
    by_lease: HashMap<i64, BTreeSet<Bytes>>,
}

impl LeaseKeys {
    /// The key's live lease changed from `old` to `new` (0 = none, or the key is not live).
    pub fn moved(&mut self, key: &Bytes, old: i64, new: i64) {
        if old == new {
            return;
        }
        if old != 0 {
            if let Some(set) = self.by_lease.get_mut(&old) {
                set.remove(key.as_ref());
                if set.is_empty() {
                    self.by_lease.remove(&old);
                }
            }
        }
        if new != 0 {
            self.by_lease.entry(new).or_default().insert(key.clone());
        }
    }

    /// Keys attached to `lease`, in key order.
    pub fn keys(&self, lease: i64) -> Vec<Bytes> {
        self.by_lease
            .get(&lease)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Number of (lease, key) attachments.
    pub fn len(&self) -> usize {
        self.by_lease.values().map(BTreeSet::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.by_lease.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t0() -> Instant {
        Instant::now()
    }

    fn grant(t: &mut LeaseTable, id: i64, ttl: i64, now: Instant) -> Result<(i64, i64)> {
        let (id, ttl) = t.reserve(id, ttl, now)?;
        t.confirm(id, now);
        Ok((id, ttl))
    }

    #[test]
    fn ttl_bounds_follow_etcd() {
        assert_eq!(effective_ttl(1).unwrap(), 2);
        assert_eq!(effective_ttl(0).unwrap(), 2);
        assert_eq!(effective_ttl(-5).unwrap(), 2);
        assert_eq!(effective_ttl(60).unwrap(), 60);
        assert_eq!(effective_ttl(MAX_LEASE_TTL).unwrap(), MAX_LEASE_TTL);
        assert!(matches!(
            effective_ttl(MAX_LEASE_TTL + 1),
            Err(Error::LeaseTtlTooLarge)
        ));
    }

    #[test]
    fn grant_generates_unique_ids_and_refuses_duplicates() {
        let now = t0();
        let mut t = LeaseTable::new(5);
        let (a, _) = grant(&mut t, 0, 10, now).unwrap();
        let (b, _) = grant(&mut t, 0, 10, now).unwrap();
        assert!(a > 0 && b > 0 && a != b);
        // A generated id skips ids granted explicitly.
        grant(&mut t, 7, 10, now).unwrap();
        let (c, _) = grant(&mut t, 0, 10, now).unwrap();
        assert_ne!(c, 7);
        assert!(matches!(grant(&mut t, 7, 10, now), Err(Error::LeaseExists)));
        // A pending reservation also holds the id.
        t.reserve(9, 10, now).unwrap();
        assert!(!t.is_live(9));
        assert!(matches!(t.reserve(9, 10, now), Err(Error::LeaseExists)));
        t.cancel(9);
        assert!(t.reserve(9, 10, now).is_ok());
    }

    #[test]
    fn generated_ids_stay_positive_at_the_top_of_the_range() {
        let now = t0();
        let mut t = LeaseTable::new(u64::MAX);
        for _ in 0..3 {
            let (id, _) = grant(&mut t, 0, 10, now).unwrap();
            assert!(id > 0);
        }
    }

    #[test]
    fn renew_expiry_and_time_to_live() {
        let now = t0();
        let mut t = LeaseTable::new(1);
        let (id, ttl) = grant(&mut t, 0, 10, now).unwrap();
        assert_eq!(ttl, 10);
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        assert_eq!(t.time_to_live(id, now + ms(300)).unwrap().remaining, 9);
        assert_eq!(
            t.time_to_live(id, now).unwrap(),
            TimeToLive {
                remaining: 10,
                granted: 10
            }
        );
        assert!(t.expired(now + ms(9_999)).is_empty());
        assert_eq!(t.renew(id, now + s(8)), Some(10));
        assert!(t.expired(now + s(17)).is_empty());
        assert_eq!(t.expired(now + s(18)), vec![id]);
        // Once expired, a renewal is too late: the lease is about to be revoked.
        assert_eq!(t.renew(id, now + s(18)), None);
        assert_eq!(t.time_to_live(id, now + ms(18_500)).unwrap().remaining, 0);
        assert_eq!(t.time_to_live(id, now + s(20)).unwrap().remaining, -2);
        assert_eq!(t.renew(12345, now), None);
        assert_eq!(t.time_to_live(12345, now), None);
    }

    #[test]
    fn revoke_lifecycle() {
        let now = t0();
        let mut t = LeaseTable::new(1);
        let (id, _) = grant(&mut t, 0, 10, now).unwrap();
        assert!(t.is_live(id));
        assert_eq!(t.begin_revoke(id).unwrap(), 10);
        assert!(!t.is_live(id));
        assert!(matches!(t.begin_revoke(id), Err(Error::LeaseNotFound)));
        assert_eq!(t.renew(id, now), None);
        assert!(t.expired(now + Duration::from_secs(60)).is_empty());
        assert_eq!(t.ids(), vec![id]);
        t.abort_revoke(id);
        assert!(t.is_live(id));
        t.begin_revoke(id).unwrap();
        t.finish_revoke(id);
        assert!(t.ids().is_empty());
        assert!(matches!(t.begin_revoke(id), Err(Error::LeaseNotFound)));
    }

    #[test]
    fn restore_refreshes_to_the_full_ttl() {
        let now = t0();
        let mut t = LeaseTable::new(1);
        t.restore(42, 30, now);
        assert!(t.is_live(42));
        assert_eq!(t.time_to_live(42, now).unwrap().remaining, 30);
        t.restore(0, 30, now);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn lease_keys_follow_moves() {
        let mut k = LeaseKeys::default();
        let a = Bytes::from_static(b"a");
        let b = Bytes::from_static(b"b");
        k.moved(&a, 0, 1);
        k.moved(&b, 0, 1);
        assert_eq!(k.keys(1), vec![a.clone(), b.clone()]);
        k.moved(&a, 1, 2);
        assert_eq!(k.keys(1), vec![b.clone()]);
        assert_eq!(k.keys(2), vec![a.clone()]);
        k.moved(&b, 1, 0);
        k.moved(&a, 2, 2);
        assert!(k.keys(1).is_empty());
        assert_eq!(k.len(), 1);
        k.moved(&a, 2, 0);
        assert!(k.is_empty());
    }

    /// The store's attachment index follows puts (with, without and keeping a lease), deletes,
    /// rollback of an aborted part, WAL replay and reloading from a checkpoint export.
    #[test]
    fn store_tracks_attachments() {
        use crate::kv::{DeleteRangeRequest, PutRequest, RequestOp, TxnRequest};
        use crate::mvcc::{ShardStore, TxnPath};
        let all = |_: &[u8]| true;
        let one = |op: RequestOp| TxnRequest {
            compare: vec![],
            success: vec![op],
            failure: vec![],
        };
        let put = |k: &'static str, lease: i64, ignore_lease: bool| {
            one(RequestOp::Put(PutRequest {
                lease,
                ignore_lease,
                ..PutRequest::new(k, "v")
            }))
        };
        let path = TxnPath(vec![true]);
        let b = |k: &'static str| Bytes::from_static(k.as_bytes());
        let mut s = ShardStore::new();
        let mut log = Vec::new();
        let run = |s: &mut ShardStore,
                   log: &mut Vec<(Vec<crate::mvcc::Effect>, i64)>,
                   txn: TxnRequest,
                   rev: i64| {
            let ex = s.execute(&txn, &path, rev, &all);
            log.push((ex.effects.clone(), rev));
            ex
        };
        run(&mut s, &mut log, put("a", 1, false), 2);
        run(&mut s, &mut log, put("b", 1, false), 3);
        run(&mut s, &mut log, put("c", 1, false), 4);
        assert_eq!(s.lease_keys(1), vec![b("a"), b("b"), b("c")]);
        run(&mut s, &mut log, put("a", 0, false), 5); // a put without a lease detaches
        run(&mut s, &mut log, put("b", 0, true), 6); // ignore_lease keeps it
        run(&mut s, &mut log, put("c", 2, false), 7); // moves to another lease
        assert_eq!(s.lease_keys(1), vec![b("b")]);
        assert_eq!(s.lease_keys(2), vec![b("c")]);
        let ex = run(
            &mut s,
            &mut log,
            one(RequestOp::DeleteRange(DeleteRangeRequest::key("b"))),
            8,
        );
        assert!(s.lease_keys(1).is_empty());
        // Undoing the delete (an aborted part) attaches the key again.
        s.rollback(ex.undo);
        log.pop();
        assert_eq!(s.lease_keys(1), vec![b("b")]);
        let ex = run(&mut s, &mut log, put("d", 2, false), 8);
        s.rollback(ex.undo);
        log.pop();
        assert_eq!(s.lease_keys(2), vec![b("c")]);
        // Replay and reload rebuild the same index.
        let mut replayed = ShardStore::new();
        for (effects, rev) in &log {
            replayed.apply(effects, *rev);
        }
        let reloaded = ShardStore::from_histories(
            s.export_keys(None, 100, s.last_revision()),
            s.last_revision(),
            0,
        );
        for other in [&replayed, &reloaded] {
            for lease in [1, 2] {
                assert_eq!(other.lease_keys(lease), s.lease_keys(lease));
            }
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Grant(i64, i64),
        Revoke(i64),
        Renew(i64),
        Advance(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0i64..6, -3i64..20).prop_map(|(id, ttl)| Op::Grant(id, ttl)),
            (0i64..6).prop_map(Op::Revoke),
            (0i64..6).prop_map(Op::Renew),
            (0u64..8000).prop_map(Op::Advance),
        ]
    }

    proptest! {
        /// Against a model: a lease exists from its grant until its revoke or until its expiry is
        /// reported, `expired` reports exactly the leases whose deadline (last grant or renewal
        /// plus TTL) has passed, and TTL-to-live never exceeds the granted TTL.
        #[test]
        fn table_matches_model(ops in proptest::collection::vec(op(), 1..80)) {
            let start = Instant::now();
            let mut now = start;
            let mut t = LeaseTable::new(100);
            // id -> (ttl, deadline)
            let mut model: HashMap<i64, (i64, Instant)> = HashMap::new();
            for op in ops {
                match op {
                    Op::Grant(id, ttl) => {
                        let r = grant(&mut t, id, ttl, now);
                        if id != 0 && model.contains_key(&id) {
                            prop_assert!(matches!(r, Err(Error::LeaseExists)));
                        } else {
                            let (got, g) = r.unwrap();
                            prop_assert!(got != 0);
                            prop_assert_eq!(g, ttl.max(MIN_LEASE_TTL));
                            prop_assert!(!model.contains_key(&got));
                            model.insert(got, (g, now + secs(g)));
                        }
                    }
                    Op::Revoke(id) => {
                        let r = t.begin_revoke(id);
                        prop_assert_eq!(r.is_ok(), model.contains_key(&id));
                        if r.is_ok() {
                            t.finish_revoke(id);
                            model.remove(&id);
                        }
                    }
                    Op::Renew(id) => {
                        let r = t.renew(id, now);
                        match model.get_mut(&id) {
                            Some((ttl, deadline)) if *deadline > now => {
                                prop_assert_eq!(r, Some(*ttl));
                                *deadline = now + secs(*ttl);
                            }
                            _ => prop_assert_eq!(r, None),
                        }
                    }
                    Op::Advance(ms) => now += Duration::from_millis(ms),
                }
                let mut want: Vec<(Instant, i64)> = model
                    .iter()
                    .filter(|(_, (_, d))| *d <= now)
                    .map(|(id, (_, d))| (*d, *id))
                    .collect();
                want.sort_unstable();
                let want: Vec<i64> = want.into_iter().map(|(_, id)| id).collect();
                prop_assert_eq!(t.expired(now), want);
                let mut ids: Vec<i64> = model.keys().copied().collect();
                ids.sort_unstable();
                prop_assert_eq!(t.ids(), ids);
                for (id, (ttl, _)) in &model {
                    let ttl_now = t.time_to_live(*id, now).unwrap();
                    prop_assert_eq!(ttl_now.granted, *ttl);
                    prop_assert!(ttl_now.remaining <= *ttl);
                }
            }
        }

        /// The attachment index equals a model map key -> lease after any sequence of moves.
        #[test]
        fn lease_keys_match_model(moves in proptest::collection::vec((0u8..6, 0i64..4), 0..60)) {
            let mut k = LeaseKeys::default();
            let mut model: HashMap<u8, i64> = HashMap::new();
            for (key, lease) in moves {
                let old = model.get(&key).copied().unwrap_or(0);
                k.moved(&Bytes::from(vec![key]), old, lease);
                model.insert(key, lease);
            }
            for lease in 1..4 {
                let mut want: Vec<Bytes> = model
                    .iter()
                    .filter(|(_, l)| **l == lease)
                    .map(|(key, _)| Bytes::from(vec![*key]))
                    .collect();
                want.sort();
                prop_assert_eq!(k.keys(lease), want);
            }
            prop_assert_eq!(k.len(), model.values().filter(|l| **l != 0).count());
        }
    }
}
