//! Cluster mode: what a core runs when its shards' Raft groups have peers. Every core binds
//! the node's peer port (SO_REUSEPORT) and runs its share of the transport; each shard it owns
//! gets a task that sends its group's messages, one that acknowledges durable log writes to
//! Raft, and one that applies committed records; one ticker per core drives elections and
//! heartbeats and keeps every shard's leadership on the node that leads shard 0.
//!
//! Separate from the core loop because a single node runs none of it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use super::core::{Core, Msg, ShardOp};
use crate::cluster::{parse_initial_cluster, url_authority, Membership, DEFAULT_TOKEN};
use crate::engine::meta;
use crate::engine::replica::{Group, NodeGate};
use crate::engine::revision::RevisionClock;
use crate::error::{Error, Result};
use crate::peer::{
    request_membership, Inbound, Join, PeerConfig, PeerInfo, PeerTls, ReadStamp, Transport,
    PROTOCOL_VERSION,
};
use crate::raft::{ConfChange, ConfState, EntryKind, Message, MessageKind, Role};

/// etcd's cluster flags, as `spindle serve` takes them.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// `--name`
    pub name: String,
    /// `--initial-cluster`
    pub initial_cluster: String,
    /// `--initial-cluster-token`
    pub token: String,
    /// `--initial-cluster-state new` (true) or `existing`.
    pub new_cluster: bool,
    /// `--initial-advertise-peer-urls`
    pub advertise_peer_urls: Vec<String>,
    /// `--listen-peer-urls`, as `host:port`.
    pub listen_peer: String,
    /// `--heartbeat-interval`
    pub heartbeat: Duration,
    /// `--election-timeout`
    pub election: Duration,
    /// `--advertise-client-urls`, announced to peers (they forward writes here when this
    /// member leads).
    pub client_urls: Vec<String>,
    /// TLS for `https://` peer URLs: accepting on this member's, dialing others'.
    pub peer_tls: PeerTls,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            name: "default".into(),
            initial_cluster: String::new(),
            token: DEFAULT_TOKEN.into(),
            new_cluster: true,
            advertise_peer_urls: Vec::new(),
            listen_peer: String::new(),
            heartbeat: Duration::from_millis(100),
            election: Duration::from_millis(1000),
            client_urls: Vec::new(),
            peer_tls: PeerTls::default(),
        }
    }
}

/// What every core of a cluster member shares.
pub(super) struct ClusterState {
    pub(super) member_id: u64,
    pub(super) cluster_id: u64,
    /// The membership as shard 0's group has applied it (that group carries membership
    /// changes; the others follow, `members.rs`).
    membership: RwLock<Membership>,
    /// Where `cluster.json` lives.
    dir: PathBuf,
    pub(super) name: String,
    pub(super) listen_peer: String,
    pub(super) tick: Duration,
    pub(super) election_ticks: u64,
    pub(super) gate: Arc<NodeGate>,
    /// The leader of shard 0 as this node last saw it (0: none): the node every shard follows.
    leader_node: AtomicU64,
    pub(super) client_urls: Vec<String>,
    peer_tls: PeerTls,
    /// What the transports dial (member id → peer URL), rewritten on membership changes.
    peers: Arc<RwLock<BTreeMap<u64, String>>>,
    /// The membership handed to joining members.
    membership_json: Arc<RwLock<Vec<u8>>>,
    /// Other members' names and client URLs, learned from their handshakes.
    pub(super) peer_info: Arc<RwLock<BTreeMap<u64, PeerInfo>>>,
    /// This member applied its own removal: it takes no part in the cluster any more.
    removed: AtomicBool,
    /// This member is a learner (read on every request, so kept apart from the membership).
    learner: AtomicBool,
    /// A member being removed (0: none): the data groups drop it before shard 0 does, so its
    /// vote still counts while they commit the change (`db::members`).
    pub(super) removing: AtomicU64,
    /// Per shard: whether its group's membership, as applied here, equals shard 0's. A new
    /// membership change waits for all (so no group is ever more than one change behind).
    pub(super) conf_synced: Vec<AtomicBool>,
}

