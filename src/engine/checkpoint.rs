//! Checkpoints: a shard's full MVCC state at one log index, in one immutable file.
//!
//! Written sequentially through a glommio DMA stream in the background (the export walks the index
//! in chunks, yielding between them, and only takes revisions up to the checkpoint's revision, so
//! writes continue meanwhile), synced, then atomically renamed. On restart the newest checkpoint is
//! mapped with memmap2 and values stay in the mapping: they are `Bytes` slices of it, so a restarted
//! shard's values live in the page cache rather than on the heap.
//!
//! Layout (little endian): header (64 bytes) | extras | key records | footer (`crc32` of all
//! before | magic). Extras (version 2; version 1 files have none) carry what a cluster member
//! cannot re-log after the checkpoint, since a follower proposes nothing: `len:u32` then
//! `lease_count:u32 { id:i64 ttl:i64 } meta_len:u32 meta decision_count:u32 { rev:i64
//! committed:u8 } [auth_len:u32 auth [alarms_len:u32 alarms]]` (the shard's live leases, for
//! shard 0 the cluster membership, the outcomes of the newest multi-shard writes, and for shard 0
//! the auth store, absent in files written before auth was persisted and when auth was never
//! used unless alarms follow, and the raised alarms, absent when none is).
//! A key record: `key_len:u32 key gen_count:u32 { create:i64 first_version:i64 tombstone:i64(0 = live)
//! put_count:u32 { rev:i64 lease:i64 value_len:u32 value } }`.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures_lite::AsyncWriteExt;

use crate::error::{Error, Result};
use crate::mvcc::{Generation, KeyHistory, PutEvent};

const MAGIC: &[u8; 8] = b"SPNDLCKP";
const END_MAGIC: &[u8; 8] = b"SPNDLEND";
const VERSION: u32 = 2;
const HEADER_LEN: usize = 64;
const FOOTER_LEN: usize = 12;

/// What a checkpoint covers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckpointInfo {
    pub shard: u32,
    /// Every log entry up to this index is reflected.
    pub index: u64,
    pub term: u64,
    pub last_revision: i64,
    pub compact_revision: i64,
    pub key_count: u64,
}

/// What a checkpoint carries besides keys.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extras {
    /// Live leases logged in this shard: id → TTL.
    pub leases: Vec<(i64, i64)>,
    /// Shard 0's checkpoint: the membership record (JSON) as of its index.
    pub membership: Bytes,
    /// Outcomes of the newest multi-shard writes the shard took part in (revision, committed):
    /// a member deciding a write its leader left undecided asks for them.
    pub decisions: Vec<(i64, bool)>,
    /// Shard 0's checkpoint: the auth store (`AuthStore::encode`) as of its index; empty when
    /// auth was never used.
    pub auth: Bytes,
    /// Shard 0's checkpoint: the raised alarms (`Alarms::encode`) as of its index; empty when
    /// none is raised.
    pub alarms: Bytes,
}

impl Extras {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(12 + 16 * self.leases.len() + self.membership.len());
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&(self.leases.len() as u32).to_le_bytes());
        for (id, ttl) in &self.leases {
            b.extend_from_slice(&id.to_le_bytes());
            b.extend_from_slice(&ttl.to_le_bytes());
        }
        b.extend_from_slice(&(self.membership.len() as u32).to_le_bytes());
        b.extend_from_slice(&self.membership);
        b.extend_from_slice(&(self.decisions.len() as u32).to_le_bytes());
        for (rev, committed) in &self.decisions {
            b.extend_from_slice(&rev.to_le_bytes());
            b.push(u8::from(*committed));
        }
        if !self.auth.is_empty() || !self.alarms.is_empty() {
            b.extend_from_slice(&(self.auth.len() as u32).to_le_bytes());
            b.extend_from_slice(&self.auth);
        }
        if !self.alarms.is_empty() {
            b.extend_from_slice(&(self.alarms.len() as u32).to_le_bytes());
            b.extend_from_slice(&self.alarms);
        }
        let len = (b.len() - 4) as u32;
        b[..4].copy_from_slice(&len.to_le_bytes());
        b
    }

    fn decode(r: &mut Reader<'_>, owner: &Bytes) -> Option<Extras> {
        let len = r.u32()? as usize;
        let end = r.pos.checked_add(len)?;
        let n = r.u32()? as usize;
        if n > len / 16 {
            return None;
        }
        let mut leases = Vec::with_capacity(n);
        for _ in 0..n {
            leases.push((r.i64()?, r.i64()?));
        }
        let mlen = r.u32()? as usize;
        let mpos = r.take(mlen)?;
        // Extras written before outcomes were recorded end here.
        let nd = if r.pos == end { 0 } else { r.u32()? as usize };
        if nd > len / 9 {
            return None;
        }
        let mut decisions = Vec::with_capacity(nd);
        for _ in 0..nd {
            let rev = r.i64()?;
            let p = r.take(1)?;
            decisions.push((rev, r.buf[p] != 0));
        }
        // Extras written before auth was persisted (or without auth state) end here.
        let auth = if r.pos == end {
            Bytes::new()
        } else {
            let alen = r.u32()? as usize;
            let apos = r.take(alen)?;
            owner.slice(apos..apos + alen)
        };
        // Extras written before alarms were persisted (or with none raised) end here.
        let alarms = if r.pos == end {
            Bytes::new()
        } else {
            let alen = r.u32()? as usize;
            let apos = r.take(alen)?;
            owner.slice(apos..apos + alen)
        };
        (r.pos == end).then(|| Extras {
            alarms,
            decisions,
            leases,
            membership: owner.slice(mpos..mpos + mlen),
            auth,
        })
    }
}

