//! WAL entries and their on-disk framing.
//!
//! Frame layout (little endian), 8-byte aligned so a scan can probe every aligned offset:
//! `len:u32 | crc:u32 | mark:u32 | 0:u32 | payload[len] | zero padding`.
//! `crc` covers `len`, `mark` and the payload. `mark` is how far the segment was known durable when
//! the frame was appended; recovery uses it to tell a torn final flush from corruption of data that
//! had already been acknowledged (see `recovery`).

use bytes::Bytes;
use flatbuffers::FlatBufferBuilder;

use super::wal_generated::spindle::walfb;
use crate::mvcc::Effect;

pub const FRAME_HEADER_LEN: usize = 16;

/// Segment header: `magic[8] | version:u32 | shard:u32 | first_index:u64 | crc:u32` padded to 64.
pub const SEGMENT_HEADER_LEN: usize = 64;
pub const SEGMENT_MAGIC: &[u8; 8] = b"SPNDLWAL";
pub const SEGMENT_VERSION: u32 = 1;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EntryKind {
    Write,
    Part,
    Abort,
    Compact,
    /// A Raft entry without application data (a new leader's first entry).
    #[default]
    Noop,
    /// Lease `WalEntry::lease` granted (or re-logged by a checkpoint); takes no revision.
    LeaseGrant,
    /// Lease `WalEntry::lease.id` revoked.
    LeaseRevoke,
    /// Raft hard state (`term`, `vote`, `commit`). Not a log entry: it takes no index.
    HardState,
    /// A Raft membership change, encoded in `data`.
    ConfChange,
    /// A multi-shard revision every participant committed (cluster members).
    Commit,
    /// An auth change (`data`: `auth::AuthOp::encode()`), in shard 0's log only.
    Auth,
    /// An alarm raised or disarmed (`data`: `alarm::AlarmOp::encode()`), in shard 0's log only.
    Alarm,
}

/// The lease a `LeaseGrant`/`LeaseRevoke` entry is about (zero for other kinds).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeaseRecord {
    pub id: i64,
    /// Granted TTL in seconds.
    pub ttl: i64,
}

/// One Raft-shaped log entry (or a hard state record).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WalEntry {
    pub term: u64,
    pub index: u64,
    pub kind: EntryKind,
    pub revision: i64,
    /// For `Part`: every shard that holds a part of `revision`.
    pub participants: Vec<u32>,
    pub ops: Vec<Effect>,
    pub lease: LeaseRecord,
    /// `HardState`: the vote (0 = none) and commit index.
    pub vote: u64,
    pub commit: u64,
    /// `ConfChange`: the encoded change; `Auth`: the encoded auth op.
    pub data: Bytes,
}

pub fn align8(n: usize) -> usize {
    (n + 7) & !7
}

/// Serializes `entry` into a complete frame.
pub fn encode_frame(entry: &WalEntry, mark: u32) -> Vec<u8> {
    let mut frame = Vec::new();
    write_frame(&mut frame, &encode_payload(entry), mark);
    frame
}

