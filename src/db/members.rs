//! Membership changes on a cluster member: etcd's MemberAdd, MemberRemove, MemberUpdate and
//! MemberPromote, and keeping every shard's group in step with them.
//!
//! Shard 0's group carries membership: a change is one Raft conf change entry there, with the
//! member's record (name, peer URLs) as its context, and takes effect on every member when that
//! entry is applied (`ClusterState::apply_change`: record, `cluster.json`, peer table). The other
//! shards' groups follow: the member leading a group proposes, one single-step change at a time,
//! whatever its membership lacks compared to shard 0's (`Core::reconcile_groups`, every tick).
//! Groups may lag shard 0 by a change for a tick or two; each group's own changes are single-step,
//! so its old and new majorities overlap as Raft requires.

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::cluster::ClusterState;
use super::core::{Core, ShardOp};
use crate::cluster::{member_id, Member, PeerUrlError};
use crate::engine::shard::Shard;
use crate::error::{Error, Result};
use crate::peer::PeerInfo;
use crate::raft::{ConfChange, ConfState, Role};

/// A member counts as started and connected when shard 0's leader heard from it this recently
/// (etcd's health interval).
const ACTIVE_WINDOW: Duration = Duration::from_secs(5);

/// At most this many learners at once, as etcd 3.4 allows.
const MAX_LEARNERS: usize = 1;

/// A learner may be promoted once it holds this share of the leader's log (etcd's rule).
const LEARNER_READY: f64 = 0.9;

/// A membership change a client asked for.
#[derive(Clone, Debug)]
pub(super) enum MemberOp {
    Add {
        peer_urls: Vec<String>,
        learner: bool,
    },
    Remove(u64),
    Update(u64, Vec<String>),
    Promote(u64),
}

impl super::LocalDb {
    /// etcd's MemberAdd: returns the new member (unnamed until it starts).
    pub async fn member_add(&self, peer_urls: Vec<String>, learner: bool) -> Result<Member> {
        let id = self
            .member_op(MemberOp::Add {
                peer_urls: peer_urls.clone(),
                learner,
            })
            .await?;
        Ok(Member {
            id,
            name: String::new(),
            peer_urls,
            client_urls: Vec::new(),
            is_learner: learner,
        })
    }

    pub async fn member_remove(&self, id: u64) -> Result<()> {
        self.member_op(MemberOp::Remove(id)).await.map(drop)
    }

    pub async fn member_update(&self, id: u64, peer_urls: Vec<String>) -> Result<()> {
        self.member_op(MemberOp::Update(id, peer_urls))
            .await
            .map(drop)
    }

    pub async fn member_promote(&self, id: u64) -> Result<()> {
        self.member_op(MemberOp::Promote(id)).await.map(drop)
    }

    /// How long a request waits for leadership to settle in a cluster (two election timeouts;
    /// zero on a single node).
    pub fn leader_patience(&self) -> Duration {
        self.core
            .shared
            .cluster
            .as_ref()
            .map_or(Duration::ZERO, |c| c.patience())
    }

    /// Whether this member is a learner (replicates, does not vote).
    pub fn is_learner(&self) -> bool {
        self.core
            .shared
            .cluster
            .as_ref()
            .is_some_and(|c| c.is_learner())
    }

    /// Whether this member applied its own removal (a server stops serving then, as etcd's
    /// removed members do).
    pub fn is_removed(&self) -> bool {
        self.core
            .shared
            .cluster
            .as_ref()
            .is_some_and(|c| c.is_removed())
    }

    /// Runs `op` on the core owning shard 0, whose group carries membership.
    async fn member_op(&self, op: MemberOp) -> Result<u64> {
        if self.core.shared.cluster.is_none() {
            return Err(Error::NotEnoughStartedMembers);
        }
        self.core.call(0, |r| ShardOp::Member(op, r)).await
    }
}

