//! The linearizability search for one key: Wing and Gong's algorithm with Lowe's memoization.
//!
//! Invocations and completions form one list in time order. The search walks it: at an
//! invocation it tries to let that operation take effect now (the register model accepts its
//! result), lifting the operation out of the list; at a completion of an operation not yet
//! placed it backtracks, since that operation would have had to take effect before it
//! completed. A (set of placed operations, register state) pair seen before is never explored
//! again: the rest of the search from it would be the same.

use std::collections::HashSet;

use super::OpId;

/// `State::rev` of a value whose put's outcome is unknown and no read has pinned yet.
pub(super) const UNKNOWN_REV: i64 = -1;

/// An operation on the key, with its result in the register's terms (values interned).
#[derive(Clone, Copy, Debug)]
pub(super) struct KOp {
    pub id: OpId,
    pub call: u64,
    /// `None`: the outcome is unknown; the operation may take effect any time after `call`, or
    /// never.
    pub ret: Option<u64>,
    pub step: Step,
}

#[derive(Clone, Copy, Debug)]
pub(super) enum Step {
    /// `revision` is `None` when the outcome is unknown.
    Put { value: u32, revision: Option<i64> },
    Get {
        value: Option<u32>,
        mod_revision: i64,
    },
    /// `result` (deleted, revision) is `None` when the outcome is unknown.
    Delete { result: Option<(bool, i64)> },
}

/// The register: its value, that value's revision, and the highest write revision placed so
/// far (writes take effect in revision order, so the next acknowledged one must be above it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct State {
    pub value: Option<u32>,
    /// Revision of `value` (0 without one, [`UNKNOWN_REV`] if not known yet).
    pub rev: i64,
    pub floor: i64,
}

impl State {
    const EMPTY: State = State {
        value: None,
        rev: 0,
        floor: 0,
    };

    /// The state after `step` takes effect here, or `None` if its result cannot come from this
    /// state.
    fn step(self, step: &Step) -> Option<State> {
        match *step {
            Step::Put {
                value,
                revision: Some(r),
            } => (r > self.floor).then_some(State {
                value: Some(value),
                rev: r,
                floor: r,
            }),
            Step::Put {
                value,
                revision: None,
            } => Some(State {
                value: Some(value),
                rev: UNKNOWN_REV,
                ..self
            }),
            Step::Get {
                value: None,
                mod_revision: _,
            } => self.value.is_none().then_some(self),
            Step::Get {
                value: Some(v),
                mod_revision: m,
            } => {
                if self.value != Some(v) {
                    None
                } else if self.rev == m {
                    Some(self)
                } else if self.rev == UNKNOWN_REV && m > self.floor {
                    // The first read of an unknown put's value tells its revision.
                    Some(State {
                        rev: m,
                        floor: m,
                        ..self
                    })
                } else {
                    None
                }
            }
            Step::Delete {
                result: Some((true, r)),
            } => (self.value.is_some() && r > self.floor).then_some(State {
                value: None,
                rev: 0,
                floor: r,
            }),
            Step::Delete {
                result: Some((false, _)),
            } => self.value.is_none().then_some(self),
            // An unknown delete removes the key if there is one; its revision stays unknown.
            Step::Delete { result: None } => Some(State {
                value: None,
                rev: 0,
                ..self
            }),
        }
    }
}

pub(super) enum Search {
    Linearizable {
        states: usize,
    },
    /// `prefix` (indices into the ops) is the longest order the search could explain, leaving
    /// `state`; `blocked` is the operation that completed without having been placed.
    NotLinearizable {
        prefix: Vec<usize>,
        state: State,
        blocked: usize,
    },
    Inconclusive {
        states: usize,
    },
}

const NIL: usize = usize::MAX;

/// The event list: every operation's invocation and completion, doubly linked in time order so
/// an operation's pair can be lifted out and put back in O(1) (dancing links).
struct Events {
    /// (is completion, op index) per event; event `len` is the head sentinel.
    ev: Vec<(bool, usize)>,
    next: Vec<usize>,
    prev: Vec<usize>,
    call_at: Vec<usize>,
    ret_at: Vec<usize>,
}

