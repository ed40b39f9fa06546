//! Replicas of one shard group on three simulated members, each with its own WAL, exchanging
//! Raft messages over an in-memory network the test can cut.

use std::cell::RefCell;
use std::collections::HashSet;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use super::tests::write;
use super::*;
use crate::runtime::run_local;
use crate::wal::{recover, WalOptions};

struct Member {
    id: raft::NodeId,
    wal: Wal,
    replica: Rc<Replica>,
    /// Revisions of the write records this member applied, in log order: (index, revision).
    applied: Rc<RefCell<Vec<(u64, i64)>>>,
}

struct Cluster {
    members: Vec<Member>,
    /// Members cut off from everyone.
    isolated: Rc<RefCell<HashSet<raft::NodeId>>>,
}

async fn start(dir: &Path) -> Rc<Cluster> {
    start_with(dir, WalOptions::default()).await
}

async fn start_with(dir: &Path, opts: WalOptions) -> Rc<Cluster> {
    let conf = ConfState::new([1, 2, 3]);
    let mut members = Vec::new();
    for id in 1..=3u64 {
        let d = dir.join(id.to_string());
        let rec = recover(&d, 0, 0).unwrap();
        let wal = Wal::open(&d, 0, opts.clone(), &rec).await.unwrap();
        let group = Group {
            id,
            conf: conf.clone(),
            election_tick: 10,
            heartbeat_tick: 1,
            gate: None,
        };
        let replica = Rc::new(Replica::recover_group(0, (0, 0), &rec, false, group).unwrap());
        replica.start(&wal).await.unwrap();
        members.push(Member {
            id,
            wal,
            replica,
            applied: Rc::default(),
        });
    }
    let c = Rc::new(Cluster {
        members,
        isolated: Rc::default(),
    });
    for i in 0..3 {
        let m = &c.members[i];
        let (r, w) = (m.replica.clone(), m.wal.clone());
        glommio::spawn_local(async move { r.run_sync(&w).await }).detach();
        // Outgoing messages, delivered unless either end is cut off.
        let (cc, r) = (c.clone(), m.replica.clone());
        glommio::spawn_local(async move {
            loop {
                r.wait_messages().await;
                for msg in r.take_messages() {
                    let cut = cc.isolated.borrow();
                    if cut.contains(&msg.from) || cut.contains(&msg.to) {
                        continue;
                    }
                    drop(cut);
                    let to = &cc.members[msg.to as usize - 1];
                    to.replica.step(&to.wal, msg);
                }
            }
        })
        .detach();
        // The apply loop: what WAL replay does to the store, recorded here.
        let (r, applied) = (m.replica.clone(), m.applied.clone());
        glommio::spawn_local(async move {
            loop {
                r.wait_committed_entries().await;
                for e in r.take_committed() {
                    if !e.data.is_empty() {
                        let rec = record::decode_payload(&e.data).expect("a WAL record");
                        applied.borrow_mut().push((e.index, rec.revision));
                    }
                    r.mark_applied(e.index);
                }
            }
        })
        .detach();
    }
    let cc = c.clone();
    glommio::spawn_local(async move {
        loop {
            glommio::timer::sleep(Duration::from_millis(5)).await;
            for m in &cc.members {
                m.replica.tick(&m.wal);
            }
        }
    })
    .detach();
    c
}

