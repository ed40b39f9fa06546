//! etcd-shaped request and response types for the key-value API.
//!
//! They mirror etcd's `etcdserverpb` messages field for field (minus transport-only fields such as
//! cluster and member ids) so the gRPC layer can convert without loss and embedded users read the
//! same vocabulary as etcd's documentation.

use bytes::Bytes;

/// One version of a key, as etcd's `mvccpb.KeyValue`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyValue {
    pub key: Bytes,
    /// Revision of the put that created the current generation of this key.
    pub create_revision: i64,
    /// Revision of the last modification.
    pub mod_revision: i64,
    /// Number of modifications since creation; reset to 0 by a delete.
    pub version: i64,
    pub value: Bytes,
    /// Lease attached to the key, 0 for none.
    pub lease: i64,
}

/// Engine part of etcd's `ResponseHeader`; transport adds cluster/member id and raft term.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResponseHeader {
    /// Store revision the response reflects.
    pub revision: i64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SortOrder {
    #[default]
    None,
    Ascend,
    Descend,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum SortTarget {
    #[default]
    Key,
    Version,
    Create,
    Mod,
    Value,
}

/// etcd `RangeRequest`. `range_end` empty = single key; `"\0"` = every key >= `key`;
/// otherwise the half-open interval `[key, range_end)`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeRequest {
    pub key: Bytes,
    pub range_end: Bytes,
    /// 0 = no limit.
    pub limit: i64,
    /// 0 = the current revision.
    pub revision: i64,
    pub sort_order: SortOrder,
    pub sort_target: SortTarget,
    pub serializable: bool,
    pub keys_only: bool,
    pub count_only: bool,
    pub min_mod_revision: i64,
    pub max_mod_revision: i64,
    pub min_create_revision: i64,
    pub max_create_revision: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeResponse {
    pub header: ResponseHeader,
    pub kvs: Vec<KeyValue>,
    /// More keys matched than `limit` allowed.
    pub more: bool,
    /// Number of keys in the range at the read revision (before limit and filters, as etcd).
    pub count: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PutRequest {
    pub key: Bytes,
    pub value: Bytes,
    pub lease: i64,
    pub prev_kv: bool,
    pub ignore_value: bool,
    pub ignore_lease: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PutResponse {
    pub header: ResponseHeader,
    pub prev_kv: Option<KeyValue>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeleteRangeRequest {
    pub key: Bytes,
    pub range_end: Bytes,
    pub prev_kv: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeleteRangeResponse {
    pub header: ResponseHeader,
    pub deleted: i64,
    pub prev_kvs: Vec<KeyValue>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestOp {
    Range(RangeRequest),
    Put(PutRequest),
    DeleteRange(DeleteRangeRequest),
    Txn(TxnRequest),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResponseOp {
    Range(RangeResponse),
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CompareResult {
    #[default]
    Equal,
    Greater,
    Less,
    NotEqual,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CompareTarget {
    #[default]
    Version,
    Create,
    Mod,
    Value,
    Lease,
}

/// The operand of a compare (etcd's `target_union` oneof).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetUnion {
    Version(i64),
    CreateRevision(i64),
    ModRevision(i64),
    Value(Bytes),
    Lease(i64),
}

/// etcd `Compare`. With a `range_end` the compare must hold for every key in the range.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compare {
    pub result: CompareResult,
    pub target: CompareTarget,
    pub key: Bytes,
    pub range_end: Bytes,
    /// etcd reads the operand matching `target`; a missing or mismatched one compares as zero/empty.
    pub target_union: Option<TargetUnion>,
}

impl Compare {
    pub fn value(key: impl Into<Bytes>, result: CompareResult, value: impl Into<Bytes>) -> Self {
        Self::with(
            key,
            result,
            CompareTarget::Value,
            TargetUnion::Value(value.into()),
        )
    }
    pub fn version(key: impl Into<Bytes>, result: CompareResult, version: i64) -> Self {
        Self::with(
            key,
            result,
            CompareTarget::Version,
            TargetUnion::Version(version),
        )
    }
    pub fn create_revision(key: impl Into<Bytes>, result: CompareResult, rev: i64) -> Self {
        Self::with(
            key,
            result,
            CompareTarget::Create,
            TargetUnion::CreateRevision(rev),
        )
    }
    pub fn mod_revision(key: impl Into<Bytes>, result: CompareResult, rev: i64) -> Self {
        Self::with(
            key,
            result,
            CompareTarget::Mod,
            TargetUnion::ModRevision(rev),
        )
    }
    pub fn lease(key: impl Into<Bytes>, result: CompareResult, lease: i64) -> Self {
        Self::with(key, result, CompareTarget::Lease, TargetUnion::Lease(lease))
    }
    fn with(
        key: impl Into<Bytes>,
        result: CompareResult,
        target: CompareTarget,
        u: TargetUnion,
    ) -> Self {
        Compare {
            result,
            target,
            key: key.into(),
            range_end: Bytes::new(),
            target_union: Some(u),
        }
    }
    /// Applies the compare to every key in `[key, range_end)` instead of one key.
    pub fn with_range_end(mut self, range_end: impl Into<Bytes>) -> Self {
        self.range_end = range_end.into();
        self
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TxnRequest {
    pub compare: Vec<Compare>,
    pub success: Vec<RequestOp>,
    pub failure: Vec<RequestOp>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TxnResponse {
    pub header: ResponseHeader,
    pub succeeded: bool,
    pub responses: Vec<ResponseOp>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompactionRequest {
    pub revision: i64,
    /// Wait until the compaction is durable in every shard before answering.
    pub physical: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompactionResponse {
    pub header: ResponseHeader,
}

/// Constructors that keep call sites short (`PutRequest::new("k", "v")`).
impl PutRequest {
    pub fn new(key: impl Into<Bytes>, value: impl Into<Bytes>) -> Self {
        PutRequest {
            key: key.into(),
            value: value.into(),
            ..Default::default()
        }
    }
}

impl RangeRequest {
    /// A single key.
    pub fn key(key: impl Into<Bytes>) -> Self {
        RangeRequest {
            key: key.into(),
            ..Default::default()
        }
    }
    /// Keys in `[key, range_end)`.
    pub fn range(key: impl Into<Bytes>, range_end: impl Into<Bytes>) -> Self {
        RangeRequest {
            key: key.into(),
            range_end: range_end.into(),
            ..Default::default()
        }
    }
    /// Every key starting with `prefix`, as etcdctl's `--prefix`.
    pub fn prefix(prefix: impl Into<Bytes>) -> Self {
        let (key, range_end) = prefix_range(prefix.into());
        RangeRequest {
            key,
            range_end,
            ..Default::default()
        }
    }
}

impl DeleteRangeRequest {
    pub fn key(key: impl Into<Bytes>) -> Self {
        DeleteRangeRequest {
            key: key.into(),
            ..Default::default()
        }
    }
    pub fn range(key: impl Into<Bytes>, range_end: impl Into<Bytes>) -> Self {
        DeleteRangeRequest {
            key: key.into(),
            range_end: range_end.into(),
            ..Default::default()
        }
    }
    pub fn prefix(prefix: impl Into<Bytes>) -> Self {
        let (key, range_end) = prefix_range(prefix.into());
        DeleteRangeRequest {
            key,
            range_end,
            ..Default::default()
        }
    }
}

/// `(key, range_end)` selecting every key with `prefix`. An empty prefix means all keys, sent as
/// `("\0", "\0")` like etcd's clients do, since an empty key is rejected.
pub fn prefix_range(prefix: Bytes) -> (Bytes, Bytes) {
    if prefix.is_empty() {
        return (Bytes::from_static(b"\0"), Bytes::from_static(b"\0"));
    }
    let end = prefix_end(&prefix);
    (prefix, end)
}

/// The range end that selects every key with `prefix` (etcd's `GetPrefixRangeEnd`): the prefix with
/// its last byte below 0xff incremented and the rest dropped; `"\0"` (all keys) when none exists.
pub fn prefix_end(prefix: &[u8]) -> Bytes {
    let mut end = prefix.to_vec();
    while let Some(&last) = end.last() {
        if last < 0xff {
            *end.last_mut().expect("non-empty") += 1;
            return Bytes::from(end);
        }
        end.pop();
    }
    Bytes::from_static(b"\0")
}

/// A key interval `[start, end)` in the engine's normalized form: `end == None` means unbounded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRange {
    pub start: Bytes,
    pub end: Option<Bytes>,
}

impl KeyRange {
    /// Interprets etcd's `(key, range_end)` pair: empty end = just `key`, `"\0"` = unbounded.
    /// Returns `None` for an empty interval (`range_end <= key`), which matches nothing.
    pub fn from_etcd(key: &Bytes, range_end: &Bytes) -> Option<KeyRange> {
        if range_end.is_empty() {
            let mut end = key.to_vec();
            end.push(0);
            return Some(KeyRange {
                start: key.clone(),
                end: Some(Bytes::from(end)),
            });
        }
        if range_end.as_ref() == b"\0" {
            return Some(KeyRange {
                start: key.clone(),
                end: None,
            });
        }
        if range_end <= key {
            return None;
        }
        Some(KeyRange {
            start: key.clone(),
            end: Some(range_end.clone()),
        })
    }

    /// Every key.
    pub fn all() -> KeyRange {
        KeyRange {
            start: Bytes::new(),
            end: None,
        }
    }

    pub fn contains(&self, k: &[u8]) -> bool {
        k >= self.start.as_ref() && self.end.as_ref().is_none_or(|e| k < e.as_ref())
    }

    /// True when the interval holds exactly one key.
    pub fn is_single_key(&self) -> bool {
        match &self.end {
            Some(e) => {
                e.len() == self.start.len() + 1 && e.starts_with(&self.start) && e[e.len() - 1] == 0
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_matches_etcd() {
        assert_eq!(prefix_end(b"abc"), Bytes::from_static(b"abd"));
        assert_eq!(prefix_end(b"a\xff"), Bytes::from_static(b"b"));
        assert_eq!(prefix_end(b"\xff\xff"), Bytes::from_static(b"\0"));
        assert_eq!(prefix_end(b""), Bytes::from_static(b"\0"));
    }

    #[test]
    fn key_range_forms() {
        let k = Bytes::from_static(b"foo");
        let single = KeyRange::from_etcd(&k, &Bytes::new()).unwrap();
        assert!(single.is_single_key());
        assert!(single.contains(b"foo") && !single.contains(b"foo\0") && !single.contains(b"fo"));
        let all = KeyRange::from_etcd(&k, &Bytes::from_static(b"\0")).unwrap();
        assert!(all.contains(b"zzz") && !all.contains(b"a"));
        assert!(KeyRange::from_etcd(&k, &Bytes::from_static(b"a")).is_none());
        let r = KeyRange::from_etcd(&k, &Bytes::from_static(b"fop")).unwrap();
        assert!(r.contains(b"foo1") && !r.contains(b"fop"));
    }
}
