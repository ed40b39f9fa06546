//! The peer wire format: frames of `len:u32 | crc32:u32 | flatbuffers Frame` (both integers
//! little-endian, the crc over the payload), carrying a handshake (`Hello`/`Refusal`) or a batch
//! of Raft messages of many shard groups.
//!
//! Pure and IO-free so that garbage, truncation and round trips are property-tested. A frame is
//! checked (length bound, crc, flatbuffers verifier, every enum value) before anything in it is
//! believed; a peer that sends a bad frame gets a typed error, never a panic. Heartbeats and their
//! responses, the bulk of idle traffic, travel as fixed-size `Beat` structs so that all groups'
//! beats between two nodes cost one vector in one frame.

use bytes::{BufMut, Bytes, BytesMut};
use flatbuffers::FlatBufferBuilder;

use super::peer_generated::spindle::peerfb as fb;
use crate::raft::{self, ConfState, Entry, EntryKind, Message, MessageKind, NodeId};

/// Frame header: length and crc32 of the payload.
pub const HEADER_LEN: usize = 8;
/// Largest payload a peer may send (snapshot chunks and append batches stay far below).
pub const MAX_FRAME: usize = 64 << 20;
/// Version of the peer protocol; a mismatch is refused at the handshake.
pub const PROTOCOL_VERSION: u32 = 2;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("frame of {len} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge { len: usize },
    #[error("frame checksum mismatch (header {expected:#010x}, payload {actual:#010x})")]
    Checksum { expected: u32, actual: u32 },
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// The first frame each side sends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hello {
    pub version: u32,
    pub cluster_id: u64,
    pub member_id: u64,
    /// Whom the dialer believes it reached (0: unknown).
    pub to_member: u64,
    pub shards: u32,
    pub name: String,
    pub token: String,
    pub client_urls: Vec<String>,
}

/// A joining member's request for the cluster's membership.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Join {
    pub version: u32,
    pub token: String,
    pub shards: u32,
    pub peer_urls: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerMsg {
    Hello(Hello),
    Refusal(String),
    Join(Join),
    /// The membership record (JSON) answering a `Join`.
    Members(Bytes),
    /// What one node sends another in one frame after the handshake.
    Batch(Batch),
}

/// One frame's worth of traffic from this node to one peer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    /// Raft messages, each tagged with its shard (sender and receiver are the connection's).
    pub messages: Vec<(u32, Message)>,
    /// The sender's read stamps.
    pub stamps: Vec<ReadStamp>,
    /// Client calls relayed to the leader node.
    pub calls: Vec<Call>,
    /// The leader node's answers to relayed calls.
    pub answers: Vec<Answer>,
}

impl Batch {
    /// Whether there is anything to send (stamps only ride along with other traffic).
    pub fn has_traffic(&self) -> bool {
        !(self.messages.is_empty() && self.calls.is_empty() && self.answers.is_empty())
    }

    /// Raft messages, calls and answers in it.
    pub fn items(&self) -> usize {
        self.messages.len() + self.calls.len() + self.answers.len()
    }
}

/// A client call a follower relays to the leader node (`server::forward`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Call {
    /// Unique on the sending core while the call is pending.
    pub id: u64,
    /// The sending core: its answer must reach this core.
    pub core: u32,
    /// The gRPC method.
    pub path: String,
    /// The request's gRPC messages, each length-prefixed as on the wire.
    pub body: Bytes,
}

/// The leader node's answer to a [`Call`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Answer {
    pub id: u64,
    pub core: u32,
    /// gRPC status code; 0 (OK) carries the response message in `body`.
    pub code: u32,
    pub message: String,
    pub body: Bytes,
}

/// A leader's promise about one shard's log: every record at or below `revision` is at or
/// below `index` (a follower's floor for reads across shards, `RevisionClock::raise_floor`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadStamp {
    pub shard: u32,
    pub index: u64,
    pub revision: i64,
}