/// The flatbuffers payload of `entry`.
pub fn encode_payload(entry: &WalEntry) -> Vec<u8> {
    let mut fbb = FlatBufferBuilder::with_capacity(64 + entry.ops.len() * 48);
    let ops: Vec<_> = entry
        .ops
        .iter()
        .map(|op| {
            let (kind, key, value, lease) = match op {
                Effect::Put { key, value, lease } => (walfb::OpKind::Put, key, Some(value), *lease),
                Effect::Delete { key } => (walfb::OpKind::Delete, key, None, 0),
            };
            let key = Some(fbb.create_vector(key.as_ref()));
            let value = value.map(|v| fbb.create_vector(v.as_ref()));
            walfb::Op::create(
                &mut fbb,
                &walfb::OpArgs {
                    kind,
                    key,
                    value,
                    lease,
                },
            )
        })
        .collect();
    let ops = if ops.is_empty() {
        None
    } else {
        Some(fbb.create_vector(&ops))
    };
    let participants = if entry.participants.is_empty() {
        None
    } else {
        Some(fbb.create_vector(&entry.participants))
    };
    let kind = match entry.kind {
        EntryKind::Write => walfb::EntryKind::Write,
        EntryKind::Part => walfb::EntryKind::Part,
        EntryKind::Abort => walfb::EntryKind::Abort,
        EntryKind::Compact => walfb::EntryKind::Compact,
        EntryKind::Noop => walfb::EntryKind::Noop,
        EntryKind::LeaseGrant => walfb::EntryKind::LeaseGrant,
        EntryKind::LeaseRevoke => walfb::EntryKind::LeaseRevoke,
        EntryKind::HardState => walfb::EntryKind::HardState,
        EntryKind::ConfChange => walfb::EntryKind::ConfChange,
        EntryKind::Commit => walfb::EntryKind::Commit,
        EntryKind::Auth => walfb::EntryKind::Auth,
        EntryKind::Alarm => walfb::EntryKind::Alarm,
    };
    let data = (!entry.data.is_empty()).then(|| fbb.create_vector(entry.data.as_ref()));
    let root = walfb::Entry::create(
        &mut fbb,
        &walfb::EntryArgs {
            term: entry.term,
            index: entry.index,
            kind,
            revision: entry.revision,
            participants,
            ops,
            lease_id: entry.lease.id,
            lease_ttl: entry.lease.ttl,
            vote: entry.vote,
            commit: entry.commit,
            data,
        },
    );
    fbb.finish(root, None);
    fbb.finished_data().to_vec()
}

/// Length of the frame that will carry a payload of `payload_len` bytes.
pub fn frame_len(payload_len: usize) -> usize {
    align8(FRAME_HEADER_LEN + payload_len)
}

/// Appends the frame of `payload` to `out` (the payload's only copy on the write path);
/// `mark` is the segment's durable end when the frame is appended.
pub fn write_frame(out: &mut Vec<u8>, payload: &[u8], mark: u32) {
    let len = (payload.len() as u32).to_le_bytes();
    let rest = {
        let mut r = [0u8; 8];
        r[0..4].copy_from_slice(&mark.to_le_bytes());
        r
    };
    let crc = frame_crc(&len, &rest, payload);
    out.reserve(frame_len(payload.len()));
    out.extend_from_slice(&len);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&rest);
    out.extend_from_slice(payload);
    let pad = frame_len(payload.len()) - FRAME_HEADER_LEN - payload.len();
    out.extend_from_slice(&[0u8; 8][..pad]);
}

/// Whether `header` (a frame's first [`FRAME_HEADER_LEN`] bytes) describes `payload`: its
/// length and checksum match, as [`write_frame`] wrote them.
pub fn frame_matches(header: &[u8], payload: &[u8]) -> bool {
    if header.len() != FRAME_HEADER_LEN {
        return false;
    }
    let (len, crc, rest) = (&header[0..4], &header[4..8], &header[8..16]);
    len == (payload.len() as u32).to_le_bytes()
        && crc == frame_crc(len, rest, payload).to_le_bytes()
}

fn frame_crc(len: &[u8], rest: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(len);
    h.update(rest);
    h.update(payload);
    h.finalize()
}