impl Cluster {
    async fn leader(&self, not: &[raft::NodeId]) -> &Member {
        for _ in 0..400 {
            if let Some(m) = self
                .members
                .iter()
                .find(|m| !not.contains(&m.id) && m.replica.can_execute())
            {
                return m;
            }
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
        panic!("no leader elected");
    }

    /// Proposes a write at `rev` on `m` (which executes it, as the shard would).
    fn propose(&self, m: &Member, rev: i64) -> (u64, u64) {
        let mut e = write(rev);
        let index = match m.replica.propose(&m.wal, &mut e) {
            Ok(i) => i,
            Err(_) => panic!("proposal refused"),
        };
        m.applied.borrow_mut().push((index, rev));
        (index, e.term)
    }

    async fn commit(
        &self,
        m: &Member,
        index: u64,
        term: u64,
        within: Duration,
    ) -> Option<Result<()>> {
        futures_lite::future::or(
            async { Some(m.replica.wait_committed(&m.wal, index, term).await) },
            async {
                glommio::timer::sleep(within).await;
                None
            },
        )
        .await
    }

    async fn converged(&self, on: &[raft::NodeId], last: u64) {
        for _ in 0..400 {
            if on
                .iter()
                .all(|&id| self.members[id as usize - 1].replica.applied() >= last)
            {
                return;
            }
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
        panic!("members {on:?} did not apply up to {last}");
    }
}

#[test]
fn writes_commit_with_a_quorum_and_followers_apply_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run_local(move || async move {
        let c = start(&d).await;
        let l = c.leader(&[]).await;
        let mut last = (0, 0);
        for rev in 1..=20 {
            last = c.propose(l, rev);
        }
        let got = c.commit(l, last.0, last.1, Duration::from_secs(5)).await;
        assert!(matches!(got, Some(Ok(()))), "{got:?}");
        c.converged(&[1, 2, 3], last.0).await;
        let want = l.applied.borrow().clone();
        for m in &c.members {
            assert_eq!(
                *m.applied.borrow(),
                want,
                "member {} applied the same log",
                m.id
            );
        }

        // One follower cut off: two of three still commit.
        let f: Vec<_> = c
            .members
            .iter()
            .map(|m| m.id)
            .filter(|&id| id != l.id)
            .collect();
        c.isolated.borrow_mut().insert(f[0]);
        let (i, t) = c.propose(l, 21);
        assert!(matches!(
            c.commit(l, i, t, Duration::from_secs(5)).await,
            Some(Ok(()))
        ));
        // Both cut off: nothing commits, and followers refuse to execute.
        c.isolated.borrow_mut().insert(f[1]);
        let (i, t) = c.propose(l, 22);
        // Either still waiting, or refused because check-quorum stepped the lone leader down
        // (ten 5 ms ticks): never committed.
        let got = c.commit(l, i, t, Duration::from_millis(150)).await;
        assert!(
            matches!(got, None | Some(Err(Error::LeaderChanged))),
            "{got:?}"
        );
        assert!(!c.members[f[1] as usize - 1].replica.can_execute());
        // Healed: the pending write commits and every member catches up.
        c.isolated.borrow_mut().clear();
        let got = c.commit(l, i, t, Duration::from_secs(5)).await;
        // The leader may have stepped down (check-quorum) while alone; then the write's fate
        // is decided by the next leader, and the client was told the leader changed.
        match got {
            Some(Ok(())) => {
                c.converged(&[1, 2, 3], i).await;
                let want = l.applied.borrow().clone();
                for m in &c.members {
                    assert_eq!(*m.applied.borrow(), want);
                }
            }
            Some(Err(Error::LeaderChanged)) => {}
            other => panic!("{other:?}"),
        }
        for m in &c.members {
            m.wal.close().await;
        }
    });
}

#[test]
fn a_new_leader_rewinds_a_deposed_leaders_uncommitted_tail() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let (old_id, dir_of) = run_local({
        let d = d.clone();
        move || async move {
            let c = start(&d).await;
            let old = c.leader(&[]).await;
            let (i, t) = c.propose(old, 1);
            assert!(matches!(
                c.commit(old, i, t, Duration::from_secs(5)).await,
                Some(Ok(()))
            ));
            c.converged(&[1, 2, 3], i).await;

            // The old leader is cut off and executes writes nobody else sees.
            c.isolated.borrow_mut().insert(old.id);
            let pending: Vec<_> = (2..=4).map(|rev| c.propose(old, rev)).collect();
            let new = c.leader(&[old.id]).await;
            let mut last = (0, 0);
            for rev in 100..=105 {
                last = c.propose(new, rev);
            }
            assert!(matches!(
                c.commit(new, last.0, last.1, Duration::from_secs(5)).await,
                Some(Ok(()))
            ));

            // Healed: the old leader learns the new term, its executed writes never commit, its
            // log's tail is replaced, and it knows its store must be rebuilt.
            c.isolated.borrow_mut().clear();
            for (i, t) in pending {
                let got = c.commit(old, i, t, Duration::from_secs(5)).await;
                assert!(matches!(got, Some(Err(Error::LeaderChanged))), "{got:?}");
            }
            assert!(
                old.replica.is_stale(),
                "applied {} role {:?} term {} raft {:?}",
                old.replica.applied(),
                old.replica.role(),
                old.replica.term(),
                old.replica.raft.as_ref().map(|r| {
                    let r = r.borrow();
                    (r.commit(), r.last_index(), r.term_at(old.replica.applied()))
                })
            );
            assert!(!old.replica.can_execute());
            for _ in 0..400 {
                if old.wal.durable_index() >= last.0 {
                    break;
                }
                glommio::timer::sleep(Duration::from_millis(5)).await;
            }
            let old_id = old.id;
            for m in &c.members {
                m.wal.close().await;
            }
            (old_id, d.join(old_id.to_string()))
        }
    });
    // On disk, the old leader's log now holds the new leader's entries.
    let rec = recover(&dir_of, 0, 0).unwrap();
    let revs: Vec<i64> = rec
        .entries
        .iter()
        .filter(|l| l.entry.kind == EntryKind::Write)
        .map(|l| l.entry.revision)
        .collect();
    assert_eq!(
        revs,
        vec![1, 100, 101, 102, 103, 104, 105],
        "member {old_id}"
    );
}

/// A follower that was cut off receives the leader's backlog in batches larger than its log
/// segments: Raft's output waits for each new segment instead of stopping the shard.
#[test]
fn a_follower_waits_for_room_when_a_burst_outruns_its_segments() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run_local(move || async move {
        let c = start_with(
            &d,
            WalOptions {
                segment_size: 64 << 10,
            },
        )
        .await;
        let l = c.leader(&[]).await;
        let f = c.members.iter().find(|m| m.id != l.id).unwrap().id;
        c.isolated.borrow_mut().insert(f);
        let mut last = (0, 0);
        for rev in 1..=80 {
            let mut e = write(rev);
            if let Some(crate::mvcc::Effect::Put { value, .. }) = e.ops.first_mut() {
                *value = Bytes::from(vec![b'v'; 8 << 10]);
            }
            let index = loop {
                match l.replica.propose(&l.wal, &mut e.clone()) {
                    Ok(i) => break i,
                    Err(ProposeError::NoRoom(nr)) => l.wal.make_room(nr.frame_len).await.unwrap(),
                    Err(ProposeError::Other(e)) => panic!("{e}"),
                }
            };
            l.applied.borrow_mut().push((index, rev));
            last = (index, l.replica.term());
        }
        let got = c.commit(l, last.0, last.1, Duration::from_secs(5)).await;
        assert!(matches!(got, Some(Ok(()))), "{got:?}");
        c.isolated.borrow_mut().clear();
        c.converged(&[1, 2, 3], last.0).await;
        let m = &c.members[f as usize - 1];
        assert!(m.replica.ensure_healthy().is_ok());
        assert_eq!(*m.applied.borrow(), *l.applied.borrow());
        for m in &c.members {
            m.wal.close().await;
        }
    });
}
