use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;

use bytes::Bytes;

use super::record::{encode_frame, SEGMENT_HEADER_LEN};
use super::*;
use crate::mvcc::Effect;
use crate::runtime::run_local;

fn entry(rev: i64, key: &str, value_len: usize) -> WalEntry {
    WalEntry {
        term: 1,
        index: 0,
        kind: EntryKind::Write,
        revision: rev,
        participants: vec![],
        ops: vec![Effect::Put {
            key: Bytes::from(key.to_string()),
            value: Bytes::from(vec![b'x'; value_len]),
            lease: 0,
        }],
        ..Default::default()
    }
}

/// Appends `n` entries (concurrently, so group commit kicks in) and returns the fsync count.
fn write_entries(dir: &Path, segment_size: u64, first_rev: i64, n: usize, value_len: usize) -> u64 {
    let dir = dir.to_path_buf();
    run_local(move || async move {
        let rec = recover(&dir, 0, 0).unwrap();
        let wal = Wal::open(&dir, 0, WalOptions { segment_size }, &rec)
            .await
            .unwrap();
        let mut tasks = vec![];
        for i in 0..n {
            let wal = wal.clone();
            tasks.push(glommio::spawn_local(async move {
                let mut e = entry(first_rev + i as i64, &format!("k{i}"), value_len);
                let idx = loop {
                    match wal.try_append(&mut e) {
                        Ok(idx) => break idx,
                        Err(NoRoom { frame_len }) => wal.make_room(frame_len).await.unwrap(),
                    }
                };
                wal.wait_durable(idx).await.unwrap();
            }));
        }
        for t in tasks {
            t.await;
        }
        let fsyncs = wal.fsync_count();
        wal.close().await;
        fsyncs
    })
}

#[test]
fn appends_survive_reopen_and_group_commit_shares_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let fsyncs = write_entries(dir.path(), 1 << 20, 1, 200, 100);
    assert!(
        fsyncs < 200,
        "group commit should batch: {fsyncs} fsyncs for 200 appends"
    );
    let rec = recover(dir.path(), 0, 0).unwrap();
    assert_eq!(rec.entries.len(), 200);
    assert!(rec.truncated.is_none());
    for (i, e) in rec.entries.iter().enumerate() {
        assert_eq!(e.entry.index, i as u64 + 1);
    }
    // Appending after reopen continues the sequence.
    write_entries(dir.path(), 1 << 20, 201, 10, 100);
    let rec = recover(dir.path(), 0, 0).unwrap();
    assert_eq!(rec.entries.len(), 210);
    assert_eq!(rec.last_index, 210);
    let revs: Vec<i64> = rec.entries.iter().map(|e| e.entry.revision).collect();
    assert_eq!(&revs[200..], &(201..=210).collect::<Vec<_>>()[..]);
}

/// Recovers shard 0's log in `dir` past checkpoint index `checkpoint` and opens it for appends.
async fn open_after(dir: &Path, checkpoint: u64, segment_size: u64) -> Wal {
    let rec = recover(dir, 0, checkpoint).unwrap();
    Wal::open(dir, 0, WalOptions { segment_size }, &rec)
        .await
        .unwrap()
}

/// Appends `entry(rev)` wherever the log is, preparing a segment if needed; returns its index.
async fn append_next(wal: &Wal, rev: i64) -> u64 {
    let mut e = entry(rev, &format!("k{rev}"), 100);
    loop {
        match wal.try_append(&mut e) {
            Ok(idx) => return idx,
            Err(NoRoom { frame_len }) => wal.make_room(frame_len).await.unwrap(),
        }
    }
}

