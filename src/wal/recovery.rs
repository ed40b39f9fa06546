//! WAL recovery: read every segment, keep the longest valid prefix, and decide whether what follows
//! is a torn final flush (truncate it) or damage to acknowledged data (refuse to open).
//!
//! The rule: a bad frame at offset X is a torn tail only if no later valid frame proves that X was
//! already durable. A frame carries `mark`, the durable end of its segment when it was appended, so a
//! later valid frame with `mark > X`, or any valid frame in a later segment, means X had been
//! synced before and its loss is corruption.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use super::record::{
    decode_payload, decode_segment_header, probe_frame, probe_frame_with, EntryKind, Probe,
    WalEntry, FRAME_HEADER_LEN, SEGMENT_HEADER_LEN,
};
use crate::error::{Error, Result};

/// One segment file, named by the index of its first entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentFile {
    pub first_index: u64,
    pub path: PathBuf,
}

/// Where appends continue after recovery.
#[derive(Clone, Debug)]
pub struct Tail {
    pub segment: SegmentFile,
    /// End of valid data; the next frame goes here.
    pub offset: u64,
    pub size: u64,
}

/// A recovered entry with the payload it was decoded from (its keys and values are slices of
/// it), which is also the Raft log entry's data. The payload is a slice of the segment's
/// read-only mapping, not a heap copy: the store serves the log tail's values from the page
/// cache, and the Raft log holds them without copies, until a checkpoint covers them. Segments
/// are never truncated nor rewritten below their valid end (a torn tail is zeroed past it, new
/// frames go after it), and a deleted segment stays mapped while a slice of it lives.
#[derive(Clone, Debug)]
pub struct LoggedEntry {
    pub entry: WalEntry,
    pub payload: Bytes,
}

#[derive(Debug, Default)]
pub struct Recovered {
    /// Entries with index > `after_index`, in log order.
    pub entries: Vec<LoggedEntry>,
    /// The newest hard state record anywhere in the log.
    pub hard_state: Option<WalEntry>,
    /// Segment files kept, oldest first.
    pub segments: Vec<SegmentFile>,
    pub tail: Option<Tail>,
    /// Index of the last valid entry (or `after_index` if the log holds nothing newer).
    pub last_index: u64,
    /// A torn tail was cut off at this place.
    pub truncated: Option<(PathBuf, u64)>,
    /// The mapped segments the entries' payloads are slices of.
    pub maps: Vec<Arc<memmap2::Mmap>>,
    /// Term of the entry at `after_index` as the log holds it (if it does). A follower that
    /// installed its leader's checkpoint there logs an entry with the checkpoint's term at its
    /// index; a different term means the install was cut short before that, and the entries
    /// after it are an old tail the leader's log does not share (Raft discards it).
    pub term_at_after: Option<u64>,
}

pub fn segment_name(first_index: u64) -> String {
    format!("{first_index:020}.wal")
}

/// Lists `*.wal` segments sorted by first index; leftovers of unfinished segment creation
/// (`*.tmp`) are removed.
pub fn list_segments(dir: &Path) -> Result<Vec<SegmentFile>> {
    let mut segs = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(segs),
        Err(e) => return Err(Error::io(dir, e)),
    };
    for ent in rd {
        let ent = ent.map_err(|e| Error::io(dir, e))?;
        let path = ent.path();
        let name = ent.file_name().to_string_lossy().into_owned();
        if name.ends_with(".tmp") {
            fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            continue;
        }
        let Some(stem) = name.strip_suffix(".wal") else {
            continue;
        };
        let first_index = stem
            .parse::<u64>()
            .map_err(|_| Error::corrupt(&path, 0, "segment file name is not an index"))?;
        segs.push(SegmentFile { first_index, path });
    }
    segs.sort_by_key(|s| s.first_index);
    Ok(segs)
}