pub fn file_name(index: u64) -> String {
    format!("checkpoint-{index:020}.ckpt")
}

/// Checkpoint files in `dir`, oldest first; unfinished ones (`*.tmp`) are removed.
pub fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io(dir, e)),
    };
    for ent in rd {
        let ent = ent.map_err(|e| Error::io(dir, e))?;
        let name = ent.file_name().to_string_lossy().into_owned();
        if name.starts_with("checkpoint-") && name.ends_with(".tmp") {
            let _ = fs::remove_file(ent.path());
            continue;
        }
        if let Some(idx) = name
            .strip_prefix("checkpoint-")
            .and_then(|s| s.strip_suffix(".ckpt"))
        {
            if let Ok(i) = idx.parse::<u64>() {
                out.push((i, ent.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Serializes key histories into checkpoint record bytes.
pub fn encode_histories(histories: &[KeyHistory], out: &mut Vec<u8>) {
    for h in histories {
        out.extend_from_slice(&(h.key.len() as u32).to_le_bytes());
        out.extend_from_slice(&h.key);
        out.extend_from_slice(&(h.generations.len() as u32).to_le_bytes());
        for g in &h.generations {
            out.extend_from_slice(&g.create_revision.to_le_bytes());
            out.extend_from_slice(&g.first_version.to_le_bytes());
            out.extend_from_slice(&g.tombstone.unwrap_or(0).to_le_bytes());
            out.extend_from_slice(&(g.puts.len() as u32).to_le_bytes());
            for p in &g.puts {
                out.extend_from_slice(&p.revision.to_le_bytes());
                out.extend_from_slice(&p.lease.to_le_bytes());
                out.extend_from_slice(&(p.value.len() as u32).to_le_bytes());
                out.extend_from_slice(&p.value);
            }
        }
    }
}

fn encode_header(info: &CheckpointInfo) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&info.shard.to_le_bytes());
    h[16..24].copy_from_slice(&info.index.to_le_bytes());
    h[24..32].copy_from_slice(&info.term.to_le_bytes());
    h[32..40].copy_from_slice(&info.last_revision.to_le_bytes());
    h[40..48].copy_from_slice(&info.compact_revision.to_le_bytes());
    h[48..56].copy_from_slice(&info.key_count.to_le_bytes());
    h
}

/// Streams a checkpoint to `dir` through a DMA writer; `next_chunk` yields encoded record bytes until
/// it returns `None`. The file appears under its final name only once complete and synced.
pub async fn write<F, Fut>(
    dir: &Path,
    mut info: CheckpointInfo,
    extras: &Extras,
    mut next_chunk: F,
) -> Result<PathBuf>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<(Vec<u8>, u64)>>,
{
    let final_path = dir.join(file_name(info.index));
    let tmp = dir.join(format!("{}.tmp", file_name(info.index)));
    let io = |e: std::io::Error| Error::io(&tmp, e);
    let file = glommio::io::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .dma_open(&tmp)
        .await
        .map_err(|e| Error::glommio(&tmp, e))?;
    let mut w = glommio::io::DmaStreamWriterBuilder::new(file)
        .with_buffer_size(512 << 10)
        .build();
    // The header's key count is only known at the end, so it is excluded from the checksum's
    // streaming pass and verified through the key records instead; write a placeholder first.
    let mut crc = crc32fast::Hasher::new();
    let mut keys = 0u64;
    let placeholder = [0u8; HEADER_LEN];
    w.write_all(&placeholder).await.map_err(io)?;
    let extras = extras.encode();
    crc.update(&extras);
    w.write_all(&extras).await.map_err(io)?;
    while let Some((bytes, n)) = next_chunk().await {
        crc.update(&bytes);
        keys += n;
        w.write_all(&bytes).await.map_err(io)?;
    }
    info.key_count = keys;
    let header = encode_header(&info);
    let mut footer = Vec::with_capacity(FOOTER_LEN);
    let mut full = crc32fast::Hasher::new();
    full.update(&header);
    full.combine(&crc);
    footer.extend_from_slice(&full.finalize().to_le_bytes());
    footer.extend_from_slice(END_MAGIC);
    w.write_all(&footer).await.map_err(io)?;
    w.close().await.map_err(io)?;
    // Patch the header in place (one small synced write), then publish by rename.
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&tmp).map_err(io)?;
        f.write_all_at(&header, 0).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    publish(dir, &tmp, final_path)
}

/// Writes a whole checkpoint synchronously from histories in key order (no executor needed):
/// what `spindle snapshot restore` lays down. Synced, then renamed into place.
pub fn write_sync(
    dir: &Path,
    mut info: CheckpointInfo,
    extras: &Extras,
    histories: &[KeyHistory],
) -> Result<PathBuf> {
    use std::io::Write;
    let final_path = dir.join(file_name(info.index));
    let tmp = dir.join(format!("{}.tmp", file_name(info.index)));
    info.key_count = histories.len() as u64;
    let mut out = encode_header(&info).to_vec();
    out.extend_from_slice(&extras.encode());
    encode_histories(histories, &mut out);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(END_MAGIC);
    let io = |e: std::io::Error| Error::io(&tmp, e);
    let mut f = fs::File::create(&tmp).map_err(io)?;
    f.write_all(&out).and_then(|_| f.sync_all()).map_err(io)?;
    publish(dir, &tmp, final_path)
}

/// Renames the synced `tmp` into place as `final_path` and syncs the directory, so the
/// checkpoint exists whole or not at all.
fn publish(dir: &Path, tmp: &Path, final_path: PathBuf) -> Result<PathBuf> {
    fs::rename(tmp, &final_path).map_err(|e| Error::io(&final_path, e))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))?;
    Ok(final_path)
}

