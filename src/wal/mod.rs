//! Per-shard write-ahead log on glommio DMA files (O_DIRECT through io_uring).
//!
//! Appends are synchronous and only queue a frame; one flusher task per shard writes everything
//! queued since its last flush with a single durable write (group commit), then wakes the
//! callers waiting on those indexes. Segments are opened `O_DSYNC`: a write completes once its
//! data is on stable storage (the kernel flushes the device's cache itself, or writes with FUA),
//! which is `fdatasync`'s guarantee for that write without a second round trip through the ring
//! and the executor for every flush. Segments are preallocated and zero-filled ahead of
//! use, so a flush never changes file metadata and a full disk is noticed when the next segment is
//! prepared, before any write that would need it has been applied.

pub mod record;
pub mod recovery;
#[allow(clippy::all, unused_imports, dead_code, deprecated, non_camel_case_types, non_snake_case)]
#[rustfmt::skip]
mod wal_generated;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use bytes::Bytes;
use event_listener::Event;
use glommio::io::{DmaFile, OpenOptions};

use crate::error::{Error, Result};
use crate::runtime::LATENCY_BUCKETS;
use record::{
    encode_payload, encode_segment_header, frame_len, write_frame, FRAME_HEADER_LEN,
    SEGMENT_HEADER_LEN,
};
pub use record::{EntryKind, LeaseRecord, WalEntry};
pub use recovery::{recover, LoggedEntry, Recovered, SegmentFile};

/// When one flush started, finished its write and was durable (the same moment: segments are
/// O_DSYNC); the put stage timings (`runtime::stages`) split a write's wait for durability
/// with these.
#[derive(Clone, Copy, Debug)]
pub struct FlushTimes {
    /// The highest index the flush made durable.
    pub last_index: u64,
    pub started: std::time::Instant,
    pub written: std::time::Instant,
    pub synced: std::time::Instant,
}

/// The last few flushes: enough for a waiter that wakes a flush or two late to find its own.
#[derive(Default)]
struct FlushLog {
    recent: [Option<FlushTimes>; 4],
    next: usize,
}

/// Sync statistics of one log.
#[derive(Clone, Debug, Default)]
pub struct SyncStats {
    pub fsyncs: u64,
    pub seconds: f64,
    pub buckets: [u64; 12],
    /// Frames queued and not yet durable.
    pub queued: u64,
}

#[derive(Clone, Debug)]
pub struct WalOptions {
    /// Size of each preallocated segment file.
    pub segment_size: u64,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions {
            segment_size: 64 << 20,
        }
    }
}

/// Placements remembered for [`Wal::settled_payload`] (older ones are forgotten).
const MAX_PLACED: usize = 1 << 16;

/// Returned by [`Wal::try_append`] when neither the current nor a prepared segment can take the
/// frame; call [`Wal::make_room`] and retry.
#[derive(Debug)]
pub struct NoRoom {
    pub frame_len: usize,
}

/// A prepared, zero-filled segment file not yet named after its first index.
struct Spare {
    file: DmaFile,
    path: PathBuf,
    size: u64,
}

/// Frames queued for one segment, written by one flush.
struct Chunk {
    segment_first: u64,
    /// Set on the chunk that starts a new segment.
    activate: Option<Spare>,
    bytes: Vec<u8>,
    last_index: u64,
    last_seq: u64,
    /// Rewinds before the chunk's last frame (see `State::rewinds`).
    epoch: u64,
}

