//! Maintenance Snapshot, Hash and HashKV, all built on a consistent export of every shard at one
//! revision (MVCC makes the cut consistent while writes continue).
//!
//! The Snapshot stream is an etcd 3.4 snapshot file (a bbolt file and its sha256, see
//! [`crate::snapshot`]), which `etcdctl snapshot status` and `snapshot restore` read. Hash and
//! HashKV hash spindle's own export encoding.

use std::rc::Rc;

use bytes::Bytes;
use http_body::Frame;

use super::grpc::{self, Code, Status};
use super::Ctx;
use crate::db::{encode_export, LocalDb};
use crate::proto::etcdserverpb as pb;
use crate::snapshot;

const CHUNK_KEYS: usize = 1024;

/// Calls `f` with every exported chunk of every shard at revision `upto`.
async fn for_each_chunk(
    db: &LocalDb,
    upto: i64,
    mut f: impl FnMut(u32, &[crate::mvcc::KeyHistory]) -> bool,
) -> Result<(), Status> {
    for shard in 0..db.shards() {
        let mut after = None;
        loop {
            let chunk = db.export(shard, after.clone(), CHUNK_KEYS, upto).await?;
            if chunk.is_empty() {
                break;
            }
            after = chunk.last().map(|h| h.key.clone());
            if !f(shard, &chunk) {
                return Err(Status::new(Code::Cancelled, "snapshot receiver went away"));
            }
            if chunk.len() < CHUNK_KEYS {
                break;
            }
        }
    }
    Ok(())
}

/// etcd's Hash/HashKV are hashes of its backend; ours is a crc32 over every key's history up to
/// the revision (equal stores give equal hashes; the value differs from etcd's by design).
pub async fn hash(ctx: &Rc<Ctx>, upto: i64) -> Result<u32, Status> {
    let mut h = crc32fast::Hasher::new();
    let mut buf = Vec::new();
    for_each_chunk(&ctx.db, upto, |_, chunk| {
        buf.clear();
        encode_export(chunk, &mut buf);
        h.update(&buf);
        true
    })
    .await?;
    Ok(h.finalize())
}

pub async fn hash_kv(ctx: &Rc<Ctx>, req: pb::HashKvRequest) -> Result<pb::HashKvResponse, Status> {
    let current = ctx.db.revision();
    let rev = if req.revision <= 0 {
        current
    } else {
        req.revision
    };
    if rev > current {
        return Err(crate::error::Error::FutureRevision.into());
    }
    let compact = ctx.db.compact_revision();
    if rev < compact {
        return Err(crate::error::Error::Compacted.into());
    }
    let hash = hash(ctx, rev).await?;
    Ok(pb::HashKvResponse {
        header: Some(ctx.header(current)),
        hash,
        compact_revision: compact,
    })
}

/// Bytes of the snapshot file a response carries.
const CHUNK_BYTES: usize = 64 * 1024;

/// What the snapshot records beside the keys: leases, members and auth as they are now.
fn extras(ctx: &Ctx, rev: i64) -> snapshot::Extras {
    let members = super::member_list(ctx)
        .into_iter()
        .map(|m| snapshot::MemberRecord {
            id: m.id,
            peer_urls: m.peer_ur_ls,
            is_learner: m.is_learner,
            name: m.name,
            client_urls: m.client_ur_ls,
        })
        .collect();
    let (auth_enabled, auth_revision, auth_users, auth_roles) = ctx
        .db
        .auth()
        .read(|a| (a.enabled(), a.revision(), a.etcd_users(), a.etcd_roles()));
    snapshot::Extras {
        compact_revision: ctx.db.compact_revision(),
        consistent_index: rev.max(0) as u64,
        leases: ctx.db.lease_grants(),
        members,
        auth_enabled,
        auth_revision,
        auth_users,
        auth_roles,
    }
}

/// Streams a consistent snapshot in etcd 3.4's format (see [`crate::snapshot`]): every key's
/// history at one revision is exported, the file built, then sent in chunks.
pub fn stream(ctx: Rc<Ctx>) -> http::Response<grpc::GrpcBody> {
    let (tx, rx) = flume::bounded::<Frame<Bytes>>(4);
    glommio::spawn_local(async move {
        let rev = ctx.db.revision();
        let header = Some(ctx.header(rev));
        let mut builder = snapshot::Builder::new();
        let result = for_each_chunk(&ctx.db, rev, |_, chunk| {
            builder.add(chunk);
            true
        })
        .await;
        let status = match result {
            Ok(()) => {
                let file = Bytes::from(builder.finish(&extras(&ctx, rev)));
                let mut sent = 0;
                let mut ok = true;
                while sent < file.len() && ok {
                    let end = (sent + CHUNK_BYTES).min(file.len());
                    let msg = pb::SnapshotResponse {
                        header,
                        remaining_bytes: (file.len() - end) as u64,
                        blob: file.slice(sent..end),
                    };
                    ok = tx
                        .send_async(Frame::data(grpc::encode_message(&msg)))
                        .await
                        .is_ok();
                    sent = end;
                }
                if !ok {
                    return;
                }
                Status::new(Code::Ok, "")
            }
            Err(s) => s,
        };
        let _ = tx
            .send_async(Frame::trailers(grpc::status_trailers(&status)))
            .await;
    })
    .detach();
    grpc::stream(rx)
}