/// Where a leader's checkpoint is assembled while it arrives in chunks.
pub fn received_path(dir: &Path) -> PathBuf {
    dir.join("snapshot.recv")
}

/// At open: a checkpoint that was still arriving (or never installed) is thrown away; the
/// leader sends it again if the follower still needs it.
pub fn discard_received(dir: &Path) -> Result<()> {
    let recv = received_path(dir);
    match fs::remove_file(&recv) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(&recv, e)),
    }
}

/// Checks a checkpoint's checksum and header without parsing its keys: what a follower does
/// with a received checkpoint before telling Raft it has the snapshot.
pub fn verify(path: &Path, shard: u32) -> Result<CheckpointInfo> {
    let file = fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the received file is written only by this core, which is not writing it now.
    let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let corrupt = |off: usize, why: &str| Error::corrupt(path, off as u64, why.to_string());
    check_frame(path, &bytes)?;
    let info =
        decode_header(&bytes[..HEADER_LEN]).ok_or_else(|| corrupt(0, "bad magic or version"))?;
    if info.shard != shard {
        return Err(corrupt(
            12,
            &format!(
                "checkpoint of shard {} received for shard {shard}",
                info.shard
            ),
        ));
    }
    Ok(info)
}

/// Checks a checkpoint's length, end marker and checksum; returns where its body ends.
fn check_frame(path: &Path, bytes: &[u8]) -> Result<usize> {
    let corrupt = |off: usize, why: &str| Error::corrupt(path, off as u64, why.to_string());
    if bytes.len() < HEADER_LEN + FOOTER_LEN {
        return Err(corrupt(0, "file too short for a checkpoint"));
    }
    let body_end = bytes.len() - FOOTER_LEN;
    if &bytes[body_end + 4..] != END_MAGIC {
        return Err(corrupt(
            body_end,
            "missing end marker (incomplete checkpoint)",
        ));
    }
    let stored = u32::from_le_bytes(bytes[body_end..body_end + 4].try_into().expect("4 bytes"));
    if crc32fast::hash(&bytes[..body_end]) != stored {
        return Err(corrupt(body_end, "checksum mismatch"));
    }
    Ok(body_end)
}

/// The header's fields, if its magic and version are ones this build reads.
fn decode_header(h: &[u8]) -> Option<CheckpointInfo> {
    let version = u32::from_le_bytes(h.get(8..12)?.try_into().ok()?);
    if h.get(0..8)? != MAGIC || !(1..=VERSION).contains(&version) {
        return None;
    }
    let u64_at =
        |o: usize| -> Option<u64> { Some(u64::from_le_bytes(h.get(o..o + 8)?.try_into().ok()?)) };
    Some(CheckpointInfo {
        shard: u32::from_le_bytes(h.get(12..16)?.try_into().ok()?),
        index: u64_at(16)?,
        term: u64_at(24)?,
        last_revision: u64_at(32)? as i64,
        compact_revision: u64_at(40)? as i64,
        key_count: u64_at(48)?,
    })
}

/// A mapped checkpoint whose values are zero-copy slices of the mapping.
pub struct Loaded {
    pub info: CheckpointInfo,
    pub extras: Extras,
    pub histories: Vec<KeyHistory>,
}

/// A shard's state as its newest checkpoint holds it.
pub struct Newest {
    pub store: crate::mvcc::ShardStore,
    /// Log index and term the checkpoint covers (0, 0 without one).
    pub index: u64,
    pub term: u64,
    pub extras: Extras,
}