/// Waits until `ready()` holds, checking every few milliseconds; `etcdserver: request timed
/// out` at `deadline`. Membership changes are rare, so polling is simpler than wake-ups.
async fn poll_until(deadline: Instant, ready: impl Fn() -> bool) -> Result<()> {
    while !ready() {
        if Instant::now() >= deadline {
            return Err(Error::Timeout);
        }
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Core {
    /// Checks `op` against the membership as etcd does (with its strict reconfiguration
    /// checks), proposes it in shard 0's group and waits until this member applied it.
    /// Returns the member id concerned.
    pub(super) async fn member_change(&self, shard: &Rc<Shard>, op: MemberOp) -> Result<u64> {
        let Some(cl) = self.shared.cluster.as_ref() else {
            return Err(Error::NotEnoughStartedMembers);
        };
        self.wait_writable().await?;
        // Every group has caught up with the previous change: groups then never differ from
        // shard 0 (or, after a restart, from what a member assumes) by more than one step, and
        // single-step changes keep old and new majorities overlapping.
        let deadline = Instant::now() + cl.patience();
        poll_until(deadline, || cl.groups_synced()).await?;
        let m = cl.membership();
        let me = cl.member_id;
        let voters: Vec<&Member> = m.members.values().filter(|r| !r.is_learner).collect();
        let active = |id: u64| {
            id == me
                || self
                    .heard
                    .borrow()
                    .get(&id)
                    .is_some_and(|t| t.elapsed() < ACTIVE_WINDOW)
        };
        // etcd's strict reconfiguration checks: "started" members have published their name;
        // a change that adds a voter needs every voter connected.
        let started = |except: u64| {
            voters
                .iter()
                .filter(|r| r.id != except && !r.name.is_empty())
                .count()
        };
        let all_connected = || voters.iter().all(|r| active(r.id));
        let urls_ok = |r: std::result::Result<(), PeerUrlError>| {
            r.map_err(|e| match e {
                PeerUrlError::Invalid => Error::MemberBadUrls,
                PeerUrlError::Exists => Error::PeerUrlExists,
            })
        };
        let (cc, record) = match op {
            MemberOp::Add { peer_urls, learner } => {
                urls_ok(m.check_peer_urls(&peer_urls, None))?;
                let id = member_id(&peer_urls, &m.token, Some(unix_now()));
                if m.members.contains_key(&id) {
                    return Err(Error::MemberExists);
                }
                if learner {
                    if m.learners().count() >= MAX_LEARNERS {
                        return Err(Error::TooManyLearners);
                    }
                } else {
                    let (n, up) = (voters.len() + 1, started(0));
                    if !(up == 1 && n == 2) && up < n / 2 + 1 {
                        return Err(Error::NotEnoughStartedMembers);
                    }
                    if !all_connected() {
                        return Err(Error::Unhealthy);
                    }
                }
                let record = Member {
                    id,
                    name: String::new(),
                    peer_urls,
                    client_urls: Vec::new(),
                    is_learner: learner,
                };
                let cc = if learner {
                    ConfChange::AddLearner(id)
                } else {
                    ConfChange::AddVoter(id)
                };
                (cc, Some(record))
            }
            MemberOp::Remove(id) => {
                let target = m.members.get(&id).ok_or(Error::MemberNotFound)?;
                if !target.is_learner {
                    let n = voters.len() - 1;
                    if started(id) < n / 2 + 1 {
                        return Err(Error::NotEnoughStartedMembers);
                    }
                    // A member that is down is safe to remove; removing one that is up must
                    // leave a quorum of the others up.
                    let up = voters.iter().filter(|r| active(r.id)).count();
                    if (id == me || active(id)) && up - 1 < 1 + (voters.len() - 1) / 2 {
                        return Err(Error::Unhealthy);
                    }
                }
                (ConfChange::Remove(id), None)
            }
            MemberOp::Update(id, peer_urls) => {
                let target = m.members.get(&id).ok_or(Error::MemberNotFound)?;
                urls_ok(m.check_peer_urls(&peer_urls, Some(id)))?;
                let mut record = target.clone();
                record.peer_urls = peer_urls;
                (ConfChange::Update(id), Some(record))
            }
            MemberOp::Promote(id) => {
                let target = m.members.get(&id).ok_or(Error::MemberNotFound)?;
                if !target.is_learner {
                    return Err(Error::MemberNotLearner);
                }
                let ready = shard
                    .replica
                    .progress_of(id)
                    .is_some_and(|(matched, _, last)| {
                        matched as f64 >= last as f64 * LEARNER_READY
                    });
                if !ready {
                    return Err(Error::LearnerNotReady);
                }
                let n = voters.len() + 1;
                if started(0) + 1 < n / 2 + 1 {
                    return Err(Error::NotEnoughStartedMembers);
                }
                if !all_connected() {
                    return Err(Error::Unhealthy);
                }
                (ConfChange::PromoteLearner(id), Some(target.clone()))
            }
        };
        let context = match record {
            Some(r) => serde_json::to_vec(&r)
                .map_err(|e| Error::InvalidArgument(format!("member record: {e}")))?,
            None => Vec::new(),
        };
        // A removal leaves the data groups first and shard 0 last: shard 0 is what takes the
        // member off every peer table (and stops it), so until the data groups have committed
        // the change without it, its vote must still reach them.
        let _removing = match cc {
            ConfChange::Remove(id) if self.shared.nshards > 1 => {
                let guard = Removing::start(cl, id);
                poll_until(Instant::now() + 2 * cl.patience(), || cl.groups_synced()).await?;
                Some(guard)
            }
            _ => None,
        };
        // One change at a time per group (a published name may hold the slot briefly): wait
        // for the previous one rather than fail.
        poll_until(deadline, || !shard.replica.conf_change_pending()).await?;
        let term = shard.replica.term();
        let index = shard
            .replica
            .propose_conf_change(&shard.wal, cc, &context)?;
        tracing::info!(change = ?cc, index, "proposed a membership change");
        let deadline = Instant::now() + cl.patience();
        while shard.replica.applied() < index {
            if shard.replica.term() != term || shard.replica.role() != Role::Leader {
                return Err(Error::LeaderChanged);
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout);
            }
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
        // The other groups follow from the next tick on; until each has, the next change waits.
        for f in cl.conf_synced.iter().skip(1) {
            f.store(false, Ordering::SeqCst);
        }
        Ok(cc.node())
    }

    /// Records that `from` spoke in shard 0's group (what the strict reconfiguration checks
    /// count as started and connected).
    pub(super) fn note_heard(&self, shard: u32, from: u64) {
        if shard == 0 {
            self.heard.borrow_mut().insert(from, Instant::now());
        }
    }

    /// Brings the membership of every group this member leads one step closer to shard 0's.
    pub(super) fn reconcile_groups(&self) {
        let Some(cl) = self.shared.cluster.as_ref() else {
            return;
        };
        let m = cl.membership();
        if let Some(s) = self.shards.get(&0) {
            self.publish_attributes(s, &m, cl);
        }
        let mut want = ConfState::new(m.voters());
        want.learners = m.learners().collect();
        let removing = cl.removing.load(Ordering::SeqCst);
        if removing != 0 {
            want.voters.remove(&removing);
            want.learners.remove(&removing);
        }
        for (&id, s) in &self.shards {
            let step = next_step(&s.replica.conf(), &want);
            if let Some(f) = cl.conf_synced.get(id as usize) {
                f.store(id == 0 || step.is_none(), Ordering::SeqCst);
            }
            if id == 0 || s.replica.role() != Role::Leader || s.replica.conf_change_pending() {
                continue;
            }
            let Some(cc) = step else {
                continue;
            };
            let Some(context) = m
                .members
                .get(&cc.node())
                .map_or(Some(Vec::new()), |r| serde_json::to_vec(r).ok())
            else {
                continue;
            };
            match s.replica.propose_conf_change(&s.wal, cc, &context) {
                Ok(index) => {
                    tracing::info!(shard = id, change = ?cc, index, "following shard 0's membership")
                }
                Err(e) => {
                    tracing::debug!(shard = id, error = %e, "membership step not proposed yet")
                }
            }
        }
    }
}

/// Marks a member as being removed from the data groups for as long as it lives.
struct Removing<'a>(&'a ClusterState);

impl<'a> Removing<'a> {
    fn start(cl: &'a ClusterState, id: u64) -> Removing<'a> {
        cl.removing.store(id, Ordering::SeqCst);
        // The groups report again against the new target from their next tick.
        for f in cl.conf_synced.iter().skip(1) {
            f.store(false, Ordering::SeqCst);
        }
        Removing(cl)
    }
}

impl Drop for Removing<'_> {
    fn drop(&mut self) {
        self.0.removing.store(0, Ordering::SeqCst);
    }
}

impl Core {
    /// On the leader: records in the membership what members said of themselves in their
    /// handshakes (name, client URLs), one member per tick, so that every member lists them,
    /// also members that never connected to them and restarts. A member added at run time is
    /// unnamed until this happens, as etcd's are until they publish themselves.
    fn publish_attributes(&self, s: &Shard, m: &crate::cluster::Membership, cl: &ClusterState) {
        if s.replica.role() != Role::Leader || s.replica.conf_change_pending() {
            return;
        }
        let mut own = PeerInfo {
            name: cl.name.clone(),
            client_urls: cl.client_urls.clone(),
        };
        let stale = {
            let Ok(info) = cl.peer_info.read() else {
                return;
            };
            m.members.values().find_map(|rec| {
                let said = if rec.id == cl.member_id {
                    std::mem::take(&mut own)
                } else {
                    info.get(&rec.id)?.clone()
                };
                let differs = (!said.name.is_empty() && said.name != rec.name)
                    || (!said.client_urls.is_empty() && said.client_urls != rec.client_urls);
                differs.then(|| {
                    let mut r = rec.clone();
                    r.name = said.name;
                    r.client_urls = said.client_urls;
                    r
                })
            })
        };
        let Some(record) = stale else { return };
        let Ok(context) = serde_json::to_vec(&record) else {
            return;
        };
        match s
            .replica
            .propose_conf_change(&s.wal, ConfChange::Update(record.id), &context)
        {
            Ok(index) => {
                tracing::info!(member = %format!("{:x}", record.id), name = %record.name, index, "published member attributes")
            }
            Err(e) => tracing::debug!(error = %e, "member attributes not published yet"),
        }
    }
}

/// The next single-step change from `have` towards `want`: additions and promotions first (so
/// the group never shrinks below what it needs), removals last.
fn next_step(have: &ConfState, want: &ConfState) -> Option<ConfChange> {
    if let Some(&id) = want.voters.iter().find(|id| !have.contains(**id)) {
        return Some(ConfChange::AddVoter(id));
    }
    if let Some(&id) = want.learners.iter().find(|id| !have.contains(**id)) {
        return Some(ConfChange::AddLearner(id));
    }
    if let Some(&id) = want.voters.iter().find(|id| have.learners.contains(id)) {
        return Some(ConfChange::PromoteLearner(id));
    }
    have.members()
        .map(|(id, _)| id)
        .find(|id| !want.contains(*id))
        .map(ConfChange::Remove)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(voters: &[u64], learners: &[u64]) -> ConfState {
        let mut c = ConfState::new(voters.iter().copied());
        c.learners = learners.iter().copied().collect();
        c
    }

    #[test]
    fn groups_follow_shard_zero_one_step_at_a_time() {
        let want = conf(&[1, 2, 4], &[5]);
        let mut have = conf(&[1, 2, 3], &[4]);
        let mut steps = Vec::new();
        while let Some(cc) = next_step(&have, &want) {
            have.apply(&cc);
            steps.push(cc);
            assert!(steps.len() < 10, "{steps:?}");
        }
        assert_eq!(have, want);
        assert_eq!(
            steps,
            vec![
                ConfChange::AddLearner(5),
                ConfChange::PromoteLearner(4),
                ConfChange::Remove(3)
            ]
        );
    }
}
