//! Data-dir metadata: the facts fixed at creation (shard count, partitioner) and the process lock.

use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::engine::partition::Partitioner;
use crate::error::{Error, Result};

const META_FILE: &str = "spindle.meta";

/// The data dir's format version, recorded as `format=` in `spindle.meta`:
/// 1. the first format (also what a meta file without the line is);
/// 2. shard 0's WAL and checkpoints may carry alarms (`EntryKind::Alarm`, checkpoint extras),
///    which builds of format 1 cannot read.
///
/// A build opens every older version (upgrading the record in place, so an older build then
/// refuses the dir instead of misreading it) and refuses a newer one without touching it.
pub const FORMAT: u32 = 2;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    pub shards: u32,
    pub partitioner: Partitioner,
    /// etcd-style identities, chosen at creation and reported in every response header.
    pub cluster_id: u64,
    pub member_id: u64,
}

/// A random non-zero id (std's hasher is randomly keyed per process).
fn random_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish().max(1)
}

/// Holds an exclusive `flock` on the data dir for as long as it lives, so two processes never
/// write the same WAL.
#[derive(Debug)]
pub struct DirLock {
    _file: fs::File,
}

pub fn lock(dir: &Path) -> Result<DirLock> {
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let path = dir.join("LOCK");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    // SAFETY: flock on a valid, owned descriptor.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(Error::DataDir {
            path: dir.to_path_buf(),
            reason: "in use by another process".into(),
        });
    }
    Ok(DirLock { _file: file })
}

pub fn shard_dir(dir: &Path, shard: u32) -> PathBuf {
    dir.join(format!("shard-{shard:03}"))
}

/// Reads the metadata of an existing data dir (`None` for a new one).
pub fn load(dir: &Path) -> Result<Option<Meta>> {
    Ok(load_versioned(dir)?.map(|(meta, _)| meta))
}

fn load_versioned(dir: &Path) -> Result<Option<(Meta, u32)>> {
    let path = dir.join(META_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => parse(&path, &text).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(&path, e)),
    }
}

/// Refuses a data dir written by a newer spindle (its format version above [`FORMAT`]),
/// before anything in it is opened for writing, so such a dir is left exactly as it was.
pub fn check_version(dir: &Path) -> Result<()> {
    let path = dir.join(META_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => version_of(&path, &text).map(|_| ()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(&path, e)),
    }
}

/// The format version `text` records (1 without a `format=` line); an error for a version
/// newer than this build's.
fn version_of(path: &Path, text: &str) -> Result<u32> {
    let line = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == "format");
    let version = match line {
        None => 1,
        Some((_, v)) => v.trim().parse::<u32>().map_err(|_| Error::DataDir {
            path: path.to_path_buf(),
            reason: format!("malformed format version {:?}", v.trim()),
        })?,
    };
    if version > FORMAT {
        return Err(Error::DataDir {
            path: path.to_path_buf(),
            reason: format!(
                "format version {version} was written by a newer spindle; this spindle reads \
                 versions up to {FORMAT}. Refusing to open it (nothing was changed): run the \
                 newer spindle, or restore a snapshot of it into a new data dir"
            ),
        });
    }
    Ok(version)
}

/// Writes `spindle.meta` durably at this build's format version (temp file, fsync, rename,
/// directory fsync).
fn write_meta(dir: &Path, meta: &Meta) -> Result<()> {
    let path = dir.join(META_FILE);
    let text = format!(
        "format={FORMAT}\nshards={}\npartitioner={}\ncluster_id={:x}\nmember_id={:x}\n",
        meta.shards,
        meta.partitioner.name(),
        meta.cluster_id,
        meta.member_id
    );
    replace_file(dir, &path, text.as_bytes())
}

/// Replaces `path` (a file in `dir`) with `bytes` durably: a temp file written and fsynced,
/// renamed over it, then the directory fsynced, so a crash leaves the old file or the new one.
fn replace_file(dir: &Path, path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// Reads the metadata, or writes it from the given defaults for a new data dir. `identity`
/// (cluster id, member id) comes from the cluster flags; without it a new data dir gets random
/// ids, and an existing one must carry the given ids.
pub fn load_or_create(
    dir: &Path,
    shards: u32,
    partitioner: Partitioner,
    identity: Option<(u64, u64)>,
) -> Result<Meta> {
    let path = dir.join(META_FILE);
    match load_versioned(dir)? {
        Some((meta, version)) => match identity {
            Some((c, m)) if (c, m) != (meta.cluster_id, meta.member_id) => Err(Error::DataDir {
                path,
                reason: format!(
                    "belongs to cluster {:x} as member {:x}, but the flags make this member \
                     {m:x} of cluster {c:x}",
                    meta.cluster_id, meta.member_id
                ),
            }),
            _ => {
                if version < FORMAT {
                    write_meta(dir, &meta)?;
                    tracing::info!(
                        path = %path.display(),
                        from = version,
                        to = FORMAT,
                        "data dir format upgraded"
                    );
                }
                Ok(meta)
            }
        },
        None => {
            if shards == 0 {
                return Err(Error::InvalidArgument(
                    "shard count must be at least 1".into(),
                ));
            }
            let meta = Meta {
                shards,
                partitioner,
                cluster_id: identity.map_or_else(random_id, |i| i.0),
                member_id: identity.map_or_else(random_id, |i| i.1),
            };
            write_meta(dir, &meta)?;
            Ok(meta)
        }
    }
}

fn parse(path: &Path, text: &str) -> Result<(Meta, u32)> {
    // Checked first: a newer version may hold lines this build does not know.
    let version = version_of(path, text)?;
    let bad = |reason: String| Error::DataDir {
        path: path.to_path_buf(),
        reason,
    };
    let mut shards = None;
    let mut partitioner = None;
    let mut cluster_id = None;
    let mut member_id = None;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| bad(format!("malformed line {line:?}")))?;
        match k.trim() {
            "format" => {}
            "shards" => shards = v.trim().parse::<u32>().ok().filter(|&n| n > 0),
            "partitioner" => partitioner = Partitioner::from_name(v.trim()),
            "cluster_id" => cluster_id = u64::from_str_radix(v.trim(), 16).ok(),
            "member_id" => member_id = u64::from_str_radix(v.trim(), 16).ok(),
            other => return Err(bad(format!("unknown key {other:?}"))),
        }
    }
    let meta = Meta {
        shards: shards.ok_or_else(|| bad("missing or invalid shards".into()))?,
        partitioner: partitioner.ok_or_else(|| bad("missing or unknown partitioner".into()))?,
        cluster_id: cluster_id.ok_or_else(|| bad("missing or invalid cluster_id".into()))?,
        member_id: member_id.ok_or_else(|| bad("missing or invalid member_id".into()))?,
    };
    Ok((meta, version))
}