/// The store a shard's newest checkpoint in `dir` holds, with the checkpoint's log index, term
/// and extras; an empty store at index 0 when there is none. Opening a shard, rebuilding one and
/// installing a leader's snapshot all start here.
pub fn load_newest(dir: &Path, shard: u32) -> Result<Newest> {
    match list(dir)?.last() {
        Some((_, file)) => {
            let c = load(file, shard)?;
            let store = crate::mvcc::ShardStore::from_histories(
                c.histories,
                c.info.last_revision,
                c.info.compact_revision,
            );
            release_free_memory();
            Ok(Newest {
                store,
                index: c.info.index,
                term: c.info.term,
                extras: c.extras,
            })
        }
        None => Ok(Newest {
            store: crate::mvcc::ShardStore::new(),
            index: 0,
            term: 0,
            extras: Extras::default(),
        }),
    }
}

/// Maps and fully validates a checkpoint (checksum, structure), returning its key histories.
pub fn load(path: &Path, shard: u32) -> Result<Loaded> {
    let file = fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: checkpoint files are immutable once renamed into place, and this process holds the
    // data dir lock, so nothing truncates or rewrites the file under the mapping.
    let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?);
    let corrupt = |off: usize, why: &str| Error::corrupt(path, off as u64, why.to_string());
    let body_end = check_frame(path, &map)?;
    let h = &map[..HEADER_LEN];
    let version = u32::from_le_bytes(h[8..12].try_into().expect("4"));
    let info = decode_header(h).ok_or_else(|| corrupt(0, "bad magic or version"))?;
    if info.shard != shard {
        return Err(corrupt(
            12,
            &format!("checkpoint of shard {} found in shard {shard}", info.shard),
        ));
    }
    let owner = Bytes::from_owner(MapOwner(map.clone()));
    let mut r = Reader {
        buf: &map[..body_end],
        pos: HEADER_LEN,
    };
    let extras = if version >= 2 {
        Extras::decode(&mut r, &owner).ok_or_else(|| corrupt(HEADER_LEN, "malformed extras"))?
    } else {
        Extras::default()
    };
    // Keys are copied into one heap arena: the index compares them constantly, and leaving them in
    // the mapping would keep every page (keys sit between values) resident. Values stay mapped.
    let mut key_arena: Vec<u8> = Vec::new();
    let mut parsed: Vec<(usize, usize, Vec<Generation>)> =
        Vec::with_capacity(info.key_count as usize);
    let mut last_key: Option<&[u8]> = None;
    while r.pos < body_end {
        let at = r.pos;
        let mut generations: Vec<Generation> = Vec::new();
        let (kpos, klen) = read_record(&mut r, |item| match item {
            Item::Generation(g) => {
                // Exact: a million keys are parsed before the index takes them over, and
                // `push`'s first growth would reserve room for four generations each.
                generations.reserve_exact(1);
                generations.push(g)
            }
            Item::Put(revision, lease, (vpos, vlen)) => {
                if let Some(g) = generations.last_mut() {
                    g.puts.push(PutEvent {
                        revision,
                        value: owner.slice(vpos..vpos + vlen),
                        lease,
                    });
                }
            }
        })
        .ok_or_else(|| corrupt(at, "truncated key record"))?;
        let key = &map[kpos..kpos + klen];
        if last_key.is_some_and(|k| k >= key) {
            return Err(corrupt(at, "out-of-order key"));
        }
        last_key = Some(key);
        parsed.push((key_arena.len(), klen, generations));
        key_arena.extend_from_slice(key);
    }
    let keys = Bytes::from(key_arena);
    let mut histories = Vec::with_capacity(parsed.len());
    for (start, len, generations) in parsed {
        let h = KeyHistory {
            key: keys.slice(start..start + len),
            generations,
        };
        if !h.is_well_formed() {
            let why = format!("malformed history of key {:?}", h.key);
            return Err(corrupt(HEADER_LEN, &why));
        }
        histories.push(h);
    }
    if histories.len() as u64 != info.key_count {
        return Err(corrupt(48, "key count does not match the records"));
    }
    // Validation touched every page; let them go from this process's resident set. They stay in
    // the page cache and fault back in only for values that are read.
    crate::wal::recovery::drop_resident(&map);
    Ok(Loaded {
        info,
        extras,
        histories,
    })
}

/// One piece of a key record, in file order: a generation (its puts follow it), or a put of the
/// last generation given as (revision, lease, (value offset, value length)).
enum Item {
    Generation(Generation),
    Put(i64, i64, (usize, usize)),
}

/// Parses the key record at `r`, handing its generations and puts to `on` in file order, and
/// returns where its key is (offset, length); `None` if the record is truncated.
fn read_record(r: &mut Reader<'_>, mut on: impl FnMut(Item)) -> Option<(usize, usize)> {
    let klen = r.u32()? as usize;
    let kpos = r.take(klen)?;
    let ngen = r.u32()?;
    for _ in 0..ngen {
        let create_revision = r.i64()?;
        let first_version = r.i64()?;
        let tomb = r.i64()?;
        let nput = r.u32()?;
        on(Item::Generation(Generation {
            create_revision,
            first_version,
            // Capped: the count comes from the file, and a bad one must not reserve gigabytes.
            puts: Vec::with_capacity((nput as usize).min(1024)),
            tombstone: if tomb == 0 { None } else { Some(tomb) },
        }));
        for _ in 0..nput {
            let revision = r.i64()?;
            let lease = r.i64()?;
            let vlen = r.u32()? as usize;
            let vpos = r.take(vlen)?;
            on(Item::Put(revision, lease, (vpos, vlen)));
        }
    }
    Some((kpos, klen))
}

