//! `spindle snapshot restore`: an etcd 3.4 snapshot (from etcd or from spindle) into a new
//! spindle data dir, revisions kept exact.
//!
//! Nothing is replayed (that would renumber revisions): the `key` bucket's histories are routed
//! to shards with the data dir's partitioner and written as each shard's checkpoint at log
//! index 0, the state a fresh data dir's log starts from. Leases go to the checkpoint of the
//! shard that logs them ([`crate::mvcc::lease::log_shard`]), the auth store to shard 0's. The
//! membership is new: a single node with random ids, or with cluster flags the member the same
//! flags make `spindle serve --initial-cluster-state new` bootstrap as (`cluster.json` and the
//! ids in `spindle.meta`).
//!
//! Everything is written into a temp dir beside the target and renamed onto it at the end, so an
//! error leaves nothing in the target.

use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::engine::checkpoint::{self, CheckpointInfo, Extras};
use crate::engine::meta;
use crate::engine::partition::Partitioner;
use crate::mvcc::{KeyHistory, ShardStore};

/// The flags etcdctl's `snapshot restore` takes for the new member.
#[derive(Clone, Debug)]
pub struct ClusterFlags {
    pub name: String,
    pub initial_cluster: String,
    pub token: String,
    pub advertise_peer_urls: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct Options {
    pub shards: u32,
    pub partitioner: Partitioner,
    pub skip_hash_check: bool,
    /// `None`: a single node.
    pub cluster: Option<ClusterFlags>,
}

/// What a restore wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub revision: i64,
    pub compact_revision: i64,
    pub keys: usize,
    pub events: u64,
    pub leases: usize,
    pub users: usize,
    pub roles: usize,
    pub cluster_id: u64,
    pub member_id: u64,
}

/// Restores `file` (a snapshot's bytes) into the new data dir `dir`, which must not exist or be
/// empty.
pub fn restore(file: &[u8], dir: &Path, opts: &Options) -> Result<Summary, String> {
    if opts.shards == 0 {
        return Err("--shards must be at least 1".into());
    }
    match std::fs::read_dir(dir) {
        Ok(mut rd) => {
            if rd.next().is_some() {
                return Err(format!(
                    "data dir {} exists and is not empty; restore into a new one",
                    dir.display()
                ));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("data dir {}: {e}", dir.display())),
    }
    let contents = crate::snapshot::read(file, opts.skip_hash_check).map_err(|e| e.to_string())?;
    let auth = crate::auth::AuthStore::from_etcd(
        contents.auth_enabled,
        contents.auth_revision,
        &contents.auth_users,
        &contents.auth_roles,
    )
    .map_err(|e| format!("the auth buckets: {e:?}"))?;

    let tmp = temp_beside(dir)?;
    let result = write_dir(&tmp, &contents, auth, opts);
    let summary = match result {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    // An empty target is replaced by the rename; a missing one is created by it.
    if let Err(e) = std::fs::rename(&tmp, dir) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(format!(
            "moving the restored data dir into {}: {e}",
            dir.display()
        ));
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        let _ = std::fs::File::open(parent).and_then(|d| d.sync_all());
    }
    Ok(summary)
}

/// A new, empty dir next to `dir` (same file system, so the final rename is atomic).
fn temp_beside(dir: &Path) -> Result<PathBuf, String> {
    let name = dir
        .file_name()
        .ok_or_else(|| format!("data dir {} has no name", dir.display()))?
        .to_string_lossy()
        .into_owned();
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    let tmp = parent.join(format!(".{name}.restore-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    Ok(tmp)
}

fn write_dir(
    tmp: &Path,
    c: &crate::snapshot::Contents,
    auth: crate::auth::AuthStore,
    opts: &Options,
) -> Result<Summary, String> {
    let err = |e: crate::Error| e.to_string();
    let mut identity = None;
    if let Some(f) = &opts.cluster {
        let listed =
            crate::cluster::parse_initial_cluster(&f.initial_cluster).map_err(|e| e.to_string())?;
        if listed.len() >= 2 {
            let (m, id) = crate::cluster::Membership::bootstrap(
                &f.initial_cluster,
                &f.token,
                &f.name,
                &f.advertise_peer_urls,
            )
            .map_err(|e| e.to_string())?;
            meta::save_membership(tmp, &m).map_err(err)?;
            identity = Some((m.cluster_id, id));
        }
    }
    let m = meta::load_or_create(tmp, opts.shards, opts.partitioner, identity).map_err(err)?;

    // Route each key as the store routes it, then let the store settle the histories (a
    // compaction applied as spindle applies it) and export them as its checkpoint would.
    let mut per_shard: Vec<Vec<KeyHistory>> = vec![Vec::new(); m.shards as usize];
    for h in &c.histories {
        let s = m.partitioner.shard_of(&h.key, m.shards) as usize;
        per_shard[s].push(h.clone());
    }
    let mut leases: Vec<Vec<(i64, i64)>> = vec![Vec::new(); m.shards as usize];
    for &(id, ttl) in &c.leases {
        leases[crate::mvcc::lease::log_shard(id, m.shards) as usize].push((id, ttl));
    }
    let auth_bytes = if auth == crate::auth::AuthStore::new() {
        Bytes::new()
    } else {
        Bytes::from(auth.encode())
    };
    let mut keys = 0;
    for (shard, histories) in per_shard.into_iter().enumerate() {
        let mut store = ShardStore::from_histories(histories, c.revision, 0);
        store.compact(c.compact_revision);
        let histories = store.export_keys(None, usize::MAX, i64::MAX);
        keys += histories.len();
        let dir = meta::shard_dir(tmp, shard as u32);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let extras = Extras {
            leases: std::mem::take(&mut leases[shard]),
            membership: Bytes::new(),
            decisions: Vec::new(),
            auth: if shard == 0 {
                auth_bytes.clone()
            } else {
                Bytes::new()
            },
            // A restored snapshot starts without alarms, as etcd's restore does.
            alarms: Bytes::new(),
        };
        let info = CheckpointInfo {
            shard: shard as u32,
            index: 0,
            term: 0,
            last_revision: c.revision,
            compact_revision: c.compact_revision,
            key_count: 0,
        };
        checkpoint::write_sync(&dir, info, &extras, &histories).map_err(err)?;
    }
    std::fs::File::open(tmp)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    Ok(Summary {
        revision: c.revision,
        compact_revision: c.compact_revision,
        keys,
        events: c.events,
        leases: c.leases.len(),
        users: c.auth_users.len(),
        roles: c.auth_roles.len(),
        cluster_id: m.cluster_id,
        member_id: m.member_id,
    })
}