impl Events {
    fn new(ops: &[KOp]) -> Events {
        let mut order: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * ops.len());
        for (i, o) in ops.iter().enumerate() {
            order.push((o.call, false, i));
            order.push((o.ret.unwrap_or(u64::MAX), true, i));
        }
        // At equal times invocations come first: the operations then count as concurrent,
        // which only allows more orders.
        order.sort_unstable();
        let n = order.len();
        let head = n;
        let mut e = Events {
            ev: order.iter().map(|&(_, r, i)| (r, i)).collect(),
            next: vec![NIL; n + 1],
            prev: vec![NIL; n + 1],
            call_at: vec![0; ops.len()],
            ret_at: vec![0; ops.len()],
        };
        let mut last = head;
        for (pos, &(_, is_ret, op)) in order.iter().enumerate() {
            e.next[last] = pos;
            e.prev[pos] = last;
            last = pos;
            if is_ret {
                e.ret_at[op] = pos;
            } else {
                e.call_at[op] = pos;
            }
        }
        e
    }

    fn head(&self) -> usize {
        self.ev.len()
    }

    fn unlink(&mut self, pos: usize) {
        let (p, n) = (self.prev[pos], self.next[pos]);
        self.next[p] = n;
        if n != NIL {
            self.prev[n] = p;
        }
    }

    fn relink(&mut self, pos: usize) {
        let (p, n) = (self.prev[pos], self.next[pos]);
        self.next[p] = pos;
        if n != NIL {
            self.prev[n] = pos;
        }
    }

    fn lift(&mut self, op: usize) {
        self.unlink(self.call_at[op]);
        self.unlink(self.ret_at[op]);
    }

    /// Undoes [`Events::lift`]; lifts must be undone in reverse order.
    fn unlift(&mut self, op: usize) {
        self.relink(self.ret_at[op]);
        self.relink(self.call_at[op]);
    }
}

/// Searches for a linearization of `ops`, exploring at most `max_states` memoized states.
pub(super) fn search(ops: &[KOp], max_states: usize) -> Search {
    let mut events = Events::new(ops);
    let head = events.head();
    // Operations with an unknown outcome never have to be placed.
    let mut open = ops.iter().filter(|o| o.ret.is_some()).count();
    let mut placed = vec![0u64; ops.len().div_ceil(64)];
    let mut seen: HashSet<(Vec<u64>, State)> = HashSet::new();
    let mut stack: Vec<(usize, State)> = Vec::new();
    let mut state = State::EMPTY;
    let mut best: Option<(Vec<usize>, State, usize)> = None;
    let mut entry = events.next[head];
    loop {
        if open == 0 {
            return Search::Linearizable { states: seen.len() };
        }
        let is_call = entry != NIL && !events.ev[entry].0;
        if is_call {
            let op = events.ev[entry].1;
            if let Some(next) = state.step(&ops[op].step) {
                placed[op / 64] |= 1 << (op % 64);
                if seen.insert((placed.clone(), next)) {
                    if seen.len() > max_states {
                        return Search::Inconclusive { states: seen.len() };
                    }
                    stack.push((op, state));
                    state = next;
                    if ops[op].ret.is_some() {
                        open -= 1;
                    }
                    events.lift(op);
                    entry = events.next[head];
                    continue;
                }
                placed[op / 64] &= !(1 << (op % 64));
            }
            entry = events.next[entry];
            continue;
        }
        // A completion of an operation not placed yet (or the end of the list, which is only
        // reached with nothing open): what is placed cannot be extended; undo the latest.
        if entry != NIL && best.as_ref().is_none_or(|b| stack.len() > b.0.len()) {
            let prefix = stack.iter().map(|s| s.0).collect();
            best = Some((prefix, state, events.ev[entry].1));
        }
        let Some((op, before)) = stack.pop() else {
            let (prefix, state, blocked) = best.unwrap_or((Vec::new(), state, 0));
            return Search::NotLinearizable {
                prefix,
                state,
                blocked,
            };
        };
        placed[op / 64] &= !(1 << (op % 64));
        state = before;
        if ops[op].ret.is_some() {
            open += 1;
        }
        events.unlift(op);
        entry = events.next[events.call_at[op]];
    }
}