/// What a probe at one offset found.
#[derive(Debug)]
pub enum Probe {
    /// A frame header of zeros: nothing was ever written here.
    Zero,
    /// Not a valid frame (bad length, checksum or payload).
    Invalid(&'static str),
    Valid {
        entry: WalEntry,
        /// The flatbuffers payload; the entry's keys and values are slices of it.
        payload: Bytes,
        frame_len: usize,
        mark: u32,
    },
}

/// Checks and decodes the frame starting at `buf[0]`; every read of a record goes through the CRC.
pub fn probe_frame(buf: &[u8]) -> Probe {
    probe_frame_with(buf, Bytes::copy_from_slice)
}

/// [`probe_frame`], with the valid payload's bytes made by `share` (a slice of the mapped
/// segment the frame was read from, rather than a copy).
pub fn probe_frame_with(buf: &[u8], share: impl FnOnce(&[u8]) -> Bytes) -> Probe {
    if buf.len() < FRAME_HEADER_LEN {
        return Probe::Invalid("truncated frame header");
    }
    let word = |i: usize| u32::from_le_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
    let (len, crc, mark, reserved) = (word(0) as usize, word(4), word(8), word(12));
    if len == 0 && crc == 0 && mark == 0 && reserved == 0 {
        return Probe::Zero;
    }
    if len == 0 || reserved != 0 || FRAME_HEADER_LEN + len > buf.len() {
        return Probe::Invalid("bad frame length");
    }
    let payload = &buf[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len];
    if frame_crc(&buf[0..4], &buf[8..16], payload) != crc {
        return Probe::Invalid("checksum mismatch");
    }
    // Verify before copying: a scan probes many offsets that hold no frame.
    if walfb::root_as_entry(payload).is_err() {
        return Probe::Invalid("undecodable payload");
    }
    let payload = share(payload);
    match decode_payload(&payload) {
        Some(entry) => Probe::Valid {
            entry,
            payload,
            frame_len: align8(FRAME_HEADER_LEN + len),
            mark,
        },
        None => Probe::Invalid("undecodable payload"),
    }
}

/// Decodes a payload; keys, values and data are slices of `payload`, not copies.
pub fn decode_payload(payload: &Bytes) -> Option<WalEntry> {
    let e = walfb::root_as_entry(payload).ok()?;
    let slice = |b: Option<flatbuffers::Vector<'_, u8>>| match b {
        Some(v) if !v.bytes().is_empty() => payload.slice_ref(v.bytes()),
        _ => Bytes::new(),
    };
    let kind = match e.kind() {
        walfb::EntryKind::Write => EntryKind::Write,
        walfb::EntryKind::Part => EntryKind::Part,
        walfb::EntryKind::Abort => EntryKind::Abort,
        walfb::EntryKind::Compact => EntryKind::Compact,
        walfb::EntryKind::Noop => EntryKind::Noop,
        walfb::EntryKind::LeaseGrant => EntryKind::LeaseGrant,
        walfb::EntryKind::LeaseRevoke => EntryKind::LeaseRevoke,
        walfb::EntryKind::HardState => EntryKind::HardState,
        walfb::EntryKind::ConfChange => EntryKind::ConfChange,
        walfb::EntryKind::Commit => EntryKind::Commit,
        walfb::EntryKind::Auth => EntryKind::Auth,
        walfb::EntryKind::Alarm => EntryKind::Alarm,
        _ => return None,
    };
    let mut ops = Vec::new();
    if let Some(list) = e.ops() {
        for op in list.iter() {
            let key = slice(op.key());
            ops.push(match op.kind() {
                walfb::OpKind::Put => Effect::Put {
                    key,
                    value: slice(op.value()),
                    lease: op.lease(),
                },
                walfb::OpKind::Delete => Effect::Delete { key },
                _ => return None,
            });
        }
    }
    Some(WalEntry {
        term: e.term(),
        index: e.index(),
        kind,
        revision: e.revision(),
        participants: e
            .participants()
            .map(|p| p.iter().collect())
            .unwrap_or_default(),
        ops,
        lease: LeaseRecord {
            id: e.lease_id(),
            ttl: e.lease_ttl(),
        },
        vote: e.vote(),
        commit: e.commit(),
        data: slice(e.data()),
    })
}

