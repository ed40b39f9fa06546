//! Hand-written histories with a known verdict, and generated histories of a simulated
//! sequential store (always linearizable) with a mutated read (never).

use proptest::prelude::*;

use super::*;

/// Builds histories from (start, end) times.
#[derive(Default)]
struct B {
    h: History,
}

impl B {
    fn op(&mut self, c: ClientId, op: Op, t: (u64, u64), outcome: Outcome) -> OpId {
        let id = self.h.invoke(c, op, t.0);
        self.h.complete(id, outcome, t.1).expect("well-formed");
        id
    }

    fn put(&mut self, c: ClientId, k: &str, v: &str, t: (u64, u64), revision: i64) -> OpId {
        self.op(c, put(k, v), t, Outcome::PutOk { revision })
    }

    fn put_unknown(&mut self, c: ClientId, k: &str, v: &str, t: (u64, u64)) -> OpId {
        self.op(c, put(k, v), t, Outcome::Unknown)
    }

    fn get(&mut self, c: ClientId, k: &str, v: Option<&str>, rev: i64, t: (u64, u64)) -> OpId {
        let outcome = Outcome::GetOk {
            value: v.map(|v| v.as_bytes().to_vec()),
            mod_revision: rev,
        };
        self.op(c, get(k), t, outcome)
    }

    fn delete(&mut self, c: ClientId, k: &str, deleted: bool, rev: i64, t: (u64, u64)) -> OpId {
        let outcome = Outcome::DeleteOk {
            deleted,
            revision: rev,
        };
        self.op(c, Op::Delete { key: k.into() }, t, outcome)
    }

    fn check(&self) -> Result<Report, Violation> {
        check(&self.h)
    }

    fn violation(&self) -> Violation {
        match self.check() {
            Ok(r) => panic!("passed: {r}"),
            Err(v) => v,
        }
    }
}

fn put(k: &str, v: &str) -> Op {
    Op::Put {
        key: k.into(),
        value: v.into(),
    }
}

fn get(k: &str) -> Op {
    Op::Get { key: k.into() }
}

#[test]
fn concurrent_reads_may_see_either_side_of_an_overlapping_put() {
    let mut b = B::default();
    b.put(1, "k", "a", (0, 10), 1);
    b.put(1, "k", "b", (20, 40), 2);
    b.get(2, "k", Some("a"), 1, (21, 30)); // overlaps the put of b: old value allowed
    b.get(3, "k", Some("b"), 2, (22, 31)); // or the new one
    b.get(2, "k", Some("b"), 2, (41, 50));
    b.get(4, "x", None, 0, (0, 100));
    let r = b.check().expect("linearizable");
    assert_eq!(r.ops, 6);
    assert_eq!(r.keys.len(), 2);
    assert!(r.conclusive());
}

#[test]
fn a_stale_read_after_a_completed_put_fails() {
    let mut b = B::default();
    b.put(1, "k", "a", (0, 10), 1);
    b.put(1, "k", "b", (20, 30), 2);
    let stale = b.get(2, "k", Some("a"), 1, (31, 40));
    let v = b.violation();
    assert_eq!(v.kind, ViolationKind::NotLinearizable);
    assert_eq!(v.key.as_deref(), Some(&b"k"[..]));
    assert!(v.ops.contains(&stale), "{v}");
    assert!(v.explanation.contains("get \"k\""), "{v}");
}

#[test]
fn a_read_cannot_go_back_after_another_read_saw_the_new_value() {
    let mut b = B::default();
    b.put(1, "k", "a", (0, 10), 1);
    b.put(1, "k", "b", (20, 100), 2);
    b.get(2, "k", Some("b"), 2, (30, 40));
    b.get(3, "k", Some("a"), 1, (50, 60)); // the put is still open, but b was already read
    assert_eq!(b.violation().kind, ViolationKind::NotLinearizable);
}