/// Requests that become runnable in the same executor turn as a write's completion (here:
/// writers woken by it that append again, as a client's next put would) join the records
/// already queued in the next write, instead of each group waiting a write of its own.
#[test]
fn records_queued_in_the_turn_a_write_completes_share_the_next_write() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().to_path_buf();
    let (writes, last) = run_local(move || async move {
        let wal = open_after(&dir, 0, 1 << 20).await;
        // A segment exists and nothing is in flight.
        let first = append_next(&wal, 1).await;
        wal.wait_durable(first).await.unwrap();
        let before = wal.fsync_count();
        // Nothing below polls the executor's rings until every task waits, so the order is fixed:
        // the flusher starts writing record 2 (the write is only submitted when the executor
        // next polls), record 3 queues behind it, and five writers wait for record 2.
        let second = append_next(&wal, 2).await;
        futures_lite::future::yield_now().await;
        let third = append_next(&wal, 3).await;
        let writers: Vec<_> = (0..5)
            .map(|i| {
                let wal = wal.clone();
                glommio::spawn_local(async move {
                    wal.wait_durable(second).await.unwrap();
                    let idx = append_next(&wal, 4 + i).await;
                    wal.wait_durable(idx).await.unwrap();
                    idx
                })
            })
            .collect();
        let mut last = third;
        for w in writers {
            last = last.max(w.await);
        }
        wal.wait_durable(last).await.unwrap();
        let writes = wal.fsync_count() - before;
        wal.close().await;
        (writes, last)
    });
    assert_eq!(last, 8);
    // One write for record 2, one for records 3 to 8.
    assert_eq!(writes, 2, "records 3 to 8 took {} writes", writes - 1);
}

#[test]
fn rolls_over_segments_and_drops_old_ones() {
    let dir = tempfile::tempdir().unwrap();
    write_entries(dir.path(), 64 << 10, 1, 300, 1000);
    let rec = recover(dir.path(), 0, 0).unwrap();
    assert_eq!(rec.entries.len(), 300);
    assert!(
        rec.segments.len() > 3,
        "expected several segments, got {}",
        rec.segments.len()
    );
    // Records bigger than a segment get a segment of their own.
    write_entries(dir.path(), 64 << 10, 301, 2, 200 << 10);
    let rec = recover(dir.path(), 0, 0).unwrap();
    assert_eq!(rec.entries.len(), 302);
    // Recovery from a checkpoint index skips what it covers.
    let rec = recover(dir.path(), 0, 250).unwrap();
    assert_eq!(rec.entries.first().unwrap().entry.index, 251);
    let dirp = dir.path().to_path_buf();
    let before = rec.segments.len();
    let removed = run_local(move || async move {
        let wal = open_after(&dirp, 250, 64 << 10).await;
        let n = wal.drop_through(250).unwrap();
        wal.close().await;
        n
    });
    assert!(removed > 0);
    let rec = recover(dir.path(), 0, 250).unwrap();
    assert_eq!(rec.segments.len(), before - removed);
    assert_eq!(rec.entries.len(), 52);
}

#[test]
fn the_log_keeps_off_glommios_poll_ring() {
    // A request in flight on glommio's IOPOLL ring keeps the executor spinning (see
    // `Wal::open`): appends, flushes and segment rollovers must leave that ring unused.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let (polled, entries) = run_local(move || async move {
        let rec = recover(&dir, 0, 0).unwrap();
        let opts = WalOptions {
            segment_size: 64 << 10,
        };
        let wal = Wal::open(&dir, 0, opts, &rec).await.unwrap();
        for i in 0..100 {
            append_at(&wal, i + 1, i as i64 + 1, 1000).await;
        }
        wal.close().await;
        let ring = glommio::executor().io_stats().poll_ring;
        let polled = ring.file_writes().0 + ring.file_reads().0;
        (polled, recover(&dir, 0, 0).unwrap().entries.len())
    });
    assert_eq!(polled, 0, "WAL requests went through the poll ring");
    assert_eq!(entries, 100);
}

fn only_segment(dir: &Path) -> std::path::PathBuf {
    let segs = recovery::list_segments(dir).unwrap();
    assert_eq!(segs.len(), 1);
    segs[0].path.clone()
}

fn frame_offsets(path: &Path) -> Vec<u64> {
    let data = fs::read(path).unwrap();
    let mut offs = vec![];
    let mut pos = SEGMENT_HEADER_LEN;
    while let record::Probe::Valid { frame_len, .. } = record::probe_frame(&data[pos..]) {
        offs.push(pos as u64);
        pos += frame_len;
    }
    offs.push(pos as u64);
    offs
}

