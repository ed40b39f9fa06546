//! Deterministic simulation of `spindle::raft` groups under faults, with safety checks after
//! every step and a linearizability check of client histories at the end.
//!
//! Everything derives from one seed (no wall clock, no hash-order iteration), so a failure
//! replays exactly: `SPINDLE_SIM_SEED=<seed> SPINDLE_SIM_SEEDS=1 cargo test --release --test
//! raft_sim`. See docs/raft.md for the fault model.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use spindle::raft::{
    ConfChange, Config, DurableState, Entry, EntryKind, HardState, Message, NodeId, Persisted,
    Raft, ReadState, Rng, Role, Snapshot,
};

// ---- randomness -----------------------------------------------------------------------------

trait RngExt {
    fn chance(&mut self, p: f64) -> bool;
    fn range(&mut self, lo: u64, hi: u64) -> u64;
}

impl RngExt for Rng {
    fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
    /// Uniform in `[lo, hi]`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
}

// ---- the KV model (state machine and linearizability) --------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Put {
        key: u64,
        value: u64,
    },
    /// Sets `new` if the current value is `expect`.
    Cas {
        key: u64,
        expect: u64,
        new: u64,
    },
    Get {
        key: u64,
    },
}

impl Op {
    fn key(&self) -> u64 {
        match *self {
            Op::Put { key, .. } | Op::Cas { key, .. } | Op::Get { key } => key,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Output {
    Put,
    Cas(bool),
    Get(Option<u64>),
}

/// One client operation as observed by the client. `ret == u64::MAX`: timed out, it may or may
/// not have taken effect (`output` is then unknown).
#[derive(Clone, Debug)]
struct HistOp {
    op: Op,
    call: u64,
    ret: u64,
    output: Option<Output>,
}

const NEVER: u64 = u64::MAX;

/// The sequential specification of one key.
fn model_step(state: Option<u64>, op: &Op, out: Option<Output>) -> Option<Option<u64>> {
    let (next, actual) = match *op {
        Op::Put { value, .. } => (Some(value), Output::Put),
        Op::Cas { expect, new, .. } => {
            if state == Some(expect) {
                (Some(new), Output::Cas(true))
            } else {
                (state, Output::Cas(false))
            }
        }
        Op::Get { .. } => (state, Output::Get(state)),
    };
    match out {
        Some(o) if o != actual => None,
        _ => Some(next),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Linearizable,
    Violation,
    /// The search budget ran out: neither proven nor refuted.
    Unknown,
}

/// Wing & Gong search with Lowe's memoization (as in Porcupine), on one key's history:
/// walk events in time order; at a call, try to linearize that op now; at a return of an op
/// not yet linearized, backtrack. `(linearized set, state)` pairs already explored are skipped.
fn check_key(ops: &[HistOp], budget: u64) -> Verdict {
    const HEAD: usize = usize::MAX;
    // Events: (time, is_return, op). Calls sort before returns at the same instant, which
    // treats them as concurrent: never stricter than the real order.
    let mut evs: Vec<(u64, bool, usize)> = Vec::new();
    for (i, o) in ops.iter().enumerate() {
        evs.push((o.call, false, i));
        evs.push((o.ret, true, i));
    }
    evs.sort();
    let n = evs.len();
    let mut next: Vec<usize> = (1..=n).collect();
    let mut prev: Vec<usize> = (0..n).map(|i| if i == 0 { HEAD } else { i - 1 }).collect();
    if n > 0 {
        next[n - 1] = n; // n == end
    }
    let mut head_next = if n == 0 { n } else { 0 };
    let mut ret_of = vec![0usize; ops.len()];
    for (ei, e) in evs.iter().enumerate() {
        if e.1 {
            ret_of[e.2] = ei;
        }
    }
    let words = ops.len().div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: BTreeSet<(Vec<u64>, Option<u64>)> = BTreeSet::new();
    let mut stack: Vec<(usize, Option<u64>)> = Vec::new();
    let mut state: Option<u64> = None;
    let mut entry = head_next;
    let mut steps = 0u64;

    macro_rules! unlink {
        ($i:expr) => {{
            let (p, nx) = (prev[$i], next[$i]);
            if p == HEAD {
                head_next = nx;
            } else {
                next[p] = nx;
            }
            if nx < n {
                prev[nx] = p;
            }
        }};
    }
    macro_rules! relink {
        ($i:expr) => {{
            let (p, nx) = (prev[$i], next[$i]);
            if p == HEAD {
                head_next = $i;
            } else {
                next[p] = $i;
            }
            if nx < n {
                prev[nx] = $i;
            }
        }};
    }

    while head_next < n {
        steps += 1;
        if steps > budget {
            return Verdict::Unknown;
        }
        if entry >= n {
            // Walked past every remaining event without a return: impossible (returns exist
            // for all ops), but treat defensively as failure to place anything.
            return Verdict::Violation;
        }
        let (_, is_ret, op) = evs[entry];
        if !is_ret {
            let o = &ops[op];
            match model_step(state, &o.op, o.output) {
                Some(ns) => {
                    linearized[op / 64] |= 1 << (op % 64);
                    if cache.insert((linearized.clone(), ns)) {
                        stack.push((entry, state));
                        state = ns;
                        unlink!(entry);
                        unlink!(ret_of[op]);
                        entry = head_next;
                    } else {
                        linearized[op / 64] &= !(1 << (op % 64));
                        entry = next[entry];
                    }
                }
                None => entry = next[entry],
            }
        } else {
            let Some((call, old)) = stack.pop() else {
                return Verdict::Violation;
            };
            let op = evs[call].2;
            state = old;
            linearized[op / 64] &= !(1 << (op % 64));
            relink!(ret_of[op]);
            relink!(call);
            entry = next[call];
        }
    }
    Verdict::Linearizable
}

fn check_history(ops: &[HistOp]) -> Verdict {
    let mut by_key: BTreeMap<u64, Vec<HistOp>> = BTreeMap::new();
    for o in ops {
        by_key.entry(o.op.key()).or_default().push(o.clone());
    }
    let mut verdict = Verdict::Linearizable;
    for ops in by_key.values() {
        match check_key(ops, 2_000_000) {
            Verdict::Violation => return Verdict::Violation,
            Verdict::Unknown => verdict = Verdict::Unknown,
            Verdict::Linearizable => {}
        }
    }
    verdict
}

/// The replicated state machine: a map plus the result of every applied command.
#[derive(Clone, Debug, Default)]
struct Kv {
    map: BTreeMap<u64, u64>,
    applied: u64,
}

fn encode_cmd(op_id: u64, op: &Op) -> Bytes {
    let mut b = BytesMut::with_capacity(33);
    b.put_u64(op_id);
    match *op {
        Op::Put { key, value } => {
            b.put_u8(1);
            b.put_u64(key);
            b.put_u64(value);
            b.put_u64(0);
        }
        Op::Cas { key, expect, new } => {
            b.put_u8(2);
            b.put_u64(key);
            b.put_u64(expect);
            b.put_u64(new);
        }
        Op::Get { key } => {
            b.put_u8(3);
            b.put_u64(key);
            b.put_u64(0);
            b.put_u64(0);
        }
    }
    b.freeze()
}

impl Kv {
    /// Applies one command; returns (op id, output).
    fn apply(&mut self, e: &Entry) -> Option<(u64, Output)> {
        assert_eq!(e.index, self.applied + 1, "apply out of order");
        self.applied = e.index;
        if e.kind != EntryKind::Normal || e.data.len() != 33 {
            return None;
        }
        let mut d = e.data.clone();
        let (id, tag, key, a, b) = (
            d.get_u64(),
            d.get_u8(),
            d.get_u64(),
            d.get_u64(),
            d.get_u64(),
        );
        let out = match tag {
            1 => {
                self.map.insert(key, a);
                Output::Put
            }
            2 => {
                let ok = self.map.get(&key) == Some(&a);
                if ok {
                    self.map.insert(key, b);
                }
                Output::Cas(ok)
            }
            _ => return None,
        };
        Some((id, out))
    }

    fn encode(&self) -> Bytes {
        let mut b = BytesMut::new();
        for (k, v) in &self.map {
            b.put_u64(*k);
            b.put_u64(*v);
        }
        b.freeze()
    }

    fn restore(data: &Bytes, applied: u64) -> Kv {
        let mut d = data.clone();
        let mut map = BTreeMap::new();
        while d.remaining() >= 16 {
            let k = d.get_u64();
            map.insert(k, d.get_u64());
        }
        Kv { map, applied }
    }
}

// ---- the simulated cluster ------------------------------------------------------------------

#[derive(Clone, Debug, Default)]
struct Disk {
    hs: HardState,
    snapshot: Snapshot,
    entries: Vec<Entry>,
}

impl Disk {
    fn write(&mut self, job: &DiskJob) {
        if let Some(s) = &job.snapshot {
            self.snapshot = s.clone();
            self.entries.clear();
        }
        if let Some(first) = job.entries.first() {
            self.entries.retain(|e| e.index < first.index);
            let base = self.snapshot.meta.index;
            self.entries
                .extend(job.entries.iter().filter(|e| e.index > base).cloned());
        }
        if let Some(hs) = job.hs {
            self.hs = hs;
        }
    }
}

#[derive(Debug)]
struct DiskJob {
    done_at: u64,
    snapshot: Option<Snapshot>,
    entries: Vec<Entry>,
    hs: Option<HardState>,
    ack: Persisted,
}

struct Node {
    id: NodeId,
    raft: Option<Raft>,
    disk: Disk,
    kv: Kv,
    jobs: VecDeque<DiskJob>,
    disk_delay: u64,
    tick_period: u64,
    next_tick: u64,
    /// Read states waiting for the applied index: (index, op id).
    reads: Vec<(u64, u64)>,
    last_commit: u64,
    last_term: u64,
    down_until: u64,
}

struct Pending {
    client: usize,
    node: NodeId,
    op: Op,
    call: u64,
}

struct Params {
    loss: f64,
    dup: f64,
    max_delay: u64,
    crash: f64,
    partition: f64,
    admin: f64,
    client_rate: f64,
    lease: bool,
    /// Classic Raft without pre-vote and check-quorum: deposed leaders linger longer.
    classic: bool,
}

struct Sim {
    seed: u64,
    rng: Rng,
    p: Params,
    now: u64,
    nodes: BTreeMap<NodeId, Node>,
    net: BTreeMap<(u64, u64), Message>,
    msg_seq: u64,
    blocked: BTreeSet<(NodeId, NodeId)>,
    heal_at: u64,
    // invariants
    leaders: BTreeMap<u64, NodeId>,
    entries_seen: BTreeMap<(u64, u64), (Bytes, u64)>,
    committed: BTreeMap<u64, u64>,
    applied: BTreeMap<u64, (u64, Bytes)>,
    // clients
    clients: Vec<Option<u64>>,
    /// The node each client talks to; it moves on when refused.
    sticky: Vec<NodeId>,
    pending: BTreeMap<u64, Pending>,
    history: Vec<HistOp>,
    next_op: u64,
    next_value: u64,
    completed_writes: u64,
    stats: Stats,
}

/// What a run exercised, to show the faults and features actually happen.
#[derive(Clone, Copy, Debug, Default)]
struct Stats {
    leaders: u64,
    crashes: u64,
    partitions: u64,
    snapshots_installed: u64,
    compactions: u64,
    conf_changes: u64,
    transfers: u64,
    reads: u64,
    writes: u64,
    maybe: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.leaders += o.leaders;
        self.crashes += o.crashes;
        self.partitions += o.partitions;
        self.snapshots_installed += o.snapshots_installed;
        self.compactions += o.compactions;
        self.conf_changes += o.conf_changes;
        self.transfers += o.transfers;
        self.reads += o.reads;
        self.writes += o.writes;
        self.maybe += o.maybe;
    }
}

const ELECTION_TICK: u64 = 10;
const CLIENT_TIMEOUT: u64 = 150;
const KEYS: u64 = 3;

impl Sim {
    fn new(seed: u64, members: u64) -> Sim {
        let mut rng = Rng::new(seed);
        let skew = rng.chance(0.5);
        let classic = rng.chance(0.25);
        let lease = !skew && !classic && rng.chance(0.5);
        let p = Params {
            loss: [0.0, 0.01, 0.05, 0.15][rng.below(4) as usize],
            dup: [0.0, 0.02, 0.1][rng.below(3) as usize],
            max_delay: rng.range(1, 8),
            crash: [0.0, 0.002, 0.01][rng.below(3) as usize],
            partition: [0.0, 0.002, 0.006][rng.below(3) as usize],
            admin: [0.0, 0.003, 0.01][rng.below(3) as usize],
            client_rate: [0.05, 0.2][rng.below(2) as usize],
            lease,
            classic,
        };
        let founders: Vec<NodeId> = (1..=members).collect();
        let mut nodes = BTreeMap::new();
        // Two spare nodes that may join through membership changes.
        for id in 1..=members + 2 {
            let st = if id <= members {
                DurableState::bootstrap(founders.clone())
            } else {
                DurableState::default()
            };
            // Clock skew: nodes tick every 3..=5 steps (lease runs use 4 +- 0: see docs).
            let tick_period = if skew { rng.range(3, 5) } else { 4 };
            let disk_delay = [0, 1, 4, 12][rng.below(4) as usize];
            let disk = Disk {
                hs: st.hard_state,
                snapshot: st.snapshot.clone(),
                entries: vec![],
            };
            let kv = Kv {
                map: BTreeMap::new(),
                applied: st.snapshot.meta.index,
            };
            let mut n = Node {
                id,
                raft: None,
                disk,
                kv,
                jobs: VecDeque::new(),
                disk_delay,
                tick_period,
                next_tick: rng.range(0, tick_period),
                reads: Vec::new(),
                last_commit: 0,
                last_term: 0,
                down_until: 0,
            };
            n.raft = Some(Raft::new(node_config(id, seed, 0, &p), st).expect("config"));
            nodes.insert(id, n);
        }
        Sim {
            seed,
            rng,
            p,
            now: 0,
            nodes,
            net: BTreeMap::new(),
            msg_seq: 0,
            blocked: BTreeSet::new(),
            heal_at: 0,
            leaders: BTreeMap::new(),
            entries_seen: BTreeMap::new(),
            committed: BTreeMap::new(),
            applied: BTreeMap::new(),
            clients: vec![None; 4],
            sticky: vec![1; 4],
            pending: BTreeMap::new(),
            history: Vec::new(),
            next_op: 1,
            next_value: 1,
            completed_writes: 0,
            stats: Stats::default(),
        }
    }

    fn fail(&self, what: String) -> ! {
        for n in self.nodes.values() {
            match &n.raft {
                Some(r) => eprintln!(
                    "  node {}: {:?} term {} lead {:?} commit {} applied {} last {} voters {:?} learners {:?}",
                    n.id,
                    r.role(),
                    r.term(),
                    r.leader(),
                    r.commit(),
                    r.applied(),
                    r.last_index(),
                    r.conf_state().voters,
                    r.conf_state().learners
                ),
                None => eprintln!("  node {}: down", n.id),
            }
        }
        eprintln!(
            "  clients {:?} sticky {:?} pending {}",
            self.clients,
            self.sticky,
            self.pending.len()
        );
        panic!("seed {}: step {}: {}", self.seed, self.now, what);
    }

    fn send(&mut self, m: Message) {
        if self.blocked.contains(&(m.from, m.to)) || self.rng.chance(self.p.loss) {
            return;
        }
        let copies = if self.rng.chance(self.p.dup) { 2 } else { 1 };
        for _ in 0..copies {
            let at = self.now + self.rng.range(1, self.p.max_delay);
            self.msg_seq += 1;
            self.net.insert((at, self.msg_seq), m.clone());
        }
    }

    fn leader(&self) -> Option<NodeId> {
        // The leader of the highest term among live nodes (a stale one may linger).
        self.nodes
            .values()
            .filter_map(|n| n.raft.as_ref())
            .filter(|r| r.role() == Role::Leader)
            .max_by_key(|r| r.term())
            .map(|r| r.id())
    }

    fn live_ids(&self) -> Vec<NodeId> {
        self.nodes
            .values()
            .filter(|n| n.raft.is_some())
            .map(|n| n.id)
            .collect()
    }

    // ---- faults ------------------------------------------------------------------------------

    fn crash(&mut self, id: NodeId) {
        let down = self.rng.range(5, 150);
        let now = self.now;
        let Some(n) = self.nodes.get_mut(&id) else {
            return;
        };
        if n.raft.is_none() {
            return;
        }
        self.stats.crashes += 1;
        n.raft = None;
        n.jobs.clear(); // unacknowledged writes are lost
        n.reads.clear();
        n.down_until = now + down;
        // Clients waiting on this node never hear back: their ops may or may not happen.
        let lost: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.node == id)
            .map(|(k, _)| *k)
            .collect();
        for op_id in lost {
            self.time_out(op_id);
        }
    }

    fn restart(&mut self, id: NodeId) {
        let seed = self.seed;
        let Some(n) = self.nodes.get_mut(&id) else {
            return;
        };
        let st = DurableState {
            hard_state: n.disk.hs,
            snapshot: n.disk.snapshot.clone(),
            entries: n.disk.entries.clone(),
        };
        n.kv = Kv::restore(&st.snapshot.data, st.snapshot.meta.index);
        n.last_commit = 0;
        n.last_term = 0;
        let cfg = node_config(id, seed, self.now, &self.p);
        match Raft::new(cfg, st) {
            Ok(r) => n.raft = Some(r),
            Err(e) => self.fail(format!("node {id} cannot restart from its disk: {e}")),
        }
    }

    fn faults(&mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        // Restarts.
        for &id in &ids {
            let n = &self.nodes[&id];
            if n.raft.is_none() && n.down_until <= self.now {
                self.restart(id);
            }
        }
        if self.rng.chance(self.p.crash) {
            let live = self.live_ids();
            if live.is_empty() {
                return;
            }
            let id = live[self.rng.below(live.len() as u64) as usize];
            self.crash(id);
        }
        if !self.blocked.is_empty() && self.now >= self.heal_at {
            self.blocked.clear();
        }
        if self.blocked.is_empty() && self.rng.chance(self.p.partition) {
            self.heal_at = self.now + self.rng.range(20, 300);
            self.stats.partitions += 1;
            if self.rng.chance(0.5) {
                // Symmetric split into two sides.
                let side: BTreeSet<NodeId> = ids
                    .iter()
                    .copied()
                    .filter(|_| self.rng.chance(0.5))
                    .collect();
                for &a in &ids {
                    for &b in &ids {
                        if side.contains(&a) != side.contains(&b) {
                            self.blocked.insert((a, b));
                        }
                    }
                }
            } else {
                // One-way: some links lose messages in one direction only.
                for _ in 0..self.rng.range(1, 4) {
                    let a = ids[self.rng.below(ids.len() as u64) as usize];
                    let b = ids[self.rng.below(ids.len() as u64) as usize];
                    self.blocked.insert((a, b));
                }
            }
        }
        if self.rng.chance(self.p.admin) {
            self.admin();
        }
        // Compaction: each node snapshots its state machine now and then.
        for &id in &ids {
            if !self.rng.chance(0.01) {
                continue;
            }
            let n = self.nodes.get_mut(&id).expect("node");
            let Some(r) = n.raft.as_mut() else { continue };
            let applied = r.applied();
            if applied < r.first_index() + 5 || n.kv.applied != applied {
                continue;
            }
            let data = n.kv.encode();
            if r.compact(applied, data.clone()).is_ok() && r.snapshot_meta().index == applied {
                n.disk.snapshot = Snapshot {
                    meta: r.snapshot_meta().clone(),
                    data,
                };
                n.disk.entries.retain(|e| e.index > applied);
                self.stats.compactions += 1;
            }
        }
    }

    /// Membership changes and leader transfers, issued at the current leader.
    fn admin(&mut self) {
        let Some(l) = self.leader() else { return };
        let pick = self.rng.below(5);
        let all: Vec<NodeId> = self.nodes.keys().copied().collect();
        let r = self
            .nodes
            .get_mut(&l)
            .and_then(|n| n.raft.as_mut())
            .expect("leader is live");
        let conf = r.conf_state().clone();
        let cc = match pick {
            0 => all
                .iter()
                .find(|id| !conf.contains(**id))
                .map(|&id| ConfChange::AddLearner(id)),
            1 => conf
                .learners
                .iter()
                .next()
                .map(|&id| ConfChange::PromoteLearner(id)),
            2 if conf.voters.len() > 3 => {
                let v: Vec<NodeId> = conf.voters.iter().copied().collect();
                Some(ConfChange::Remove(
                    v[self.rng.below(v.len() as u64) as usize],
                ))
            }
            3 => conf
                .learners
                .iter()
                .next()
                .map(|&id| ConfChange::Remove(id)),
            _ => {
                let v: Vec<NodeId> = conf.voters.iter().copied().filter(|&v| v != l).collect();
                if !v.is_empty() {
                    let to = v[self.rng.below(v.len() as u64) as usize];
                    if r.transfer_leader(to).is_ok() {
                        self.stats.transfers += 1;
                    }
                }
                None
            }
        };
        if let Some(cc) = cc {
            let _ = r.propose_conf_change(cc);
        }
    }

    // ---- clients -----------------------------------------------------------------------------

    fn clients(&mut self) {
        for c in 0..self.clients.len() {
            if self.clients[c].is_some() || !self.rng.chance(self.p.client_rate) {
                continue;
            }
            let live = self.live_ids();
            if live.is_empty() {
                return;
            }
            // Clients stick to a node (which may be a deposed leader that does not know it
            // yet) and move to the leader or a random node when refused.
            let node = if live.contains(&self.sticky[c]) {
                self.sticky[c]
            } else {
                live[self.rng.below(live.len() as u64) as usize]
            };
            let key = self.rng.below(KEYS);
            self.next_value += 1;
            let op = match self.rng.below(3) {
                0 => Op::Put {
                    key,
                    value: self.next_value,
                },
                1 => {
                    let cur = self.nodes[&node].kv.map.get(&key).copied().unwrap_or(0);
                    let expect = if self.rng.chance(0.7) {
                        cur
                    } else {
                        self.next_value / 2
                    };
                    Op::Cas {
                        key,
                        expect,
                        new: self.next_value,
                    }
                }
                _ => Op::Get { key },
            };
            let op_id = self.next_op;
            self.next_op += 1;
            let r = self
                .nodes
                .get_mut(&node)
                .and_then(|n| n.raft.as_mut())
                .expect("live");
            let res = match op {
                Op::Get { .. } => r.read_index(Bytes::copy_from_slice(&op_id.to_be_bytes())),
                _ => r.propose(encode_cmd(op_id, &op)).map(|_| ()),
            };
            if res.is_ok() {
                self.clients[c] = Some(op_id);
                self.pending.insert(
                    op_id,
                    Pending {
                        client: c,
                        node,
                        op,
                        call: self.now,
                    },
                );
            } else {
                // A refused request never entered the log: it did not happen.
                self.sticky[c] = match self.leader() {
                    Some(l) if self.rng.chance(0.7) => l,
                    _ => live[self.rng.below(live.len() as u64) as usize],
                };
            }
        }
    }

    fn respond(&mut self, op_id: u64, output: Output) {
        if let Some(p) = self.pending.remove(&op_id) {
            self.clients[p.client] = None;
            if !matches!(output, Output::Get(_)) {
                self.completed_writes += 1;
                self.stats.writes += 1;
            } else {
                self.stats.reads += 1;
            }
            self.history.push(HistOp {
                op: p.op,
                call: p.call,
                ret: self.now,
                output: Some(output),
            });
        }
    }

    fn time_out(&mut self, op_id: u64) {
        if let Some(p) = self.pending.remove(&op_id) {
            self.clients[p.client] = None;
            // Try elsewhere next time: some clients find the new leader while others still
            // talk to a deposed one.
            let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
            self.sticky[p.client] = match self.leader() {
                Some(l) if self.rng.chance(0.5) => l,
                _ => ids[self.rng.below(ids.len() as u64) as usize],
            };
            // A read that never answered has no effect; a write may have happened.
            if !matches!(p.op, Op::Get { .. }) {
                self.stats.maybe += 1;
                self.history.push(HistOp {
                    op: p.op,
                    call: p.call,
                    ret: NEVER,
                    output: None,
                });
            }
        }
    }

    // ---- the node loop ----------------------------------------------------------------------

    fn handle_ready(&mut self, id: NodeId) {
        let Some(n) = self.nodes.get_mut(&id) else {
            return;
        };
        let Some(r) = n.raft.as_mut() else { return };
        if !r.has_ready() {
            return;
        }
        let rd = r.ready();
        let ack = rd.persisted();
        // Log matching: an (index, term) pair always names the same entry and predecessor.
        let mut prev_term = rd.entries.first().and_then(|e| r.term_at(e.index - 1));
        let mut violations = Vec::new();
        for e in &rd.entries {
            let Some(pt) = prev_term else {
                violations.push(format!("node {id}: entry {} has no predecessor", e.index));
                break;
            };
            match self.entries_seen.get(&(e.index, e.term)) {
                Some((d, p)) if *d != e.data || *p != pt => violations.push(format!(
                    "log matching: node {id} entry ({}, {}) differs from another node's",
                    e.index, e.term
                )),
                Some(_) => {}
                None => {
                    self.entries_seen
                        .insert((e.index, e.term), (e.data.clone(), pt));
                }
            }
            prev_term = Some(e.term);
        }
        if rd.conf_state.is_some() {
            self.stats.conf_changes += 1;
        }
        if let Some(s) = &rd.snapshot {
            self.stats.snapshots_installed += 1;
            n.kv = Kv::restore(&s.data, s.meta.index);
            n.reads.clear();
        }
        let mut outputs = Vec::new();
        for e in &rd.committed_entries {
            match self.applied.get(&e.index) {
                Some((t, d)) if *t != e.term || *d != e.data => violations.push(format!(
                    "state machine safety: node {id} applied a different entry at {}",
                    e.index
                )),
                Some(_) => {}
                None => {
                    self.applied.insert(e.index, (e.term, e.data.clone()));
                }
            }
            if let Some(out) = n.kv.apply(e) {
                outputs.push(out);
            }
        }
        for ReadState { index, ctx } in rd.read_states {
            if let Ok(b) = <[u8; 8]>::try_from(&ctx[..]) {
                n.reads.push((index, u64::from_be_bytes(b)));
            }
        }
        let done_at = self.now + n.disk_delay;
        let done_at = n.jobs.back().map_or(done_at, |j| j.done_at.max(done_at));
        if ack != Persisted::default() {
            n.jobs.push_back(DiskJob {
                done_at,
                snapshot: rd.snapshot,
                entries: rd.entries,
                hs: rd.hard_state,
                ack,
            });
        }
        if let Some(v) = violations.into_iter().next() {
            self.fail(v);
        }
        for (op_id, out) in outputs {
            if self.pending.get(&op_id).is_some_and(|p| p.node == id) {
                self.respond(op_id, out);
            }
        }
        for m in rd.messages {
            self.send(m);
        }
    }

    fn serve_reads(&mut self, id: NodeId) {
        let n = self.nodes.get_mut(&id).expect("node");
        let applied = n.kv.applied;
        let (ready, waiting): (Vec<_>, Vec<_>) =
            n.reads.drain(..).partition(|(i, _)| *i <= applied);
        n.reads = waiting;
        let mut answers = Vec::new();
        for (_, op_id) in ready {
            if let Some(p) = self.pending.get(&op_id) {
                if p.node == id {
                    answers.push((op_id, n.kv.map.get(&p.op.key()).copied()));
                }
            }
        }
        for (op_id, v) in answers {
            self.respond(op_id, Output::Get(v));
        }
    }

    fn step(&mut self, faults: bool) {
        self.now += 1;
        if faults {
            self.faults();
        } else {
            for id in self.nodes.keys().copied().collect::<Vec<_>>() {
                if self.nodes[&id].raft.is_none() {
                    self.restart(id);
                }
            }
        }
        self.clients();
        // Deliver due messages.
        while let Some(entry) = self.net.first_entry() {
            if entry.key().0 > self.now {
                break;
            }
            let m = entry.remove();
            if self.blocked.contains(&(m.from, m.to)) {
                continue;
            }
            if let Some(r) = self.nodes.get_mut(&m.to).and_then(|n| n.raft.as_mut()) {
                r.step(m);
            }
        }
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for &id in &ids {
            let now = self.now;
            let n = self.nodes.get_mut(&id).expect("node");
            let Some(r) = n.raft.as_mut() else { continue };
            // Disk completions, in order.
            while n.jobs.front().is_some_and(|j| j.done_at <= now) {
                let Some(job) = n.jobs.pop_front() else { break };
                n.disk.write(&job);
                r.advance(job.ack);
            }
            if n.next_tick <= now {
                n.next_tick = now + n.tick_period;
                r.tick();
            }
        }
        for &id in &ids {
            self.handle_ready(id);
            self.serve_reads(id);
        }
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.call + CLIENT_TIMEOUT <= self.now)
            .map(|(k, _)| *k)
            .collect();
        for op_id in expired {
            self.time_out(op_id);
        }
        self.check();
    }

    /// Safety properties that must hold after every step.
    fn check(&mut self) {
        let mut errs = Vec::new();
        if self.net.len() > 200_000 {
            errs.push(format!(
                "message storm: {} messages in flight",
                self.net.len()
            ));
        }
        for n in self.nodes.values_mut() {
            let Some(r) = n.raft.as_ref() else { continue };
            if r.term() < n.last_term {
                errs.push(format!(
                    "node {}: term went back {} -> {}",
                    n.id,
                    n.last_term,
                    r.term()
                ));
            }
            n.last_term = r.term();
            if r.commit() < n.last_commit {
                errs.push(format!("node {}: commit went back", n.id));
            }
            // Every committed entry agrees across nodes.
            for i in n.last_commit.max(r.first_index() - 1) + 1..=r.commit() {
                let Some(t) = r.term_at(i) else { continue };
                if let Some(&ct) = self.committed.get(&i) {
                    if ct != t {
                        errs.push(format!(
                            "node {}: committed ({i}, {t}) vs ({i}, {ct})",
                            n.id
                        ));
                    }
                } else {
                    self.committed.insert(i, t);
                }
            }
            n.last_commit = r.commit();
            if r.role() == Role::Leader {
                match self.leaders.get(&r.term()) {
                    Some(&l) if l != n.id => errs.push(format!(
                        "two leaders in term {}: {l} and {}",
                        r.term(),
                        n.id
                    )),
                    Some(_) => {}
                    None => {
                        self.leaders.insert(r.term(), n.id);
                        self.stats.leaders += 1;
                        // Leader completeness: it holds every entry committed so far.
                        let base = r.snapshot_meta().index;
                        for (&i, &t) in self.committed.range(base + 1..) {
                            if r.term_at(i) != Some(t) {
                                errs.push(format!(
                                    "leader completeness: leader {} of term {} lacks committed ({i}, {t})",
                                    n.id,
                                    r.term()
                                ));
                                break;
                            }
                        }
                    }
                }
            }
        }
        if let Some(e) = errs.into_iter().next() {
            self.fail(e);
        }
    }

    fn run(&mut self, steps: u64) {
        for _ in 0..steps {
            self.step(true);
        }
        // Quiet period: heal, restart everyone, and require progress.
        self.blocked.clear();
        let before = self.completed_writes;
        let mut quiet = 0;
        while quiet < 1500 && (self.completed_writes == before || quiet < 300) {
            self.p.loss = 0.0;
            self.step(false);
            quiet += 1;
        }
        if self.completed_writes == before {
            self.fail(format!(
                "liveness: no write completed in {quiet} quiet steps"
            ));
        }
        for op_id in self.pending.keys().copied().collect::<Vec<_>>() {
            self.time_out(op_id);
        }
        match check_history(&self.history) {
            Verdict::Violation => self.fail(format!(
                "history of {} operations is not linearizable",
                self.history.len()
            )),
            Verdict::Unknown => eprintln!("seed {}: linearizability check inconclusive", self.seed),
            Verdict::Linearizable => {}
        }
    }
}

fn node_config(id: NodeId, seed: u64, now: u64, p: &Params) -> Config {
    let mut c = Config::new(id);
    c.election_tick = ELECTION_TICK;
    c.heartbeat_tick = 2;
    c.max_entries_per_msg = 8;
    c.max_bytes_per_msg = 4096;
    c.max_inflight = 4;
    // Lease shorter than the election timeout by more than the worst clock-rate ratio.
    c.lease_ticks = if p.lease { 4 } else { 0 };
    c.pre_vote = !p.classic;
    c.check_quorum = !p.classic;
    c.seed = seed ^ (id << 32) ^ now;
    c
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs the seeds of `[SPINDLE_SIM_SEED, +SPINDLE_SIM_SEEDS)` that `pick` selects.
fn run_seeds(test: &str, members: u64, pick: fn(u64) -> bool) {
    let seeds = env_u64("SPINDLE_SIM_SEEDS", 3000);
    let start = env_u64("SPINDLE_SIM_SEED", 1);
    let steps = env_u64("SPINDLE_SIM_STEPS", 2500);
    let mut total = Stats::default();
    for seed in (start..start + seeds).filter(|s| pick(*s)) {
        let res = catch_unwind(AssertUnwindSafe(|| {
            let mut sim = Sim::new(seed, members);
            sim.run(steps);
            sim.stats
        }));
        match res {
            Ok(st) => total.add(&st),
            Err(_) => panic!(
                "raft simulation failed at seed {seed} ({members} members); replay with:\n  \
                 SPINDLE_SIM_SEED={seed} SPINDLE_SIM_SEEDS=1 cargo test --release --test raft_sim \
                 {test}"
            ),
        }
    }
    eprintln!("{members}-member groups: {total:?}");
}

/// Odd seeds.
#[test]
fn sim_three_members() {
    run_seeds("sim_three_members", 3, |s| s % 2 == 1);
}

/// Even seeds.
#[test]
fn sim_five_members() {
    run_seeds("sim_five_members", 5, |s| s % 2 == 0);
}

/// Every tenth seed: commit is local durability, until learners join and get promoted.
#[test]
fn sim_single_member() {
    run_seeds("sim_single_member", 1, |s| s % 10 == 0);
}

// ---- the checker must be able to say no --------------------------------------------------

fn h(op: Op, call: u64, ret: u64, output: Option<Output>) -> HistOp {
    HistOp {
        op,
        call,
        ret,
        output,
    }
}

#[test]
fn checker_rejects_stale_read() {
    let put = h(Op::Put { key: 1, value: 7 }, 0, 10, Some(Output::Put));
    let stale = h(Op::Get { key: 1 }, 20, 30, Some(Output::Get(None)));
    assert_eq!(check_history(&[put.clone(), stale]), Verdict::Violation);
    let fresh = h(Op::Get { key: 1 }, 20, 30, Some(Output::Get(Some(7))));
    assert_eq!(check_history(&[put.clone(), fresh]), Verdict::Linearizable);
    // Overlapping in time, either order is fine.
    let concurrent = h(Op::Get { key: 1 }, 5, 30, Some(Output::Get(None)));
    assert_eq!(check_history(&[put, concurrent]), Verdict::Linearizable);
}

#[test]
fn checker_rejects_lost_update_and_impossible_cas() {
    let a = h(Op::Put { key: 1, value: 1 }, 0, 10, Some(Output::Put));
    let b = h(Op::Put { key: 1, value: 2 }, 11, 20, Some(Output::Put));
    let r = h(Op::Get { key: 1 }, 21, 30, Some(Output::Get(Some(1))));
    assert_eq!(
        check_history(&[a.clone(), b.clone(), r]),
        Verdict::Violation
    );
    // Two CAS from the same expected value cannot both succeed.
    let c1 = h(
        Op::Cas {
            key: 1,
            expect: 2,
            new: 3,
        },
        21,
        40,
        Some(Output::Cas(true)),
    );
    let c2 = h(
        Op::Cas {
            key: 1,
            expect: 2,
            new: 4,
        },
        22,
        41,
        Some(Output::Cas(true)),
    );
    assert_eq!(
        check_history(&[a.clone(), b.clone(), c1.clone(), c2]),
        Verdict::Violation
    );
    // A timed-out write may have happened (or not): both reads are explainable.
    let maybe = h(Op::Put { key: 1, value: 9 }, 31, NEVER, None);
    let saw = h(Op::Get { key: 1 }, 50, 60, Some(Output::Get(Some(9))));
    assert_eq!(
        check_history(&[a.clone(), b.clone(), maybe.clone(), saw]),
        Verdict::Linearizable
    );
    let missed = h(Op::Get { key: 1 }, 50, 60, Some(Output::Get(Some(2))));
    assert_eq!(check_history(&[a, b, maybe, missed]), Verdict::Linearizable);
    // Different keys are independent.
    let other = h(Op::Get { key: 2 }, 50, 60, Some(Output::Get(None)));
    assert_eq!(
        check_history(&[c1, other]),
        Verdict::Violation,
        "c1 cannot succeed on absent key"
    );
}
