//! Tuning knobs and the deterministic randomness used for election timeouts.

use super::error::{Error, Result};
use super::message::NodeId;

#[derive(Clone, Debug)]
pub struct Config {
    pub id: NodeId,
    /// Ticks without hearing from a leader before campaigning; the actual timeout is drawn
    /// from `[election_tick, 2 * election_tick)` so that split votes resolve.
    pub election_tick: u64,
    pub heartbeat_tick: u64,
    /// Batching: at most this many entries / bytes per append (one entry always fits).
    pub max_entries_per_msg: usize,
    pub max_bytes_per_msg: u64,
    /// Flow control: appends in flight per follower in the replicate state.
    pub max_inflight: usize,
    /// Campaign only after a pre-vote round shows a majority would vote for us.
    pub pre_vote: bool,
    /// The leader steps down when it has not heard from a majority for an election timeout,
    /// and followers ignore vote requests while they still follow a live leader.
    pub check_quorum: bool,
    /// Leader lease for local reads, in ticks; 0 disables. Requires `check_quorum` and must
    /// be shorter than `election_tick` divided by the worst clock-rate ratio between nodes.
    pub lease_ticks: u64,
    /// Seed of the election-timeout randomness (deterministic replay).
    pub seed: u64,
}

impl Config {
    pub fn new(id: NodeId) -> Self {
        Config {
            id,
            election_tick: 10,
            heartbeat_tick: 1,
            max_entries_per_msg: 64,
            max_bytes_per_msg: 1 << 20,
            max_inflight: 256,
            pre_vote: true,
            check_quorum: true,
            lease_ticks: 0,
            seed: id,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.id == 0 {
            return Err(Error::InvalidState("node id 0 is reserved"));
        }
        if self.heartbeat_tick == 0 || self.election_tick <= self.heartbeat_tick {
            return Err(Error::InvalidState(
                "election_tick must exceed heartbeat_tick >= 1",
            ));
        }
        if self.max_inflight == 0 || self.max_entries_per_msg == 0 {
            return Err(Error::InvalidState(
                "max_inflight and max_entries_per_msg must be >= 1",
            ));
        }
        if self.lease_ticks > 0 && (!self.check_quorum || self.lease_ticks >= self.election_tick) {
            return Err(Error::InvalidState(
                "a lease needs check_quorum and < election_tick",
            ));
        }
        Ok(())
    }
}

/// splitmix64: tiny, seedable, good enough to spread election timeouts.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, n)` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}
