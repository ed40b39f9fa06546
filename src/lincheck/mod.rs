//! A linearizability checker for recorded client histories of an etcd-like key-value store.
//!
//! Client threads record when they invoke an operation and when, and how, it completed
//! ([`History`]); [`check`] then decides whether one total order of the operations, consistent
//! with real time, explains every result the way a sequential store with one revision counter
//! would have produced them. Cluster tests use it to judge what clients saw across kills and
//! partitions, where comparing the final data alone would miss stale reads and lost writes.
//!
//! How it checks:
//! - **Revision rules of etcd**, over all keys at once: acknowledged writes never share a
//!   revision; a write that completed before another was invoked has the lower revision; a read
//!   returns only values some put wrote, with that put's revision as `mod_revision`.
//! - **Per-key linearizability** of a register. Linearizability is compositional (Herlihy and
//!   Wing's locality), so each key is checked on its own, which keeps the search small. The
//!   search is Wing and Gong's, with Lowe's memoization of (set of linearized operations, state)
//!   (`wgl.rs`); the register state carries the current value's revision and the highest write
//!   revision so far, so writes must also take effect in revision order.
//! - **Indeterminate writes** ([`Outcome::Unknown`]: a timeout, a dropped connection, a member
//!   killed under the request) may have taken effect at any time after their invocation, or
//!   never; the search may place them anywhere after their invocation or leave them out.
//!   [`Outcome::Failed`] writes definitely did not happen and are left out; a failed read says
//!   nothing and is left out too.
//!
//! The search is exponential in the worst case, so it is bounded ([`Limits`]); a key that hits
//! the bound is reported as inconclusive ([`Report::conclusive`]) instead of running forever.

use std::collections::{HashMap, HashSet};
use std::fmt;

mod wgl;

#[cfg(test)]
mod tests;

/// Who issued an operation (a client thread); only used in explanations.
pub type ClientId = u64;

/// An operation's index in its [`History`].
pub type OpId = usize;

/// An operation on the store, as a client invoked it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    /// A linearizable read of one key.
    Get {
        key: Vec<u8>,
    },
    /// A delete of one key.
    Delete {
        key: Vec<u8>,
    },
}

impl Op {
    pub fn key(&self) -> &[u8] {
        match self {
            Op::Put { key, .. } | Op::Get { key } | Op::Delete { key } => key,
        }
    }

    fn is_write(&self) -> bool {
        !matches!(self, Op::Get { .. })
    }
}

/// How an operation completed.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The put was acknowledged at `revision`.
    PutOk { revision: i64 },
    /// The read returned `value` (`None`: no such key) written at `mod_revision` (0 if none).
    GetOk {
        value: Option<Vec<u8>>,
        mod_revision: i64,
    },
    /// The delete was acknowledged; `deleted` says whether the key existed, and then `revision`
    /// is the delete's own revision (otherwise it is only the store's revision and not checked).
    DeleteOk { deleted: bool, revision: i64 },
    /// The operation definitely did not take effect (e.g. it failed before it was sent). Record
    /// this only when certain; otherwise [`Outcome::Unknown`].
    Failed,
    /// The operation may or may not have taken effect (timeout, connection lost, server died).
    Unknown,
}

impl Outcome {
    /// Whether this outcome can answer `op`.
    fn fits(&self, op: &Op) -> bool {
        matches!(
            (self, op),
            (Outcome::PutOk { .. }, Op::Put { .. })
                | (Outcome::GetOk { .. }, Op::Get { .. })
                | (Outcome::DeleteOk { .. }, Op::Delete { .. })
                | (Outcome::Failed | Outcome::Unknown, _)
        )
    }
}

/// One recorded operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub client: ClientId,
    pub op: Op,
    /// When the client invoked it (monotonic nanoseconds; any common origin).
    pub invoked: u64,
    /// When it completed, and how; `None` while pending (a pending write counts as unknown).
    pub completed: Option<(u64, Outcome)>,
}