struct State {
    next_index: u64,
    durable_index: u64,
    /// Rewinds so far: each replaced the log from some index on (a follower's uncommitted tail
    /// overwritten by a new leader's entries).
    epoch: u64,
    /// `(epoch, last index kept)` of rewinds that chunks queued before them may not know of: a
    /// chunk flushed after a rewind makes durable no more than the rewind kept.
    rewinds: Vec<(u64, u64)>,
    /// Every frame (entries and hard state records alike) gets a sequence number, so a record
    /// that takes no log index can still be waited for.
    next_seq: u64,
    durable_seq: u64,
    failed: Option<String>,
    closing: bool,
    /// Segment appends go to (`None` before the first one exists), with its write position and size.
    append_segment: Option<u64>,
    append_pos: u64,
    append_size: u64,
    /// Durable end of the segment the flusher last wrote, used as the `mark` of new frames.
    durable_segment: Option<u64>,
    durable_pos: u64,
    pending: VecDeque<Chunk>,
    spare: Option<Spare>,
    spare_creating: bool,
    spare_seq: u64,
    segments: Vec<SegmentFile>,
    /// Frame bytes appended since open, counting the recovered entries (those after the
    /// checkpoint recovery started from) as appended: see [`Wal::appended_bytes`].
    appended: u64,
    /// Where recent entries' payloads went, oldest first, for [`Wal::settled_payload`].
    placed: VecDeque<Placed>,
    /// Whether placements are noted for [`Wal::settled_payload`] (off when nobody asks: a
    /// cluster member's records stay in its Raft log for followers).
    placing: bool,
    /// Read-only mappings of settled windows of segments: (segment, window) → mapping.
    windows: std::collections::BTreeMap<(u64, u64), (std::sync::Arc<memmap2::Mmap>, Bytes)>,
    /// The window whose frames were last read back to check them: its pages leave the
    /// resident set once the checks move on to the next window.
    checked_window: Option<(u64, u64)>,
}

/// The place of one entry's payload in its segment.
#[derive(Clone, Copy)]
struct Placed {
    index: u64,
    segment: u64,
    offset: u64,
    len: u64,
    segment_size: u64,
}

/// Segments are mapped for reading in windows of this size, each once everything in it is
/// durable for good (see [`Wal::settled_payload`]).
const WINDOW: u64 = 1 << 20;

/// What [`Wal::settled_payload`] found.
pub enum Settled {
    /// The payload, a slice of the segment's mapping.
    At(Bytes),
    /// Not yet: part of its window may still be written.
    NotYet,
    /// Never (not placed, replaced by a rewind, across two windows, or its segment is gone).
    Never,
}

struct Inner {
    dir: PathBuf,
    shard: u32,
    opts: WalOptions,
    st: RefCell<State>,
    /// Durable index advanced, or the log failed.
    durable_ev: Event,
    /// Frames were queued, or close was requested.
    work_ev: Event,
    /// A spare segment finished (or failed) preparing.
    spare_ev: Event,
    flusher: RefCell<Option<glommio::task::JoinHandle<()>>>,
    sync_stats: RefCell<SyncStats>,
    flushes: RefCell<FlushLog>,
}

/// Handle to a shard's log; cheap to clone within its executor.
#[derive(Clone)]
pub struct Wal {
    inner: Rc<Inner>,
}

/// The segment the flusher writes into.
struct Current {
    file: DmaFile,
    first_index: u64,
    /// Bytes durable in this segment (including the header).
    durable_pos: u64,
    /// Content of the partially filled last block, rewritten by the next flush.
    tail: Vec<u8>,
}

