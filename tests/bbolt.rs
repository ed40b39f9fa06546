//! bbolt files (`spindle::bbolt`): the writer's files read back the same, the reader never
//! panics on random or corrupted bytes, and both agree with real etcd 3.4 — the reader opens a
//! file `etcdctl snapshot save` wrote, and etcd's tools accept a file the writer rewrote from it.
//!
//! Needs `etcd` and `etcdctl` 3.4 on PATH (`tools/test` installs them).

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine;
use proptest::prelude::*;
use prost::Message;
use serde_json::Value as Json;
use sha2::{Digest, Sha256};
use spindle::bbolt::{self, Bucket, BucketData, Db, Error, Value, WriteOptions};
use spindle::proto::mvccpb::KeyValue;

mod common;
use common::etcd;
use common::etcdctl;
use common::process::json_output;
use common::server::Server;

type Contents = BTreeMap<Vec<u8>, BTreeMap<Vec<u8>, Vec<u8>>>;

/// Every top-level bucket and its entries; panics on errors and nested buckets.
fn contents(db: &Db<'_>) -> Contents {
    let mut all = Contents::new();
    for name in db.buckets().expect("bucket names") {
        let bucket = db
            .bucket(name)
            .expect("read bucket")
            .expect("bucket listed");
        let mut entries = BTreeMap::new();
        for entry in bucket.iter() {
            let (k, v) = entry.expect("bucket entry");
            let v = v.data().expect("no nested buckets");
            entries.insert(k.to_vec(), v.to_vec());
        }
        all.insert(name.to_vec(), entries);
    }
    all
}

fn as_buckets(c: &Contents) -> Vec<BucketData> {
    c.iter()
        .map(|(name, entries)| {
            let kvs = entries
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            (name.clone(), kvs)
        })
        .collect()
}

/// Reads everything reachable (nested buckets included) and the freelist, ignoring errors: what
/// a reader of a hostile file does. Returns how many entries it saw.
fn walk_all(db: &Db<'_>) -> usize {
    fn walk(b: &Bucket<'_>, depth: usize) -> usize {
        let mut n = 0;
        for entry in b.iter() {
            let Ok((_, v)) = entry else { break };
            n += 1;
            if let Value::Bucket(inner) = v {
                if depth < 8 {
                    n += walk(&inner, depth + 1);
                }
            }
        }
        n
    }
    let _ = db.freelist();
    if let Ok(names) = db.buckets() {
        for name in names {
            if let Ok(Some(b)) = db.bucket(name) {
                let keys: Vec<&[u8]> = b
                    .iter()
                    .take(4)
                    .filter_map(|e| e.ok())
                    .map(|e| e.0)
                    .collect();
                for k in keys {
                    let _ = b.get(k);
                }
            }
        }
    }
    walk(&db.root(), 0)
}

fn contents_strategy() -> impl Strategy<Value = Contents> {
    let small = proptest::collection::vec(any::<u8>(), 0..24);
    let large = proptest::collection::vec(any::<u8>(), 0..1200);
    let value = prop_oneof![4 => small, 1 => large];
    let key = proptest::collection::vec(any::<u8>(), 1..40);
    let entries = proptest::collection::btree_map(key, value, 0..120);
    let name = proptest::collection::vec(any::<u8>(), 1..12);
    proptest::collection::btree_map(name, entries, 0..5)
}