/// A mistake in recording, refused by [`History::complete`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HistoryError {
    NoSuchOp(OpId),
    AlreadyCompleted(OpId),
    /// The completion time is before the invocation time.
    CompletedBeforeInvoked(OpId),
    /// E.g. a `PutOk` for a `Get`.
    WrongOutcome(OpId),
}

impl fmt::Display for HistoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HistoryError::NoSuchOp(id) => write!(f, "no operation #{id}"),
            HistoryError::AlreadyCompleted(id) => write!(f, "operation #{id} already completed"),
            HistoryError::CompletedBeforeInvoked(id) => {
                write!(f, "operation #{id} completed before it was invoked")
            }
            HistoryError::WrongOutcome(id) => {
                write!(f, "operation #{id} got an outcome of another kind")
            }
        }
    }
}

impl std::error::Error for HistoryError {}

/// Operations as clients invoked them and saw them complete. Not synchronized: concurrent
/// clients share one behind a lock. Times only need to be monotonic; taking the invocation time
/// early or the completion time late only widens an interval, which is always safe.
#[derive(Clone, Debug, Default)]
pub struct History {
    entries: Vec<Entry>,
}

impl History {
    pub fn new() -> History {
        History::default()
    }

    /// Records that `client` invoked `op` at time `t`; complete it later with the returned id.
    pub fn invoke(&mut self, client: ClientId, op: Op, t: u64) -> OpId {
        self.entries.push(Entry {
            client,
            op,
            invoked: t,
            completed: None,
        });
        self.entries.len() - 1
    }

    /// Records that operation `id` completed at time `t` with `outcome`.
    pub fn complete(&mut self, id: OpId, outcome: Outcome, t: u64) -> Result<(), HistoryError> {
        let e = self.entries.get_mut(id).ok_or(HistoryError::NoSuchOp(id))?;
        if e.completed.is_some() {
            return Err(HistoryError::AlreadyCompleted(id));
        }
        if t < e.invoked {
            return Err(HistoryError::CompletedBeforeInvoked(id));
        }
        if !outcome.fits(&e.op) {
            return Err(HistoryError::WrongOutcome(id));
        }
        e.completed = Some((t, outcome));
        Ok(())
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Bounds on the search.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Distinct (linearized set, state) pairs explored per key before giving up on it. Each costs
    /// a bitset of the key's operations in memory.
    pub max_states_per_key: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_states_per_key: 200_000,
        }
    }
}

/// What a successful check covered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Operations recorded.
    pub ops: usize,
    /// Acknowledged puts and deletes.
    pub acknowledged_writes: usize,
    /// Successful reads.
    pub reads: usize,
    /// Writes whose outcome was unknown (or never recorded).
    pub unknown_writes: usize,
    /// Writes that failed, and reads that failed or whose outcome is unknown: left out.
    pub left_out: usize,
    /// Per key, in key order.
    pub keys: Vec<KeyReport>,
}

/// The linearizability search of one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyReport {
    pub key: Vec<u8>,
    /// Operations searched.
    pub ops: usize,
    /// Unknown puts whose value nobody read, removed before the search: leaving them out is
    /// always a valid choice when the key has no deletes (nothing could observe them).
    pub pruned_unknown: usize,
    /// Search states explored.
    pub states: usize,
    /// False if the search hit [`Limits::max_states_per_key`]: neither proven nor refuted.
    pub conclusive: bool,
}

impl Report {
    /// Whether every key was decided (no key hit the search bound).
    pub fn conclusive(&self) -> bool {
        self.keys.iter().all(|k| k.conclusive)
    }

    pub fn inconclusive_keys(&self) -> impl Iterator<Item = &KeyReport> {
        self.keys.iter().filter(|k| !k.conclusive)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let states: usize = self.keys.iter().map(|k| k.states).sum();
        write!(
            f,
            "{} ops ({} acknowledged writes, {} reads, {} unknown writes, {} left out) over {} keys, \
             {states} search states",
            self.ops,
            self.acknowledged_writes,
            self.reads,
            self.unknown_writes,
            self.left_out,
            self.keys.len()
        )?;
        for k in self.inconclusive_keys() {
            write!(f, "; key {} INCONCLUSIVE", show(&k.key))?;
        }
        Ok(())
    }
}

