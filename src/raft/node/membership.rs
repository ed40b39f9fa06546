//! Applying single-step membership changes.

use super::*;
use crate::raft::message::{ConfChange, ConfState};
use crate::raft::progress::Progress;

impl Raft {
    pub(super) fn conf_at(&self, index: u64) -> ConfState {
        self.conf_history
            .iter()
            .rev()
            .find(|(i, _)| *i <= index)
            .map_or_else(
                || self.log.snapshot().meta.conf_state.clone(),
                |(_, c)| c.clone(),
            )
    }

    pub(super) fn apply_conf_change(&mut self, index: u64, cc: ConfChange) {
        self.conf.apply(&cc);
        self.conf_history.push((index, self.conf.clone()));
        self.conf_changed = true;
        if self.role != Role::Leader {
            return;
        }
        let next = self.log.last_index() + 1;
        let inflight = self.cfg.max_inflight;
        self.prs.retain(|id, _| self.conf.contains(*id));
        for (id, learner) in self.conf.members() {
            self.prs
                .entry(id)
                .or_insert_with(|| Progress::new(next, inflight, learner))
                .is_learner = learner;
        }
        if !self.conf.voters.contains(&self.id) {
            // Removed: stop leading; the remaining voters elect among themselves.
            self.become_follower(self.term, None);
            return;
        }
        if self
            .lead_transferee
            .is_some_and(|t| !self.conf.voters.contains(&t))
        {
            self.lead_transferee = None;
        }
        if self.maybe_commit() {
            self.broadcast_append(true);
        }
        self.advance_reads();
    }
}