/// Hands memory the allocator holds free back to the system. After a checkpoint's values
/// replace their heap copies, or a restart's parsed histories are dropped, hundreds of MB are
/// free but scattered between live allocations; glibc's malloc keeps such memory resident
/// (it only returns the top of each arena by itself), and `malloc_trim` releases every whole
/// free page in every arena. Takes a few milliseconds per hundred MB.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only inspects and shrinks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Bytes of checksum verified per [`ValueScan::step`].
const VERIFY_STEP: usize = 4 << 20;

/// A durable checkpoint mapped again so that the values it holds can be served from the mapping
/// instead of the heap (`ShardStore::adopt`): a written value otherwise stays on the heap
/// until the next restart, which is most of a loaded store's memory.
///
/// The scan runs in steps so an executor can yield between them: first the checksum (values are
/// only handed out from a file that verifies), then the key records. Pages it has read are
/// dropped from the process as it goes, so a scan costs a read of the file but little resident
/// memory; values fault back in only when read.
pub struct ValueScan {
    path: PathBuf,
    map: Arc<memmap2::Mmap>,
    owner: Bytes,
    crc: crc32fast::Hasher,
    /// Verified up to here, while `< body_end`; then the checksum is checked.
    verified: usize,
    /// Start of the next key record (after the checksum pass).
    pos: usize,
    body_end: usize,
    /// Pages below this were already dropped from the resident set.
    released: usize,
}

/// What [`ValueScan::step`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Scanned {
    /// Part of the checksum was verified.
    Verified,
    /// This many key records were handed out.
    Keys(usize),
    /// Every record was handed out.
    Done,
}

/// Reads the file at `path` into the page cache and waits for it: a blocking call, for a
/// thread that may block. A checkpoint is written around the page cache, so the first read
/// of each page through its mapping would otherwise be a major fault on the executor that
/// adopts it, stalling every request on that core for the disk (tens of milliseconds in all).
///
/// The pages are faulted into a private mapping (`MADV_POPULATE_READ`, Linux 5.14) a few MiB
/// at a time, and each step's page table entries are dropped again (`MADV_DONTNEED`, which
/// leaves the page cache alone), so nothing is copied and the resident set does not grow. A
/// plain read of the file copied every byte to user space: with a long history, checkpoints of
/// hundreds of MB made that copy 12% of the server's CPU (docs/benchmarks.md, "A growing
/// history, and warming a checkpoint without copying it"). Older kernels read the rest of the
/// file instead.
pub fn read_into_page_cache(path: &Path) -> std::io::Result<()> {
    const STEP: usize = 4 << 20;
    let file = fs::File::open(path)?;
    if file.metadata()?.len() == 0 {
        return Ok(());
    }
    // SAFETY: checkpoint files are immutable once renamed into place, and nothing reads through
    // this mapping: it only makes the kernel bring the pages in.
    let map = unsafe { memmap2::Mmap::map(&file)? };
    let mut at = 0;
    while at < map.len() {
        let len = STEP.min(map.len() - at);
        if map
            .advise_range(memmap2::Advice::PopulateRead, at, len)
            .is_err()
        {
            return read_from(file, at as u64);
        }
        // SAFETY: dropping a read-only file mapping's pages only unmaps them (a later access
        // would fault them back in from the page cache), and nothing reads this mapping.
        unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, at, len)? };
        at += len;
    }
    Ok(())
}

/// Reads `file` from `offset` to its end, discarding the bytes (see [`read_into_page_cache`]).
fn read_from(mut file: fs::File, offset: u64) -> std::io::Result<()> {
    use std::io::{Read, Seek};
    file.seek(std::io::SeekFrom::Start(offset))?;
    // On the stack: this thread allocates nothing (it would get a heap of its own).
    let mut buf = [0u8; 64 << 10];
    while file.read(&mut buf)? > 0 {}
    Ok(())
}