#[test]
fn a_lost_acknowledged_put_fails() {
    let mut b = B::default();
    b.put(1, "k", "a", (0, 10), 1);
    b.get(2, "k", None, 0, (20, 30));
    assert_eq!(b.violation().kind, ViolationKind::NotLinearizable);

    let mut b = B::default();
    b.put(1, "k", "a", (0, 10), 1);
    b.put(1, "k", "b", (20, 30), 2);
    b.put(2, "j", "x", (40, 50), 3);
    b.get(2, "k", Some("a"), 1, (60, 70)); // b vanished
    assert_eq!(b.violation().kind, ViolationKind::NotLinearizable);
}

#[test]
fn a_read_of_a_value_never_written_fails() {
    let mut b = B::default();
    b.put(1, "k", "a", (0, 10), 1);
    let r = b.get(2, "k", Some("zzz"), 1, (20, 30));
    let v = b.violation();
    assert_eq!(v.kind, ViolationKind::NeverWritten);
    assert_eq!(v.ops, vec![r]);

    // A value written only by a failed put was never written either.
    let mut b = B::default();
    b.op(1, put("k", "f"), (0, 10), Outcome::Failed);
    b.get(2, "k", Some("f"), 1, (20, 30));
    let v = b.violation();
    assert_eq!(v.kind, ViolationKind::NeverWritten);
    assert!(v.explanation.contains("failed"), "{v}");
}

#[test]
fn a_read_with_the_wrong_mod_revision_fails() {
    let mut b = B::default();
    b.put(1, "k", "a", (0, 10), 4);
    b.get(2, "k", Some("a"), 5, (20, 30));
    assert_eq!(b.violation().kind, ViolationKind::ModRevision);
}

#[test]
fn duplicate_revisions_fail_even_on_different_keys() {
    let mut b = B::default();
    let x = b.put(1, "k", "a", (0, 10), 7);
    let y = b.put(2, "j", "b", (0, 10), 7);
    let v = b.violation();
    assert_eq!(v.kind, ViolationKind::DuplicateRevision);
    assert_eq!(v.ops.len(), 2);
    assert!(v.ops.contains(&x) && v.ops.contains(&y));
}

#[test]
fn a_revision_going_backwards_in_real_time_fails() {
    let mut b = B::default();
    b.put(1, "k", "a", (0, 10), 9);
    b.put(2, "j", "b", (20, 30), 5); // invoked after the first completed, lower revision
    let v = b.violation();
    assert_eq!(v.kind, ViolationKind::RevisionOrder);
    // Overlapping writes may take revisions in either order.
    let mut b = B::default();
    b.put(1, "k", "a", (0, 30), 9);
    b.put(2, "j", "b", (20, 40), 5);
    b.check().expect("concurrent writes");
}

#[test]
fn same_key_writes_must_take_effect_in_revision_order() {
    // Concurrent puts, revisions say b after a, but reads in real time see b then a.
    let mut b = B::default();
    b.put(1, "k", "a", (0, 100), 2);
    b.put(2, "k", "b", (0, 100), 1);
    b.get(3, "k", Some("b"), 1, (10, 20));
    b.get(3, "k", Some("a"), 2, (30, 40));
    b.check().expect("b (rev 1) then a (rev 2)");
    let mut b = B::default();
    b.put(1, "k", "a", (0, 100), 1);
    b.put(2, "k", "b", (0, 100), 2);
    b.get(3, "k", Some("b"), 2, (10, 20));
    b.get(3, "k", Some("a"), 1, (30, 40));
    assert_eq!(b.violation().kind, ViolationKind::NotLinearizable);
}

