//! Maintenance Snapshot, Hash and HashKV, all built on a consistent export of every shard at one
//! revision (MVCC makes the cut consistent while writes continue).
//!
//! Snapshot stream format: `SPNDLSNP | version:u32 | shards:u32 | revision:i64 | compact:i64`,
//! then chunks `shard:u32 | len:u64 | key records (checkpoint encoding)`, then `0xFFFFFFFF` and
//! zero padding to a multiple of 512 bytes, then the SHA-256 of everything before it (etcd's
//! clients verify that trailer by the same layout).

use std::rc::Rc;

use bytes::{BufMut, Bytes, BytesMut};
use http_body::Frame;
use sha2::{Digest, Sha256};

use super::grpc::{self, Code, Status};
use super::Ctx;
use crate::db::{encode_export, LocalDb};
use crate::proto::etcdserverpb as pb;

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

/// Streams a consistent snapshot; the response body is fed as chunks are exported.
pub fn stream(ctx: Rc<Ctx>) -> http::Response<grpc::GrpcBody> {
    let (tx, rx) = flume::bounded::<Frame<Bytes>>(4);
    glommio::spawn_local(async move {
        let rev = ctx.db.revision();
        let header = Some(ctx.header(rev));
        let mut sha = Sha256::new();
        let mut total = 0usize;
        let mut send = |blob: Bytes, sha: &mut Sha256, tx: &flume::Sender<Frame<Bytes>>| {
            sha.update(&blob);
            total += blob.len();
            let msg = pb::SnapshotResponse {
                header,
                remaining_bytes: 0,
                blob,
            };
            tx.send(Frame::data(grpc::encode_message(&msg))).is_ok()
        };
        let mut head = BytesMut::new();
        head.put_slice(b"SPNDLSNP");
        head.put_u32_le(1);
        head.put_u32_le(ctx.db.shards());
        head.put_i64_le(rev);
        head.put_i64_le(ctx.db.compact_revision());
        if !send(head.freeze(), &mut sha, &tx) {
            return;
        }
        let mut records = Vec::new();
        let result = for_each_chunk(&ctx.db, rev, |shard, chunk| {
            records.clear();
            encode_export(chunk, &mut records);
            let mut b = BytesMut::with_capacity(12 + records.len());
            b.put_u32_le(shard);
            b.put_u64_le(records.len() as u64);
            b.put_slice(&records);
            send(b.freeze(), &mut sha, &tx)
        })
        .await;
        let status = match result {
            Ok(()) => {
                // etcd's clients find the checksum by size: the data before it is a multiple of
                // 512 bytes (a bolt file is), so pad the end marker out to that.
                let mut tail = BytesMut::new();
                tail.put_slice(&[0xff, 0xff, 0xff, 0xff]);
                let padded = (total + tail.len()).next_multiple_of(512);
                tail.resize(padded - total, 0);
                sha.update(&tail);
                let digest = sha.clone().finalize();
                tail.put_slice(&digest);
                let msg = pb::SnapshotResponse {
                    header,
                    remaining_bytes: 0,
                    blob: tail.freeze(),
                };
                let _ = tx.send(Frame::data(grpc::encode_message(&msg)));
                Status::new(Code::Ok, "")
            }
            Err(s) => s,
        };
        let _ = tx.send(Frame::trailers(grpc::status_trailers(&status)));
    })
    .detach();
    grpc::stream(rx)
}
