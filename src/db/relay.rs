//! Client calls a follower relays to the leader node over the peer transport, and the leader
//! node's side of them. The server decides what to relay and runs relayed calls
//! (`server::forward`); this module moves them: calls queued on a core leave in that core's next
//! peer frame to the leader (many clients' calls in one write), and their answers come back on
//! the same connection to the same core.
//!
//! A relayed call ends with the leader's answer, or, when the answer cannot come:
//! - it never left (no connection to the leader could be made): [`RelayError::NotSent`], and
//!   the caller may ask the next leader;
//! - the connection broke, or this member sees another leader (or none) while the call is
//!   out: `etcdserver: leader changed`, since the call may have run;
//! - a call that answers promptly on a live leader (anything but a lock or a campaign) was out
//!   for two leader patiences: `etcdserver: request timed out`.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::time::Instant;

use bytes::Bytes;

use super::core::{Core, ShardOp};
use super::LocalDb;
use crate::error::Error;
use crate::peer::codec::{Answer, Call, ReadStamp};
use crate::peer::transport::Replies;
use crate::raft::NodeId;

/// gRPC's UNAVAILABLE, which etcd answers `etcdserver: not leader` with.
const GRPC_UNAVAILABLE: u32 = 14;
/// gRPC's RESOURCE_EXHAUSTED, for a message too large to send.
const GRPC_RESOURCE_EXHAUSTED: u32 = 8;
/// The largest call or answer relayed: what fits one peer frame with room for the rest.
const MAX_RELAYED: usize = crate::peer::codec::MAX_FRAME - (1 << 20);

/// What a relayed call returns: the response message, or a gRPC status code and message.
pub type CallResult = Result<Bytes, (u32, String)>;

/// Runs a call another member relayed here (installed by the server on each core).
pub type CallHandler = Rc<dyn Fn(String, Bytes) -> Pin<Box<dyn Future<Output = CallResult>>>>;

/// Why a relayed call has no answer.
#[derive(Debug)]
pub enum RelayError {
    /// It never reached the leader: safe to send to another.
    NotSent(Error),
    /// It may have reached the leader, and may have run.
    Lost(Error),
}

struct Pending {
    to: NodeId,
    deadline: Option<Instant>,
    done: flume::Sender<Result<CallResult, RelayError>>,
}

/// One core's relayed calls: those it sent and waits for, and the handler for those it serves.
#[derive(Default)]
pub(super) struct Relay {
    next_id: Cell<u64>,
    pending: RefCell<HashMap<u64, Pending>>,
    handler: RefCell<Option<CallHandler>>,
}

impl Relay {
    fn finish(&self, id: u64, outcome: Result<CallResult, RelayError>) {
        if let Some(p) = self.pending.borrow_mut().remove(&id) {
            let _ = p.done.send(outcome);
        }
    }

    /// The answer to a call this core sent.
    pub(super) fn answered(&self, a: Answer) {
        let result = if a.code == 0 {
            Ok(a.body)
        } else {
            Err((a.code, a.message))
        };
        self.finish(a.id, Ok(result));
    }

    /// Calls that never left this core.
    pub(super) fn unsent(&self, ids: Vec<u64>) {
        for id in ids {
            self.finish(id, Err(RelayError::NotSent(Error::NoLeader)));
        }
    }

    /// The connection to `to` broke: every call out to it may be lost.
    pub(super) fn lost(&self, to: NodeId) {
        let lost: Vec<u64> = self
            .pending
            .borrow()
            .iter()
            .filter(|(_, p)| p.to == to)
            .map(|(&id, _)| id)
            .collect();
        for id in lost {
            self.finish(id, Err(RelayError::Lost(Error::LeaderChanged)));
        }
    }

    /// On every tick: calls out to a member that no longer leads, or out too long.
    pub(super) fn check(&self, leader: NodeId, now: Instant) {
        let failed: Vec<(u64, Error)> = self
            .pending
            .borrow()
            .iter()
            .filter_map(|(&id, p)| {
                if p.to != leader {
                    Some((id, Error::LeaderChanged))
                } else if p.deadline.is_some_and(|d| d <= now) {
                    Some((id, Error::Timeout))
                } else {
                    None
                }
            })
            .collect();
        for (id, e) in failed {
            self.finish(id, Err(RelayError::Lost(e)));
        }
    }
}

/// Removes a call's entry when its caller stops waiting (the client went away).
struct Forget<'a> {
    relay: &'a Relay,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.relay.pending.borrow_mut().remove(&self.id);
    }
}

/// The relayed call that asks the leader node for a follower's read barrier (see
/// [`LocalDb::read_barrier_from`]); peers only, never a client's method.
const READ_BARRIER: &str = "/spindle.peer/ReadBarrier";

/// A read barrier's answer: one `(shard, index, revision)` stamp per shard, little-endian.
fn encode_stamps(stamps: &[ReadStamp]) -> Bytes {
    let mut out = Vec::with_capacity(stamps.len() * 20);
    for st in stamps {
        out.extend_from_slice(&st.shard.to_le_bytes());
        out.extend_from_slice(&st.index.to_le_bytes());
        out.extend_from_slice(&st.revision.to_le_bytes());
    }
    out.into()
}

fn decode_stamps(b: &[u8]) -> Option<Vec<ReadStamp>> {
    if b.len() % 20 != 0 {
        return None;
    }
    b.chunks_exact(20)
        .map(|c| {
            Some(ReadStamp {
                shard: u32::from_le_bytes(c[..4].try_into().ok()?),
                index: u64::from_le_bytes(c[4..12].try_into().ok()?),
                revision: i64::from_le_bytes(c[12..].try_into().ok()?),
            })
        })
        .collect()
}