#[test]
fn an_unknown_put_may_or_may_not_take_effect() {
    // It did: a later read sees it (and pins its revision).
    let mut b = B::default();
    b.put(1, "k", "a", (0, 10), 1);
    b.put_unknown(1, "k", "u", (20, 30));
    b.get(2, "k", Some("a"), 1, (40, 50));
    b.get(2, "k", Some("u"), 3, (60, 70)); // took effect long after the client gave up
    b.get(2, "k", Some("u"), 3, (80, 90));
    let r = b.check().expect("took effect late");
    assert_eq!(r.unknown_writes, 1);
    // It did not: nothing ever reads it.
    let mut b = B::default();
    b.put(1, "k", "a", (0, 10), 1);
    b.put_unknown(1, "k", "u", (20, 30));
    b.get(2, "k", Some("a"), 1, (40, 50));
    let r = b.check().expect("never took effect");
    assert_eq!(r.keys[0].pruned_unknown, 1);
    // A pending put counts as unknown.
    let mut b = B::default();
    b.h.invoke(1, put("k", "p"), 0);
    b.get(2, "k", Some("p"), 1, (5, 6));
    b.check().expect("pending put read");
    // It took effect once; it cannot be undone.
    let mut b = B::default();
    b.put(1, "k", "a", (0, 10), 1);
    b.put_unknown(1, "k", "u", (20, 30));
    b.get(2, "k", Some("u"), 2, (40, 50));
    b.get(2, "k", Some("a"), 1, (60, 70));
    assert_eq!(b.violation().kind, ViolationKind::NotLinearizable);
    // Its revision must be above the writes of the key placed before it (here the writes
    // overlap, so only the register search can tell).
    let mut b = B::default();
    b.put(1, "k", "a", (0, 25), 5);
    b.put_unknown(2, "k", "u", (20, 30));
    b.get(2, "k", Some("u"), 3, (40, 50));
    assert_eq!(b.violation().kind, ViolationKind::NotLinearizable);
}

#[test]
fn the_revision_a_read_reveals_for_an_unknown_put_follows_the_revision_rules() {
    // Revealed at a revision an acknowledged write on another key already has.
    let mut b = B::default();
    b.put(1, "j", "x", (0, 10), 3);
    let u = b.put_unknown(2, "k", "u", (0, 10));
    b.get(3, "k", Some("u"), 3, (20, 30));
    let v = b.violation();
    assert_eq!(v.kind, ViolationKind::DuplicateRevision);
    assert!(v.ops.contains(&u), "{v}");
    // Invoked after an acknowledged write completed, yet revealed below its revision.
    let mut b = B::default();
    b.put(1, "j", "x", (0, 10), 7);
    b.put_unknown(2, "k", "u", (20, 30));
    b.get(3, "k", Some("u"), 5, (40, 50));
    assert_eq!(b.violation().kind, ViolationKind::RevisionOrder);
    // Two reads disagree on it.
    let mut b = B::default();
    b.put_unknown(2, "k", "u", (0, 10));
    b.get(3, "k", Some("u"), 5, (20, 30));
    b.get(3, "k", Some("u"), 6, (40, 50));
    assert_eq!(b.violation().kind, ViolationKind::ModRevision);
    // Consistent: passes.
    let mut b = B::default();
    b.put(1, "j", "x", (0, 10), 7);
    b.put_unknown(2, "k", "u", (20, 30));
    b.get(3, "k", Some("u"), 8, (40, 50));
    b.check()
        .expect("revealed revision above the earlier write's");
}

#[test]
fn an_unknown_put_cannot_take_effect_before_it_was_invoked() {
    let mut b = B::default();
    b.get(2, "k", Some("u"), 1, (0, 10));
    b.put_unknown(1, "k", "u", (20, 30));
    assert_eq!(b.violation().kind, ViolationKind::NotLinearizable);
}

#[test]
fn failed_writes_and_unanswered_reads_are_left_out() {
    let mut b = B::default();
    b.put(1, "k", "a", (0, 10), 1);
    b.op(1, put("k", "f"), (20, 30), Outcome::Failed);
    b.op(2, get("k"), (20, 30), Outcome::Unknown);
    b.get(2, "k", Some("a"), 1, (40, 50));
    let r = b.check().expect("failed put left out");
    assert_eq!(r.left_out, 2);
}