/// Recovers the log of one shard. Entries up to `after_index` are covered by a checkpoint and are
/// validated but not returned. Repairs a torn tail on disk (zeroes it, drops later empty segments).
pub fn recover(dir: &Path, shard: u32, after_index: u64) -> Result<Recovered> {
    let segs = list_segments(dir)?;
    let mut out = Recovered {
        last_index: after_index,
        ..Default::default()
    };
    let mut expected: Option<u64> = None;
    let mut i = 0;
    while i < segs.len() {
        let seg = &segs[i];
        let file = fs::File::open(&seg.path).map_err(|e| Error::io(&seg.path, e))?;
        let size = file.metadata().map_err(|e| Error::io(&seg.path, e))?.len();
        // SAFETY: segment files belong to this shard and nothing else maps or truncates them while
        // the data dir is locked by this process.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&seg.path, e))?;
        let map = Arc::new(map);
        let shared = Bytes::from_owner(SegmentMap(map.clone()));
        let header = match decode_segment_header(&map) {
            Ok(h) => h,
            Err(reason) => return Err(Error::corrupt(&seg.path, 0, reason)),
        };
        let Some((hdr_shard, hdr_first)) = header else {
            // Never written: a crash right after the segment was created. Only the last may be so.
            if i + 1 != segs.len() {
                return Err(Error::corrupt(
                    &seg.path,
                    0,
                    "empty segment followed by other segments",
                ));
            }
            fs::remove_file(&seg.path).map_err(|e| Error::io(&seg.path, e))?;
            break;
        };
        if hdr_shard != shard || hdr_first != seg.first_index {
            return Err(Error::corrupt(
                &seg.path,
                0,
                format!("header says shard {hdr_shard} index {hdr_first}, expected shard {shard} index {}", seg.first_index),
            ));
        }
        // A segment is named after the index its first entry takes, or one more than the
        // previous segment's name when a rewind would reuse it; entries continue the previous
        // segment's log (a rewind may restart them lower).
        let mut next = expected.unwrap_or(seg.first_index);
        let first_segment = expected.is_none();
        let mut first_entry = true;
        let mut pos = SEGMENT_HEADER_LEN;
        let end_reason = loop {
            if map.len() - pos < FRAME_HEADER_LEN {
                // A segment filled to (nearly) its end: the rest must be padding.
                break map[pos..]
                    .iter()
                    .any(|&b| b != 0)
                    .then_some("truncated frame header");
            }
            match probe_frame_with(&map[pos..], |p| shared.slice_ref(p)) {
                Probe::Valid {
                    entry,
                    payload,
                    frame_len,
                    ..
                } => {
                    if entry.kind == EntryKind::HardState {
                        out.hard_state = Some(entry);
                    } else {
                        if first_segment && first_entry && entry.index > after_index + 1 {
                            return Err(Error::corrupt(
                                &seg.path,
                                pos as u64,
                                format!(
                                    "log starts at index {} but the checkpoint ends at {after_index}",
                                    entry.index
                                ),
                            ));
                        }
                        first_entry = false;
                        // A gap is the log continuing after an installed checkpoint that covers it.
                        if entry.index == 0 || (entry.index > next && entry.index > after_index + 1)
                        {
                            break Some("entry index out of sequence");
                        }
                        if entry.index <= after_index {
                            out.term_at_after = (entry.index == after_index).then_some(entry.term);
                        }
                        // Below `next`: a rewind; the record replaces the entries from its index on.
                        let keep = out.entries.partition_point(|e| e.entry.index < entry.index);
                        out.entries.truncate(keep);
                        next = entry.index + 1;
                        if entry.index > after_index {
                            out.entries.push(LoggedEntry { entry, payload });
                        }
                    }
                    pos += frame_len;
                }
                Probe::Zero => break None,
                Probe::Invalid(reason) => break Some(reason),
            }
        };
        out.segments.push(seg.clone());
        out.maps.push(map.clone());
        expected = Some(next);
        out.last_index = (next - 1).max(after_index);

        let stop = pos as u64;
        // Whatever follows the stop point in this segment must not prove the stop point durable.
        if let Some((off, mark)) = later_valid_frame(&map, pos + 8) {
            if mark as u64 > stop {
                let why = end_reason.unwrap_or("zeroed frame");
                return Err(Error::corrupt(
                    &seg.path,
                    stop,
                    format!("{why}, but a valid record written after it follows at offset {off}"),
                ));
            }
        }
        let later = &segs[i + 1..];
        let later_has_data = later_segments_have_data(later)?;
        if later_has_data {
            if let Some(reason) = end_reason {
                return Err(Error::corrupt(
                    &seg.path,
                    stop,
                    format!("{reason}, followed by later segments"),
                ));
            }
            i += 1;
            continue;
        }
        // This is the last segment holding data.
        let dirty = map[pos..].iter().any(|&b| b != 0);
        // Appends continue in it with direct writes from the block holding `stop` on, and a
        // direct write must be able to drop the pages it writes from the page cache: what the
        // entries keep mapped ends at the last whole page before `stop`, and the few entries
        // in the page after it are copied. The scan's mapping of the whole file goes now.
        out.maps.pop();
        let settled = stop / page_size() * page_size();
        let kept = if settled > SEGMENT_HEADER_LEN as u64 {
            // SAFETY: as for the scan's mapping; nothing writes below `settled` again.
            let m = unsafe { memmap2::MmapOptions::new().len(settled as usize).map(&file) }
                .map_err(|e| Error::io(&seg.path, e))?;
            Some(Arc::new(m))
        } else {
            None
        };
        let kept_bytes = kept
            .as_ref()
            .map(|m| Bytes::from_owner(SegmentMap(m.clone())));
        let base = map.as_ptr() as usize;
        for e in out.entries.iter_mut().rev() {
            let at = e.payload.as_ptr() as usize;
            if !(base..base + map.len()).contains(&at) {
                break;
            }
            let (off, end) = (at - base, at - base + e.payload.len());
            let payload = match &kept_bytes {
                Some(k) if end as u64 <= settled => k.slice(off..end),
                _ => Bytes::copy_from_slice(&e.payload),
            };
            e.entry = decode_payload(&payload)
                .ok_or_else(|| Error::corrupt(&seg.path, off as u64, "undecodable payload"))?;
            e.payload = payload;
        }
        out.maps.extend(kept);
        drop(shared);
        drop(map);
        if dirty {
            zero_from(&seg.path, stop, size)?;
            out.truncated = Some((seg.path.clone(), stop));
        }
        for s in later {
            fs::remove_file(&s.path).map_err(|e| Error::io(&s.path, e))?;
        }
        out.tail = Some(Tail {
            segment: seg.clone(),
            offset: stop,
            size,
        });
        break;
    }
    Ok(out)
}

