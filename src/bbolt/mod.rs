//! bbolt database files: the format of etcd 3.4's backend (`member/snap/db`) and of the files
//! `etcdctl snapshot save` writes (a bbolt file followed by a 32-byte sha256 of it).
//!
//! [`Db::open`] reads a file from a byte slice (the caller reads or maps it), checking every
//! offset and length: a corrupt or truncated file gives an [`Error`] naming the page and byte
//! offset, never a panic. [`write`] produces a fresh, compact file from a list of buckets.
//!
//! The layout (all integers little-endian, as bbolt writes them on the little-endian machines
//! etcd runs on):
//!
//! * Every page starts with a 16-byte header: page id `u64`, flags `u16` (branch `0x01`, leaf
//!   `0x02`, meta `0x04`, freelist `0x10`), element count `u16`, overflow `u32` (how many further
//!   pages the page spans).
//! * Pages 0 and 1 are meta pages: after the header, magic `0xED0CDAED` `u32`, version 2 `u32`,
//!   page size `u32`, flags `u32`, the root bucket (root page `u64`, sequence `u64`), freelist page
//!   `u64`, high-water page id `u64` (pages in the file), transaction id `u64`, and a checksum
//!   `u64`: FNV-1a 64 of the 56 meta bytes before it. Of the valid metas the one with the higher
//!   transaction id is current.
//! * Branch pages hold `count` elements (pos `u32`, key size `u32`, child page `u64`), leaf pages
//!   `count` elements (flags `u32`, pos `u32`, key size `u32`, value size `u32`); `pos` is the
//!   distance from the element to its key, and a leaf value follows its key. The key of a branch
//!   element is the first key of its child.
//! * A leaf element with flag `0x01` is a bucket: its value is the bucket's root page `u64` and
//!   sequence `u64`, and when the root is 0 the bucket's one leaf page follows inline.
//! * The freelist page lists free page ids (`u64` each); a count of `0xFFFF` means the real count
//!   is the first `u64` and the ids follow it.

mod format;
mod read;
mod write;

pub use format::{fnv1a64, MAGIC, MIN_PAGE_SIZE, VERSION};
pub use read::{Bucket, Db, Error, Iter, Meta, Value};
pub use write::{write, write_with, BucketData, WriteOptions};
