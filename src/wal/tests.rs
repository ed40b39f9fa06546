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
        let rec = recover(&dirp, 0, 250).unwrap();
        let wal = Wal::open(
            &dirp,
            0,
            WalOptions {
                segment_size: 64 << 10,
            },
            &rec,
        )
        .await
        .unwrap();
        let n = wal.drop_through(250).unwrap();
        wal.close().await;
        n
    });
    assert!(removed > 0);
    let rec = recover(dir.path(), 0, 250).unwrap();
    assert_eq!(rec.segments.len(), before - removed);
    assert_eq!(rec.entries.len(), 52);
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
