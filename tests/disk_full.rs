//! A full disk: writes fail with `Error::DiskFull` before anything is applied, reads keep working,
//! writes resume once space is freed, and everything acknowledged survives a reopen.
//!
//! Needs root to mount a small tmpfs (CI and the dev machines run as root).

use std::path::{Path, PathBuf};
use std::process::Command;

use spindle::kv::*;
use spindle::{Db, Error, Options};

mod common;
use common::db::opts;
use common::process::output_ok;

struct Mount(PathBuf);

impl Mount {
    fn tmpfs(dir: &Path, size: &str) -> Result<Mount, String> {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(Mount(dir.to_path_buf()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn full_disk_is_a_typed_error_and_the_store_stays_consistent() {
    let base = tempfile::tempdir().unwrap();
    let mount = match Mount::tmpfs(base.path(), "3m") {
        Ok(m) => m,
        Err(e) => {
            assert!(
                unsafe { libc::geteuid() } != 0,
                "running as root but could not mount a tmpfs: {e}"
            );
            eprintln!("SKIPPED: mounting a tmpfs needs root ({e})");
            return;
        }
    };
    let dir = mount.0.join("db");
    let options = Options {
        wal_segment_size: 512 << 10,
        ..opts(1, 1)
    };
    let db = Db::open(&dir, options.clone()).unwrap();
    let value = bytes::Bytes::from(vec![b'x'; 8 << 10]);
    let mut acked = Vec::new();
    let mut full = None;
    for i in 0..2000 {
        match db.put(PutRequest::new(format!("k{i:05}"), value.clone())) {
            Ok(r) => acked.push((format!("k{i:05}"), r.header.revision)),
            Err(e) => {
                full = Some(e);
                break;
            }
        }
    }
    let err = full.expect("a 3 MiB filesystem must fill up");
    assert!(
        matches!(err, Error::DiskFull { .. }),
        "expected DiskFull, got {err}"
    );
    assert!(err.to_string().contains("disk full"), "{err}");
    assert!(acked.len() > 100, "only {} writes fit", acked.len());
    // Nothing of the failed write was applied; reads keep working; revisions are contiguous.
    let rev = db.revision();
    assert_eq!(
        rev,
        acked.len() as i64 + 1,
        "an empty store is at revision 1"
    );
    let all = db
        .range(RangeRequest {
            keys_only: true,
            ..RangeRequest::prefix("k")
        })
        .unwrap();
    assert_eq!(all.count as usize, acked.len());
    assert!(matches!(
        db.put(PutRequest::new("again", value.clone())),
        Err(Error::DiskFull { .. })
    ));
    assert_eq!(db.revision(), rev);
    // The operator frees space (here: grows the filesystem); the same open store writes again.
    output_ok(
        Command::new("mount")
            .args(["-o", "remount,size=16m"])
            .arg(&mount.0),
    );
    let later = db.put(PutRequest::new("after", "space")).unwrap();
    assert_eq!(later.header.revision, rev + 1);
    acked.push(("after".to_string(), rev + 1));
    db.close();
    // Everything acknowledged is there after a reopen.
    let db = Db::open(&dir, options).unwrap();
    assert_eq!(db.revision(), rev + 1);
    for (k, r) in &acked {
        let got = db.range(RangeRequest::key(k.clone())).unwrap();
        assert_eq!(got.kvs.first().map(|kv| kv.mod_revision), Some(*r), "{k}");
    }
    db.close();
}
