//! Scenario tests over a tiny synchronous network; the randomized fault-injecting
//! simulation lives in `tests/raft_sim.rs`.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

use super::*;

struct Net {
    nodes: BTreeMap<NodeId, Raft>,
    applied: BTreeMap<NodeId, Vec<Entry>>,
    reads: BTreeMap<NodeId, Vec<ReadState>>,
    /// Messages to these (from, to) pairs are dropped.
    cut: BTreeSet<(NodeId, NodeId)>,
    /// Nodes whose disk never acknowledges.
    stuck_disk: BTreeSet<NodeId>,
    snapshots: BTreeMap<NodeId, Snapshot>,
    /// Every message delivered twice.
    dup: bool,
    /// (from, to, entries) of every append sent.
    appends: Vec<(NodeId, NodeId, usize)>,
}

fn cfg(id: NodeId) -> Config {
    let mut c = Config::new(id);
    c.max_entries_per_msg = 4;
    c.max_inflight = 2;
    c
}

impl Net {
    fn new(n: u64) -> Net {
        let ids: Vec<NodeId> = (1..=n).collect();
        let mut net = Net {
            nodes: BTreeMap::new(),
            applied: BTreeMap::new(),
            reads: BTreeMap::new(),
            cut: BTreeSet::new(),
            stuck_disk: BTreeSet::new(),
            snapshots: BTreeMap::new(),
            dup: false,
            appends: Vec::new(),
        };
        for &id in &ids {
            net.add(id, DurableState::bootstrap(ids.clone()), cfg(id));
        }
        net
    }

    fn add(&mut self, id: NodeId, st: DurableState, c: Config) {
        self.nodes
            .insert(id, Raft::new(c, st).expect("valid config"));
    }

    fn node(&mut self, id: NodeId) -> &mut Raft {
        self.nodes.get_mut(&id).expect("node exists")
    }

    fn isolate(&mut self, id: NodeId) {
        for &o in self.nodes.keys() {
            self.cut.insert((id, o));
            self.cut.insert((o, id));
        }
    }

    /// Processes ready/deliver until nothing moves.
    fn settle(&mut self) {
        for _ in 0..10_000 {
            let mut msgs = Vec::new();
            for (&id, n) in self.nodes.iter_mut() {
                if !n.has_ready() {
                    continue;
                }
                let rd = n.ready();
                if let Some(s) = &rd.snapshot {
                    self.snapshots.insert(id, s.clone());
                }
                self.applied
                    .entry(id)
                    .or_default()
                    .extend(rd.committed_entries.iter().cloned());
                self.reads
                    .entry(id)
                    .or_default()
                    .extend(rd.read_states.iter().cloned());
                if !self.stuck_disk.contains(&id) {
                    let p = rd.persisted();
                    n.advance(p);
                }
                msgs.extend(rd.messages);
            }
            if msgs.is_empty() && !self.nodes.values().any(|n| n.has_ready()) {
                return;
            }
            for m in msgs {
                if m.kind == MessageKind::Append {
                    self.appends.push((m.from, m.to, m.entries.len()));
                }
                if self.cut.contains(&(m.from, m.to)) {
                    continue;
                }
                if let Some(n) = self.nodes.get_mut(&m.to) {
                    if self.dup {
                        n.step(m.clone());
                    }
                    n.step(m);
                }
            }
        }
        panic!("network did not settle");
    }

    fn elect(&mut self, id: NodeId) {
        self.node(id).campaign();
        self.settle();
        assert_eq!(self.node(id).role(), Role::Leader);
    }

    fn tick_all(&mut self, n: usize) {
        for _ in 0..n {
            for r in self.nodes.values_mut() {
                r.tick();
            }
            self.settle();
        }
    }