#[test]
fn deletes() {
    let mut b = B::default();
    b.put(1, "k", "a", (0, 10), 1);
    b.delete(1, "k", true, 2, (20, 30));
    b.get(2, "k", None, 0, (40, 50));
    b.delete(2, "k", false, 2, (60, 70));
    b.put(1, "k", "b", (80, 90), 3);
    b.get(2, "k", Some("b"), 3, (100, 110));
    b.check().expect("delete then put");

    let mut b = B::default();
    b.put(1, "k", "a", (0, 10), 1);
    b.delete(1, "k", true, 2, (20, 30));
    b.get(2, "k", Some("a"), 1, (40, 50));
    assert_eq!(b.violation().kind, ViolationKind::NotLinearizable);

    // An unknown put observed only by a delete that found the key.
    let mut b = B::default();
    b.put_unknown(1, "k", "u", (0, 10));
    b.delete(2, "k", true, 5, (20, 30));
    let r = b.check().expect("unknown put seen by the delete");
    assert_eq!(r.keys[0].pruned_unknown, 0);

    let mut b = B::default();
    b.delete(2, "k", true, 5, (20, 30));
    assert_eq!(b.violation().kind, ViolationKind::NotLinearizable);
}

#[test]
fn recording_mistakes_are_refused() {
    let mut h = History::new();
    let id = h.invoke(1, get("k"), 10);
    assert_eq!(
        h.complete(id, Outcome::PutOk { revision: 1 }, 20),
        Err(HistoryError::WrongOutcome(id))
    );
    assert_eq!(
        h.complete(id, Outcome::Unknown, 5),
        Err(HistoryError::CompletedBeforeInvoked(id))
    );
    assert_eq!(h.complete(id, Outcome::Unknown, 20), Ok(()));
    assert_eq!(
        h.complete(id, Outcome::Unknown, 30),
        Err(HistoryError::AlreadyCompleted(id))
    );
    assert_eq!(
        h.complete(7, Outcome::Unknown, 30),
        Err(HistoryError::NoSuchOp(7))
    );
    check(&History::new()).expect("an empty history is linearizable");
}

#[test]
fn the_search_is_bounded() {
    // Many concurrent unknown puts whose values some read saw: many orders to try.
    let mut b = B::default();
    for i in 0..12 {
        b.put_unknown(i, "k", &format!("u{i}"), (0, 1));
    }
    for i in 0..12 {
        b.get(
            100,
            "k",
            Some(&format!("u{i}")),
            100 + i as i64,
            (10 + i, 10 + i),
        );
    }
    b.get(100, "k", Some("u0"), 100, (1000, 1001)); // impossible: u0 was overwritten
    let limits = Limits {
        max_states_per_key: 50,
    };
    let r = check_with(&b.h, limits).expect("bounded: not refuted");
    assert!(!r.conclusive());
    assert_eq!(r.inconclusive_keys().count(), 1);
    assert!(r.to_string().contains("INCONCLUSIVE"));
    assert_eq!(b.violation().kind, ViolationKind::NotLinearizable);
}

/// One generated operation: its client, kind (0 put, 1 get, 2 delete, 3 put of unknown outcome
/// that takes effect, 4 one that does not), key, and gaps before its invocation, linearization
/// point and completion.
type Gen = (u64, u8, u8, u64, u64, u64);