fn kind_code(k: MessageKind) -> u8 {
    match k {
        MessageKind::Append => 0,
        MessageKind::AppendResponse => 1,
        MessageKind::RequestVote => 2,
        MessageKind::RequestVoteResponse => 3,
        MessageKind::RequestPreVote => 4,
        MessageKind::RequestPreVoteResponse => 5,
        MessageKind::Heartbeat => 6,
        MessageKind::HeartbeatResponse => 7,
        MessageKind::Snapshot => 8,
        MessageKind::TimeoutNow => 9,
        MessageKind::ReadIndex => 10,
        MessageKind::ReadIndexResponse => 11,
    }
}

fn kind_of(code: u8) -> Option<MessageKind> {
    Some(match code {
        0 => MessageKind::Append,
        1 => MessageKind::AppendResponse,
        2 => MessageKind::RequestVote,
        3 => MessageKind::RequestVoteResponse,
        4 => MessageKind::RequestPreVote,
        5 => MessageKind::RequestPreVoteResponse,
        6 => MessageKind::Heartbeat,
        7 => MessageKind::HeartbeatResponse,
        8 => MessageKind::Snapshot,
        9 => MessageKind::TimeoutNow,
        10 => MessageKind::ReadIndex,
        11 => MessageKind::ReadIndexResponse,
        _ => return None,
    })
}

/// A heartbeat (or response) that fits a `Beat`: nothing but term, commit and an 8-byte round.
fn as_beat(shard: u32, m: &Message) -> Option<fb::Beat> {
    let kind = match m.kind {
        MessageKind::Heartbeat => 0,
        MessageKind::HeartbeatResponse if m.commit == 0 => 1,
        _ => return None,
    };
    let round: [u8; 8] = m.context.as_ref().try_into().ok()?;
    let plain = m.log_term == 0
        && m.index == 0
        && m.entries.is_empty()
        && !m.reject
        && m.reject_hint == 0
        && m.snapshot.is_none();
    plain.then(|| fb::Beat::new(shard, kind, m.term, m.commit, u64::from_be_bytes(round)))
}

fn finish(
    mut fbb: FlatBufferBuilder<'_>,
    body_type: fb::Body,
    body: flatbuffers::WIPOffset<flatbuffers::UnionWIPOffset>,
) -> Bytes {
    let frame = fb::Frame::create(
        &mut fbb,
        &fb::FrameArgs {
            body_type,
            body: Some(body),
        },
    );
    fbb.finish(frame, None);
    let payload = fbb.finished_data();
    let mut out = BytesMut::with_capacity(HEADER_LEN + payload.len());
    out.put_u32_le(payload.len() as u32);
    out.put_u32_le(crc32fast::hash(payload));
    out.put_slice(payload);
    out.freeze()
}

/// One framed `Hello`.
pub fn encode_hello(h: &Hello) -> Bytes {
    let mut fbb = FlatBufferBuilder::with_capacity(128);
    let name = fbb.create_string(&h.name);
    let token = fbb.create_string(&h.token);
    let urls: Vec<_> = h.client_urls.iter().map(|u| fbb.create_string(u)).collect();
    let client_urls = fbb.create_vector(&urls);
    let hello = fb::Hello::create(
        &mut fbb,
        &fb::HelloArgs {
            version: h.version,
            cluster_id: h.cluster_id,
            member_id: h.member_id,
            to_member: h.to_member,
            shards: h.shards,
            name: Some(name),
            token: Some(token),
            client_urls: Some(client_urls),
        },
    );
    finish(fbb, fb::Body::Hello, hello.as_union_value())
}

/// One framed `Refusal` (sent before closing a connection that failed the handshake).
pub fn encode_refusal(reason: &str) -> Bytes {
    let mut fbb = FlatBufferBuilder::with_capacity(64 + reason.len());
    let r = fbb.create_string(reason);
    let refusal = fb::Refusal::create(&mut fbb, &fb::RefusalArgs { reason: Some(r) });
    finish(fbb, fb::Body::Refusal, refusal.as_union_value())
}