    fn data(&self, id: NodeId) -> Vec<Bytes> {
        self.applied
            .get(&id)
            .map(|v| {
                v.iter()
                    .filter(|e| !e.data.is_empty())
                    .map(|e| e.data.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn leaders(&self) -> Vec<NodeId> {
        self.nodes
            .values()
            .filter(|n| n.role() == Role::Leader)
            .map(|n| n.id())
            .collect()
    }
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

#[test]
fn single_node_commits_on_local_durability() {
    let mut net = Net::new(1);
    net.node(1).campaign();
    let rd = net.node(1).ready();
    assert!(rd.hard_state.is_some());
    assert_eq!(
        net.node(1).role(),
        Role::Candidate,
        "own vote counts only once durable"
    );
    net.node(1).advance(rd.persisted());
    assert_eq!(net.node(1).role(), Role::Leader);
    net.settle();
    let idx = net.node(1).propose(b("x")).expect("leader");
    let rd = net.node(1).ready();
    assert_eq!(rd.entries.last().map(|e| e.index), Some(idx));
    assert!(rd.committed_entries.is_empty(), "not durable yet");
    net.node(1).advance(rd.persisted());
    let rd = net.node(1).ready();
    assert_eq!(
        rd.committed_entries.last().map(|e| e.data.clone()),
        Some(b("x"))
    );
    assert!(rd.messages.is_empty());
}

#[test]
fn election_and_replication() {
    let mut net = Net::new(3);
    net.elect(1);
    for i in 0..20 {
        net.node(1).propose(b(&format!("v{i}"))).expect("leader");
    }
    net.settle();
    net.tick_all(1); // heartbeat carries the final commit index
    for id in 1..=3 {
        assert_eq!(net.data(id).len(), 20, "node {id}");
        assert_eq!(net.node(id).commit(), net.node(1).last_index());
    }
    assert!(matches!(
        net.node(2).propose(b("no")),
        Err(Error::NotLeader { leader: Some(1) })
    ));
}

#[test]
fn randomized_timeout_elects_exactly_one_leader() {
    let mut net = Net::new(5);
    net.tick_all(40);
    assert_eq!(net.leaders().len(), 1);
}

#[test]
fn pre_vote_keeps_partitioned_node_from_bumping_term() {
    let mut net = Net::new(3);
    net.elect(1);
    let term = net.node(1).term();
    net.isolate(3);
    net.tick_all(100);
    assert_eq!(
        net.node(3).term(),
        term,
        "pre-vote never reached a majority"
    );
    net.cut.clear();
    net.tick_all(5);
    assert_eq!(
        net.node(1).role(),
        Role::Leader,
        "rejoining node does not disrupt"
    );
    assert_eq!(net.node(1).term(), term);
}

#[test]
fn check_quorum_steps_down_isolated_leader() {
    let mut net = Net::new(3);
    net.elect(1);
    net.isolate(1);
    net.tick_all(50);
    assert_ne!(net.node(1).role(), Role::Leader);
    let leaders = net.leaders();
    assert_eq!(leaders.len(), 1);
    assert_ne!(leaders[0], 1);
}

#[test]
fn follower_acks_only_durable_entries() {
    let mut net = Net::new(3);
    net.elect(1);
    net.stuck_disk.insert(2);
    net.stuck_disk.insert(3);
    let idx = net.node(1).propose(b("x")).expect("leader");
    net.settle();
    assert!(net.node(1).commit() < idx, "no follower made it durable");
    net.stuck_disk.clear();
    // Acknowledge the followers' pending writes now.
    for id in [2, 3] {
        let last = net.node(id).last_index();
        let term = net.node(id).term_at(last).expect("entry");
        net.node(id).advance(Persisted {
            entries: Some((term, last)),
            ..Persisted::default()
        });
    }
    net.settle();
    assert_eq!(net.node(1).commit(), idx);
}

#[test]
fn fast_backtracking_resolves_divergent_log() {
    let mut net = Net::new(3);
    net.elect(1);
    net.node(1).propose(b("a")).expect("leader");
    net.settle();
    // Node 1 appends a long uncommitted tail of its term while cut off.
    net.isolate(1);
    for i in 0..30 {
        net.node(1)
            .propose(b(&format!("stale{i}")))
            .expect("leader");
    }
    net.settle();
    net.tick_all(30);
    let l = *net.leaders().iter().find(|&&l| l != 1).expect("new leader");
    for i in 0..10 {
        net.node(l).propose(b(&format!("new{i}"))).expect("leader");
    }
    net.settle();
    net.cut.clear();
    net.tick_all(3);
    assert_eq!(net.node(1).role(), Role::Follower);
    let last = net.node(l).last_index();
    assert_eq!(net.node(1).last_index(), last);
    for i in 1..=last {
        assert_eq!(net.node(1).term_at(i), net.node(l).term_at(i), "index {i}");
    }
    assert!(!net.data(1).iter().any(|d| d.starts_with(b"stale")));
}

#[test]
fn read_index_confirms_leadership_and_forwards() {
    let mut net = Net::new(3);
    net.elect(1);
    net.node(1).propose(b("x")).expect("leader");
    net.settle();
    net.node(1).read_index(b("r1")).expect("leader");
    net.node(3).read_index(b("r3")).expect("has leader");
    net.settle();
    let commit = net.node(1).commit();
    assert_eq!(
        net.reads[&1],
        vec![ReadState {
            index: commit,
            ctx: b("r1")
        }]
    );
    assert_eq!(
        net.reads[&3],
        vec![ReadState {
            index: commit,
            ctx: b("r3")
        }]
    );
    // An isolated leader cannot confirm a read.
    net.isolate(1);
    net.node(1)
        .read_index(b("lost"))
        .expect("still thinks it leads");
    net.settle();
    assert_eq!(net.reads[&1].len(), 1);
}

#[test]
fn lease_read_answers_without_a_round_trip() {
    let ids = vec![1, 2, 3];
    let mut net = Net::new(0);
    for id in 1..=3 {
        let mut c = cfg(id);
        c.lease_ticks = 5;
        net.add(id, DurableState::bootstrap(ids.clone()), c);
    }
    net.node(1).campaign();
    net.settle();
    assert_ne!(
        net.node(1).role(),
        Role::Leader,
        "fresh nodes guard a lease they may have granted"
    );
    net.tick_all(25);
    let l = net.leaders()[0];
    net.isolate(l);
    net.node(l).read_index(b("r")).expect("leader");
    net.settle();
    assert_eq!(net.reads[&l].len(), 1, "lease still valid");
    for _ in 0..6 {
        net.node(l).tick();
    }
    net.settle();
    net.node(l).read_index(b("r2")).expect("leader");
    net.settle();
    assert_eq!(
        net.reads[&l].len(),
        1,
        "lease expired: falls back to ReadIndex"
    );
}

#[test]
fn snapshot_catches_up_a_lagging_follower() {
    let mut net = Net::new(3);
    net.elect(1);
    net.isolate(3);
    for i in 0..20 {
        net.node(1).propose(b(&format!("v{i}"))).expect("leader");
    }
    net.settle();
    let applied = net.node(1).applied();
    net.node(1).compact(applied, b("state")).expect("compact");
    assert!(net.node(1).compact(applied + 100, b("x")).is_err());
    net.cut.clear();
    net.tick_all(3);
    assert_eq!(
        net.snapshots.get(&3).map(|s| s.data.clone()),
        Some(b("state"))
    );
    assert_eq!(net.node(3).commit(), net.node(1).commit());
    net.node(1).propose(b("after")).expect("leader");
    net.settle();
    net.tick_all(1);
    assert_eq!(net.data(3).last(), Some(&b("after")));
}

#[test]
fn learner_replicates_without_voting_then_promotes() {
    let mut net = Net::new(3);
    net.elect(1);
    net.add(4, DurableState::default(), cfg(4));
    net.node(1)
        .propose_conf_change(ConfChange::AddLearner(4))
        .expect("leader");
    assert_eq!(
        net.node(1).propose_conf_change(ConfChange::AddVoter(5)),
        Err(Error::ConfChangePending)
    );
    net.settle();
    net.tick_all(3);
    assert!(net.node(1).conf_state().learners.contains(&4));
    net.node(1).propose(b("x")).expect("leader");
    net.settle();
    net.tick_all(1);
    assert_eq!(net.data(4).last(), Some(&b("x")));
    // With two voters down, the learner does not make a quorum.
    net.isolate(2);
    net.isolate(3);
    let idx = net.node(1).propose(b("y")).expect("leader");
    net.settle();
    assert!(net.node(1).commit() < idx);
    net.cut.clear();
    net.tick_all(2);
    net.node(1)
        .propose_conf_change(ConfChange::PromoteLearner(4))
        .expect("leader");
    net.settle();
    net.tick_all(2);
    assert_eq!(net.node(4).conf_state().voters.len(), 4);
    net.node(1)
        .propose_conf_change(ConfChange::Remove(2))
        .expect("leader");
    net.settle();
    net.tick_all(2);
    assert_eq!(
        net.node(1).conf_state().voters,
        [1, 3, 4].into_iter().collect()
    );
}

#[test]
fn leader_transfer_hands_over_and_blocks_proposals() {
    let mut net = Net::new(3);
    net.elect(1);
    net.isolate(3);
    net.node(1).propose(b("x")).expect("leader");
    net.settle();
    net.node(1).transfer_leader(3).expect("leader");
    assert_eq!(
        net.node(1).propose(b("y")),
        Err(Error::TransferInProgress(3))
    );
    net.cut.clear();
    net.tick_all(2);
    assert_eq!(net.leaders(), vec![3]);
    assert!(net.node(1).transfer_leader(2).is_err(), "no longer leader");
}

#[test]
fn leader_transfer_aborts_after_election_timeout() {
    let mut net = Net::new(3);
    net.elect(1);
    net.isolate(3);
    net.node(1).transfer_leader(3).expect("leader");
    net.tick_all(12);
    assert_eq!(net.node(1).role(), Role::Leader);
    assert_eq!(net.node(1).lead_transferee(), None);
    net.node(1).propose(b("y")).expect("transfer abandoned");
}

#[test]
fn restart_keeps_only_durable_state() {
    let mut net = Net::new(1);
    net.elect(1);
    net.node(1).propose(b("x")).expect("leader");
    net.settle();
    let n = net.node(1);
    let entries = (n.first_index()..=n.last_index())
        .filter_map(|i| n.entry(i).cloned())
        .collect();
    let st = DurableState {
        hard_state: n.hard_state(),
        snapshot: Snapshot::bootstrap([1]),
        entries,
    };
    let mut r = Raft::new(cfg(1), st).expect("restore");
    assert_eq!(r.role(), Role::Follower);
    let rd = r.ready();
    assert_eq!(
        rd.committed_entries.last().map(|e| e.data.clone()),
        Some(b("x"))
    );
}

#[test]
fn invalid_input_is_rejected_not_panicked() {
    let mut c = cfg(0);
    assert!(Raft::new(c.clone(), DurableState::default()).is_err());
    c.id = 1;
    c.lease_ticks = 50;
    assert!(Raft::new(c, DurableState::default()).is_err());
    let mut net = Net::new(3);
    net.elect(1);
    let n = net.node(1);
    assert!(n.propose_conf_change(ConfChange::AddVoter(2)).is_err());
    assert!(n.propose_conf_change(ConfChange::Remove(9)).is_err());
    assert!(n.transfer_leader(9).is_err());
    // Garbage messages are ignored.
    let mut m = Message::new(MessageKind::HeartbeatResponse, 2, 1, n.term());
    m.context = b("short");
    n.step(m);
    n.step(Message::new(MessageKind::Snapshot, 2, 1, n.term() + 5));
}

#[test]
fn leader_never_commits_an_old_term_entry_by_counting_replicas() {
    // Figure 8 of the Raft paper: an entry of term 2 on a majority is not committed by a
    // term-4 leader until an entry of term 4 is on a majority too.
    let mut c = cfg(1);
    c.pre_vote = false;
    let old = Entry {
        term: 2,
        index: 2,
        kind: EntryKind::Normal,
        data: b("old"),
    };
    let st = DurableState {
        hard_state: HardState {
            term: 3,
            vote: None,
            commit: 1,
        },
        snapshot: Snapshot::bootstrap([1, 2, 3]),
        entries: vec![old],
    };
    let mut r = Raft::new(c, st).expect("restore");
    r.campaign();
    let rd = r.ready();
    r.advance(Persisted {
        hard_state: rd.hard_state,
        ..Persisted::default()
    });
    r.step(Message::new(MessageKind::RequestVoteResponse, 2, 1, 4));
    assert_eq!(r.role(), Role::Leader);
    assert_eq!(r.last_index(), 3, "no-op of term 4 appended");
    let rd = r.ready();
    let mut ack = Message::new(MessageKind::AppendResponse, 2, 1, 4);
    ack.index = 2;
    r.step(ack.clone());
    assert_eq!(
        r.commit(),
        1,
        "index 2 is on a majority but of an older term"
    );
    r.advance(rd.persisted());
    assert_eq!(r.commit(), 1);
    ack.index = 3;
    r.step(ack);
    assert_eq!(
        r.commit(),
        3,
        "the term-4 entry commits, and the old one with it"
    );
}

#[test]
fn flow_control_bounds_batches_and_inflight_appends() {
    let mut net = Net::new(3);
    net.elect(1);
    net.tick_all(1);
    net.appends.clear();
    // Node 2 receives but its answers are lost: at most max_inflight (2) appends of at most
    // max_entries_per_msg (4) entries go out to it.
    net.cut.insert((2, 1));
    for i in 0..20 {
        net.node(1).propose(b(&format!("v{i}"))).expect("leader");
        net.settle();
    }
    // (Empty appends that only carry the commit index do not occupy the window.)
    let to2: Vec<usize> = net
        .appends
        .iter()
        .filter(|a| a.1 == 2 && a.2 > 0)
        .map(|a| a.2)
        .collect();
    assert_eq!(to2.len(), 2, "{to2:?}");
    assert!(to2.iter().all(|&n| n <= 4));
    let to3 = net.appends.iter().filter(|a| a.1 == 3).count();
    assert!(to3 >= 5, "node 3 answers, so its window keeps moving");
    // Once answers flow again the stalled follower is probed and catches up.
    net.cut.clear();
    net.tick_all(8);
    assert_eq!(net.node(2).last_index(), net.node(1).last_index());
}

#[test]
fn duplicated_messages_are_harmless() {
    let mut net = Net::new(3);
    net.dup = true;
    net.elect(1);
    for i in 0..30 {
        net.node(1).propose(b(&format!("v{i}"))).expect("leader");
    }
    net.settle();
    net.tick_all(2);
    for id in 1..=3 {
        assert_eq!(net.data(id).len(), 30, "node {id}");
    }
    assert_eq!(net.leaders(), vec![1]);
}

#[test]
fn new_leader_refuses_conf_change_until_its_log_is_applied() {
    let mut net = Net::new(3);
    net.elect(1);
    let idx = net
        .node(1)
        .propose_conf_change(ConfChange::AddLearner(4))
        .expect("leader");
    net.settle();
    net.tick_all(1);
    assert!(net.node(1).applied() >= idx);
    net.node(1)
        .propose_conf_change(ConfChange::Remove(4))
        .expect("previous change applied");
    net.settle();
    net.tick_all(1);
    assert!(!net.node(1).conf_state().contains(4));
}

#[test]
fn a_rejected_candidate_does_not_delay_the_up_to_date_node() {
    // Without pre-vote, a candidate with a stale log bumps the term of the node that could
    // win; that node must still campaign on its original schedule.
    let classic = |id| {
        let mut c = cfg(id);
        c.pre_vote = false;
        c.check_quorum = false;
        c
    };
    let stale = Raft::new(classic(1), DurableState::bootstrap([1, 2]));
    let mut ahead = DurableState::bootstrap([1, 2]);
    ahead.entries.push(Entry {
        term: 1,
        index: 2,
        kind: EntryKind::Normal,
        data: b("x"),
    });
    let (mut n1, mut n2) = (
        stale.expect("valid"),
        Raft::new(classic(2), ahead).expect("valid"),
    );
    for _ in 0..9 {
        n2.tick();
    }
    n1.campaign();
    let rd = n1.ready();
    n1.advance(rd.persisted());
    for m in n1.ready().messages {
        n2.step(m);
    }
    assert_eq!(
        (n2.term(), n2.role()),
        (2, Role::Follower),
        "vote refused, term learned"
    );
    for _ in 0..11 {
        n2.tick();
    }
    assert_eq!(
        n2.role(),
        Role::Candidate,
        "timed out within 2 * election_tick of its start"
    );
}