#[test]
fn torn_tail_is_truncated_and_zeroed() {
    let dir = tempfile::tempdir().unwrap();
    write_entries(dir.path(), 1 << 20, 1, 20, 300);
    let path = only_segment(dir.path());
    let offs = frame_offsets(&path);
    // Tear the last record: keep its first half, garble the rest.
    let last = offs[offs.len() - 2];
    let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_at(&[0xAB; 100], last + 40).unwrap();
    let rec = recover(dir.path(), 0, 0).unwrap();
    assert_eq!(rec.entries.len(), 19);
    assert_eq!(rec.truncated, Some((path.clone(), last)));
    // The garbage is gone, so a second recovery is clean and appends continue at index 20.
    let rec = recover(dir.path(), 0, 0).unwrap();
    assert!(rec.truncated.is_none());
    write_entries(dir.path(), 1 << 20, 100, 1, 10);
    let rec = recover(dir.path(), 0, 0).unwrap();
    assert_eq!(rec.entries.len(), 20);
    assert_eq!(rec.entries[19].entry.revision, 100);
}

#[test]
fn partially_persisted_final_flush_is_a_torn_tail() {
    // A last flush whose first block was lost but whose later frames landed: the later frames were
    // appended before that data was durable, so this is a torn write, not corruption.
    let dir = tempfile::tempdir().unwrap();
    write_entries(dir.path(), 1 << 20, 1, 5, 100);
    let path = only_segment(dir.path());
    let end = *frame_offsets(&path).last().unwrap();
    let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
    let mut e = entry(7, "late", 10);
    e.index = 8; // as if entries 6 and 7 were in the lost part of the same flush
    f.write_at(&encode_frame(&e, end as u32), end + 512)
        .unwrap();
    let rec = recover(dir.path(), 0, 0).unwrap();
    assert_eq!(rec.entries.len(), 5);
    assert_eq!(rec.truncated, Some((path, end)));
}

#[test]
fn corruption_before_durable_records_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    // Separate runs, so later records were appended after earlier ones were durable.
    for i in 0..4 {
        write_entries(dir.path(), 1 << 20, 1 + i * 5, 5, 100);
    }
    let path = only_segment(dir.path());
    let offs = frame_offsets(&path);
    let victim = offs[3];
    let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_at(&[0x5A], victim + 20).unwrap();
    let err = recover(dir.path(), 0, 0).unwrap_err();
    match &err {
        Error::Corrupt {
            path: p, offset, ..
        } => {
            assert_eq!(p, &path);
            assert_eq!(*offset, victim);
        }
        other => panic!("expected corruption, got {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains(&victim.to_string()),
        "{msg}"
    );
}

#[test]
fn corruption_in_an_earlier_segment_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    write_entries(dir.path(), 64 << 10, 1, 200, 1000);
    let segs = recovery::list_segments(dir.path()).unwrap();
    assert!(segs.len() >= 2);
    let offs = frame_offsets(&segs[0].path);
    let f = fs::OpenOptions::new()
        .write(true)
        .open(&segs[0].path)
        .unwrap();
    f.write_at(&[0xFF; 8], offs[offs.len() - 2] + 30).unwrap();
    assert!(matches!(
        recover(dir.path(), 0, 0),
        Err(Error::Corrupt { .. })
    ));
}

#[test]
fn damaged_segment_header_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    write_entries(dir.path(), 1 << 20, 1, 3, 10);
    let path = only_segment(dir.path());
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .write_at(b"X", 2)
        .unwrap();
    match recover(dir.path(), 0, 0) {
        Err(Error::Corrupt {
            path: p, offset: 0, ..
        }) => assert_eq!(p, path),
        other => panic!("expected corruption, got {other:?}"),
    }
}

/// Appends `entry(rev)` at log index `index` (a rewind when at or below the last index),
/// preparing segments as needed; waits until it is durable.
async fn append_at(wal: &Wal, index: u64, rev: i64, value_len: usize) {
    let mut e = entry(rev, &format!("r{rev}"), value_len);
    e.index = index;
    let payload = super::record::encode_payload(&e);
    loop {
        match wal.append_frame(Some(index), &payload) {
            Ok(_) => break,
            Err(NoRoom { frame_len }) => wal.make_room(frame_len).await.unwrap(),
        }
    }
    wal.wait_durable(index).await.unwrap();
}

fn revisions(rec: &Recovered) -> Vec<(u64, i64)> {
    rec.entries
        .iter()
        .map(|l| (l.entry.index, l.entry.revision))
        .collect()
}