impl ClusterState {
    /// The membership this member uses: the data dir's if it has one (a restarted member ignores
    /// the initial-cluster flags, as etcd does), else the one the flags describe, or for
    /// `--initial-cluster-state existing` the one a running member hands out.
    pub(super) fn resolve(
        path: &Path,
        opts: &ClusterOptions,
        nshards: u32,
    ) -> Result<ClusterState> {
        let invalid = |e: String| Error::InvalidArgument(e);
        let (membership, member_id) = match meta::load_membership(path)? {
            Some(m) => {
                // The member id in spindle.meta names this member; a member added at run time
                // is recorded by others without a name until it starts.
                let stored = meta::load(path)?.map(|meta| meta.member_id);
                let id = stored.filter(|id| m.members.contains_key(id)).or_else(|| {
                    m.members
                        .values()
                        .find(|mb| mb.name == opts.name)
                        .map(|mb| mb.id)
                });
                let Some(id) = id else {
                    return Err(invalid(match stored {
                        Some(id) => format!(
                            "data dir {}: member {id:x} has been permanently removed from                              cluster {:x}; start it with a new data dir and add it again",
                            path.display(),
                            m.cluster_id
                        ),
                        None => format!(
                            "data dir {} holds cluster {:x}, which has no member named {:?}",
                            path.display(),
                            m.cluster_id,
                            opts.name
                        ),
                    }));
                };
                (m, id)
            }
            None => {
                let (m, id) = if opts.new_cluster {
                    Membership::bootstrap(
                        &opts.initial_cluster,
                        &opts.token,
                        &opts.name,
                        &opts.advertise_peer_urls,
                    )
                    .map_err(|e| invalid(e.to_string()))?
                } else {
                    join(opts, nshards)?
                };
                std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))?;
                meta::save_membership(path, &m)?;
                (m, id)
            }
        };
        let tick = opts.heartbeat.max(Duration::from_millis(1));
        let election_ticks = (opts.election.as_millis() / tick.as_millis()).max(2) as u64;
        let state = ClusterState {
            member_id,
            cluster_id: membership.cluster_id,
            membership: RwLock::new(membership),
            dir: path.to_path_buf(),
            name: opts.name.clone(),
            listen_peer: opts.listen_peer.clone(),
            tick,
            election_ticks,
            gate: NodeGate::new(nshards),
            leader_node: AtomicU64::new(0),
            client_urls: opts.client_urls.clone(),
            peer_tls: opts.peer_tls.clone(),
            peers: Arc::default(),
            membership_json: Arc::default(),
            peer_info: Arc::default(),
            removed: AtomicBool::new(false),
            learner: AtomicBool::new(false),
            removing: AtomicU64::new(0),
            conf_synced: (0..nshards).map(|_| AtomicBool::new(true)).collect(),
        };
        state.publish(&state.membership());
        Ok(state)
    }

    /// A copy of the membership as this member last applied it.
    pub(super) fn membership(&self) -> Membership {
        match self.membership.read() {
            Ok(m) => m.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Applies a committed change of shard 0's group: the record, `cluster.json`, and the
    /// peer table every core's transport dials from.
    pub(super) fn apply_change(&self, cc: &ConfChange, context: &[u8]) -> Result<()> {
        let m = self.update_membership(|m| m.apply_change(cc, context))?;
        if !m.members.contains_key(&self.member_id) && !self.removed.swap(true, Ordering::SeqCst) {
            tracing::warn!(
                member = %format!("{:x}", self.member_id),
                "the member has been permanently removed from the cluster"
            );
        }
        Ok(())
    }

    /// Takes over the membership an installed shard-0 snapshot carries (the changes it covers
    /// were compacted away, so this member never applied them one by one). A member that
    /// joined after the checkpoint is not in it yet; the log that follows adds it again, so
    /// only an applied removal stops a member.
    pub(super) fn replace_membership(&self, record: &[u8]) -> Result<()> {
        let next = Membership::decode(record)
            .map_err(|e| Error::InvalidArgument(format!("snapshot membership: {e}")))?;
        self.update_membership(|m| *m = next)?;
        Ok(())
    }

    /// Changes the membership, then saves `cluster.json` and republishes the peer table.
    fn update_membership(&self, change: impl FnOnce(&mut Membership)) -> Result<Membership> {
        let m = {
            let mut m = match self.membership.write() {
                Ok(m) => m,
                Err(p) => p.into_inner(),
            };
            change(&mut m);
            m.clone()
        };
        meta::save_membership(&self.dir, &m)?;
        self.publish(&m);
        Ok(m)
    }

    /// Whether every group's membership has caught up with shard 0's.
    pub(super) fn groups_synced(&self) -> bool {
        self.conf_synced.iter().all(|f| f.load(Ordering::SeqCst))
    }

    /// Whether this member is a learner.
    pub(super) fn is_learner(&self) -> bool {
        self.learner.load(Ordering::Relaxed)
    }

    /// Rewrites what the transports read: peer addresses and the record joiners get.
    fn publish(&self, m: &Membership) {
        let learner = m.members.get(&self.member_id).is_some_and(|r| r.is_learner);
        self.learner.store(learner, Ordering::Relaxed);
        let peers: BTreeMap<u64, String> = m
            .members
            .keys()
            .filter(|&&id| id != self.member_id)
            .filter_map(|&id| Some((id, m.peer_url(id)?.to_string())))
            .collect();
        if let Ok(mut p) = self.peers.write() {
            *p = peers;
        }
        if let Ok(mut j) = self.membership_json.write() {
            *j = m.encode();
        }
    }

    /// Whether this member applied its own removal.
    pub(super) fn is_removed(&self) -> bool {
        self.removed.load(Ordering::SeqCst)
    }

    /// Every shard group's make-up on this member at open.
    pub(super) fn group(&self) -> Group {
        let m = self.membership();
        let mut conf = ConfState::new(m.voters());
        conf.learners = m.learners().collect();
        Group {
            id: self.member_id,
            conf,
            election_tick: self.election_ticks,
            heartbeat_tick: 1,
            gate: Some(self.gate.clone()),
        }
    }

    fn peer_config(&self, shards: u32) -> PeerConfig {
        let m = self.membership();
        let mut cfg = PeerConfig::new(
            self.cluster_id,
            self.member_id,
            shards,
            &self.name,
            &m.token,
            BTreeMap::new(),
        );
        cfg.local.client_urls = self.client_urls.clone();
        cfg.peers = self.peers.clone();
        cfg.peer_info = self.peer_info.clone();
        cfg.membership = self.membership_json.clone();
        cfg.tls = self.peer_tls.clone();
        cfg
    }

    /// The member that leads shard 0, as this node last saw it.
    pub(super) fn leader_node(&self) -> u64 {
        self.leader_node.load(Ordering::Relaxed)
    }

    /// How long a write or a MoveLeader waits for leadership to settle: two election timeouts.
    pub(super) fn patience(&self) -> Duration {
        2 * self.tick * self.election_ticks as u32
    }
}

/// `--initial-cluster-state existing`: asks the members `--initial-cluster` names for the
/// membership (this member must have been added with its advertised peer URLs) and checks the
/// flags against it, as etcd does.
fn join(opts: &ClusterOptions, nshards: u32) -> Result<(Membership, u64)> {
    let invalid = |e: String| Error::InvalidArgument(e);
    let named = parse_initial_cluster(&opts.initial_cluster).map_err(|e| invalid(e.to_string()))?;
    let request = Join {
        version: PROTOCOL_VERSION,
        token: opts.token.clone(),
        shards: nshards,
        peer_urls: opts.advertise_peer_urls.clone(),
    };
    let mut errors = Vec::new();
    let mut found = None;
    for url in named
        .values()
        .flatten()
        .filter(|u| !opts.advertise_peer_urls.contains(u))
    {
        if url_authority(url).is_err() {
            continue;
        }
        let tls = opts.peer_tls.dial.as_ref();
        match request_membership(url, tls, &request, Duration::from_secs(2)) {
            Ok(bytes) => match Membership::decode(&bytes) {
                Ok(m) => {
                    found = Some(m);
                    break;
                }
                Err(e) => errors.push(format!("{url}: {e}")),
            },
            Err(e) => errors.push(format!("{url}: {e}")),
        }
    }
    let Some(mut m) = found else {
        return Err(invalid(format!(
            "--initial-cluster-state existing: no member of the cluster answered ({})",
            errors.join("; ")
        )));
    };
    if named.len() != m.members.len() {
        return Err(invalid(format!(
            "error validating peerURLs: member count is unequal (--initial-cluster names {},              cluster {:x} has {})",
            named.len(),
            m.cluster_id,
            m.members.len()
        )));
    }
    let mut mine = opts.advertise_peer_urls.clone();
    mine.sort();
    let id = m
        .members
        .values()
        .find(|mb| {
            let mut u = mb.peer_urls.clone();
            u.sort();
            u == mine
        })
        .map(|mb| mb.id)
        .ok_or_else(|| {
            invalid(format!(
                "error validating peerURLs: cluster {:x} has no member with peer URLs {} (add                  it first with `etcdctl member add {} --peer-urls={}`)",
                m.cluster_id,
                opts.advertise_peer_urls.join(","),
                opts.name,
                opts.advertise_peer_urls.join(",")
            ))
        })?;
    if let Some(me) = m.members.get_mut(&id) {
        me.name = opts.name.clone();
    }
    Ok((m, id))
}

/// Starts this core's share of the cluster: the transport and its shards' tasks.
pub(super) fn start(core: &Rc<Core>) -> Result<()> {
    for shard in core.shards.values() {
        shard.attach_auth(core.shared.auth.clone());
        shard.attach_alarms(core.shared.alarms.clone());
    }
    let Some(cl) = core.shared.cluster.as_ref() else {
        return Ok(());
    };
    let listener = glommio::net::TcpListener::bind(cl.listen_peer.as_str()).map_err(|e| {
        Error::InvalidArgument(format!(
            "cannot listen for peers on {}: {e}",
            cl.listen_peer
        ))
    })?;
    let weak: Weak<Core> = Rc::downgrade(core);
    let transport = Transport::start(
        cl.peer_config(core.shared.nshards),
        listener,
        Rc::new(move |inbound| {
            if let Some(core) = weak.upgrade() {
                match inbound {
                    Inbound::Raft(shard, msg) => core.peer_message(shard, msg),
                    Inbound::Stamp(st) => core.peer_stamp(st),
                    Inbound::Call(from, call, replies) => core.serve_relayed(from, call, replies),
                    Inbound::Answer(a) => core.relay.answered(a),
                    Inbound::Unsent(_, ids) => core.relay.unsent(ids),
                    Inbound::Lost(to) => core.relay.lost(to),
                }
            }
        }),
    );
    *core.transport.borrow_mut() = Some(transport.clone());
    for shard in core.shards.values() {
        let (s, t, catchup, clock) = (
            shard.clone(),
            transport.clone(),
            core.catchup.clone(),
            core.shared.clock.clone(),
        );
        glommio::spawn_local(async move {
            loop {
                s.replica.wait_messages().await;
                if s.replica.ensure_healthy().is_err() {
                    return;
                }
                let stamp = read_stamp(&s, &clock);
                for m in s.replica.take_messages() {
                    if m.kind == MessageKind::Snapshot {
                        // The snapshot is the checkpoint file, streamed in chunks.
                        catchup.send(&s, &t, m);
                    } else {
                        if let Some(st) = stamp {
                            t.stamp(m.to, st);
                        }
                        t.send(m.to, s.id, m);
                    }
                }
                t.flush();
            }
        })
        .detach();
        let s = shard.clone();
        glommio::spawn_local(async move { s.replica.run_sync(&s.wal).await }).detach();
        let (s, clock, shared, weak_core) = (
            shard.clone(),
            core.shared.clock.clone(),
            core.shared.clone(),
            Rc::downgrade(core),
        );
        glommio::spawn_local(async move {
            let Some(cl) = shared.cluster.as_ref() else {
                return;
            };
            // The multi-shard part this shard's apply holds at: (revision, participants).
            let mut held: Option<(i64, Vec<u32>)> = None;
            loop {
                if s.replica.ensure_healthy().is_err() {
                    return;
                }
                if let Some((rev, participants)) = held.clone() {
                    // A leader decides a write its predecessor left undecided; everyone else
                    // waits for the record that says how it ended (checked again every tick).
                    if s.may_decide() {
                        if let Some(core) = weak_core.upgrade() {
                            if let Some(commit) = decide(&core, &s, rev, &participants).await {
                                if let Err(e) = s.decide_in_doubt(rev, commit).await {
                                    tracing::debug!(shard = s.id, revision = rev, error = %e, "decision not proposed yet");
                                }
                            }
                        }
                    }
                    futures_lite::future::or(s.replica.wait_committed_entries(), async {
                        glommio::timer::sleep(cl.tick).await;
                    })
                    .await;
                } else {
                    s.replica.wait_committed_entries().await;
                }
                if let Some(meta) = s.replica.pending_install() {
                    let take = |record: &[u8]| {
                        if s.id == 0 && !record.is_empty() {
                            cl.replace_membership(record)
                        } else {
                            Ok(())
                        }
                    };
                    if let Err(e) = s.install(&meta, &clock, take).await {
                        s.replica
                            .stop(format!("installing the leader's snapshot failed: {e}"));
                        return;
                    }
                }
                let entries = s.replica.take_committed();
                if s.id == 0 {
                    // Shard 0's group carries membership (`db::members`).
                    for e in entries.iter().filter(|e| e.kind == EntryKind::ConfChange) {
                        let Ok(cc) = ConfChange::decode(&e.data) else {
                            continue;
                        };
                        if let Err(err) = cl.apply_change(&cc, ConfChange::context(&e.data)) {
                            s.replica
                                .stop(format!("recording a membership change failed: {err}"));
                            return;
                        }
                        tracing::info!(change = ?cc, index = e.index, "membership changed");
                    }
                }
                // Also with nothing new: a rebuild or an install may have changed what waits.
                match s.apply_committed(&entries, &clock) {
                    Ok(h) => held = h,
                    Err(e) => {
                        s.replica
                            .stop(format!("applying committed records failed: {e}"));
                        return;
                    }
                }
            }
        })
        .detach();
    }
    let weak = Rc::downgrade(core);
    let tick = cl.tick;
    glommio::spawn_local(async move {
        // Ticks keep to a fixed schedule: each sleep ends a little late and the tick's own work
        // takes time, and sleeping a whole tick after that would stretch every election timeout
        // (counted in ticks) by as much.
        let mut next = std::time::Instant::now() + tick;
        loop {
            let now = std::time::Instant::now();
            if next > now {
                glommio::timer::sleep(next - now).await;
            }
            next += tick;
            let now = std::time::Instant::now();
            if now > next + tick * 4 {
                // Far behind (the executor was starved): start the schedule again from now.
                next = now + tick;
            }
            let Some(core) = weak.upgrade() else { return };
            if core.shared.closing.load(Ordering::Relaxed) {
                return;
            }
            core.tick_groups();
        }
    })
    .detach();
    Ok(())
}

/// The outcome of the multi-shard write at `rev` that `s` holds at, if this node can tell:
/// any participant's record of it wins; else it committed iff every participant's log holds
/// its part, and aborted once a participant whose whole log this node leads lacks it.
async fn decide(
    core: &Rc<Core>,
    s: &crate::engine::shard::Shard,
    rev: i64,
    participants: &[u32],
) -> Option<bool> {
    use crate::engine::shard::PartStatus;
    let mut all_hold = true;
    let mut lacking = false;
    for &p in participants {
        let status = if p == s.id {
            s.part_status(rev)
        } else {
            core.call(p, |r| ShardOp::PartStatus(rev, r))
                .await
                .unwrap_or(PartStatus::Unknown)
        };
        match status {
            PartStatus::Decided(c) => return Some(c),
            PartStatus::Holds => {}
            PartStatus::Lacks => {
                lacking = true;
                all_hold = false;
            }
            PartStatus::Unknown => all_hold = false,
        }
    }
    if all_hold {
        Some(true)
    } else if lacking {
        Some(false)
    } else {
        None
    }
}

impl super::LocalDb {
    /// etcd's MoveLeader: the leader hands shard 0 to `target` (the other shards follow it by
    /// leader affinity) and returns once `target` leads shard 0. A member that does not lead
    /// answers `etcdserver: not leader` (the server forwards the call to the leader).
    pub async fn move_leader(&self, target: u64) -> Result<()> {
        let shared = &self.core.shared;
        let Some(cl) = shared.cluster.as_ref() else {
            return if target == shared.member_id {
                Ok(())
            } else {
                Err(Error::BadLeaderTransferee)
            };
        };
        let can_lead = cl
            .membership()
            .members
            .get(&target)
            .is_some_and(|m| !m.is_learner);
        if !can_lead {
            return Err(Error::BadLeaderTransferee);
        }
        if cl.leader_node() != cl.member_id {
            return Err(if cl.leader_node() == 0 {
                Error::NoLeader
            } else {
                Error::NotLeader
            });
        }
        if target == cl.member_id {
            return Ok(());
        }
        self.core
            .call(0, |r| super::core::ShardOp::Transfer(target, r))
            .await?;
        let deadline = std::time::Instant::now() + cl.patience();
        while cl.leader_node() != target {
            if std::time::Instant::now() >= deadline {
                return Err(Error::Timeout);
            }
            glommio::timer::sleep(cl.tick).await;
        }
        Ok(())
    }
}

impl Core {
    /// A cluster member takes a write only while it may execute on every shard. While this node
    /// is becoming the leader node (it leads shard 0 and the others are being handed over, or
    /// an election is running) the write waits, up to two election timeouts; a member that
    /// another node leads refuses at once, as etcd's followers would if they did not forward.
    pub(super) async fn wait_writable(&self) -> Result<()> {
        let Some(cl) = self.shared.cluster.as_ref() else {
            return Ok(());
        };
        let deadline = std::time::Instant::now() + cl.patience();
        loop {
            if cl.gate.all() {
                return Ok(());
            }
            let leader = cl.leader_node();
            if leader != 0 && leader != cl.member_id {
                return Err(Error::NotLeader);
            }
            if std::time::Instant::now() >= deadline {
                return Err(if leader == 0 {
                    Error::NoLeader
                } else {
                    Error::Timeout
                });
            }
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Before a linearizable read on a cluster member: this member must lead the cluster (else
    /// `not leader`, which the server forwards) and Raft's ReadIndex on shard 0 must confirm
    /// it still does. That one confirmation covers every shard: no other member can have
    /// committed a write since, as writes need the leadership of shard 0 too.
    pub(super) async fn confirm_read(&self, shard0: &crate::engine::shard::Shard) -> Result<u64> {
        let Some(cl) = self.shared.cluster.as_ref() else {
            return Ok(0);
        };
        // Leading every shard with its whole log applied (the write gate) means every write
        // any member committed is in this member's stores; ReadIndex then proves no other member
        // has taken shard 0, without which no write can commit anywhere.
        self.wait_writable().await?;
        let index = shard0
            .replica
            .read_index(&shard0.wal, cl.patience())
            .await?;
        if !cl.gate.all() || shard0.replica.applied() < index {
            return Err(Error::LeaderChanged);
        }
        Ok(index)
    }

    /// A leader's read stamp: noted by the shard here, or passed to the core that owns it.
    pub(super) fn peer_stamp(&self, st: ReadStamp) {
        match self.shards.get(&st.shard) {
            Some(s) => s.note_stamp(st.index, st.revision, &self.shared.clock),
            None => {
                let core = self.shared.core_of(st.shard);
                let _ = self.shared.inboxes[core].send(Msg::Stamp(st));
            }
        }
    }

    /// A peer's message for `shard`: stepped here, or passed to the core that owns the shard.
    pub(super) fn peer_message(&self, shard: u32, msg: Message) {
        match self.shards.get(&shard) {
            Some(s) => {
                self.note_heard(shard, msg.from);
                let msg = if super::catchup::is_chunk(&msg) {
                    match self.catchup.receive(s, msg) {
                        Some(m) => m,
                        None => return,
                    }
                } else if msg.kind == MessageKind::Snapshot {
                    // A snapshot arrives only as a checkpoint's chunks; a bare one names a
                    // file this member does not have.
                    tracing::warn!(shard, from = %format!("{:x}", msg.from), "dropped a snapshot message without its checkpoint");
                    return;
                } else {
                    msg
                };
                s.replica.step(&s.wal, msg);
                if shard == 0 {
                    // Learn a new leader at once, not at the next tick: followers forward to it
                    // and waiting writes look for it.
                    if let Some(cl) = self.shared.cluster.as_ref() {
                        cl.leader_node
                            .store(s.replica.leader().unwrap_or(0), Ordering::Relaxed);
                    }
                }
            }
            None => {
                let core = self.shared.core_of(shard);
                let _ = self.shared.inboxes[core].send(Msg::Peer(shard, msg));
            }
        }
    }

    /// One tick of every local group, then leader affinity: a node leading shard `s != 0`
    /// while another leads shard 0 hands `s` over, so one node ends up leading every shard.
    fn tick_groups(&self) {
        let Some(cl) = self.shared.cluster.as_ref() else {
            return;
        };
        let me = cl.member_id;
        for (&id, s) in &self.shards {
            s.replica.tick(&s.wal);
            s.log_pending_records();
            if s.wants_checkpoint() {
                // Members cut checkpoints on ticks; a lagging member receives the newest one as
                // its snapshot.
                let (s, shared) = (s.clone(), self.shared.clone());
                glommio::spawn_local(async move {
                    if let Err(e) = s.checkpoint_with(move || shared.membership_record()).await {
                        tracing::warn!(error = %e, "background checkpoint failed; the WAL keeps everything");
                    }
                })
                .detach();
            }
            if s.replica.is_stale() && !s.rebuilding.replace(true) {
                let s = s.clone();
                glommio::spawn_local(async move {
                    if let Err(e) = s.rebuild().await {
                        tracing::error!(shard = s.id, error = %e, "rebuilding the shard failed");
                    }
                    s.rebuilding.set(false);
                })
                .detach();
            }
            if id == 0 {
                cl.leader_node
                    .store(s.replica.leader().unwrap_or(0), Ordering::Relaxed);
            }
            let term = s.replica.term();
            self.shared.raft_term.fetch_max(term, Ordering::Relaxed);
            if cl.is_removed() {
                continue;
            }
            let node = cl.leader_node();
            if id != 0 && node == me && s.replica.leader() != Some(me) {
                s.replica.ask_for_leadership(&s.wal, cl.election_ticks);
            }
            if id != 0 && s.replica.role() == Role::Leader && node != 0 && node != me {
                if let Err(e) = s.replica.transfer_leader(&s.wal, node) {
                    tracing::debug!(shard = id, error = %e, "leader transfer not started");
                }
            }
        }
        self.reconcile_groups();
        self.relay
            .check(cl.leader_node(), std::time::Instant::now());
    }
}

/// What a leader of `s` promises its followers with the messages it sends now: every record
/// of `s` at or below this node's stamp revision (its read revision, never past a committed
/// record) is at or below its last log index. The revision is read first: whatever it covers
/// was proposed before it was resolved, so the index read after covers it. A leader that
/// executes here also keeps its own floor for the shard current, for the moments the node
/// stops executing (a leadership change).
fn read_stamp(s: &crate::engine::shard::Shard, clock: &RevisionClock) -> Option<ReadStamp> {
    if s.replica.role() != Role::Leader {
        return None;
    }
    let revision = clock.stamp_revision();
    if s.replica.can_execute() {
        clock.raise_floor(s.id, revision);
    }
    Some(ReadStamp {
        shard: s.id,
        index: s.replica.last_index(),
        revision,
    })
}
