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

use super::core::Core;
use super::LocalDb;
use crate::error::Error;
use crate::peer::codec::{Answer, Call};
use crate::peer::transport::Replies;
use crate::raft::NodeId;

/// gRPC's UNAVAILABLE, which etcd answers `etcdserver: not leader` with.
const GRPC_UNAVAILABLE: u32 = 14;

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

    /// Every call out to `to` may be lost: fails those not already answered.
    fn fail_to(&self, to: NodeId, err: impl Fn() -> Error) {
        let lost: Vec<u64> = self
            .pending
            .borrow()
            .iter()
            .filter(|(_, p)| p.to == to)
            .map(|(&id, _)| id)
            .collect();
        for id in lost {
            self.finish(id, Err(RelayError::Lost(err())));
        }
    }

    /// The connection to `to` broke.
    pub(super) fn lost(&self, to: NodeId) {
        self.fail_to(to, || Error::LeaderChanged);
    }

    /// On every tick: calls out to a member that no longer leads, or out too long.
    pub(super) fn check(&self, leader: NodeId, now: Instant) {
        let targets: Vec<NodeId> = {
            let p = self.pending.borrow();
            let mut t: Vec<NodeId> = p
                .values()
                .map(|p| p.to)
                .filter(|&to| to != leader)
                .collect();
            t.dedup();
            t
        };
        for to in targets {
            self.fail_to(to, || Error::LeaderChanged);
        }
        let late: Vec<u64> = self
            .pending
            .borrow()
            .iter()
            .filter(|(_, p)| p.deadline.is_some_and(|d| d <= now))
            .map(|(&id, _)| id)
            .collect();
        for id in late {
            self.finish(id, Err(RelayError::Lost(Error::Timeout)));
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

impl Core {
    /// Runs a call member `from` relayed here, and answers it on the connection it came on.
    pub(super) fn serve_relayed(&self, from: NodeId, call: Call, replies: Rc<Replies>) {
        let Some(handler) = self.relay.handler.borrow().clone() else {
            replies.send(Answer {
                id: call.id,
                core: call.core,
                code: GRPC_UNAVAILABLE,
                message: Error::NotLeader.to_string(),
                body: Bytes::new(),
            });
            return;
        };
        tracing::trace!(from = %format!("{from:x}"), path = %call.path, "relayed call");
        glommio::spawn_local(async move {
            let (code, message, body) = match handler(call.path, call.body).await {
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