/// A sequential store (one revision counter) applied at each operation's linearization point,
/// which lies strictly inside its interval; clients run one operation at a time.
fn simulate(gen: &[Gen], clients: u64) -> History {
    let mut free = vec![0u64; usize::try_from(clients).unwrap_or(1).max(1)];
    // (linearization point, client, kind, key, invoke, complete, value)
    let mut planned = Vec::new();
    for (n, &(c, kind, key, gap, d1, d2)) in gen.iter().enumerate() {
        let slot = usize::try_from(c % clients).unwrap_or(0);
        // Times are multiples of 1000 plus the op's index, so no two points coincide.
        let call = (free[slot] + gap) * 1000 + n as u64;
        let point = call + d1 * 1000 + 1;
        let ret = point + d2 * 1000 + 1;
        free[slot] = ret / 1000 + 1;
        planned.push((point, c % clients, kind, key, call, ret, format!("v{n}")));
    }
    let mut order: Vec<usize> = (0..planned.len()).collect();
    order.sort_by_key(|&i| planned[i].0);
    let mut store: HashMap<u8, (String, i64)> = HashMap::new();
    let mut rev = 0i64;
    let mut outcomes = vec![Outcome::Unknown; planned.len()];
    for i in order {
        let (_, _, kind, key, _, _, ref value) = planned[i];
        outcomes[i] = match kind {
            0 | 3 => {
                rev += 1;
                store.insert(key, (value.clone(), rev));
                if kind == 0 {
                    Outcome::PutOk { revision: rev }
                } else {
                    Outcome::Unknown
                }
            }
            1 => match store.get(&key) {
                Some((v, r)) => Outcome::GetOk {
                    value: Some(v.clone().into_bytes()),
                    mod_revision: *r,
                },
                None => Outcome::GetOk {
                    value: None,
                    mod_revision: 0,
                },
            },
            2 => match store.remove(&key) {
                Some(_) => {
                    rev += 1;
                    Outcome::DeleteOk {
                        deleted: true,
                        revision: rev,
                    }
                }
                None => Outcome::DeleteOk {
                    deleted: false,
                    revision: rev,
                },
            },
            _ => Outcome::Unknown, // never took effect
        };
    }
    // Record in invocation order, as a live recorder would.
    let mut by_call: Vec<usize> = (0..planned.len()).collect();
    by_call.sort_by_key(|&i| planned[i].4);
    let mut h = History::new();
    for i in by_call {
        let (_, c, kind, key, call, ret, ref value) = planned[i];
        let key = vec![b'k', key];
        let op = match kind {
            1 => Op::Get { key },
            2 => Op::Delete { key },
            _ => Op::Put {
                key,
                value: value.clone().into_bytes(),
            },
        };
        let id = h.invoke(c, op, call);
        h.complete(id, outcomes[i].clone(), ret)
            .expect("simulated outcomes fit");
    }
    h
}

/// Makes one read stale: a read that began after an acknowledged put `q` completed now returns
/// the value (and revision) of an acknowledged put `o` of the same key with a lower revision than
/// `q`'s. No order can explain it, whatever else happened. Returns false if there is no such read.
fn make_a_read_stale(h: &mut History) -> bool {
    let acked: Vec<(Vec<u8>, Vec<u8>, i64, u64)> = h
        .entries
        .iter()
        .filter_map(|e| match (&e.op, &e.completed) {
            (Op::Put { key, value }, Some((t, Outcome::PutOk { revision }))) => {
                Some((key.clone(), value.clone(), *revision, *t))
            }
            _ => None,
        })
        .collect();
    for e in h.entries.iter_mut() {
        let Op::Get { key } = &e.op else { continue };
        let Some((_, Outcome::GetOk { .. })) = &e.completed else {
            continue;
        };
        let newer = acked
            .iter()
            .filter(|q| &q.0 == key && q.3 < e.invoked)
            .map(|q| q.2)
            .max();
        let Some(newer) = newer else { continue };
        if let Some(o) = acked.iter().find(|o| &o.0 == key && o.2 < newer) {
            if let Some((_, out)) = &mut e.completed {
                *out = Outcome::GetOk {
                    value: Some(o.1.clone()),
                    mod_revision: o.2,
                };
                return true;
            }
        }
    }
    false
}

fn gen_ops() -> impl Strategy<Value = Vec<Gen>> {
    prop::collection::vec(
        (
            0u64..4,
            prop_oneof![4 => Just(0u8), 4 => Just(1u8), 1 => Just(2u8), 1 => Just(3u8), 1 => Just(4u8)],
            0u8..3,
            0u64..3,
            0u64..4,
            0u64..4,
        ),
        1..120,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn a_simulated_sequential_store_always_passes(gen in gen_ops(), clients in 1u64..5) {
        let h = simulate(&gen, clients);
        let r = check(&h);
        prop_assert!(r.is_ok(), "{}", r.err().map(|v| v.to_string()).unwrap_or_default());
        let r = r.unwrap_or_default();
        prop_assert!(r.conclusive(), "{r}");
        prop_assert_eq!(r.ops, gen.len());
    }

    #[test]
    fn a_stale_read_in_a_simulated_history_fails(gen in gen_ops(), clients in 1u64..5) {
        let mut h = simulate(&gen, clients);
        prop_assume!(make_a_read_stale(&mut h));
        let r = check(&h);
        prop_assert!(r.is_err(), "a stale read passed: {:?}", r);
    }
}
