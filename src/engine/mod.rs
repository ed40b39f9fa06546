//! The shard runtime: what turns the pure MVCC store and Raft state machine into durable,
//! replicated shards on glommio executors. Shards (`shard`), their Raft replicas over the WAL
//! (`replica`), the store-wide revision oracle (`revision`), checkpoints (`checkpoint`), the
//! key-to-shard function (`partition`), the data dir's metadata (`meta`) and the per-core watch hub
//! (`watch`). Only `db` drives it; the server never reaches in here.

pub mod checkpoint;
pub mod meta;
pub mod partition;
pub mod replica;
pub mod revision;
pub mod shard;
pub mod watch;