pub fn encode_segment_header(shard: u32, first_index: u64) -> [u8; SEGMENT_HEADER_LEN] {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[0..8].copy_from_slice(SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&shard.to_le_bytes());
    h[16..24].copy_from_slice(&first_index.to_le_bytes());
    let crc = crc32fast::hash(&h[0..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Parses a segment header; `Ok(None)` when it is all zeros (the segment was never written).
pub fn decode_segment_header(h: &[u8]) -> Result<Option<(u32, u64)>, &'static str> {
    if h.len() < SEGMENT_HEADER_LEN {
        return Err("file shorter than a segment header");
    }
    if h[..SEGMENT_HEADER_LEN].iter().all(|&b| b == 0) {
        return Ok(None);
    }
    if &h[0..8] != SEGMENT_MAGIC {
        return Err("bad segment magic");
    }
    let crc = u32::from_le_bytes([h[24], h[25], h[26], h[27]]);
    if crc32fast::hash(&h[0..24]) != crc {
        return Err("segment header checksum mismatch");
    }
    let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if version != SEGMENT_VERSION {
        return Err("unsupported segment version");
    }
    let shard = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
    let mut fi = [0u8; 8];
    fi.copy_from_slice(&h[16..24]);
    Ok(Some((shard, u64::from_le_bytes(fi))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> WalEntry {
        WalEntry {
            term: 3,
            index: 42,
            kind: EntryKind::Part,
            revision: 1000,
            participants: vec![0, 2, 5],
            ops: vec![
                Effect::Put {
                    key: Bytes::from_static(b"a/b"),
                    value: Bytes::from_static(b"v"),
                    lease: 7,
                },
                Effect::Delete {
                    key: Bytes::from_static(b"c"),
                },
                Effect::Put {
                    key: Bytes::from_static(b"e"),
                    value: Bytes::new(),
                    lease: 0,
                },
            ],
            lease: LeaseRecord::default(),
            ..Default::default()
        }
    }

    #[test]
    fn lease_records_round_trip() {
        for kind in [EntryKind::LeaseGrant, EntryKind::LeaseRevoke] {
            let e = WalEntry {
                term: 1,
                index: 9,
                kind,
                revision: 0,
                participants: vec![],
                ops: vec![],
                lease: LeaseRecord {
                    id: 0x1234_5678_9abc,
                    ttl: 9_000_000_000,
                },
                ..Default::default()
            };
            match probe_frame(&encode_frame(&e, 0)) {
                Probe::Valid { entry, .. } => assert_eq!(entry, e),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// A record written before leases existed (no lease fields) still decodes, with no lease.
    #[test]
    fn records_without_lease_fields_decode() {
        let mut fbb = FlatBufferBuilder::new();
        let root = walfb::Entry::create(
            &mut fbb,
            &walfb::EntryArgs {
                term: 1,
                index: 2,
                kind: walfb::EntryKind::Compact,
                revision: 5,
                ..Default::default()
            },
        );
        fbb.finish(root, None);
        let mut frame = Vec::new();
        write_frame(&mut frame, fbb.finished_data(), 0);
        match probe_frame(&frame) {
            Probe::Valid { entry, .. } => {
                assert_eq!(entry.kind, EntryKind::Compact);
                assert_eq!(entry.lease, LeaseRecord::default());
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn frame_round_trip() {
        let frame = encode_frame(&sample(), 4096);
        assert_eq!(frame.len() % 8, 0);
        match probe_frame(&frame) {
            Probe::Valid {
                entry,
                frame_len,
                mark,
                ..
            } => {
                assert_eq!(entry, sample());
                assert_eq!(frame_len, frame.len());
                assert_eq!(mark, 4096);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let frame = encode_frame(&sample(), 64);
        let payload_end = FRAME_HEADER_LEN
            + u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
        for byte in 0..frame.len() {
            for bit in 0..8 {
                let mut f = frame.clone();
                f[byte] ^= 1 << bit;
                if let Probe::Valid { entry, .. } = probe_frame(&f) {
                    // Flips in the padding are harmless; anything else must be caught.
                    assert!(
                        byte >= payload_end && entry == sample(),
                        "flip at {byte}:{bit} undetected"
                    );
                }
            }
        }
    }

    #[test]
    fn zero_and_truncated_frames() {
        assert!(matches!(probe_frame(&[0u8; 32]), Probe::Zero));
        let frame = encode_frame(&sample(), 0);
        assert!(matches!(
            probe_frame(&frame[..frame.len() - 9]),
            Probe::Invalid(_)
        ));
    }

    #[test]
    fn segment_header_round_trip() {
        let h = encode_segment_header(7, 99);
        assert_eq!(decode_segment_header(&h), Ok(Some((7, 99))));
        assert_eq!(decode_segment_header(&[0u8; 64]), Ok(None));
        let mut bad = h;
        bad[17] ^= 1;
        assert!(decode_segment_header(&bad).is_err());
    }
}
