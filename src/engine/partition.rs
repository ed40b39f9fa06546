//! Which shard owns a key. Every part of the system routes through [`Partitioner::shard_of`].

/// How keys map to shards; chosen when a data dir is created and recorded in its metadata, since
/// changing it would move keys between shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Partitioner {
    /// Hash of the key's directory (bytes up to and including the last `/`; the whole key when it
    /// has none). A directory's keys (a lock's waiters, an election's candidates) share a shard, so
    /// single-directory transactions stay single-shard.
    Directory,
    /// Hash of the whole key: the most even spread, at the cost of more multi-shard transactions.
    WholeKey,
}

impl Partitioner {
    pub fn name(self) -> &'static str {
        match self {
            Partitioner::Directory => "directory-crc32",
            Partitioner::WholeKey => "key-crc32",
        }
    }

    pub fn from_name(name: &str) -> Option<Partitioner> {
        match name {
            "directory-crc32" => Some(Partitioner::Directory),
            "key-crc32" => Some(Partitioner::WholeKey),
            _ => None,
        }
    }

    pub fn shard_of(self, key: &[u8], shards: u32) -> u32 {
        if shards <= 1 {
            return 0;
        }
        let hashed = match self {
            Partitioner::Directory => match key.iter().rposition(|&b| b == b'/') {
                Some(i) => &key[..=i],
                None => key,
            },
            Partitioner::WholeKey => key,
        };
        // crc32 is stable across versions and platforms, which a persisted mapping requires.
        crc32fast::hash(hashed) % shards
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_keys_share_a_shard() {
        let p = Partitioner::Directory;
        for n in 2..8 {
            assert_eq!(p.shard_of(b"/locks/a/w1", n), p.shard_of(b"/locks/a/w2", n));
            assert_eq!(p.shard_of(b"x/", n), p.shard_of(b"x/y", n));
        }
        let spread: std::collections::HashSet<u32> = (0..100)
            .map(|i| p.shard_of(format!("key{i}").as_bytes(), 4))
            .collect();
        assert_eq!(
            spread.len(),
            4,
            "keys without '/' hash whole and spread over shards"
        );
        assert_eq!(p.shard_of(b"anything", 1), 0);
    }

    #[test]
    fn names_round_trip() {
        for p in [Partitioner::Directory, Partitioner::WholeKey] {
            assert_eq!(Partitioner::from_name(p.name()), Some(p));
        }
    }
}
