//! Constants and field offsets of the bbolt file format (see the module docs).

/// The marker in every meta page.
pub const MAGIC: u32 = 0xED0C_DAED;
/// The format version bbolt writes and reads.
pub const VERSION: u32 = 2;

/// The smallest page size the reader accepts and the writer writes: room for a header, a meta
/// and a few elements.
pub const MIN_PAGE_SIZE: usize = 128;
/// The largest page size the reader accepts.
pub(crate) const MAX_PAGE_SIZE: usize = 1 << 24;

pub(crate) const PAGE_HEADER_SIZE: usize = 16;
pub(crate) const ELEMENT_SIZE: usize = 16;
pub(crate) const META_SIZE: usize = 64;
/// Meta bytes the checksum covers: everything before the checksum.
pub(crate) const META_SUMMED: usize = 56;
pub(crate) const BUCKET_HEADER_SIZE: usize = 16;

pub(crate) const FLAG_BRANCH: u16 = 0x01;
pub(crate) const FLAG_LEAF: u16 = 0x02;
pub(crate) const FLAG_META: u16 = 0x04;
pub(crate) const FLAG_FREELIST: u16 = 0x10;

/// Leaf element flag: the value is a bucket.
pub(crate) const LEAF_BUCKET: u32 = 0x01;

/// A page count of this value on a freelist page means the real count is the first id slot.
pub(crate) const FREELIST_COUNT_OVERFLOW: u16 = 0xFFFF;
/// The freelist page id of a file whose freelist is not stored.
pub(crate) const NO_FREELIST: u64 = u64::MAX;

/// FNV-1a, 64 bits: the meta page checksum.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

pub(crate) fn put_u16(buf: &mut [u8], at: usize, v: u16) {
    buf[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_u64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::fnv1a64;

    #[test]
    fn fnv1a64_known_values() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }
}