impl ValueScan {
    /// Maps the checkpoint at `path`; checks its frame and header (the checksum follows in steps).
    pub fn open(path: &Path) -> Result<ValueScan> {
        let file = fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: as in `load`: checkpoint files are immutable once renamed into place.
        let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?);
        let corrupt = |off: usize, why: &str| Error::corrupt(path, off as u64, why.to_string());
        if map.len() < HEADER_LEN + FOOTER_LEN || &map[map.len() - 8..] != END_MAGIC {
            return Err(corrupt(0, "not a complete checkpoint"));
        }
        let h = &map[..HEADER_LEN];
        let version = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
        decode_header(h).ok_or_else(|| corrupt(0, "bad magic or version"))?;
        let body_end = map.len() - FOOTER_LEN;
        let mut r = Reader {
            buf: &map[..body_end],
            pos: HEADER_LEN,
        };
        if version >= 2 {
            let len = r
                .u32()
                .ok_or_else(|| corrupt(HEADER_LEN, "malformed extras"))?
                as usize;
            r.take(len)
                .ok_or_else(|| corrupt(HEADER_LEN, "malformed extras"))?;
        }
        let pos = r.pos;
        Ok(ValueScan {
            path: path.to_path_buf(),
            owner: Bytes::from_owner(MapOwner(map.clone())),
            map,
            crc: crc32fast::Hasher::new(),
            verified: 0,
            pos,
            body_end,
            released: 0,
        })
    }

    /// Verifies the next part of the checksum, or once it holds, hands up to `max_keys` key
    /// records to `record` as (key, [(revision, value)] of its puts). The keys of one step are
    /// copied into one small arena (keys are compared constantly, so they belong on the heap,
    /// compactly), the values are slices of the mapping (creating one reads nothing). Fails if
    /// the file does not verify or a record does not parse; a file that fails its checksum hands
    /// out nothing.
    pub fn step(
        &mut self,
        max_keys: usize,
        mut record: impl FnMut(Bytes, &[(i64, Bytes)]),
    ) -> Result<Scanned> {
        let path = self.path.clone();
        let corrupt = |off: usize, why: &str| Error::corrupt(&path, off as u64, why.to_string());
        if self.verified < self.body_end {
            let end = (self.verified + VERIFY_STEP).min(self.body_end);
            self.crc.update(&self.map[self.verified..end]);
            self.verified = end;
            self.release_below(end);
            if end == self.body_end {
                let stored = &self.map[end..end + 4];
                let stored = u32::from_le_bytes(stored.try_into().expect("4 bytes"));
                if self.crc.clone().finalize() != stored {
                    return Err(corrupt(end, "checksum mismatch"));
                }
                self.released = 0;
            }
            return Ok(Scanned::Verified);
        }
        if self.pos >= self.body_end {
            self.release_below(self.map.len());
            return Ok(Scanned::Done);
        }
        let mut r = Reader {
            buf: &self.map[..self.body_end],
            pos: self.pos,
        };
        let mut arena = Vec::new();
        let mut records = Vec::with_capacity(max_keys.min(4096));
        while records.len() < max_keys && r.pos < self.body_end {
            let at = r.pos;
            let mut puts: Vec<(i64, Bytes)> = Vec::with_capacity(1);
            let (kpos, klen) = read_record(&mut r, |item| {
                if let Item::Put(rev, _, (vpos, vlen)) = item {
                    puts.push((rev, self.owner.slice(vpos..vpos + vlen)));
                }
            })
            .ok_or_else(|| corrupt(at, "truncated key record"))?;
            records.push((arena.len(), klen, puts));
            arena.extend_from_slice(&self.map[kpos..kpos + klen]);
        }
        let keys = Bytes::from(arena);
        for (start, len, puts) in &records {
            record(keys.slice(*start..start + len), puts);
        }
        self.pos = r.pos;
        self.release_below(self.pos);
        Ok(Scanned::Keys(records.len()))
    }

    /// Drops the pages wholly below `end` from the resident set (they stay in the page cache).
    fn release_below(&mut self, end: usize) {
        const PAGE: usize = 4096;
        let end = end / PAGE * PAGE;
        if end <= self.released {
            return;
        }
        // SAFETY: the mapping is read-only and file-backed, so dropping its pages loses nothing;
        // they fault back in from the file if touched again.
        let dropped = unsafe {
            self.map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                self.released,
                end - self.released,
            )
        };
        if let Err(e) = dropped {
            tracing::debug!(error = %e, "madvise(DONTNEED) on a checkpoint failed; pages stay resident");
        }
        self.released = end;
    }
}

struct MapOwner(Arc<memmap2::Mmap>);