/// One framed `Join`.
pub fn encode_join(j: &Join) -> Bytes {
    let mut fbb = FlatBufferBuilder::with_capacity(128);
    let token = fbb.create_string(&j.token);
    let urls: Vec<_> = j.peer_urls.iter().map(|u| fbb.create_string(u)).collect();
    let peer_urls = fbb.create_vector(&urls);
    let join = fb::Join::create(
        &mut fbb,
        &fb::JoinArgs {
            version: j.version,
            token: Some(token),
            shards: j.shards,
            peer_urls: Some(peer_urls),
        },
    );
    finish(fbb, fb::Body::Join, join.as_union_value())
}

/// One framed `Members` answer.
pub fn encode_members(membership: &[u8]) -> Bytes {
    let mut fbb = FlatBufferBuilder::with_capacity(64 + membership.len());
    let m = fbb.create_vector(membership);
    let members = fb::Members::create(
        &mut fbb,
        &fb::MembersArgs {
            membership: Some(m),
        },
    );
    finish(fbb, fb::Body::Members, members.as_union_value())
}

/// One framed batch (all from this node to one peer).
pub fn encode_batch(batch: &Batch) -> Bytes {
    let msgs = &batch.messages;
    let size: usize = msgs
        .iter()
        .map(|(_, m)| 96 + m.entries.iter().map(|e| e.data.len() + 48).sum::<usize>())
        .sum::<usize>()
        + batch
            .calls
            .iter()
            .map(|c| 64 + c.path.len() + c.body.len())
            .sum::<usize>()
        + batch
            .answers
            .iter()
            .map(|a| 64 + a.message.len() + a.body.len())
            .sum::<usize>();
    let mut fbb = FlatBufferBuilder::with_capacity(size.min(MAX_FRAME));
    let mut beats = Vec::new();
    let mut full = Vec::new();
    for (shard, m) in msgs.iter() {
        if let Some(b) = as_beat(*shard, m) {
            beats.push(b);
            continue;
        }
        let entries = (!m.entries.is_empty()).then(|| {
            let es: Vec<_> = m
                .entries
                .iter()
                .map(|e| {
                    let data = (!e.data.is_empty()).then(|| fbb.create_vector(&e.data[..]));
                    fb::Entry::create(
                        &mut fbb,
                        &fb::EntryArgs {
                            term: e.term,
                            index: e.index,
                            conf_change: e.kind == EntryKind::ConfChange,
                            data,
                        },
                    )
                })
                .collect();
            fbb.create_vector(&es)
        });
        let snapshot = m.snapshot.as_ref().map(|s| {
            let voters: Vec<u64> = s.meta.conf_state.voters.iter().copied().collect();
            let learners: Vec<u64> = s.meta.conf_state.learners.iter().copied().collect();
            let voters = fbb.create_vector(&voters);
            let learners = fbb.create_vector(&learners);
            let conf = fb::ConfState::create(
                &mut fbb,
                &fb::ConfStateArgs {
                    voters: Some(voters),
                    learners: Some(learners),
                },
            );
            let data = fbb.create_vector(&s.data[..]);
            fb::Snapshot::create(
                &mut fbb,
                &fb::SnapshotArgs {
                    index: s.meta.index,
                    term: s.meta.term,
                    conf: Some(conf),
                    data: Some(data),
                },
            )
        });
        let context = (!m.context.is_empty()).then(|| fbb.create_vector(&m.context[..]));
        full.push(fb::Message::create(
            &mut fbb,
            &fb::MessageArgs {
                shard: *shard,
                kind: kind_code(m.kind),
                term: m.term,
                log_term: m.log_term,
                index: m.index,
                entries,
                commit: m.commit,
                reject: m.reject,
                reject_hint: m.reject_hint,
                snapshot,
                context,
            },
        ));
    }
    let messages = (!full.is_empty()).then(|| fbb.create_vector(&full));
    let beats = (!beats.is_empty()).then(|| fbb.create_vector(&beats));
    let stamps: Vec<fb::Stamp> = batch
        .stamps
        .iter()
        .map(|s| fb::Stamp::new(s.shard, s.index, s.revision))
        .collect();
    let stamps = (!stamps.is_empty()).then(|| fbb.create_vector(&stamps));
    let calls: Vec<_> = batch
        .calls
        .iter()
        .map(|c| {
            let path = fbb.create_string(&c.path);
            let body = fbb.create_vector(&c.body[..]);
            fb::Call::create(
                &mut fbb,
                &fb::CallArgs {
                    id: c.id,
                    core: c.core,
                    path: Some(path),
                    body: Some(body),
                },
            )
        })
        .collect();
    let calls = (!calls.is_empty()).then(|| fbb.create_vector(&calls));
    let answers: Vec<_> = batch
        .answers
        .iter()
        .map(|a| {
            let message = fbb.create_string(&a.message);
            let body = fbb.create_vector(&a.body[..]);
            fb::Answer::create(
                &mut fbb,
                &fb::AnswerArgs {
                    id: a.id,
                    core: a.core,
                    code: a.code,
                    message: Some(message),
                    body: Some(body),
                },
            )
        })
        .collect();
    let answers = (!answers.is_empty()).then(|| fbb.create_vector(&answers));
    let batch = fb::Batch::create(
        &mut fbb,
        &fb::BatchArgs {
            messages,
            beats,
            stamps,
            calls,
            answers,
        },
    );
    finish(fbb, fb::Body::Batch, batch.as_union_value())
}