impl Recovered {
    /// Drops the segments' pages from this process's resident set (the scan and the replay
    /// touched them all); they stay in the page cache and fault back in when a value is read.
    pub fn release_pages(&self) {
        for map in &self.maps {
            drop_resident(map);
        }
    }
}

/// Drops a read-only file mapping's pages from this process's resident set: they stay in the
/// page cache and fault back in when read. A failure only leaves them resident.
pub(crate) fn drop_resident(map: &memmap2::Mmap) {
    // SAFETY: the mapping is read-only and file-backed, so dropping its pages loses nothing.
    if let Err(e) = unsafe { map.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) } {
        tracing::debug!(error = %e, "madvise(DONTNEED) failed; pages stay resident");
    }
}

/// Reads a freshly mapped window of the log in one request and nothing past it. The log writes
/// around the page cache, so a fault's readahead would otherwise read past the window into
/// blocks the log is still writing (each direct write then evicts them, and they are read again
/// when their own window settles).
pub(crate) fn read_whole_window(map: &memmap2::Mmap) {
    if let Err(e) = map.advise(memmap2::Advice::Random) {
        tracing::debug!(error = %e, "madvise(RANDOM) failed; faults read ahead");
    }
    if let Err(e) = map.advise(memmap2::Advice::WillNeed) {
        tracing::debug!(error = %e, "madvise(WILLNEED) failed; the window faults in page by page");
    }
}

/// The page size: what a mapping is made of.
pub(crate) fn page_size() -> u64 {
    // Asked on every settled write; sysconf is a libc call each time.
    static PAGE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        u64::try_from(n).unwrap_or(4096).max(4096)
    })
}

pub(crate) struct SegmentMap(pub(crate) Arc<memmap2::Mmap>);

impl AsRef<[u8]> for SegmentMap {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Among valid frames at 8-aligned offsets from `from` on, the one with the highest mark.
fn later_valid_frame(map: &[u8], from: usize) -> Option<(usize, u32)> {
    let mut best: Option<(usize, u32)> = None;
    let mut off = from.next_multiple_of(8);
    while off + 16 <= map.len() {
        if let Probe::Valid { mark, .. } = probe_frame(&map[off..]) {
            if best.is_none_or(|(_, m)| mark > m) {
                best = Some((off, mark));
            }
        }
        off += 8;
    }
    best
}

fn later_segments_have_data(later: &[SegmentFile]) -> Result<bool> {
    for s in later {
        let mut head = Vec::with_capacity(SEGMENT_HEADER_LEN);
        let f = fs::File::open(&s.path).map_err(|e| Error::io(&s.path, e))?;
        f.take(SEGMENT_HEADER_LEN as u64)
            .read_to_end(&mut head)
            .map_err(|e| Error::io(&s.path, e))?;
        if head.iter().any(|&b| b != 0) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Overwrites `[from, size)` with zeros and syncs, so stale bytes of a torn flush can never be
/// mistaken for records appended later.
fn zero_from(path: &Path, from: u64, size: u64) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    f.seek(SeekFrom::Start(from))
        .map_err(|e| Error::io(path, e))?;
    let zeros = vec![0u8; 1 << 20];
    let mut left = size.saturating_sub(from);
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        f.write_all(&zeros[..n]).map_err(|e| Error::io(path, e))?;
        left -= n as u64;
    }
    f.sync_data().map_err(|e| Error::io(path, e))
}
