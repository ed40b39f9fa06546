//! Linearizable reads: ReadIndex (a heartbeat round confirms leadership) and leases.

use bytes::Bytes;

use super::*;
use crate::raft::message::{Message, MessageKind, NodeId, ReadState};

impl Raft {
    pub(super) fn leader_read(&mut self, ctx: Bytes, from: NodeId) {
        let committed = self.log.committed();
        if self.log.term(committed) != Some(self.term) {
            self.reads_awaiting_commit.push((ctx, from));
            return;
        }
        let solo = self.conf.voters.len() == 1 && self.conf.voters.contains(&self.id);
        if solo || self.lease_valid() {
            self.answer_read(ctx, from, committed);
            return;
        }
        // ReadIndex (§6.4): the commit index is current once a majority confirms, after the
        // read arrived, that we still lead.
        self.read_queue.push_back(ReadRequest {
            ctx,
            from,
            index: committed,
            round: self.round + 1,
        });
        self.broadcast_heartbeat();
    }

    pub(super) fn answer_read(&mut self, ctx: Bytes, from: NodeId, index: u64) {
        if from == self.id {
            self.read_states.push(ReadState { index, ctx });
        } else {
            let mut m = Message::new(MessageKind::ReadIndexResponse, self.id, from, self.term);
            m.index = index;
            m.context = ctx;
            self.send(m);
        }
    }

    pub(super) fn advance_reads(&mut self) {
        let q = self.quorum();
        while let Some(r) = self.read_queue.front() {
            let acks = self
                .conf
                .voters
                .iter()
                .filter(|v| {
                    **v == self.id || self.prs.get(v).is_some_and(|p| p.acked_round >= r.round)
                })
                .count();
            if acks < q {
                break;
            }
            if let Some(r) = self.read_queue.pop_front() {
                self.answer_read(r.ctx, r.from, r.index);
            }
        }
    }

    /// A majority acknowledged a heartbeat sent within the last `lease_ticks`; none of them
    /// will vote for another candidate until an election timeout after receiving it.
    pub(super) fn lease_valid(&self) -> bool {
        if self.cfg.lease_ticks == 0 || self.timeout_now_sent || self.lead_transferee.is_some() {
            return false;
        }
        let sent_tick = |round: u64| {
            self.round_ticks
                .iter()
                .find(|(r, _)| *r == round)
                .map(|(_, t)| *t)
        };
        let mut ticks: Vec<u64> = self
            .conf
            .voters
            .iter()
            .map(|v| {
                if *v == self.id {
                    self.ticks
                } else {
                    self.prs
                        .get(v)
                        .and_then(|p| sent_tick(p.acked_round))
                        .unwrap_or(0)
                }
            })
            .collect();
        ticks.sort_unstable_by(|a, b| b.cmp(a));
        let confirmed = ticks.get(self.quorum() - 1).copied().unwrap_or(0);
        confirmed > 0 && confirmed + self.cfg.lease_ticks > self.ticks
    }
}