/// Which rule a history breaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViolationKind {
    /// Two acknowledged writes got the same revision.
    DuplicateRevision,
    /// A write that completed before another was invoked got a revision at or above the other's.
    RevisionOrder,
    /// A read returned a value no put (that may have happened) wrote.
    NeverWritten,
    /// A read's `mod_revision` is not the revision of the put that wrote its value.
    ModRevision,
    /// No order of one key's operations, consistent with real time, explains their results.
    NotLinearizable,
}

/// Why a history is not linearizable: the rule, the key (if one), the operations involved, and
/// an explanation naming them with their times.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub kind: ViolationKind,
    pub key: Option<Vec<u8>>,
    pub ops: Vec<OpId>,
    pub explanation: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.explanation)
    }
}

impl std::error::Error for Violation {}

/// Checks `history` with the default [`Limits`].
pub fn check(history: &History) -> Result<Report, Violation> {
    check_with(history, Limits::default())
}

/// Checks `history`: etcd's revision rules over all keys, then every key's linearizability.
pub fn check_with(history: &History, limits: Limits) -> Result<Report, Violation> {
    let h = Normalized::new(history);
    let revealed = h.check_reads()?;
    h.check_revisions(&revealed)?;
    let mut report = Report {
        ops: history.len(),
        acknowledged_writes: h
            .ops
            .iter()
            .filter(|o| o.write_revision().is_some())
            .count(),
        reads: h.ops.iter().filter(|o| !o.op.is_write()).count(),
        unknown_writes: h.ops.iter().filter(|o| o.done.is_none()).count(),
        left_out: history.len() - h.ops.len(),
        keys: Vec::new(),
    };
    let mut by_key: HashMap<&[u8], Vec<usize>> = HashMap::new();
    for (i, o) in h.ops.iter().enumerate() {
        by_key.entry(o.op.key()).or_default().push(i);
    }
    let mut keys: Vec<_> = by_key.into_iter().collect();
    keys.sort_unstable();
    for (key, idx) in keys {
        report.keys.push(h.check_key(key, &idx, limits)?);
    }
    Ok(report)
}

/// An operation that may have taken effect, with what the checker needs of it.
struct Norm<'a> {
    id: OpId,
    op: &'a Op,
    invoked: u64,
    /// Completion time and outcome; `None` for an unknown (or pending) write.
    done: Option<(u64, &'a Outcome)>,
}

impl Norm<'_> {
    /// The revision an acknowledged write took effect at.
    fn write_revision(&self) -> Option<i64> {
        match self.done {
            Some((_, Outcome::PutOk { revision }))
            | Some((
                _,
                Outcome::DeleteOk {
                    deleted: true,
                    revision,
                },
            )) => Some(*revision),
            _ => None,
        }
    }
}

/// The history with failed operations and unanswered reads left out.
struct Normalized<'a> {
    ops: Vec<Norm<'a>>,
    /// Every recorded operation, for explanations.
    all: &'a [Entry],
    /// Times in explanations are relative to the first invocation.
    origin: u64,
    /// Values written by puts that failed, per key (for the explanation of a read of one).
    failed_values: HashSet<(&'a [u8], &'a [u8])>,
}