impl AsRef<[u8]> for MapOwner {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<usize> {
        let start = self.pos;
        let end = start.checked_add(n)?;
        if end > self.buf.len() {
            return None;
        }
        self.pos = end;
        Some(start)
    }
    fn u32(&mut self) -> Option<u32> {
        let p = self.take(4)?;
        Some(u32::from_le_bytes(self.buf[p..p + 4].try_into().ok()?))
    }
    fn i64(&mut self) -> Option<i64> {
        let p = self.take(8)?;
        Some(i64::from_le_bytes(self.buf[p..p + 8].try_into().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest};
    use crate::mvcc::{ShardStore, TxnPath};

    /// How many of the pages of `path` the page cache holds, and how many it has.
    fn cached_pages(path: &Path) -> (usize, usize) {
        let file = fs::File::open(path).unwrap();
        // SAFETY: the file is not modified while mapped, and the mapping is only given to mincore.
        let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
        crate::wal::tests::cached_pages(&map)
    }

    #[test]
    fn warming_a_file_puts_every_page_in_the_page_cache() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("checkpoint-1.ckpt");
        let len = (9 << 20) + 12_345; // more than two steps, and a partial page at the end
        {
            let mut f = fs::File::create(&path).unwrap();
            std::io::Write::write_all(&mut f, &vec![7u8; len]).unwrap();
            f.sync_all().unwrap();
            // SAFETY: advice on a whole open file; it only asks the kernel to drop clean pages.
            let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            assert_eq!(rc, 0);
        }
        let (before, pages) = cached_pages(&path);
        assert!(
            before < pages / 2,
            "{before} of {pages} pages cached before warming"
        );
        read_into_page_cache(&path).unwrap();
        let (after, pages) = cached_pages(&path);
        assert_eq!(
            after, pages,
            "{after} of {pages} pages cached after warming"
        );
    }

    fn extras_roundtrip(bytes: &[u8]) -> Option<Extras> {
        let owner = Bytes::copy_from_slice(bytes);
        let mut r = Reader {
            buf: &owner,
            pos: 0,
        };
        let e = Extras::decode(&mut r, &owner)?;
        (r.pos == owner.len()).then_some(e)
    }

    #[test]
    fn extras_carry_the_auth_store_and_older_extras_still_load() {
        let full = Extras {
            leases: vec![(5, 60)],
            membership: Bytes::from_static(b"{}"),
            decisions: vec![(9, true)],
            auth: Bytes::from_static(b"auth-bytes"),
            alarms: Bytes::new(),
        };
        assert_eq!(extras_roundtrip(&full.encode()), Some(full.clone()));
        // Alarms with and without an auth section before them.
        for auth in [Bytes::new(), Bytes::from_static(b"auth-bytes")] {
            let with_alarms = Extras {
                auth,
                alarms: Bytes::from_static(b"alarm-bytes"),
                ..full.clone()
            };
            assert_eq!(
                extras_roundtrip(&with_alarms.encode()),
                Some(with_alarms.clone())
            );
        }
        // Written before auth was persisted (or with no auth state): no auth section.
        let without = Extras {
            auth: Bytes::new(),
            ..full.clone()
        };
        let bytes = without.encode();
        assert_eq!(extras_roundtrip(&bytes), Some(without));
        // Written before outcomes were recorded: leases and membership only.
        let mut old = Vec::new();
        old.extend_from_slice(&(4u32 + 16 + 4 + 2).to_le_bytes());
        old.extend_from_slice(&1u32.to_le_bytes());
        old.extend_from_slice(&5i64.to_le_bytes());
        old.extend_from_slice(&60i64.to_le_bytes());
        old.extend_from_slice(&2u32.to_le_bytes());
        old.extend_from_slice(b"{}");
        let e = extras_roundtrip(&old).expect("old extras load");
        assert_eq!(
            (e.leases, e.decisions.len(), e.auth.len()),
            (vec![(5, 60)], 0, 0)
        );
        // A truncated auth section is refused.
        let mut cut = full.encode();
        let n = cut.len();
        cut.truncate(n - 3);
        let len = (cut.len() - 4) as u32;
        cut[..4].copy_from_slice(&len.to_le_bytes());
        assert_eq!(extras_roundtrip(&cut), None);
    }

    /// A checkpoint file as `write` lays it out, built in memory.
    fn file_bytes(store: &ShardStore, upto: i64) -> Vec<u8> {
        let histories = store.export_keys(None, usize::MAX, upto);
        let info = CheckpointInfo {
            shard: 0,
            index: 7,
            term: 1,
            last_revision: upto,
            compact_revision: store.compact_revision(),
            key_count: histories.len() as u64,
        };
        let mut out = encode_header(&info).to_vec();
        out.extend_from_slice(&Extras::default().encode());
        encode_histories(&histories, &mut out);
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(END_MAGIC);
        out
    }

    fn put(s: &mut ShardStore, rev: i64, ops: Vec<RequestOp>) {
        let t = TxnRequest {
            compare: vec![],
            success: ops,
            failure: vec![],
        };
        let ex = s.execute(&t, &TxnPath(vec![true]), rev, &|_| true);
        assert!(ex.wrote());
    }

    fn put_op(k: String, v: String) -> RequestOp {
        RequestOp::Put(PutRequest::new(Bytes::from(k), Bytes::from(v)))
    }

    /// A store with overwrites, deletes, re-creates and a compaction, every value on the heap.
    fn history() -> ShardStore {
        let mut s = ShardStore::new();
        let mut rev = 0;
        for round in 0..4 {
            for k in 0..300 {
                if (k + round) % 3 == 0 {
                    rev += 1;
                    put(
                        &mut s,
                        rev,
                        vec![put_op(format!("k{k:04}"), format!("v{round}-{k}"))],
                    );
                }
            }
            rev += 1;
            let (from, to) = (
                format!("k{:04}", round * 50),
                format!("k{:04}", round * 50 + 20),
            );
            let del = DeleteRangeRequest::range(Bytes::from(from), Bytes::from(to));
            let key = format!("k{:04}", round * 50 + 1);
            // A delete and a re-create of one key at one revision (etcd's sub-revisions).
            put(
                &mut s,
                rev,
                vec![
                    RequestOp::DeleteRange(del),
                    put_op(key, format!("again{round}")),
                ],
            );
            if round == 1 {
                s.compact(rev - 40);
            }
        }
        s
    }

    /// Every read the tests compare: each key's range at every revision from the compaction on.
    fn reads(s: &ShardStore) -> Vec<crate::mvcc::ShardRange> {
        let all = RangeRequest::range(Bytes::from_static(b"k"), Bytes::from_static(b"l"));
        (s.compact_revision()..=s.last_revision() + 1)
            .map(|rev| s.range(&all, rev).expect("range"))
            .collect()
    }

    fn scan_all(scan: &mut ValueScan, mut rec: impl FnMut(Bytes, &[(i64, Bytes)])) -> Result<()> {
        while scan.step(7, &mut rec)? != Scanned::Done {}
        Ok(())
    }

    #[test]
    fn adopted_values_read_the_same_and_live_in_the_mapping() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = history();
        let before = reads(&store);
        let upto = store.last_revision() - 5;
        let path = dir.path().join(file_name(7));
        fs::write(&path, file_bytes(&store, upto)).expect("write");

        let latest = RangeRequest::range(Bytes::from_static(b"k"), Bytes::from_static(b"l"));
        let key_ptrs = |s: &ShardStore| -> Vec<usize> {
            let page = s.range(&latest, 0).expect("range");
            page.kvs.iter().map(|kv| kv.key.as_ptr() as usize).collect()
        };
        let heap_keys = key_ptrs(&store);
        let mut scan = ValueScan::open(&path).expect("open");
        let (lo, hi) = (
            scan.owner.as_ptr() as usize,
            scan.owner.as_ptr() as usize + scan.owner.len(),
        );
        let mut adopted = 0;
        scan_all(&mut scan, |key, puts| {
            assert!(puts.iter().all(|(rev, _)| *rev <= upto));
            adopted += store.adopt(key, puts);
        })
        .expect("scan");
        // In small steps, as a shard does between serving requests.
        let mut after = 0;
        while let Some(next) = store.adopt_event_values(after, upto, 3) {
            after = next;
        }
        assert!(adopted > 300, "adopted {adopted}");
        assert_eq!(reads(&store), before, "reads changed by adoption");
        // Every key the checkpoint holds moved to an arena: none is its write's copy any more.
        let arena_keys = key_ptrs(&store);
        assert_eq!(arena_keys.len(), heap_keys.len());
        assert!(arena_keys.iter().zip(&heap_keys).all(|(a, h)| a != h));

        // Every value at or below `upto` is now a slice of the mapping; newer ones are not.
        let in_map = |v: &Bytes| (lo..hi).contains(&(v.as_ptr() as usize));
        for page in reads(&store) {
            for kv in page.kvs.iter().filter(|kv| !kv.value.is_empty()) {
                assert_eq!(in_map(&kv.value), kv.mod_revision <= upto, "{kv:?}");
            }
        }
        let feed = store
            .changes(&[crate::kv::KeyRange::all()], upto - 20, upto, usize::MAX)
            .expect("changes");
        assert!(!feed.events.is_empty());
        for e in feed.events.iter().filter(|e| !e.kv.value.is_empty()) {
            assert!(in_map(&e.kv.value), "event {e:?} still holds its heap copy");
        }

        // Adopting again (a later checkpoint) or from the same file changes no read.
        let mut again = ValueScan::open(&path).expect("open");
        scan_all(&mut again, |key, puts| {
            store.adopt(key, puts);
        })
        .expect("scan");
        assert_eq!(reads(&store), before);
    }

    #[test]
    fn a_corrupt_checkpoint_hands_out_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = history();
        let mut bytes = file_bytes(&store, store.last_revision());
        // A value byte near the end: the checksum, not the structure, has to catch it.
        let at = bytes.len() - FOOTER_LEN - 2;
        bytes[at] ^= 0x20;
        let path = dir.path().join(file_name(7));
        fs::write(&path, &bytes).expect("write");
        let mut scan = ValueScan::open(&path).expect("frame and header are fine");
        let mut handed = 0;
        let err = scan_all(&mut scan, |_, _| handed += 1).expect_err("checksum");
        assert!(err.to_string().contains("checksum"), "{err}");
        assert_eq!(handed, 0);

        fs::write(&path, &bytes[..bytes.len() - 3]).expect("write");
        assert!(ValueScan::open(&path).is_err(), "incomplete file");
    }

    #[test]
    fn load_reads_what_encode_wrote() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = history();
        let path = dir.path().join(file_name(7));
        fs::write(&path, file_bytes(&store, store.last_revision())).expect("write");
        let loaded = load(&path, 0).expect("load");
        assert_eq!(
            loaded.histories,
            store.export_keys(None, usize::MAX, i64::MAX)
        );
    }
}