#[test]
fn rewinds_replace_the_tail_across_segments_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    // Small segments: a few entries each, so rewinds cross segment boundaries.
    let opts = || WalOptions {
        segment_size: 16 << 10,
    };
    let d2 = d.clone();
    run_local(move || async move {
        let rec = recover(&d2, 0, 0).unwrap();
        let wal = Wal::open(&d2, 0, opts(), &rec).await.unwrap();
        for i in 1..=12u64 {
            append_at(&wal, i, i as i64, 3000).await;
        }
        // A new leader replaces 8.. with its own entries (revisions 100+).
        append_at(&wal, 8, 108, 3000).await;
        assert_eq!(wal.durable_index(), 8);
        assert_eq!(wal.next_index(), 9);
        append_at(&wal, 9, 109, 3000).await;
        // And again, right at the start of the newest segment, forcing a fresh segment name.
        let newest = wal.segments().last().unwrap().first_index;
        for _ in 0..8 {
            let next = wal.next_index();
            append_at(&wal, next, 200 + next as i64, 3000).await;
        }
        let newest2 = wal.segments().last().unwrap().first_index;
        assert!(newest2 > newest, "the log moved on to a new segment");
        // Too big for what is left of that segment: the rewind opens a new one, which may not
        // reuse the name of the segment it rewinds into.
        append_at(&wal, newest2, 300, 15000).await;
        assert_eq!(wal.segments().last().unwrap().first_index, newest2 + 1);
        append_at(&wal, newest2 + 1, 301, 3000).await;
        wal.close().await;
    });
    let rec = recover(&d, 0, 0).unwrap();
    let got = revisions(&rec);
    let idx: Vec<u64> = got.iter().map(|(i, _)| *i).collect();
    assert_eq!(
        idx,
        (1..=idx.len() as u64).collect::<Vec<_>>(),
        "contiguous"
    );
    assert_eq!(
        &got[..7],
        &(1..=7).map(|i| (i, i as i64)).collect::<Vec<_>>()[..]
    );
    assert_eq!(got[7], (8, 108));
    assert_eq!(got[8], (9, 109));
    let last = got.len() as u64;
    assert_eq!(got[last as usize - 2].1, 300);
    assert_eq!(got[last as usize - 1], (last, 301));
    assert_eq!(rec.last_index, last);
    let names: Vec<u64> = rec.segments.iter().map(|s| s.first_index).collect();
    assert!(names.windows(2).all(|w| w[0] < w[1]), "{names:?}");

    // Reopen, rewind once more, and drop what a checkpoint covers.
    let d3 = d.clone();
    run_local(move || async move {
        let rec = recover(&d3, 0, 0).unwrap();
        let wal = Wal::open(&d3, 0, opts(), &rec).await.unwrap();
        append_at(&wal, last, 400, 10).await;
        wal.drop_through(9).unwrap();
        wal.close().await;
    });
    let rec = recover(&d, 0, 9).unwrap();
    let got = revisions(&rec);
    assert_eq!(got.first().map(|g| g.0), Some(10));
    assert_eq!(got.last(), Some(&(last, 400)));
}

#[test]
fn a_rewind_lowers_the_durable_mark_until_its_record_is_synced() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run_local(move || async move {
        let rec = recover(&d, 0, 0).unwrap();
        let wal = Wal::open(&d, 0, WalOptions::default(), &rec).await.unwrap();
        for i in 1..=5u64 {
            append_at(&wal, i, i as i64, 10).await;
        }
        // Queue 6 and 7, then rewind to 6 before any flush can report them.
        for (i, rev) in [(6u64, 6i64), (7, 7), (6, 106)] {
            let mut e = entry(rev, "k", 10);
            e.index = i;
            wal.append_frame(Some(i), &super::record::encode_payload(&e))
                .unwrap();
        }
        assert!(wal.durable_index() <= 5);
        wal.wait_durable(6).await.unwrap();
        // The stale 7 was flushed too, but it is not part of the log.
        assert_eq!(wal.durable_index(), 6);
        assert_eq!(wal.next_index(), 7);
        wal.close().await;
        let rec = recover(&d, 0, 0).unwrap();
        assert_eq!(revisions(&rec).last(), Some(&(6, 106)));
        assert_eq!(rec.last_index, 6);
    });
}