impl<'a> Normalized<'a> {
    fn new(history: &'a History) -> Normalized<'a> {
        let mut ops = Vec::new();
        let mut failed_values = HashSet::new();
        for (id, e) in history.entries.iter().enumerate() {
            let done = match &e.completed {
                Some((_, Outcome::Failed)) => {
                    if let Op::Put { key, value } = &e.op {
                        failed_values.insert((key.as_slice(), value.as_slice()));
                    }
                    continue;
                }
                Some((_, Outcome::Unknown)) | None => None,
                Some((t, o)) => Some((*t, o)),
            };
            if done.is_none() && !e.op.is_write() {
                continue;
            }
            ops.push(Norm {
                id,
                op: &e.op,
                invoked: e.invoked,
                done,
            });
        }
        let origin = history.entries.iter().map(|e| e.invoked).min().unwrap_or(0);
        Normalized {
            ops,
            all: &history.entries,
            origin,
            failed_values,
        }
    }

    /// `#id client c: put k=v -> rev 5 [1.200..3.400 ms]`.
    fn describe(&self, id: OpId) -> String {
        let Some(e) = self.all.get(id) else {
            return format!("#{id} (not recorded)");
        };
        let op = match &e.op {
            Op::Put { key, value } => format!("put {}={}", show(key), show(value)),
            Op::Get { key } => format!("get {}", show(key)),
            Op::Delete { key } => format!("delete {}", show(key)),
        };
        let ms = |t: u64| t.saturating_sub(self.origin) as f64 / 1e6;
        let (result, end) = match &e.completed {
            None => ("pending".to_string(), "?".to_string()),
            Some((t, o)) => {
                let r = match o {
                    Outcome::PutOk { revision } => format!("rev {revision}"),
                    Outcome::GetOk {
                        value: Some(v),
                        mod_revision,
                    } => format!("{} (mod rev {mod_revision})", show(v)),
                    Outcome::GetOk { value: None, .. } => "no key".to_string(),
                    Outcome::DeleteOk { deleted, revision } => {
                        format!("deleted={deleted} rev {revision}")
                    }
                    Outcome::Failed => "failed".to_string(),
                    Outcome::Unknown => "unknown".to_string(),
                };
                let end = match o {
                    Outcome::Unknown => "?".to_string(),
                    _ => format!("{:.3}", ms(*t)),
                };
                (r, end)
            }
        };
        format!(
            "#{id} client {}: {op} -> {result} [{:.3}..{end} ms]",
            e.client,
            ms(e.invoked)
        )
    }

    fn violation(
        &self,
        kind: ViolationKind,
        key: Option<&[u8]>,
        ops: Vec<OpId>,
        what: String,
    ) -> Violation {
        let mut explanation = what;
        for &id in &ops {
            explanation.push_str("\n  ");
            explanation.push_str(&self.describe(id));
        }
        Violation {
            kind,
            key: key.map(<[u8]>::to_vec),
            ops,
            explanation,
        }
    }

    /// Every value read was written by a put that may have happened, and when exactly one put
    /// wrote it and was acknowledged, the read's `mod_revision` is that put's revision.
    ///
    /// Returns the revisions reads reveal for puts of unknown outcome (index into `self.ops`,
    /// revision): such a put took effect, at the read's `mod_revision`, when its value is unique.
    fn check_reads(&self) -> Result<HashMap<usize, i64>, Violation> {
        let index: HashMap<OpId, usize> = self
            .ops
            .iter()
            .enumerate()
            .map(|(i, o)| (o.id, i))
            .collect();
        let mut revealed: HashMap<usize, (i64, OpId)> = HashMap::new();
        let mut writers: HashMap<(&[u8], &[u8]), Vec<&Norm>> = HashMap::new();
        for o in &self.ops {
            if let Op::Put { key, value } = o.op {
                writers.entry((key, value)).or_default().push(o);
            }
        }
        for o in &self.ops {
            let Some((
                _,
                Outcome::GetOk {
                    value: Some(value),
                    mod_revision,
                },
            )) = o.done
            else {
                continue;
            };
            let key = o.op.key();
            match writers.get(&(key, value.as_slice())).map(Vec::as_slice) {
                None | Some([]) => {
                    let why = if self.failed_values.contains(&(key, value.as_slice())) {
                        "only by a put recorded as failed"
                    } else {
                        "by no put"
                    };
                    return Err(self.violation(
                        ViolationKind::NeverWritten,
                        Some(key),
                        vec![o.id],
                        format!(
                            "key {}: a read returned {}, a value written {why}",
                            show(key),
                            show(value)
                        ),
                    ));
                }
                Some([w]) => {
                    let known = match (w.write_revision(), w.done) {
                        (Some(rev), _) => Some((rev, w.id)),
                        (None, None) => {
                            let i = index.get(&w.id).copied().unwrap_or(usize::MAX);
                            let first = *revealed.entry(i).or_insert((*mod_revision, o.id));
                            Some(first)
                        }
                        _ => None,
                    };
                    if let Some((rev, by)) = known {
                        if rev != *mod_revision {
                            let mut ops = vec![w.id, o.id];
                            if by != w.id {
                                ops.insert(1, by);
                            }
                            return Err(self.violation(
                                ViolationKind::ModRevision,
                                Some(key),
                                ops,
                                format!(
                                    "key {}: a read returned the value put at revision {rev} \
                                     with mod_revision {mod_revision}",
                                    show(key)
                                ),
                            ));
                        }
                    }
                }
                Some(_) => {} // several puts of one value: the register search decides
            }
        }
        Ok(revealed.into_iter().map(|(i, (rev, _))| (i, rev)).collect())
    }

    /// Writes with a known revision (acknowledged, or `revealed` by a read) have distinct
    /// revisions, ordered as real time orders the writes. A revealed write has no known
    /// completion time, so it is only ever the later of two.
    fn check_revisions(&self, revealed: &HashMap<usize, i64>) -> Result<(), Violation> {
        let mut writes: Vec<(&Norm, i64, u64)> = self
            .ops
            .iter()
            .filter_map(|o| Some((o, o.write_revision()?, o.done?.0)))
            .chain(
                revealed
                    .iter()
                    .filter_map(|(&i, &rev)| Some((self.ops.get(i)?, rev, u64::MAX))),
            )
            .collect();
        writes.sort_by_key(|w| w.1);
        for pair in writes.windows(2) {
            if let [a, b] = pair {
                if a.1 == b.1 {
                    return Err(self.violation(
                        ViolationKind::DuplicateRevision,
                        None,
                        vec![a.0.id, b.0.id],
                        format!("two writes share revision {}", a.1),
                    ));
                }
            }
        }
        // Sweep writes by invocation time, folding in every write that completed strictly
        // earlier; the highest revision among those must be below the invoked write's.
        let mut by_end: Vec<&(&Norm, i64, u64)> = writes.iter().collect();
        by_end.sort_by_key(|w| w.2);
        let mut by_start: Vec<&(&Norm, i64, u64)> = writes.iter().collect();
        by_start.sort_by_key(|w| w.0.invoked);
        let mut done = 0;
        let mut highest: Option<&(&Norm, i64, u64)> = None;
        for b in by_start {
            while let Some(a) = by_end.get(done) {
                if a.2 >= b.0.invoked {
                    break;
                }
                if highest.is_none_or(|h| a.1 > h.1) {
                    highest = Some(a);
                }
                done += 1;
            }
            if let Some(a) = highest {
                if a.1 >= b.1 {
                    return Err(self.violation(
                        ViolationKind::RevisionOrder,
                        None,
                        vec![a.0.id, b.0.id],
                        format!(
                            "a write acknowledged at revision {} completed before a write was \
                             invoked that took revision {}",
                            a.1, b.1
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Searches for a linearization of one key's operations (`idx` into `self.ops`).
    fn check_key(&self, key: &[u8], idx: &[usize], limits: Limits) -> Result<KeyReport, Violation> {
        let mut values: HashMap<&[u8], u32> = HashMap::new();
        let mut intern = |v: &'a [u8]| {
            let n = u32::try_from(values.len()).unwrap_or(u32::MAX);
            *values.entry(v).or_insert(n)
        };
        let mut observed = HashSet::new();
        let mut deletes = false;
        for &i in idx {
            let o = &self.ops[i];
            match (o.op, o.done) {
                (Op::Get { .. }, Some((_, Outcome::GetOk { value: Some(v), .. }))) => {
                    observed.insert(intern(v));
                }
                (Op::Delete { .. }, _) => deletes = true,
                _ => {}
            }
        }
        let mut ops = Vec::new();
        let mut pruned = 0;
        for &i in idx {
            let o = &self.ops[i];
            let step = match (o.op, o.done) {
                (Op::Put { value, .. }, done) => {
                    let value = intern(value);
                    let revision = match done {
                        Some((_, Outcome::PutOk { revision })) => Some(*revision),
                        _ => None,
                    };
                    if revision.is_none() && !deletes && !observed.contains(&value) {
                        pruned += 1;
                        continue;
                    }
                    wgl::Step::Put { value, revision }
                }
                (
                    Op::Get { .. },
                    Some((
                        _,
                        Outcome::GetOk {
                            value,
                            mod_revision,
                        },
                    )),
                ) => wgl::Step::Get {
                    value: value.as_deref().map(&mut intern),
                    mod_revision: *mod_revision,
                },
                (Op::Delete { .. }, Some((_, Outcome::DeleteOk { deleted, revision }))) => {
                    wgl::Step::Delete {
                        result: Some((*deleted, *revision)),
                    }
                }
                (Op::Delete { .. }, _) => wgl::Step::Delete { result: None },
                // Outcomes that do not fit the operation are refused when recorded.
                _ => continue,
            };
            ops.push(wgl::KOp {
                id: o.id,
                call: o.invoked,
                ret: o.done.map(|d| d.0),
                step,
            });
        }
        let mut report = KeyReport {
            key: key.to_vec(),
            ops: ops.len(),
            pruned_unknown: pruned,
            states: 0,
            conclusive: true,
        };
        match wgl::search(&ops, limits.max_states_per_key) {
            wgl::Search::Linearizable { states } => report.states = states,
            wgl::Search::Inconclusive { states } => {
                report.states = states;
                report.conclusive = false;
            }
            wgl::Search::NotLinearizable {
                prefix,
                state,
                blocked,
            } => {
                let names: HashMap<u32, &[u8]> = values.iter().map(|(v, n)| (*n, *v)).collect();
                let holds = match state.value {
                    None => "no value".to_string(),
                    Some(v) => {
                        let v = names.get(&v).map_or("?".to_string(), |v| show(v));
                        if state.rev == wgl::UNKNOWN_REV {
                            format!("{v} (from a put of unknown outcome)")
                        } else {
                            format!("{v} (mod rev {})", state.rev)
                        }
                    }
                };
                let mut involved: Vec<OpId> = Vec::new();
                // The tail of the longest explainable order, then the operation that cannot
                // follow it, then the operations that were still open when it completed.
                let tail = prefix.len().saturating_sub(4);
                involved.extend(prefix[tail..].iter().map(|&i| ops[i].id));
                let stuck = ops.get(blocked).map(|o| o.id);
                if let Some(b) = ops.get(blocked) {
                    involved.push(b.id);
                    let open = ops.iter().enumerate().filter(|(i, o)| {
                        *i != blocked && !prefix.contains(i) && o.call <= b.ret.unwrap_or(u64::MAX)
                    });
                    involved.extend(open.take(6).map(|(_, o)| o.id));
                }
                let what = format!(
                    "key {}: no order of its {} operations consistent with real time explains \
                     the results. The longest explainable prefix places {} of them and leaves the \
                     key holding {holds} (highest write revision {}); then {} completed \
                     without any order in which it fits. Last of that prefix, the blocked \
                     operation, and operations still open then:",
                    show(key),
                    ops.len(),
                    prefix.len(),
                    state.floor,
                    stuck.map_or("an operation".to_string(), |s| format!("#{s}")),
                );
                return Err(self.violation(
                    ViolationKind::NotLinearizable,
                    Some(key),
                    involved,
                    what,
                ));
            }
        }
        Ok(report)
    }
}

/// Bytes as a quoted string, escaping what is not printable ASCII.
fn show(bytes: &[u8]) -> String {
    format!("\"{}\"", bytes.escape_ascii())
}