const MEMBERSHIP_FILE: &str = "cluster.json";

/// The cluster membership a member's data dir holds (`None` for a single node's).
pub fn load_membership(dir: &Path) -> Result<Option<crate::cluster::Membership>> {
    let path = dir.join(MEMBERSHIP_FILE);
    match fs::read(&path) {
        Ok(bytes) => crate::cluster::Membership::decode(&bytes)
            .map(Some)
            .map_err(|e| Error::DataDir {
                path,
                reason: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(&path, e)),
    }
}

/// Writes the membership durably (temp file, fsync, rename, directory fsync).
pub fn save_membership(dir: &Path, m: &crate::cluster::Membership) -> Result<()> {
    replace_file(dir, &dir.join(MEMBERSHIP_FILE), &m.encode())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_fixed() {
        let dir = tempfile::tempdir().unwrap();
        let m = load_or_create(dir.path(), 3, Partitioner::Directory, None).unwrap();
        assert_eq!(m.shards, 3);
        // Later opens keep the recorded shard count whatever the caller asks for.
        let m2 = load_or_create(dir.path(), 8, Partitioner::WholeKey, None).unwrap();
        assert_eq!(m2, m);
    }

    #[test]
    fn lock_is_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let l = lock(dir.path()).unwrap();
        assert!(matches!(lock(dir.path()), Err(Error::DataDir { .. })));
        drop(l);
        lock(dir.path()).unwrap();
    }

    #[test]
    fn a_data_dir_of_another_member_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let m = load_or_create(dir.path(), 2, Partitioner::Directory, Some((0xc1, 0xa1))).unwrap();
        assert_eq!((m.cluster_id, m.member_id), (0xc1, 0xa1));
        let err = load_or_create(dir.path(), 2, Partitioner::Directory, Some((0xc2, 0xa1)))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cluster c1 as member a1") && err.contains("cluster c2"),
            "{err}"
        );
    }

    #[test]
    fn membership_round_trips_through_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load_membership(dir.path()).unwrap(), None);
        let (m, _) = crate::cluster::Membership::bootstrap(
            "a=http://127.0.0.1:1,b=http://127.0.0.1:2",
            "t",
            "a",
            &["http://127.0.0.1:1".to_string()],
        )
        .unwrap();
        save_membership(dir.path(), &m).unwrap();
        assert_eq!(load_membership(dir.path()).unwrap(), Some(m));
        fs::write(dir.path().join(MEMBERSHIP_FILE), b"{").unwrap();
        let err = load_membership(dir.path()).unwrap_err().to_string();
        assert!(err.contains(MEMBERSHIP_FILE), "{err}");
    }

    #[test]
    fn older_versions_open_and_are_upgraded_newer_ones_are_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let m = load_or_create(dir.path(), 2, Partitioner::Directory, None).unwrap();
        let path = dir.path().join(META_FILE);
        let written = fs::read_to_string(&path).unwrap();
        assert!(
            written.starts_with(&format!("format={FORMAT}\n")),
            "{written}"
        );
        // Version 1, and a meta file without a version line (the first version).
        for old in ["format=1\n", ""] {
            let text = written.replacen(&format!("format={FORMAT}\n"), old, 1);
            fs::write(&path, &text).unwrap();
            check_version(dir.path()).unwrap();
            assert_eq!(
                load_or_create(dir.path(), 2, Partitioner::Directory, None).unwrap(),
                m
            );
            assert_eq!(fs::read_to_string(&path).unwrap(), written);
        }
        let newer = format!("format={}\nshards=2\nsomething_new=1\n", FORMAT + 1);
        fs::write(&path, &newer).unwrap();
        for err in [
            check_version(dir.path()).unwrap_err(),
            load_or_create(dir.path(), 2, Partitioner::Directory, None).unwrap_err(),
        ] {
            let err = err.to_string();
            assert!(
                err.contains(META_FILE)
                    && err.contains(&format!("format version {}", FORMAT + 1))
                    && err.contains(&format!("versions up to {FORMAT}")),
                "{err}"
            );
        }
        assert_eq!(fs::read_to_string(&path).unwrap(), newer);
    }

    #[test]
    fn garbage_meta_is_rejected_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(META_FILE), "shards=banana\n").unwrap();
        let err = load_or_create(dir.path(), 1, Partitioner::Directory, None).unwrap_err();
        assert!(err.to_string().contains(META_FILE), "{err}");
    }
}
