//! Catching a member up by snapshot: when a follower needs entries its leader already
//! compacted into a checkpoint, Raft sends a snapshot instead, and the snapshot is that
//! checkpoint file.
//!
//! Raft's `Snapshot` message names the checkpoint (index, term, membership) and carries no data.
//! The leader's core streams the file to the follower as a run of such messages, each with one
//! chunk in its `data` and `offset | total` (16 bytes, big-endian) in its `context`, one chunk
//! in flight per destination so a large file never sits in memory. The follower's core owning
//! the shard writes the chunks in order to the shard's `snapshot.recv`; a chunk out of order
//! (a connection dropped some) discards the transfer, and the leader, whose Raft hears no
//! answer, sends the snapshot again after an election timeout. Once the last chunk is in, the
//! file is synced and its checksum verified, and only then is the plain snapshot message
//! stepped into Raft; the shard installs the checkpoint when Raft hands it out
//! (`Shard::install`).
//!
//! The follower's writes are plain blocking file writes of at most one chunk at a time, and
//! the final sync blocks its core once per snapshot; catch-up by snapshot is rare (a member
//! that was away for more than a checkpoint interval).

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::rc::Rc;

use bytes::Bytes;

use crate::engine::checkpoint;
use crate::engine::shard::Shard;
use crate::peer::Transport;
use crate::raft::{Message, MessageKind, NodeId};

/// Size of one chunk of a checkpoint on the wire.
const CHUNK: usize = 1 << 20;

/// A checkpoint arriving for one shard.
struct Incoming {
    from: NodeId,
    index: u64,
    term: u64,
    total: u64,
    written: u64,
    file: std::fs::File,
}

/// One core's snapshot transfers, both ways.
#[derive(Default)]
pub(super) struct Catchup {
    /// (shard, member) pairs this core is streaming a checkpoint to.
    sending: RefCell<HashSet<(u32, NodeId)>>,
    incoming: RefCell<HashMap<u32, Incoming>>,
}

fn chunk_position(m: &Message) -> Option<(u64, u64)> {
    let c: &[u8; 16] = m.context.as_ref().try_into().ok()?;
    let offset = u64::from_be_bytes(c[..8].try_into().ok()?);
    let total = u64::from_be_bytes(c[8..].try_into().ok()?);
    Some((offset, total))
}

impl Catchup {
    /// Sends Raft's snapshot message `m` for `shard` as the checkpoint file it names, unless a
    /// transfer to that member is already running. A checkpoint that is gone (a newer one
    /// replaced it) is not sent: Raft sends the newer snapshot when it retries.
    pub(super) fn send(self: &Rc<Self>, shard: &Rc<Shard>, t: &Rc<Transport>, m: Message) {
        let key = (shard.id, m.to);
        if !self.sending.borrow_mut().insert(key) {
            return;
        }
        let (me, s, t) = (self.clone(), shard.clone(), t.clone());
        glommio::spawn_local(async move {
            if let Err(e) = stream(&s, &t, m).await {
                tracing::warn!(shard = s.id, to = %format!("{:x}", key.1), error = %e, "sending a snapshot failed; Raft retries");
            }
            me.sending.borrow_mut().remove(&key);
        })
        .detach();
    }

    /// A chunk of a checkpoint for `shard` arrived. Returns the snapshot message to step into
    /// Raft once the whole file is in and verified.
    pub(super) fn receive(&self, shard: &Shard, mut m: Message) -> Option<Message> {
        let (offset, total) = chunk_position(&m)?;
        let snap = m.snapshot.as_mut()?;
        if shard.replica.pending_install().is_some() {
            // Still installing the previous one; the leader retries if it must.
            return None;
        }
        let data = std::mem::take(&mut snap.data);
        let (index, term) = (snap.meta.index, snap.meta.term);
        let path = checkpoint::received_path(&shard.dir);
        let mut incoming = self.incoming.borrow_mut();
        if offset == 0 {
            let file = match std::fs::File::create(&path) {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot receive a snapshot");
                    return None;
                }
            };
            incoming.insert(
                shard.id,
                Incoming {
                    from: m.from,
                    index,
                    term,
                    total,
                    written: 0,
                    file,
                },
            );
        }
        let cur = incoming.get_mut(&shard.id)?;
        if (cur.from, cur.index, cur.term, cur.total, cur.written)
            != (m.from, index, term, total, offset)
        {
            tracing::debug!(
                shard = shard.id,
                offset,
                "snapshot chunk out of order; transfer dropped"
            );
            incoming.remove(&shard.id);
            return None;
        }
        if let Err(e) = cur.file.write_all_at(&data, offset) {
            tracing::warn!(path = %path.display(), error = %e, "writing a received snapshot failed");
            incoming.remove(&shard.id);
            return None;
        }
        cur.written += data.len() as u64;
        if cur.written < cur.total {
            return None;
        }
        let done = incoming.remove(&shard.id)?;
        let verified = done
            .file
            .sync_all()
            .map_err(|e| crate::error::Error::io(&path, e))
            .and_then(|()| checkpoint::verify(&path, shard.id));
        match verified {
            Ok(info) if (info.index, info.term) == (index, term) => {
                tracing::info!(
                    shard = shard.id,
                    index,
                    bytes = total,
                    "received the leader's checkpoint"
                );
                m.context = Bytes::new();
                Some(m)
            }
            Ok(info) => {
                tracing::warn!(
                    shard = shard.id,
                    index,
                    got = info.index,
                    "received checkpoint is not the one announced"
                );
                None
            }
            Err(e) => {
                tracing::warn!(shard = shard.id, error = %e, "received checkpoint is damaged; waiting for the leader to resend");
                None
            }
        }
    }
}

/// Whether `m` is a chunk of a checkpoint transfer (rather than a message for Raft).
pub(super) fn is_chunk(m: &Message) -> bool {
    m.kind == MessageKind::Snapshot && chunk_position(m).is_some()
}

async fn stream(s: &Shard, t: &Rc<Transport>, m: Message) -> Result<(), String> {
    let index = m.snapshot.as_ref().ok_or("no snapshot")?.meta.index;
    let path = s.dir.join(checkpoint::file_name(index));
    let file = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let total = file
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    tracing::info!(shard = s.id, to = %format!("{:x}", m.to), index, bytes = total, "sending a checkpoint as the snapshot");
    let mut offset = 0u64;
    while offset < total {
        let n = CHUNK.min((total - offset) as usize);
        let mut buf = vec![0u8; n];
        file.read_exact_at(&mut buf, offset)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let mut c = m.clone();
        if let Some(snap) = c.snapshot.as_mut() {
            snap.data = Bytes::from(buf);
        }
        let mut ctx = Vec::with_capacity(16);
        ctx.extend_from_slice(&offset.to_be_bytes());
        ctx.extend_from_slice(&total.to_be_bytes());
        c.context = Bytes::from(ctx);
        t.send(m.to, s.id, c);
        t.flush();
        offset += n as u64;
        // One chunk in flight: wait until the link took it before reading the next.
        t.drained(m.to).await;
        if s.replica.ensure_healthy().is_err() {
            return Err("the shard stopped".into());
        }
    }
    Ok(())
}