/// Splits frames off a byte stream and checks each one's length and checksum.
#[derive(Default)]
pub struct FrameReader {
    buf: BytesMut,
}

impl FrameReader {
    pub fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Whether the stream opens with a TLS handshake record (type 22, version 3.x), which a
    /// plain peer port must refuse at once: read as a frame header it announces a frame of over
    /// 64 KiB, far more than any hello, and both ends would wait for bytes that never come.
    pub fn starts_like_tls(&self) -> bool {
        self.buf.len() >= 3 && self.buf[0] == 0x16 && self.buf[1] == 0x03 && self.buf[2] <= 0x04
    }

    /// The next whole frame's payload, `None` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, CodecError> {
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > MAX_FRAME {
            return Err(CodecError::TooLarge { len });
        }
        if self.buf.len() < HEADER_LEN + len {
            self.buf.reserve(HEADER_LEN + len - self.buf.len());
            return Ok(None);
        }
        let expected = u32::from_le_bytes([self.buf[4], self.buf[5], self.buf[6], self.buf[7]]);
        let mut frame = self.buf.split_to(HEADER_LEN + len);
        let payload = frame.split_off(HEADER_LEN).freeze();
        let actual = crc32fast::hash(&payload);
        if actual != expected {
            return Err(CodecError::Checksum { expected, actual });
        }
        Ok(Some(payload))
    }
}

fn malformed(what: impl Into<String>) -> CodecError {
    CodecError::Malformed(what.into())
}