impl Core {
    /// On the leader node: confirms leadership (ReadIndex on shard 0, which covers every
    /// shard) and returns, per shard, where its log holds everything up to the revision every
    /// acknowledged write is at or below.
    async fn read_barrier(self: &Rc<Self>) -> Result<Vec<ReadStamp>, Error> {
        self.call(0, ShardOp::ReadIndex).await?;
        // Read after the confirmation; never past a committed record (a stamp's rule).
        let revision = self.shared.clock.stamp_revision();
        let shards: Vec<u32> = (0..self.shared.nshards).collect();
        self.call_all(&shards, |r| ShardOp::Stamp(revision, r))
            .await
            .into_iter()
            .collect()
    }

    /// Runs a call member `from` relayed here, and answers it on the connection it came on.
    pub(super) fn serve_relayed(self: &Rc<Self>, from: NodeId, call: Call, replies: Rc<Replies>) {
        tracing::trace!(from = %format!("{from:x}"), path = %call.path, "relayed call");
        let handler = self.relay.handler.borrow().clone();
        let core = self.clone();
        glommio::spawn_local(async move {
            let result = if call.path == READ_BARRIER {
                core.read_barrier()
                    .await
                    .map(|stamps| encode_stamps(&stamps))
                    .map_err(|e| (GRPC_UNAVAILABLE, e.to_string()))
            } else if let Some(handler) = handler {
                handler(call.path, call.body).await
            } else {
                Err((GRPC_UNAVAILABLE, Error::NotLeader.to_string()))
            };
            let (code, message, body) = match result {
                // An answer must fit one peer frame; a larger one would break the connection
                // and every call on it. etcd would send it; the client gets gRPC's refusal.
                Ok(body) if body.len() > MAX_RELAYED => (
                    GRPC_RESOURCE_EXHAUSTED,
                    format!(
                        "grpc: trying to send message larger than max ({} vs. {MAX_RELAYED})",
                        body.len()
                    ),
                    Bytes::new(),
                ),
                Ok(body) => (0, String::new(), body),
                Err((code, message)) => (code, message, Bytes::new()),
            };
            replies.send(Answer {
                id: call.id,
                core: call.core,
                code,
                message,
                body,
            });
        })
        .detach();
    }
}

impl LocalDb {
    /// A follower's barrier before a linearizable read, Raft's ReadIndex across every shard:
    /// the leader node `leader` confirms it leads and says, per shard, up to which log index
    /// everything at or below its revision `R` lies; once this member has applied that far on
    /// every shard, its reads are at `R` or later, so they see every write acknowledged before
    /// the barrier. Waits at most the leader patience for the applies (`request timed out`).
    /// The leader's refusal comes back as its gRPC code and message.
    pub async fn read_barrier_from(
        &self,
        leader: NodeId,
    ) -> Result<Result<(), (u32, String)>, RelayError> {
        let body = match self
            .relay(leader, READ_BARRIER, Bytes::new(), false)
            .await?
        {
            Ok(body) => body,
            Err(refused) => return Ok(Err(refused)),
        };
        let stamps = decode_stamps(&body)
            .filter(|s| !s.is_empty())
            .ok_or(RelayError::Lost(Error::LeaderChanged))?;
        let revision = stamps.iter().map(|s| s.revision).min().unwrap_or(0);
        for st in stamps {
            self.core.peer_stamp(st);
        }
        self.core
            .wait_visible_within(revision, self.leader_patience())
            .await
            .map_err(RelayError::Lost)?;
        Ok(Ok(()))
    }

    /// Installs what runs calls other members relay to this core.
    pub fn serve_relayed_calls(&self, handler: CallHandler) {
        *self.core.relay.handler.borrow_mut() = Some(handler);
    }

    /// Relays the gRPC call `path` (its messages length-prefixed in `body`) to member `to`
    /// and waits for the answer. A `blocking` call (a lock, a campaign) may wait on the leader
    /// for as long as it takes; any other is given up after two leader patiences.
    pub async fn relay(
        &self,
        to: NodeId,
        path: &str,
        body: Bytes,
        blocking: bool,
    ) -> Result<CallResult, RelayError> {
        if body.len() > MAX_RELAYED {
            return Err(RelayError::Lost(Error::RequestTooLarge));
        }
        let core = &self.core;
        let Some(transport) = core.transport.borrow().clone() else {
            return Err(RelayError::NotSent(Error::NoLeader));
        };
        let relay = &core.relay;
        let id = relay.next_id.get() + 1;
        relay.next_id.set(id);
        let (done, rx) = flume::bounded(1);
        let deadline = (!blocking).then(|| Instant::now() + 2 * self.leader_patience());
        relay
            .pending
            .borrow_mut()
            .insert(id, Pending { to, deadline, done });
        let _forget = Forget { relay, id };
        transport.call(
            to,
            Call {
                id,
                core: core.id as u32,
                path: path.to_string(),
                body,
            },
        );
        transport.flush();
        rx.recv_async()
            .await
            .map_err(|_| RelayError::Lost(Error::Closed))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_barrier_stamps_round_trip_and_bad_lengths_are_refused() {
        let stamps = vec![
            ReadStamp {
                shard: 0,
                index: 7,
                revision: 41,
            },
            ReadStamp {
                shard: 3,
                index: u64::MAX,
                revision: -1,
            },
        ];
        let b = encode_stamps(&stamps);
        assert_eq!(decode_stamps(&b), Some(stamps));
        assert_eq!(decode_stamps(&b[..19]), None);
        assert_eq!(decode_stamps(&[]), Some(vec![]));
    }
}