impl Wal {
    /// Opens the log after `recover` has validated it. Must run on the shard's executor.
    /// Segments are opened write-only (the log is read through `std` and mmap, never through
    /// glommio). That is what keeps the log's I/O off glommio's IOPOLL ring: glommio decides
    /// per device and thread whether to poll by probing a read on the first O_DIRECT file it
    /// opens, and on a device without poll queues (`queue/io_poll` = 0) that probe succeeds
    /// anyway; the executor then busy-polls every write in flight and starves the kernel
    /// worker that completes it (the milliseconds-long stalls in docs/benchmarks.md). A
    /// write-only file makes the probe fail, so every write goes through the interrupt-driven
    /// main ring and the executor sleeps while its flush is in flight.
    pub async fn open(
        dir: &Path,
        shard: u32,
        opts: WalOptions,
        recovered: &Recovered,
    ) -> Result<Wal> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut current = None;
        let (append_segment, append_pos, append_size) = match &recovered.tail {
            Some(tail) => {
                // Write-only on purpose: see `Wal::open`'s note on glommio's poll ring.
                let file = OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_DSYNC)
                    .dma_open(&tail.segment.path)
                    .await
                    .map_err(|e| Error::glommio(&tail.segment.path, e))?;
                let align = file.alignment();
                let block_start = tail.offset / align * align;
                let mut buf = vec![0u8; (tail.offset - block_start) as usize];
                read_exact_at(&tail.segment.path, &mut buf, block_start)?;
                current = Some(Current {
                    file,
                    first_index: tail.segment.first_index,
                    durable_pos: tail.offset,
                    tail: buf,
                });
                (Some(tail.segment.first_index), tail.offset, tail.size)
            }
            None => (None, 0, 0),
        };
        let st = State {
            next_index: recovered.last_index + 1,
            durable_index: recovered.last_index,
            epoch: 0,
            rewinds: Vec::new(),
            next_seq: 1,
            durable_seq: 0,
            failed: None,
            closing: false,
            append_segment,
            append_pos,
            append_size,
            durable_segment: append_segment,
            durable_pos: append_pos,
            pending: VecDeque::new(),
            spare: None,
            spare_creating: false,
            spare_seq: 0,
            segments: recovered.segments.clone(),
            appended: recovered
                .entries
                .iter()
                .map(|e| frame_len(e.payload.len()) as u64)
                .sum(),
            placed: VecDeque::new(),
            placing: true,
            windows: std::collections::BTreeMap::new(),
            checked_window: None,
        };
        let wal = Wal {
            inner: Rc::new(Inner {
                dir: dir.to_path_buf(),
                shard,
                opts,
                st: RefCell::new(st),
                durable_ev: Event::new(),
                work_ev: Event::new(),
                spare_ev: Event::new(),
                flusher: RefCell::new(None),
                sync_stats: RefCell::new(SyncStats::default()),
                flushes: RefCell::default(),
            }),
        };
        let inner = wal.inner.clone();
        let task = glommio::spawn_local(async move { flusher(inner, current).await }).detach();
        *wal.inner.flusher.borrow_mut() = Some(task);
        Ok(wal)
    }

    pub fn next_index(&self) -> u64 {
        self.inner.st.borrow().next_index
    }

    /// A running count of the frame bytes appended to the log (the entries recovery found after
    /// the checkpoint count as appended at open). The difference between two readings is what
    /// the log grew by in between: the shard subtracts its reading at its last checkpoint to
    /// tell the log's live records (those a restart would replay) from the ones the checkpoint
    /// made garbage, which stay in their segment until it is retired.
    pub fn appended_bytes(&self) -> u64 {
        self.inner.st.borrow().appended
    }

    pub fn durable_index(&self) -> u64 {
        self.inner.st.borrow().durable_index
    }

    /// Number of durable flushes so far (group-commit effectiveness).
    pub fn fsync_count(&self) -> u64 {
        self.inner.sync_stats.borrow().fsyncs
    }

    pub fn sync_stats(&self) -> SyncStats {
        let mut s = self.inner.sync_stats.borrow().clone();
        let st = self.inner.st.borrow();
        s.queued = st.next_index - 1 - st.durable_index;
        s
    }

    pub fn failure(&self) -> Option<String> {
        self.inner.st.borrow().failed.clone()
    }

    /// Queues `entry` with the next index (assigned here; a hard state record takes none) and
    /// returns that index. Never waits; fails only when no segment has room, in which case
    /// nothing was queued.
    pub fn try_append(&self, entry: &mut WalEntry) -> Result<u64, NoRoom> {
        let index = (entry.kind != EntryKind::HardState).then(|| self.next_index());
        entry.index = index.unwrap_or_else(|| self.next_index() - 1);
        self.append_frame(index, &encode_payload(entry))?;
        Ok(entry.index)
    }

    /// Queues an encoded record and returns its sequence number. `index` is the log index the
    /// record carries, or `None` for a record that takes no index (hard state). An index at or
    /// below the last one *rewinds* the log: the record replaces every entry from `index` on
    /// (Raft overwrites a follower's uncommitted tail this way; it never rewinds over committed
    /// entries). Never waits; fails only when no segment has room, queueing nothing.
    pub fn append_frame(&self, index: Option<u64>, payload: &[u8]) -> Result<u64, NoRoom> {
        let mut st = self.inner.st.borrow_mut();
        let len = frame_len(payload.len()) as u64;
        if let Some(i) = index {
            assert!(
                i >= 1 && i <= st.next_index,
                "shard {} log index {i} leaves a gap after {}",
                self.inner.shard,
                st.next_index - 1
            );
        }
        // Checked before any state changes, so a refused rewind leaves the log as it was.
        let fits_current = st.append_segment.is_some() && st.append_pos + len <= st.append_size;
        let spare_fits = st
            .spare
            .as_ref()
            .is_some_and(|sp| SEGMENT_HEADER_LEN as u64 + len <= sp.size);
        if !fits_current && !spare_fits {
            return Err(NoRoom {
                frame_len: len as usize,
            });
        }
        if let Some(i) = index.filter(|&i| i < st.next_index) {
            while st.placed.back().is_some_and(|p| p.index >= i) {
                st.placed.pop_back();
            }
            st.next_index = i;
            st.durable_index = st.durable_index.min(i - 1);
            st.epoch += 1;
            let epoch = st.epoch;
            st.rewinds.push((epoch, i - 1));
        }
        let mut activate = None;
        if !fits_current {
            match st.spare.take() {
                Some(spare) if SEGMENT_HEADER_LEN as u64 + len <= spare.size => {
                    // Named after its first index, but never reusing a name: after a rewind
                    // the first index may not exceed the current segment's.
                    let name = st.next_index.max(st.append_segment.map_or(0, |s| s + 1));
                    st.append_segment = Some(name);
                    st.append_pos = SEGMENT_HEADER_LEN as u64;
                    st.append_size = spare.size;
                    activate = Some(spare);
                }
                other => {
                    st.spare = other;
                    return Err(NoRoom {
                        frame_len: len as usize,
                    });
                }
            }
        }
        let segment = st.append_segment.expect("a segment was chosen above");
        let mark = if st.durable_segment == Some(segment) {
            st.durable_pos
        } else {
            SEGMENT_HEADER_LEN as u64
        };
        if let Some(index) = index.filter(|_| st.placing) {
            let (offset, segment_size) = (st.append_pos + FRAME_HEADER_LEN as u64, st.append_size);
            if st.placed.len() >= MAX_PLACED {
                st.placed.pop_front();
            }
            st.placed.push_back(Placed {
                index,
                segment,
                offset,
                len: payload.len() as u64,
                segment_size,
            });
        }
        st.append_pos += len;
        st.appended += len;
        if index.is_some() {
            st.next_index += 1;
        }
        let last_index = st.next_index - 1;
        let seq = st.next_seq;
        st.next_seq += 1;
        let epoch = st.epoch;
        match st.pending.back_mut() {
            Some(chunk) if activate.is_none() && chunk.segment_first == segment => {
                write_frame(&mut chunk.bytes, payload, mark as u32);
                chunk.last_index = last_index;
                chunk.last_seq = seq;
                chunk.epoch = epoch;
            }
            _ => {
                let mut bytes = Vec::new();
                write_frame(&mut bytes, payload, mark as u32);
                st.pending.push_back(Chunk {
                    segment_first: segment,
                    activate,
                    bytes,
                    last_index,
                    last_seq: seq,
                    epoch,
                })
            }
        }
        let prepare_next =
            st.spare.is_none() && !st.spare_creating && st.append_pos * 2 > st.append_size;
        drop(st);
        self.inner.work_ev.notify(1);
        if prepare_next {
            // Prepare the next segment early so a rollover rarely waits; errors surface in make_room.
            let wal = self.clone();
            glommio::spawn_local(async move {
                let _ = wal.make_room(0).await;
            })
            .detach();
        }
        Ok(seq)
    }

    /// Whether a frame of `frame_len` bytes can be appended without waiting.
    pub fn has_room(&self, frame_len: usize) -> bool {
        let st = self.inner.st.borrow();
        let len = frame_len as u64;
        (st.append_segment.is_some() && st.append_pos + len <= st.append_size)
            || st
                .spare
                .as_ref()
                .is_some_and(|s| SEGMENT_HEADER_LEN as u64 + len <= s.size)
    }

    /// Ensures a frame of `frame_len` bytes can be appended, preparing a new segment if needed.
    /// A full disk is reported here as [`Error::DiskFull`].
    pub async fn make_room(&self, frame_len: usize) -> Result<()> {
        loop {
            {
                let st = self.inner.st.borrow();
                if let Some(f) = &st.failed {
                    return Err(Error::ShardFailed {
                        shard: self.inner.shard,
                        reason: f.clone(),
                    });
                }
                let len = frame_len as u64;
                let fits_current =
                    st.append_segment.is_some() && st.append_pos + len <= st.append_size;
                let fits_spare = st
                    .spare
                    .as_ref()
                    .is_some_and(|s| SEGMENT_HEADER_LEN as u64 + len <= s.size);
                if (frame_len > 0 && fits_current) || fits_spare {
                    return Ok(());
                }
            }
            let listener = self.inner.spare_ev.listen();
            if self.inner.st.borrow().spare_creating {
                listener.await;
                continue;
            }
            let (seq, size) = {
                let mut st = self.inner.st.borrow_mut();
                st.spare_creating = true;
                st.spare_seq += 1;
                let needed = (SEGMENT_HEADER_LEN + frame_len) as u64;
                (
                    st.spare_seq,
                    self.inner
                        .opts
                        .segment_size
                        .max(needed.next_multiple_of(4096)),
                )
            };
            let res = self.create_spare(seq, size).await;
            let mut st = self.inner.st.borrow_mut();
            st.spare_creating = false;
            match res {
                Ok(spare) => {
                    // A spare too small for this frame is replaced by the bigger one.
                    st.spare = Some(spare);
                    drop(st);
                    self.inner.spare_ev.notify(usize::MAX);
                }
                Err(e) => {
                    drop(st);
                    self.inner.spare_ev.notify(usize::MAX);
                    return Err(e);
                }
            }
        }
    }

    async fn create_spare(&self, seq: u64, size: u64) -> Result<Spare> {
        let path = self.inner.dir.join(format!("next-{seq}.tmp"));
        let res: Result<Spare> = async {
            // Write-only, like every WAL file glommio opens (see `Wal::open`).
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .dma_open(&path)
                .await
                .map_err(|e| Error::glommio(&path, e))?;
            file.pre_allocate(size, false)
                .await
                .map_err(|e| Error::glommio(&path, e))?;
            // Zero-fill so later flushes write into allocated, initialized blocks and their
            // syncs have no extent metadata to commit.
            let chunk = 1u64 << 20;
            let mut pos = 0;
            while pos < size {
                let n = chunk.min(size - pos) as usize;
                let mut buf = file.alloc_dma_buffer(n);
                buf.as_bytes_mut().fill(0);
                file.write_at(buf, pos)
                    .await
                    .map_err(|e| Error::glommio(&path, e))?;
                pos += n as u64;
            }
            file.fdatasync()
                .await
                .map_err(|e| Error::glommio(&path, e))?;
            let _ = file.close().await;
            // Zero-filled with one sync at the end; the log's own writes are each durable.
            let file = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DSYNC)
                .dma_open(&path)
                .await
                .map_err(|e| Error::glommio(&path, e))?;
            Ok(Spare {
                file,
                path: path.clone(),
                size,
            })
        }
        .await;
        if res.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        res
    }

    /// Waits until every entry up to `index` is durable.
    pub async fn wait_durable(&self, index: u64) -> Result<()> {
        self.wait_until(|st| st.durable_index >= index).await
    }

    /// Waits until every frame up to sequence number `seq` is durable.
    pub async fn wait_synced(&self, seq: u64) -> Result<()> {
        self.wait_until(|st| st.durable_seq >= seq).await
    }

    /// The timings of the recent flush that made `index` durable, if it is still remembered.
    pub fn flush_times(&self, index: u64) -> Option<FlushTimes> {
        let log = self.inner.flushes.borrow();
        log.recent
            .iter()
            .flatten()
            .filter(|f| f.last_index >= index)
            .min_by_key(|f| f.last_index)
            .copied()
    }

    pub fn durable_seq(&self) -> u64 {
        self.inner.st.borrow().durable_seq
    }

    async fn wait_until(&self, done: impl Fn(&State) -> bool) -> Result<()> {
        loop {
            let listener = self.inner.durable_ev.listen();
            {
                let st = self.inner.st.borrow();
                if done(&st) {
                    return Ok(());
                }
                if let Some(f) = &st.failed {
                    return Err(Error::ShardFailed {
                        shard: self.inner.shard,
                        reason: f.clone(),
                    });
                }
            }
            listener.await;
        }
    }

    /// Deletes segments whose entries are all at or below `index` (covered by a checkpoint).
    pub fn drop_through(&self, index: u64) -> Result<usize> {
        self.drop_through_keeping(index, u64::MAX)
    }

    /// [`Self::drop_through`], but keeps segment `keep` (a segment's name) and every later one.
    pub fn drop_through_keeping(&self, index: u64, keep: u64) -> Result<usize> {
        let mut st = self.inner.st.borrow_mut();
        let current = st.durable_segment;
        let mut removed = 0;
        while st.segments.len() >= 2 && st.segments[1].first_index <= index + 1 {
            if Some(st.segments[0].first_index) == current || st.segments[0].first_index >= keep {
                break;
            }
            let seg = st.segments.remove(0);
            // Values still slices of its windows keep them mapped (and the file's space).
            let first = seg.first_index;
            st.windows.retain(|&(s, _), _| s != first);
            std::fs::remove_file(&seg.path).map_err(|e| Error::io(&seg.path, e))?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Continues the log with a no-op at `index` of `term`, a follower's stand-in for the last
    /// entry of the leader's checkpoint it installed: a rewind when `index` is at or below the
    /// last index, else after a gap the checkpoint covers (recovery accepts such a gap). Waits
    /// for what is queued first; the caller appends nothing meanwhile.
    pub async fn anchor(&self, index: u64, term: u64) -> Result<()> {
        let payload = encode_payload(&WalEntry {
            term,
            index,
            kind: EntryKind::Noop,
            ..Default::default()
        });
        let queued = self.inner.st.borrow().next_seq - 1;
        self.wait_synced(queued).await?;
        self.make_room(frame_len(payload.len())).await?;
        {
            let mut st = self.inner.st.borrow_mut();
            if index > st.next_index {
                st.next_index = index;
                st.durable_index = index - 1;
            }
        }
        self.append_frame(Some(index), &payload)
            .map_err(|nr| Error::ShardFailed {
                shard: self.inner.shard,
                reason: format!("no room for a {}-byte record after make_room", nr.frame_len),
            })?;
        Ok(())
    }

    /// The payload of the entry at `index`, as a slice of a read-only mapping of the segment
    /// it is in, once it is durable and nothing in its window of the segment will be written
    /// again: the log's direct writes start at the block holding the durable end, and a direct
    /// write must be able to drop the pages it writes from the page cache, so nothing maps a
    /// page the log may still write. Entries are asked for in index order; entries not asked
    /// for before a later one are forgotten.
    pub fn settled_payload(&self, index: u64) -> Settled {
        let mut st = self.inner.st.borrow_mut();
        while st.placed.front().is_some_and(|p| p.index < index) {
            st.placed.pop_front();
        }
        let Some(p) = st.placed.front().copied().filter(|p| p.index == index) else {
            return Settled::Never;
        };
        if index > st.durable_index {
            return Settled::NotYet;
        }
        let window = p.offset / WINDOW;
        let (start, end) = (window * WINDOW, ((window + 1) * WINDOW).min(p.segment_size));
        if p.offset + p.len > end {
            st.placed.pop_front();
            return Settled::Never;
        }
        let settled = match st.durable_segment {
            Some(d) if p.segment < d => p.segment_size,
            Some(d) if p.segment == d => {
                st.durable_pos / recovery::page_size() * recovery::page_size()
            }
            _ => 0,
        };
        if end > settled {
            return Settled::NotYet;
        }
        st.placed.pop_front();
        let map = match st.windows.get(&(p.segment, window)) {
            Some((_, m)) => m.clone(),
            None => {
                let path = self.inner.dir.join(recovery::segment_name(p.segment));
                let mapped = std::fs::File::open(&path).and_then(|f| {
                    // SAFETY: segment files are never truncated, and nothing writes this
                    // window of the file again (checked above).
                    unsafe {
                        memmap2::MmapOptions::new()
                            .offset(start)
                            .len((end - start) as usize)
                            .map(&f)
                    }
                });
                match mapped {
                    Ok(m) => {
                        recovery::read_whole_window(&m);
                        let m = std::sync::Arc::new(m);
                        let b = Bytes::from_owner(recovery::SegmentMap(m.clone()));
                        st.windows.insert((p.segment, window), (m, b.clone()));
                        b
                    }
                    Err(e) => {
                        tracing::debug!(path = %path.display(), error = %e, "cannot map a WAL segment");
                        return Settled::Never;
                    }
                }
            }
        };
        let at = (p.offset - start) as usize;
        // Read back once and checked like every other read of the log: what the mapping shows
        // must be the frame as written (a misdirected or lost write shows here, not later as
        // a wrong value copied into a checkpoint under a fresh checksum).
        let Some(header_at) = at.checked_sub(record::FRAME_HEADER_LEN) else {
            return Settled::Never; // the header is in the window before
        };
        let payload = map.slice(at..at + p.len as usize);
        if !record::frame_matches(&map[header_at..at], &payload) {
            tracing::error!(
                path = %self.inner.dir.join(recovery::segment_name(p.segment)).display(),
                offset = p.offset - record::FRAME_HEADER_LEN as u64,
                "a WAL frame reads back different from what was written; its value stays in memory"
            );
            return Settled::Never;
        }
        // The check faulted the window's pages in; once the checks reach the next window they
        // leave the resident set (they stay in the page cache and fault back in when read).
        if st.checked_window != Some((p.segment, window)) {
            if let Some((prev, _)) = st.checked_window.and_then(|w| st.windows.get(&w)) {
                recovery::drop_resident(prev);
            }
            st.checked_window = Some((p.segment, window));
        }
        Settled::At(payload)
    }

    /// Stops noting where entries' payloads go: nobody will ask [`Self::settled_payload`].
    pub fn stop_placing(&self) {
        let mut st = self.inner.st.borrow_mut();
        st.placing = false;
        st.placed = VecDeque::new();
    }

    /// Drops the pages of the mapped windows from this process's resident set (a checkpoint
    /// read every value in them); they stay in the page cache and fault back in when read.
    pub fn release_pages(&self) {
        for (map, _) in self.inner.st.borrow().windows.values() {
            recovery::drop_resident(map);
        }
    }

    /// Name of the segment the last queued frame went to (`None` before the first).
    pub fn append_segment(&self) -> Option<u64> {
        self.inner.st.borrow().append_segment
    }

    pub fn segments(&self) -> Vec<SegmentFile> {
        self.inner.st.borrow().segments.clone()
    }

    /// Flushes what is queued and stops the flusher.
    pub async fn close(&self) {
        self.inner.st.borrow_mut().closing = true;
        self.inner.work_ev.notify(usize::MAX);
        let task = self.inner.flusher.borrow_mut().take();
        if let Some(task) = task {
            task.await;
        }
        let spare = self.inner.st.borrow_mut().spare.take();
        if let Some(spare) = spare {
            let _ = spare.file.close().await;
            let _ = std::fs::remove_file(&spare.path);
        }
    }
}

async fn flusher(inner: Rc<Inner>, mut current: Option<Current>) {
    // A listener is only made when nothing is queued (each costs an allocation), and the
    // queue is looked at again after it exists, so a notify in between is not lost.
    let mut listener = None;
    loop {
        let next = {
            let mut st = inner.st.borrow_mut();
            if st.failed.is_some() {
                break;
            }
            match st.pending.pop_front() {
                Some(c) => Some(c),
                None if st.closing => break,
                None => None,
            }
        };
        let Some(chunk) = next else {
            match listener.take() {
                Some(l) => l.await,
                None => listener = Some(inner.work_ev.listen()),
            }
            continue;
        };
        listener = None;
        let epoch = chunk.epoch;
        match flush_chunk(&inner, &mut current, chunk).await {
            Ok((last_index, last_seq, segment, pos)) => {
                let mut st = inner.st.borrow_mut();
                assert!(last_seq > st.durable_seq, "durable sequence must grow");
                // Entries a later rewind replaced do not count: cap at what every rewind since
                // this chunk was queued kept.
                let kept = st
                    .rewinds
                    .iter()
                    .filter(|(e, _)| *e > epoch)
                    .map(|(_, k)| *k)
                    .min()
                    .unwrap_or(u64::MAX);
                let last_index = last_index.min(kept);
                if epoch == st.epoch {
                    st.rewinds.clear();
                    assert!(
                        last_index >= st.durable_index,
                        "durable index went backwards"
                    );
                }
                st.durable_index = st.durable_index.max(last_index);
                st.durable_seq = last_seq;
                st.durable_segment = Some(segment);
                st.durable_pos = pos;
            }
            Err(e) => {
                tracing::error!(shard = inner.shard, error = %e, "WAL write failed; shard stops accepting writes");
                inner.st.borrow_mut().failed = Some(e.to_string());
            }
        }
        inner.durable_ev.notify(usize::MAX);
        // Let the tasks already runnable in this turn (requests whose bytes arrived with this
        // write's completion) queue their records first, so they go out in the next write
        // instead of waiting a whole write for the one after (docs/benchmarks.md, "Group
        // commit after the turn").
        futures_lite::future::yield_now().await;
    }
    if let Some(cur) = current {
        let _ = cur.file.close().await;
    }
}

/// Writes one chunk and syncs it; returns (last index, last sequence, segment, durable position).
async fn flush_chunk(
    inner: &Inner,
    current: &mut Option<Current>,
    chunk: Chunk,
) -> Result<(u64, u64, u64, u64)> {
    let started = std::time::Instant::now();
    if let Some(spare) = chunk.activate {
        let path = inner.dir.join(recovery::segment_name(chunk.segment_first));
        spare
            .file
            .rename(&path)
            .await
            .map_err(|e| Error::glommio(&path, e))?;
        sync_dir(&inner.dir)?;
        if let Some(old) = current.take() {
            let _ = old.file.close().await;
        }
        inner.st.borrow_mut().segments.push(SegmentFile {
            first_index: chunk.segment_first,
            path,
        });
        *current = Some(Current {
            file: spare.file,
            first_index: chunk.segment_first,
            durable_pos: SEGMENT_HEADER_LEN as u64,
            tail: encode_segment_header(inner.shard, chunk.segment_first).to_vec(),
        });
    }
    let cur = current.as_mut().ok_or_else(|| Error::ShardFailed {
        shard: inner.shard,
        reason: "WAL has no open segment".into(),
    })?;
    debug_assert_eq!(cur.first_index, chunk.segment_first);
    let align = cur.file.alignment();
    let start = cur.durable_pos / align * align;
    debug_assert_eq!(cur.tail.len() as u64, cur.durable_pos - start);
    let data_len = cur.tail.len() + chunk.bytes.len();
    let buf_len = (data_len as u64).next_multiple_of(align) as usize;
    let mut buf = cur.file.alloc_dma_buffer(buf_len);
    {
        let b = buf.as_bytes_mut();
        b[..cur.tail.len()].copy_from_slice(&cur.tail);
        b[cur.tail.len()..data_len].copy_from_slice(&chunk.bytes);
        b[data_len..].fill(0);
    }
    let path = || inner.dir.join(recovery::segment_name(cur.first_index));
    let write_started = std::time::Instant::now();
    let written = cur
        .file
        .write_at(buf, start)
        .await
        .map_err(|e| Error::glommio(path(), e))?;
    if written < buf_len {
        return Err(Error::io(
            path(),
            std::io::Error::new(std::io::ErrorKind::WriteZero, "short WAL write"),
        ));
    }
    // The file is O_DSYNC: the write is durable once it completes.
    let done = std::time::Instant::now();
    let written = done;
    {
        let mut log = inner.flushes.borrow_mut();
        let at = log.next % log.recent.len();
        log.recent[at] = Some(FlushTimes {
            last_index: chunk.last_index,
            started,
            written,
            synced: done,
        });
        log.next += 1;
    }
    {
        let took = done.duration_since(write_started).as_secs_f64();
        let mut st = inner.sync_stats.borrow_mut();
        st.fsyncs += 1;
        st.seconds += took;
        if let Some(b) = LATENCY_BUCKETS.iter().position(|&le| took <= le) {
            st.buckets[b] += 1;
        }
    }
    let new_pos = cur.durable_pos + chunk.bytes.len() as u64;
    let new_block = new_pos / align * align;
    let cut = (new_block - start) as usize;
    cur.tail = if cut >= cur.tail.len() {
        chunk.bytes[cut - cur.tail.len()..].to_vec()
    } else {
        let mut t = cur.tail[cut..].to_vec();
        t.extend_from_slice(&chunk.bytes);
        t
    };
    cur.durable_pos = new_pos;
    Ok((chunk.last_index, chunk.last_seq, cur.first_index, new_pos))
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

fn read_exact_at(path: &Path, buf: &mut [u8], offset: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    f.read_exact_at(buf, offset).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
pub(crate) mod tests;