/// A fresh log in `path` with `n` entries of about 1 KB, each waited for until durable
/// (before the first is durable it is not settled); returns the log and each entry's index and
/// payload.
async fn write_durably(path: &Path, segment_size: u64, n: i64) -> (Wal, Vec<(u64, Bytes)>) {
    let rec = recover(path, 0, 0).unwrap();
    let wal = Wal::open(path, 0, WalOptions { segment_size }, &rec)
        .await
        .unwrap();
    let mut written = vec![];
    for i in 0..n {
        let mut e = entry(i + 1, &format!("k{i}"), 1000);
        let idx = loop {
            match wal.try_append(&mut e) {
                Ok(idx) => break idx,
                Err(NoRoom { frame_len }) => wal.make_room(frame_len).await.unwrap(),
            }
        };
        if i == 0 {
            // Queued, not durable: not yet.
            assert!(matches!(wal.settled_payload(idx), Settled::NotYet));
        }
        wal.wait_durable(idx).await.unwrap();
        written.push((idx, Bytes::from(record::encode_payload(&e))));
    }
    (wal, written)
}

/// A payload is handed out from the segment's mapping only once its whole window is durable
/// for good (never a page the log still writes), and then reads as written.
#[test]
fn settled_payloads_are_mapped_only_from_windows_written_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run_local(move || async move {
        // Windows are 1 MiB: with 256 KiB segments, one is settled once the log moved on.
        let (wal, written) = write_durably(&path, 256 << 10, 400).await;
        // The first segment is complete: its entries are mapped and read as written.
        let (idx, payload) = &written[0];
        match wal.settled_payload(*idx) {
            Settled::At(m) => assert_eq!(&m, payload),
            _ => panic!("entry {idx} of a complete segment is not settled"),
        }
        // The last entry's segment is still written: not yet, and asked again later it is
        // still there to ask for.
        let (last, _) = written.last().unwrap();
        assert!(matches!(wal.settled_payload(*last), Settled::NotYet));
        assert!(matches!(wal.settled_payload(*last), Settled::NotYet));
        // Entries skipped over are forgotten.
        assert!(matches!(wal.settled_payload(*idx), Settled::Never));
        wal.close().await;
    });
}

/// In the segment appends go to, a window is settled once the durable end passed its last page.
#[test]
fn settled_payloads_in_the_segment_being_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run_local(move || async move {
        // About 1.3 MiB: the first window is written for good, the second is not.
        let (wal, written) = write_durably(&path, 4 << 20, 1300).await;
        assert_eq!(wal.segments().len(), 1);
        for (idx, payload) in &written[..100] {
            match wal.settled_payload(*idx) {
                Settled::At(m) => assert_eq!(&m, payload),
                _ => panic!("entry {idx} of the first window is not settled"),
            }
        }
        let (last, _) = written.last().unwrap();
        assert!(matches!(wal.settled_payload(*last), Settled::NotYet));
        wal.close().await;
    });
}

/// Settling reads a window back and nothing past it: a page of the log cached past the window
/// would make the log's next direct write over it leave io_uring's inline path for a worker
/// thread (the write must first evict it), and it is read again when its own window settles.
#[test]
fn settling_a_window_caches_no_page_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run_local(move || async move {
        // About 1.3 MiB in one 4 MiB segment: the first 1 MiB window settles, the second not.
        let (wal, written) = write_durably(&path, 4 << 20, 1300).await;
        let mut settled = 0;
        for (idx, _) in &written {
            match wal.settled_payload(*idx) {
                Settled::At(_) => settled += 1,
                _ => break,
            }
        }
        assert!(settled > 100, "only {settled} entries settled");
        let segment = only_segment(&path);
        let file = std::fs::File::open(&segment).unwrap();
        let past = unsafe {
            memmap2::MmapOptions::new()
                .offset(1 << 20)
                .len(256 << 10)
                .map(&file)
        }
        .unwrap();
        let (cached, _) = cached_pages(&past);
        assert_eq!(
            cached, 0,
            "{cached} pages past the settled window are cached"
        );
        wal.close().await;
    });
}

/// How many pages of the mapping `map` the page cache holds, and how many it spans.
pub(crate) fn cached_pages(map: &[u8]) -> (usize, usize) {
    let mut resident = vec![0u8; map.len().div_ceil(4096)];
    // SAFETY: `map` is a live page-aligned mapping of `map.len()` bytes and `resident` has one
    // byte per 4 KiB page of it (page sizes are at least 4 KiB, so it is long enough).
    let rc = unsafe {
        libc::mincore(
            map.as_ptr() as *mut libc::c_void,
            map.len(),
            resident.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
    let cached = resident.iter().filter(|b| **b & 1 == 1).count();
    (cached, resident.len())
}