/// Decodes one frame payload. Raft messages get `from`/`to` from the connection: a peer cannot
/// speak for anyone but the member it authenticated as in its `Hello`.
pub fn decode(payload: &Bytes, from: NodeId, to: NodeId) -> Result<PeerMsg, CodecError> {
    let frame = fb::root_as_frame(payload).map_err(|e| malformed(e.to_string()))?;
    match frame.body_type() {
        fb::Body::Hello => {
            let h = frame
                .body_as_hello()
                .ok_or_else(|| malformed("empty hello"))?;
            Ok(PeerMsg::Hello(Hello {
                version: h.version(),
                cluster_id: h.cluster_id(),
                member_id: h.member_id(),
                to_member: h.to_member(),
                shards: h.shards(),
                name: h.name().unwrap_or_default().to_string(),
                token: h.token().unwrap_or_default().to_string(),
                client_urls: h
                    .client_urls()
                    .map(|v| v.iter().map(str::to_string).collect())
                    .unwrap_or_default(),
            }))
        }
        fb::Body::Refusal => {
            let r = frame
                .body_as_refusal()
                .ok_or_else(|| malformed("empty refusal"))?;
            Ok(PeerMsg::Refusal(r.reason().unwrap_or_default().to_string()))
        }
        fb::Body::Join => {
            let j = frame
                .body_as_join()
                .ok_or_else(|| malformed("empty join"))?;
            Ok(PeerMsg::Join(Join {
                version: j.version(),
                token: j.token().unwrap_or_default().to_string(),
                shards: j.shards(),
                peer_urls: j
                    .peer_urls()
                    .map(|v| v.iter().map(str::to_string).collect())
                    .unwrap_or_default(),
            }))
        }
        fb::Body::Members => {
            let m = frame
                .body_as_members()
                .ok_or_else(|| malformed("empty members"))?;
            Ok(PeerMsg::Members(Bytes::copy_from_slice(
                m.membership().map(|v| v.bytes()).unwrap_or_default(),
            )))
        }
        fb::Body::Batch => {
            let b = frame
                .body_as_batch()
                .ok_or_else(|| malformed("empty batch"))?;
            let mut out = Vec::new();
            for beat in b.beats().iter().flatten() {
                let kind = match beat.kind() {
                    0 => MessageKind::Heartbeat,
                    1 => MessageKind::HeartbeatResponse,
                    k => return Err(malformed(format!("beat kind {k}"))),
                };
                let mut m = Message::new(kind, from, to, beat.term());
                m.commit = beat.commit();
                m.context = Bytes::copy_from_slice(&beat.round().to_be_bytes());
                out.push((beat.shard(), m));
            }
            for fm in b.messages().iter().flatten() {
                let kind =
                    kind_of(fm.kind()).ok_or_else(|| malformed(format!("kind {}", fm.kind())))?;
                let mut m = Message::new(kind, from, to, fm.term());
                m.log_term = fm.log_term();
                m.index = fm.index();
                m.commit = fm.commit();
                m.reject = fm.reject();
                m.reject_hint = fm.reject_hint();
                m.context = slice(payload, fm.context());
                for e in fm.entries().iter().flatten() {
                    m.entries.push(Entry {
                        term: e.term(),
                        index: e.index(),
                        kind: if e.conf_change() {
                            EntryKind::ConfChange
                        } else {
                            EntryKind::Normal
                        },
                        data: slice(payload, e.data()),
                    });
                }
                if let Some(s) = fm.snapshot() {
                    let conf = s.conf();
                    let ids = |v: Option<flatbuffers::Vector<'_, u64>>| {
                        v.map(|v| v.iter().collect::<Vec<_>>()).unwrap_or_default()
                    };
                    let mut conf_state = ConfState::new(ids(conf.and_then(|c| c.voters())));
                    conf_state.learners =
                        ids(conf.and_then(|c| c.learners())).into_iter().collect();
                    m.snapshot = Some(raft::Snapshot {
                        meta: raft::SnapshotMeta {
                            index: s.index(),
                            term: s.term(),
                            conf_state,
                        },
                        data: slice(payload, s.data()),
                    });
                }
                out.push((fm.shard(), m));
            }
            let stamps = b
                .stamps()
                .iter()
                .flatten()
                .map(|st| ReadStamp {
                    shard: st.shard(),
                    index: st.index(),
                    revision: st.revision(),
                })
                .collect();
            let calls = b
                .calls()
                .iter()
                .flatten()
                .map(|c| Call {
                    id: c.id(),
                    core: c.core(),
                    path: c.path().unwrap_or_default().to_string(),
                    body: slice(payload, c.body()),
                })
                .collect();
            let answers = b
                .answers()
                .iter()
                .flatten()
                .map(|a| Answer {
                    id: a.id(),
                    core: a.core(),
                    code: a.code(),
                    message: a.message().unwrap_or_default().to_string(),
                    body: slice(payload, a.body()),
                })
                .collect();
            Ok(PeerMsg::Batch(Batch {
                messages: out,
                stamps,
                calls,
                answers,
            }))
        }
        other => Err(malformed(format!("body type {}", other.0))),
    }
}