fn page_size_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![Just(128usize), Just(256), Just(512), Just(4096)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// What the writer writes, the reader reads back: every bucket (empty ones too) and every
    /// key and value (values larger than a page too), in order.
    #[test]
    fn write_then_read_round_trips(
        c in contents_strategy(),
        page_size in page_size_strategy(),
        inline_buckets in any::<bool>(),
        probes in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..3), 0..8),
    ) {
        let file = bbolt::write_with(&as_buckets(&c), WriteOptions { page_size, inline_buckets });
        prop_assert_eq!(file.len() % page_size, 0);
        let db = Db::open(&file).expect("open what the writer wrote");
        prop_assert_eq!(db.page_size(), page_size);
        prop_assert_eq!(db.meta().high_water as usize * page_size, file.len());
        prop_assert_eq!(db.meta_page(), 1);
        prop_assert_eq!(db.freelist().expect("freelist"), Vec::<u64>::new());
        prop_assert_eq!(contents(&db), c.clone());
        for (name, entries) in &c {
            let b = db.bucket(name).unwrap().unwrap();
            let size: usize = 16 + entries.iter().map(|(k, v)| 16 + k.len() + v.len()).sum::<usize>();
            prop_assert_eq!(b.is_inline(), inline_buckets && size <= page_size / 4);
            prop_assert_eq!(b.root_page().is_none(), b.is_inline());
            for (k, v) in entries {
                prop_assert_eq!(b.get(k).unwrap().and_then(|v| v.data()), Some(&v[..]));
                let after = [&k[..], &[0]].concat();
                let found = b.get(&after).unwrap().and_then(|v| v.data());
                prop_assert_eq!(found, entries.get(&after).map(|v| &v[..]));
            }
            for probe in &probes {
                let found = b.get(probe).unwrap().and_then(|v| v.data());
                prop_assert_eq!(found, entries.get(probe).map(|v| &v[..]));
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Random bytes are refused or read, never a panic.
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        if let Ok(db) = Db::open(&bytes) {
            walk_all(&db);
        }
    }

    /// Valid metas in front of pages of random bytes whose headers name themselves and a tree
    /// page type: the walk meets garbage elements, never a panic.
    #[test]
    fn random_pages_behind_valid_metas_never_panic(
        pages in proptest::collection::vec(
            (prop_oneof![Just(0x01u16), Just(0x02), Just(0x10)], 0u16..12, 0u32..3,
             proptest::collection::vec(any::<u8>(), 112)),
            1..16,
        ),
        root in 0u64..20,
        freelist in 0u64..20,
        high_water in 0u64..24,
    ) {
        const PS: usize = 128;
        let mut file = bbolt::write(&[], PS);
        file.truncate(2 * PS);
        for (i, (flags, count, overflow, body)) in pages.into_iter().enumerate() {
            let id = (i + 2) as u64;
            file.extend_from_slice(&id.to_le_bytes());
            file.extend_from_slice(&flags.to_le_bytes());
            file.extend_from_slice(&count.to_le_bytes());
            file.extend_from_slice(&overflow.to_le_bytes());
            file.extend_from_slice(&body);
        }
        for m in [16, PS + 16] {
            file[m + 16..m + 24].copy_from_slice(&root.to_le_bytes());
            file[m + 32..m + 40].copy_from_slice(&freelist.to_le_bytes());
            file[m + 40..m + 48].copy_from_slice(&high_water.to_le_bytes());
            let sum = bbolt::fnv1a64(&file[m..m + 56]);
            file[m + 56..m + 64].copy_from_slice(&sum.to_le_bytes());
        }
        let db = Db::open(&file).expect("the metas are valid");
        walk_all(&db);
    }

    /// A valid file with bytes overwritten or cut off is refused or read, never a panic.
    #[test]
    fn corrupted_files_never_panic(
        c in contents_strategy(),
        page_size in prop_oneof![Just(128usize), Just(256), Just(1024)],
        inline_buckets in any::<bool>(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let mut file = bbolt::write_with(&as_buckets(&c), WriteOptions { page_size, inline_buckets });
        for (at, byte) in edits {
            let i = at.index(file.len());
            file[i] = byte;
        }
        if let Some(cut) = cut {
            file.truncate(cut.index(file.len()));
        }
        if let Ok(db) = Db::open(&file) {
            walk_all(&db);
        }
    }
}

fn sample() -> Contents {
    let mut c = Contents::new();
    let big: BTreeMap<Vec<u8>, Vec<u8>> = (0..200u32)
        .map(|i| (format!("key{i:05}").into_bytes(), vec![i as u8; 40]))
        .collect();
    c.insert(b"big".to_vec(), big);
    c.insert(b"empty".to_vec(), BTreeMap::new());
    c
}

/// A bad meta page 0 leaves meta page 1; both bad refuses the file, naming both.
#[test]
fn a_bad_meta_falls_back_to_the_other() {
    let file = bbolt::write(&as_buckets(&sample()), 256);
    let mut one_bad = file.clone();
    one_bad[16 + 20] ^= 1; // meta 0's root page: the checksum no longer matches
    let db = Db::open(&one_bad).expect("meta 1 is still valid");
    assert_eq!(db.meta_page(), 1);
    assert_eq!(contents(&db), sample());

    let mut both_bad = one_bad.clone();
    both_bad[256 + 16] ^= 1; // meta 1's magic
    match Db::open(&both_bad) {
        Err(Error::NoValidMeta { first, second }) => {
            assert!(
                matches!(
                    *first,
                    Error::BadChecksum {
                        page: 0,
                        offset: 72,
                        ..
                    }
                ),
                "{first}"
            );
            assert!(
                matches!(
                    *second,
                    Error::BadMagic {
                        page: 1,
                        offset: 272,
                        ..
                    }
                ),
                "{second}"
            );
        }
        other => panic!("expected NoValidMeta, got {other:?}"),
    }
}

/// A file cut short fails where the first missing page is reached, naming it.
#[test]
fn a_truncated_file_names_the_missing_page() {
    let file = bbolt::write(&as_buckets(&sample()), 256);
    let cut = &file[..file.len() - 256];
    let db = Db::open(cut).expect("the metas are intact");
    let last = db.meta().high_water - 1;
    // The root bucket's page is the last one written.
    match db.buckets() {
        Err(e @ Error::OutOfBounds { .. }) => {
            assert_eq!(e.page(), Some(last), "{e}");
            assert_eq!(e.offset(), Some(last * 256), "{e}");
        }
        other => panic!("expected OutOfBounds, got {other:?}"),
    }
}

/// A branch page pointing at itself is reported, not followed forever.
#[test]
fn a_cycle_is_reported() {
    let file = bbolt::write(&as_buckets(&sample()), 256);
    let db = Db::open(&file).unwrap();
    let root = db.bucket(b"big").unwrap().unwrap().root_page().unwrap();
    let mut bad = file.clone();
    let at = root as usize * 256;
    assert_eq!(
        u16::from_le_bytes([bad[at + 8], bad[at + 9]]),
        0x01,
        "a branch root"
    );
    // The first element's child becomes the branch itself.
    bad[at + 16 + 8..at + 16 + 16].copy_from_slice(&root.to_le_bytes());
    let db = Db::open(&bad).unwrap();
    let b = db.bucket(b"big").unwrap().unwrap();
    let err = b.iter().find_map(Result::err).expect("an error");
    assert!(matches!(err, Error::Cycle { .. }), "{err}");
    let err = b.get(b"key00000").unwrap_err();
    assert!(matches!(err, Error::Cycle { .. }), "{err}");
}

/// A bucket entry flagged as a bucket is reported as a nested bucket, inline ones included.
#[test]
fn nested_buckets_are_reported_as_such() {
    // An inline bucket (root 0, sequence 7) whose page holds x = y, stored as a plain value
    // first; then its element's flags say "bucket".
    let mut inline = vec![0u8; 16];
    inline[8..16].copy_from_slice(&7u64.to_le_bytes());
    let mut page = vec![0u8; 16 + 16];
    page[8] = 0x02; // leaf
    page[10] = 1; // one element
    page[16 + 4..16 + 8].copy_from_slice(&16u32.to_le_bytes()); // pos: right after the element
    page[16 + 8] = 1; // ksize
    page[16 + 12] = 1; // vsize
    page.extend_from_slice(b"xy");
    inline.extend_from_slice(&page);
    let buckets: Vec<BucketData> = vec![(
        b"outer".to_vec(),
        vec![(b"a".to_vec(), b"1".to_vec()), (b"inner".to_vec(), inline)],
    )];
    let mut file = bbolt::write(&buckets, 256);
    let db = Db::open(&file).unwrap();
    let outer = db.bucket(b"outer").unwrap().unwrap().root_page().unwrap() as usize;
    file[outer * 256 + 16 + 16] = 0x01; // element 1 ("inner") becomes a bucket
    let db = Db::open(&file).unwrap();
    let outer = db.bucket(b"outer").unwrap().unwrap();
    assert_eq!(outer.bucket_names().unwrap(), vec![&b"inner"[..]]);
    let entries: Vec<(&[u8], Value<'_>)> = outer.iter().map(Result::unwrap).collect();
    assert_eq!(entries[0].0, b"a");
    assert_eq!(entries[0].1.data(), Some(&b"1"[..]));
    let Value::Bucket(inner) = entries[1].1 else {
        panic!("inner is not reported as a bucket")
    };
    assert!(inner.is_inline());
    assert_eq!(inner.sequence(), 7);
    let kvs: Vec<(&[u8], Option<&[u8]>)> = inner
        .iter()
        .map(|e| e.map(|(k, v)| (k, v.data())).unwrap())
        .collect();
    assert_eq!(kvs, vec![(&b"x"[..], Some(&b"y"[..]))]);
    assert!(
        db.bucket(b"inner").unwrap().is_none(),
        "not a top-level bucket"
    );
}

/// A freelist page with 0xFFFF as its count keeps the real count in its first slot.
#[test]
fn freelist_count_overflow_convention() {
    let mut file = bbolt::write(&as_buckets(&sample()), 256);
    let p = 2 * 256;
    file[p + 10..p + 12].copy_from_slice(&0xFFFFu16.to_le_bytes());
    for (i, v) in [3u64, 9, 8, 7].iter().enumerate() {
        file[p + 16 + 8 * i..p + 24 + 8 * i].copy_from_slice(&v.to_le_bytes());
    }
    assert_eq!(Db::open(&file).unwrap().freelist().unwrap(), vec![9, 8, 7]);
    // A count larger than the page holds is refused, naming the page.
    file[p + 16..p + 24].copy_from_slice(&1000u64.to_le_bytes());
    let err = Db::open(&file).unwrap().freelist().unwrap_err();
    assert!(matches!(err, Error::OutOfBounds { page: 2, .. }), "{err}");
}

// ---- against etcd 3.4 ---------------------------------------------------------------------

const ETCD_BUCKETS: [&str; 9] = [
    "key",
    "meta",
    "lease",
    "members",
    "cluster",
    "alarm",
    "auth",
    "authUsers",
    "authRoles",
];

fn revision(s: &Server) -> i64 {
    s.ctl_json(&["get", "nothing"])["header"]["revision"]
        .as_i64()
        .unwrap()
}

/// Whether bucket `name` has a root page of its own and it is a branch page (flags 0x01).
fn branch_root(db: &Db<'_>, file: &[u8], name: &[u8]) -> Option<bool> {
    let root = db.bucket(name).unwrap()?.root_page()? as usize;
    Some(file[root * db.page_size() + 8] == 0x01)
}

const TXNS: usize = 3;
const TXN_OPS: usize = 128;

/// Runs `etcdctl txn` with `input` (compares, blank line, success ops, blank line, failure ops)
/// on its stdin.
fn txn(s: &Server, input: &str) {
    let out = etcdctl::run_with_input(&s.endpoint(), &["txn"], input);
    assert!(out.ok, "{}", out.stderr);
    assert!(out.stdout.starts_with("SUCCESS"));
}

/// The bbolt file inside a snapshot, after checking its sha256 trailer.
fn strip_trailer(snapshot: &[u8]) -> &[u8] {
    assert!(snapshot.len() > 32);
    let (db, sum) = snapshot.split_at(snapshot.len() - 32);
    assert_eq!(
        &Sha256::digest(db)[..],
        sum,
        "the snapshot's sha256 trailer"
    );
    db
}

fn with_trailer(db: &[u8]) -> Vec<u8> {
    let mut out = db.to_vec();
    out.extend_from_slice(&Sha256::digest(db));
    out
}

fn snapshot_status(file: &Path) -> Json {
    json_output(&mut etcdctl::command(
        "127.0.0.1:1",
        &["snapshot", "status", file.to_str().unwrap(), "-w", "json"],
    ))
}

/// All keys with their values, versions, revisions and leases, as etcd returns them.
fn all_kvs(s: &Server) -> Json {
    s.ctl_json(&["get", "--prefix", ""])["kvs"].clone()
}

/// A revision key of etcd's `key` bucket: main and sub revision, and whether it is a tombstone.
fn revision_key(k: &[u8]) -> (i64, i64, bool) {
    assert!(k.len() == 17 || (k.len() == 18 && k[17] == b't'), "{k:?}");
    assert_eq!(k[8], b'_');
    let main = i64::from_be_bytes(k[..8].try_into().unwrap());
    let sub = i64::from_be_bytes(k[9..17].try_into().unwrap());
    (main, sub, k.len() == 18)
}

/// etcd writes a snapshot the reader opens: its buckets, and one `key` entry per revision
/// holding the key-value etcd stored. The writer then rewrites the same buckets into a file
/// `etcdctl snapshot status` reads as the same revision, key count and hash, and which
/// `etcdctl snapshot restore` turns into a data dir etcd serves the same keys from.
#[test]
fn etcd_snapshot_is_read_and_rewritten() {
    let tmp = tempfile::tempdir().unwrap();
    let mut server = Server::etcd(&[]);
    let base = revision(&server);
    server.ctl(&["put", "a", "1"]);
    server.ctl(&["put", "b", "2"]);
    server.ctl(&["put", "b", "3"]);
    server.ctl(&["put", "c", "gone"]);
    server.ctl(&["del", "c"]);
    let grant: Json =
        serde_json::from_str(&server.ctl(&["lease", "grant", "600", "-w", "json"])).unwrap();
    let lease = grant["ID"].as_i64().unwrap();
    let lease_hex = format!("{lease:x}");
    server.ctl(&["put", "l", "leased", "--lease", &lease_hex]);
    let big = "x".repeat(10_000);
    server.ctl(&["put", "big", &big]);
    // Three transactions of 128 puts each (etcd's --max-txn-ops): one revision each, the puts
    // its sub-revisions, and enough bytes that etcd's `key` bucket needs branch pages.
    let txn_value = |t: usize, i: usize| format!("{t}-{i}-{}", "p".repeat(100));
    for t in 0..TXNS {
        let ops: String = (0..TXN_OPS)
            .map(|i| format!("put t/{t}/{i:03} {}\n", txn_value(t, i)))
            .collect();
        txn(&server, &format!("\n{ops}\n\n"));
    }
    let kvs = all_kvs(&server);

    let saved = tmp.path().join("saved.db");
    server.ctl(&["snapshot", "save", saved.to_str().unwrap()]);
    let snapshot = std::fs::read(&saved).unwrap();
    let file = strip_trailer(&snapshot);

    // The reader opens it.
    let db = Db::open(file).expect("open etcd's snapshot");
    let names: Vec<String> = db
        .buckets()
        .unwrap()
        .iter()
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect();
    for b in ETCD_BUCKETS {
        assert!(
            names.iter().any(|n| n == b),
            "bucket {b} missing from {names:?}"
        );
    }
    let c = contents(&db);
    assert_eq!(
        branch_root(&db, file, b"key"),
        Some(true),
        "etcd's key bucket"
    );
    let revs: Vec<(i64, i64, bool, KeyValue)> = c[&b"key"[..]]
        .iter()
        .map(|(k, v)| {
            let (main, sub, tomb) = revision_key(k);
            (
                main,
                sub,
                tomb,
                KeyValue::decode(&v[..]).expect("mvccpb.KeyValue"),
            )
        })
        .collect();
    let mut expect: Vec<(i64, i64, bool, String, String, i64)> = [
        (1, false, "a", "1", 0),
        (2, false, "b", "2", 0),
        (3, false, "b", "3", 0),
        (4, false, "c", "gone", 0),
        (5, true, "c", "", 0),
        (6, false, "l", "leased", lease),
        (7, false, "big", &big, 0),
    ]
    .into_iter()
    .map(|(rev, tomb, k, v, l)| (base + rev, 0, tomb, k.to_string(), v.to_string(), l))
    .collect();
    for t in 0..TXNS {
        for i in 0..TXN_OPS {
            let key = format!("t/{t}/{i:03}");
            expect.push((
                base + 8 + t as i64,
                i as i64,
                false,
                key,
                txn_value(t, i),
                0,
            ));
        }
    }
    assert_eq!(
        revs.len(),
        expect.len(),
        "one key entry per revision: {revs:?}"
    );
    for ((main, sub, tomb, kv), (rev, esub, etomb, key, value, elease)) in revs.iter().zip(&expect)
    {
        assert_eq!((*main, *sub, *tomb), (*rev, *esub, *etomb), "{kv:?}");
        assert_eq!(&kv.key[..], key.as_bytes());
        assert_eq!(&kv.value[..], value.as_bytes());
        assert_eq!(kv.lease, *elease);
        if !tomb {
            assert_eq!(kv.mod_revision, *rev);
        }
    }
    let leases = &c[&b"lease"[..]];
    assert_eq!(
        leases.keys().collect::<Vec<_>>(),
        vec![&lease.to_be_bytes().to_vec()]
    );
    assert!(c[&b"meta"[..]].contains_key(&b"consistent_index"[..]));
    assert_eq!(c[&b"members"[..]].len(), 1);

    // etcd's own backend file, once etcd has stopped, holds the same revisions.
    server.terminate();
    let backend = std::fs::read(server.data_dir().join("member/snap/db")).unwrap();
    let live = Db::open(&backend).expect("open etcd's backend");
    live.freelist().expect("the backend's freelist");
    assert_eq!(contents(&live)[&b"key"[..]], c[&b"key"[..]]);
    drop(server);

    // The writer rewrites it, with and without inline buckets; etcd's tools read each rewrite
    // as the original, and etcd restored from it serves the same keys.
    let before = snapshot_status(&saved);
    assert_eq!(before["revision"].as_i64(), Some(base + 7 + TXNS as i64));
    for inline_buckets in [false, true] {
        let options = WriteOptions {
            page_size: db.page_size(),
            inline_buckets,
        };
        let again = bbolt::write_with(&as_buckets(&c), options);
        let reread = Db::open(&again).unwrap();
        assert_eq!(contents(&reread), c);
        assert_eq!(branch_root(&reread, &again, b"key"), Some(true));
        let rewritten = tmp.path().join(format!("rewritten-{inline_buckets}.db"));
        std::fs::write(&rewritten, with_trailer(&again)).unwrap();
        let after = snapshot_status(&rewritten);
        for field in ["revision", "totalKey", "hash"] {
            assert_eq!(before[field], after[field], "{field}: {before} vs {after}");
        }
        assert_eq!(after["totalSize"].as_u64(), Some(again.len() as u64));

        let restored = tmp.path().join(format!("restored-{inline_buckets}"));
        let mut served = etcd::spawn_restored(&rewritten, &restored);
        served.wait_ready();
        assert_eq!(all_kvs(&served), kvs);
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let keys: Vec<String> = kvs
        .as_array()
        .unwrap()
        .iter()
        .map(|kv| String::from_utf8(b64.decode(kv["key"].as_str().unwrap()).unwrap()).unwrap())
        .collect();
    let mut expect_keys = vec!["a".to_string(), "b".into(), "big".into(), "l".into()];
    for t in 0..TXNS {
        expect_keys.extend((0..TXN_OPS).map(|i| format!("t/{t}/{i:03}")));
    }
    assert_eq!(keys, expect_keys);
}