/// A vector's bytes as a slice of the frame, without copying.
fn slice(payload: &Bytes, v: Option<flatbuffers::Vector<'_, u8>>) -> Bytes {
    match v {
        Some(v) if !v.bytes().is_empty() => payload.slice_ref(v.bytes()),
        _ => Bytes::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn read_all(bytes: &[u8]) -> Result<Vec<Bytes>, CodecError> {
        let mut r = FrameReader::default();
        r.feed(bytes);
        let mut out = Vec::new();
        while let Some(f) = r.next_frame()? {
            out.push(f);
        }
        Ok(out)
    }

    fn any_message() -> impl Strategy<Value = (u32, Message)> {
        (
            0u32..64,
            0u8..12,
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<bool>(),
            prop::collection::vec(
                (
                    any::<u64>(),
                    any::<bool>(),
                    prop::collection::vec(any::<u8>(), 0..40),
                ),
                0..4,
            ),
            prop::collection::vec(any::<u8>(), 0..12),
            prop::option::of((
                any::<u64>(),
                prop::collection::btree_set(1u64..9, 0..4),
                prop::collection::vec(any::<u8>(), 0..64),
            )),
        )
            .prop_map(
                |(shard, k, term, log_term, index, commit, reject, es, ctx, snap)| {
                    let mut m = Message::new(kind_of(k).unwrap(), 7, 9, term);
                    m.log_term = log_term;
                    m.index = index;
                    m.commit = commit;
                    m.reject = reject;
                    m.context = Bytes::from(ctx);
                    m.entries = es
                        .into_iter()
                        .enumerate()
                        .map(|(i, (t, cc, d))| Entry {
                            term: t,
                            index: index.wrapping_add(i as u64),
                            kind: if cc {
                                EntryKind::ConfChange
                            } else {
                                EntryKind::Normal
                            },
                            data: Bytes::from(d),
                        })
                        .collect();
                    m.snapshot = snap.map(|(i, voters, data)| raft::Snapshot {
                        meta: raft::SnapshotMeta {
                            index: i,
                            term: 3,
                            conf_state: ConfState::new(voters),
                        },
                        data: Bytes::from(data),
                    });
                    (shard, m)
                },
            )
    }

    proptest! {
        #[test]
        fn batches_round_trip(
            msgs in prop::collection::vec(any_message(), 0..12),
            stamps in prop::collection::vec((0u32..64, any::<u64>(), any::<i64>()), 0..4),
            calls in prop::collection::vec((any::<u64>(), any::<u32>(), ".{0,30}", prop::collection::vec(any::<u8>(), 0..64)), 0..4),
            answers in prop::collection::vec((any::<u64>(), any::<u32>(), any::<u32>(), ".{0,30}", prop::collection::vec(any::<u8>(), 0..64)), 0..4),
        ) {
            let stamps: Vec<ReadStamp> = stamps
                .into_iter()
                .map(|(shard, index, revision)| ReadStamp { shard, index, revision })
                .collect();
            let calls: Vec<Call> = calls
                .into_iter()
                .map(|(id, core, path, body)| Call { id, core, path, body: body.into() })
                .collect();
            let answers: Vec<Answer> = answers
                .into_iter()
                .map(|(id, core, code, message, body)| Answer { id, core, code, message, body: body.into() })
                .collect();
            let batch = Batch { messages: msgs.clone(), stamps, calls, answers };
            let frames = read_all(&encode_batch(&batch)).unwrap();
            prop_assert_eq!(frames.len(), 1);
            let PeerMsg::Batch(mut got) = decode(&frames[0], 7, 9).unwrap() else {
                panic!("not a batch")
            };
            prop_assert_eq!(&got.stamps, &batch.stamps);
            prop_assert_eq!(&got.calls, &batch.calls);
            prop_assert_eq!(&got.answers, &batch.answers);
            // Beats are grouped first; compare as multisets in a fixed order.
            let mut want = msgs.clone();
            let key = |(s, m): &(u32, Message)| (*s, format!("{m:?}"));
            want.sort_by_key(key);
            got.messages.sort_by_key(key);
            prop_assert_eq!(got.messages, want);
        }

        #[test]
        fn garbage_is_an_error_not_a_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(frames) = read_all(&bytes) {
                for f in frames {
                    let _ = decode(&f, 1, 2);
                }
            }
        }

        #[test]
        fn flipped_bytes_are_caught(msgs in prop::collection::vec(any_message(), 1..4), at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let batch = Batch { messages: msgs, ..Default::default() };
            let mut bytes = encode_batch(&batch).to_vec();
            let i = HEADER_LEN + at.index(bytes.len() - HEADER_LEN);
            bytes[i] ^= 1 << bit;
            let caught = matches!(read_all(&bytes), Err(CodecError::Checksum { .. }));
            prop_assert!(caught);
        }
    }

    #[test]
    fn heartbeats_are_coalesced_into_beats() {
        let msgs: Vec<_> = (0..32)
            .map(|s| {
                let mut m = Message::new(MessageKind::Heartbeat, 7, 9, 5);
                m.commit = 100;
                m.context = Bytes::copy_from_slice(&42u64.to_be_bytes());
                (s, m)
            })
            .collect();
        let batch = Batch {
            messages: msgs,
            ..Default::default()
        };
        let frame = encode_batch(&batch);
        assert!(frame.len() < 32 * 48, "{} bytes for 32 beats", frame.len());
        let payload = read_all(&frame).unwrap().remove(0);
        assert_eq!(decode(&payload, 7, 9).unwrap(), PeerMsg::Batch(batch));
    }

    #[test]
    fn handshake_frames_and_limits() {
        let h = Hello {
            version: PROTOCOL_VERSION,
            cluster_id: 1,
            member_id: 2,
            to_member: 3,
            shards: 4,
            name: "n1".into(),
            token: "t".into(),
            client_urls: vec!["http://127.0.0.1:2379".into()],
        };
        let mut stream = encode_hello(&h).to_vec();
        stream.extend_from_slice(&encode_refusal("no"));
        let join = Join {
            version: PROTOCOL_VERSION,
            token: "t".into(),
            shards: 4,
            peer_urls: vec!["http://127.0.0.1:2380".into()],
        };
        stream.extend_from_slice(&encode_join(&join));
        stream.extend_from_slice(&encode_members(b"{}"));
        let frames = read_all(&stream).unwrap();
        assert_eq!(decode(&frames[0], 0, 0).unwrap(), PeerMsg::Hello(h));
        assert_eq!(
            decode(&frames[1], 0, 0).unwrap(),
            PeerMsg::Refusal("no".into())
        );
        assert_eq!(decode(&frames[2], 0, 0).unwrap(), PeerMsg::Join(join));
        assert_eq!(
            decode(&frames[3], 0, 0).unwrap(),
            PeerMsg::Members(Bytes::from_static(b"{}"))
        );
        // A partial frame waits for more bytes.
        let mut r = FrameReader::default();
        r.feed(&stream[..5]);
        assert_eq!(r.next_frame(), Ok(None));
        // An absurd length is refused before buffering it.
        let mut r = FrameReader::default();
        r.feed(&u32::MAX.to_le_bytes());
        r.feed(&[0; 4]);
        assert!(matches!(r.next_frame(), Err(CodecError::TooLarge { .. })));
        // A well-checksummed frame that is not flatbuffers is malformed.
        let junk = b"not a flatbuffer";
        let mut f = (junk.len() as u32).to_le_bytes().to_vec();
        f.extend_from_slice(&crc32fast::hash(junk).to_le_bytes());
        f.extend_from_slice(junk);
        let p = read_all(&f).unwrap().remove(0);
        assert!(matches!(decode(&p, 0, 0), Err(CodecError::Malformed(_))));
    }
}
