//! Reading a bbolt file from a byte slice, every offset and length checked.

use std::fmt;

use super::format::*;

/// Why a file cannot be read. Every variant but the first two names the page and the absolute
/// byte offset in the file where the problem was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("file of {len} bytes is too short to hold a meta page")]
    TooShort { len: usize },
    #[error("no valid meta page (page 0: {first}; page 1: {second})")]
    NoValidMeta {
        first: Box<Error>,
        second: Box<Error>,
    },
    #[error("page {page} (byte {offset}): bad magic {found:#010x}")]
    BadMagic { page: u64, offset: u64, found: u32 },
    #[error("page {page} (byte {offset}): format version {found}, expected {VERSION}")]
    BadVersion { page: u64, offset: u64, found: u32 },
    #[error("page {page} (byte {offset}): meta checksum {found:#018x}, computed {computed:#018x}")]
    BadChecksum {
        page: u64,
        offset: u64,
        found: u64,
        computed: u64,
    },
    #[error("page {page} (byte {offset}): page size {found} is not usable here")]
    BadPageSize { page: u64, offset: u64, found: u64 },
    #[error("page {page} (byte {offset}): {what} runs past the end of its page or of the file")]
    OutOfBounds {
        page: u64,
        offset: u64,
        what: &'static str,
    },
    #[error("page {page} (byte {offset}): flags {flags:#06x}, expected a {expected} page")]
    BadPageType {
        page: u64,
        offset: u64,
        flags: u16,
        expected: &'static str,
    },
    #[error("page {page} (byte {offset}): the page header names page {found}")]
    PageIdMismatch { page: u64, offset: u64, found: u64 },
    #[error("page {page} (byte {offset}): at or beyond the high-water mark {high_water}")]
    BeyondHighWater {
        page: u64,
        offset: u64,
        high_water: u64,
    },
    #[error("page {page} (byte {offset}): key not above the key before it")]
    Unordered { page: u64, offset: u64 },
    #[error("page {page} (byte {offset}): the tree reaches more pages than the file holds")]
    Cycle { page: u64, offset: u64 },
}

impl Error {
    /// The page the problem was found on, if it is about one page.
    pub fn page(&self) -> Option<u64> {
        self.location().map(|(p, _)| p)
    }

    /// The absolute byte offset in the file of the problem, if it is about one page.
    pub fn offset(&self) -> Option<u64> {
        self.location().map(|(_, o)| o)
    }

    fn location(&self) -> Option<(u64, u64)> {
        match *self {
            Error::TooShort { .. } | Error::NoValidMeta { .. } => None,
            Error::BadMagic { page, offset, .. }
            | Error::BadVersion { page, offset, .. }
            | Error::BadChecksum { page, offset, .. }
            | Error::BadPageSize { page, offset, .. }
            | Error::OutOfBounds { page, offset, .. }
            | Error::BadPageType { page, offset, .. }
            | Error::PageIdMismatch { page, offset, .. }
            | Error::BeyondHighWater { page, offset, .. }
            | Error::Unordered { page, offset }
            | Error::Cycle { page, offset } => Some((page, offset)),
        }
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// A meta page's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub page_size: u32,
    pub flags: u32,
    /// The root bucket's root page.
    pub root: u64,
    /// The root bucket's sequence.
    pub sequence: u64,
    /// The freelist page, or `u64::MAX` when the freelist is not stored.
    pub freelist: u64,
    /// The high-water mark: the number of pages in use.
    pub high_water: u64,
    pub txid: u64,
    pub checksum: u64,
}

impl Meta {
    /// Parses and validates the meta on page `page`, which starts at byte `off`.
    fn parse(data: &[u8], page: u64, off: usize) -> Result<Meta, Error> {
        let m = off + PAGE_HEADER_SIZE;
        if data.len() < m + META_SIZE {
            return Err(Error::OutOfBounds {
                page,
                offset: off as u64,
                what: "meta page",
            });
        }
        let at = |field: usize| (m + field) as u64;
        let magic = u32_at(data, m);
        if magic != MAGIC {
            return Err(Error::BadMagic {
                page,
                offset: at(0),
                found: magic,
            });
        }
        let version = u32_at(data, m + 4);
        if version != VERSION {
            return Err(Error::BadVersion {
                page,
                offset: at(4),
                found: version,
            });
        }
        let checksum = u64_at(data, m + 56);
        let computed = fnv1a64(&data[m..m + META_SUMMED]);
        if checksum != computed {
            return Err(Error::BadChecksum {
                page,
                offset: at(56),
                found: checksum,
                computed,
            });
        }
        let page_size = u32_at(data, m + 8);
        if !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&(page_size as usize)) {
            return Err(Error::BadPageSize {
                page,
                offset: at(8),
                found: page_size.into(),
            });
        }
        Ok(Meta {
            page_size,
            flags: u32_at(data, m + 12),
            root: u64_at(data, m + 16),
            sequence: u64_at(data, m + 24),
            freelist: u64_at(data, m + 32),
            high_water: u64_at(data, m + 40),
            txid: u64_at(data, m + 48),
            checksum,
        })
    }
}

/// The file and what every page read needs to know of it.
#[derive(Clone, Copy)]
struct File<'a> {
    data: &'a [u8],
    page_size: usize,
    high_water: u64,
}

impl fmt::Debug for File<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "File({} bytes, page size {}, high water {})",
            self.data.len(),
            self.page_size,
            self.high_water
        )
    }
}

impl<'a> File<'a> {
    /// Page `id` with its overflow pages.
    fn page(&self, id: u64) -> Result<Page<'a>, Error> {
        let offset = id.saturating_mul(self.page_size as u64);
        if id >= self.high_water {
            return Err(Error::BeyondHighWater {
                page: id,
                offset,
                high_water: self.high_water,
            });
        }
        let oob = |what| Error::OutOfBounds {
            page: id,
            offset,
            what,
        };
        let off = usize::try_from(offset).map_err(|_| oob("page header"))?;
        let header = off
            .checked_add(PAGE_HEADER_SIZE)
            .filter(|&end| end <= self.data.len())
            .ok_or_else(|| oob("page header"))?;
        let h = &self.data[off..header];
        let found = u64_at(h, 0);
        if found != id {
            return Err(Error::PageIdMismatch {
                page: id,
                offset,
                found,
            });
        }
        let overflow = u32_at(h, 12) as usize;
        let end = overflow
            .checked_add(1)
            .and_then(|n| n.checked_mul(self.page_size))
            .and_then(|len| off.checked_add(len))
            .filter(|&end| end <= self.data.len())
            .ok_or_else(|| oob("page with its overflow pages"))?;
        Ok(Page {
            id,
            base: off,
            bytes: &self.data[off..end],
            flags: u16_at(h, 8),
            count: u16_at(h, 10) as usize,
        })
    }

    /// Page `id`, which must be a branch or leaf page.
    fn tree_page(&self, id: u64) -> Result<Page<'a>, Error> {
        let p = self.page(id)?;
        if p.flags != FLAG_BRANCH && p.flags != FLAG_LEAF {
            return Err(p.bad_type("branch or leaf"));
        }
        Ok(p)
    }

    /// The absolute offset of `part`, a slice of this file's bytes.
    fn offset_of(&self, part: &[u8]) -> usize {
        (part.as_ptr() as usize).wrapping_sub(self.data.as_ptr() as usize)
    }
}

/// One page (or an inline bucket's page inside a leaf value).
#[derive(Clone, Copy, Debug)]
struct Page<'a> {
    /// The page id; for an inline page, the id of the page holding it.
    id: u64,
    /// Absolute offset of the page's first byte.
    base: usize,
    /// The page and its overflow pages.
    bytes: &'a [u8],
    flags: u16,
    count: usize,
}

struct LeafElement<'a> {
    flags: u32,
    key: &'a [u8],
    value: &'a [u8],
    /// Offset of the element within the page.
    at: usize,
}

impl<'a> Page<'a> {
    fn err_at(&self, at: usize, what: &'static str) -> Error {
        Error::OutOfBounds {
            page: self.id,
            offset: (self.base + at) as u64,
            what,
        }
    }

    fn bad_type(&self, expected: &'static str) -> Error {
        Error::BadPageType {
            page: self.id,
            offset: self.base as u64,
            flags: self.flags,
            expected,
        }
    }

    /// The offset of element `i`, checked to lie within the page.
    fn element(&self, i: usize) -> Result<usize, Error> {
        let at = PAGE_HEADER_SIZE + i * ELEMENT_SIZE;
        if at + ELEMENT_SIZE > self.bytes.len() {
            return Err(self.err_at(at.min(self.bytes.len()), "element"));
        }
        Ok(at)
    }

    /// `len` bytes at `pos` past the element at `at`, checked to lie within the page.
    fn span(&self, at: usize, pos: u32, len: usize, what: &'static str) -> Result<&'a [u8], Error> {
        let start = at.checked_add(pos as usize);
        let end = start.and_then(|s| s.checked_add(len));
        match (start, end) {
            (Some(s), Some(e)) if e <= self.bytes.len() => Ok(&self.bytes[s..e]),
            _ => Err(self.err_at(at, what)),
        }
    }

    fn branch_element(&self, i: usize) -> Result<(&'a [u8], u64), Error> {
        let at = self.element(i)?;
        let b = self.bytes;
        let key = self.span(at, u32_at(b, at), u32_at(b, at + 4) as usize, "branch key")?;
        Ok((key, u64_at(b, at + 8)))
    }

    fn leaf_element(&self, i: usize) -> Result<LeafElement<'a>, Error> {
        let at = self.element(i)?;
        let b = self.bytes;
        let (pos, ksize, vsize) = (u32_at(b, at + 4), u32_at(b, at + 8), u32_at(b, at + 12));
        let kv = self.span(
            at,
            pos,
            ksize as usize + vsize as usize,
            "leaf key and value",
        )?;
        let (key, value) = kv.split_at(ksize as usize);
        Ok(LeafElement {
            flags: u32_at(b, at),
            key,
            value,
            at,
        })
    }
}

/// Where a bucket's tree starts.
#[derive(Clone, Copy, Debug)]
enum Root<'a> {
    Page(u64),
    Inline(Page<'a>),
}

/// A bucket: a tree of keys in key order, each holding a value or a nested bucket.
#[derive(Clone, Copy, Debug)]
pub struct Bucket<'a> {
    file: File<'a>,
    root: Root<'a>,
    sequence: u64,
}

/// What a key in a bucket holds.
#[derive(Clone, Copy, Debug)]
pub enum Value<'a> {
    Data(&'a [u8]),
    /// A nested bucket.
    Bucket(Bucket<'a>),
}

impl<'a> Value<'a> {
    /// The bytes, unless this is a nested bucket.
    pub fn data(&self) -> Option<&'a [u8]> {
        match *self {
            Value::Data(d) => Some(d),
            Value::Bucket(_) => None,
        }
    }

    pub fn is_bucket(&self) -> bool {
        matches!(self, Value::Bucket(_))
    }
}

impl<'a> Bucket<'a> {
    /// The bucket a leaf element's value describes: root page and sequence, and the inline page
    /// after them when the root is 0.
    fn from_value(file: File<'a>, holder: &Page<'a>, value: &'a [u8]) -> Result<Bucket<'a>, Error> {
        let at = file.offset_of(value);
        let oob = |off: usize, what| Error::OutOfBounds {
            page: holder.id,
            offset: off as u64,
            what,
        };
        if value.len() < BUCKET_HEADER_SIZE {
            return Err(oob(at, "bucket header"));
        }
        let root = u64_at(value, 0);
        let sequence = u64_at(value, 8);
        if root != 0 {
            return Ok(Bucket {
                file,
                root: Root::Page(root),
                sequence,
            });
        }
        let bytes = &value[BUCKET_HEADER_SIZE..];
        let base = at + BUCKET_HEADER_SIZE;
        if bytes.len() < PAGE_HEADER_SIZE {
            return Err(oob(base, "inline bucket page"));
        }
        let page = Page {
            id: holder.id,
            base,
            bytes,
            flags: u16_at(bytes, 8),
            count: u16_at(bytes, 10) as usize,
        };
        if page.flags != FLAG_LEAF {
            return Err(page.bad_type("inline leaf"));
        }
        Ok(Bucket {
            file,
            root: Root::Inline(page),
            sequence,
        })
    }

    /// The bucket's root page, or `None` for an inline bucket.
    pub fn root_page(&self) -> Option<u64> {
        match self.root {
            Root::Page(id) => Some(id),
            Root::Inline(_) => None,
        }
    }

    pub fn is_inline(&self) -> bool {
        matches!(self.root, Root::Inline(_))
    }

    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    /// The keys in order, each with what it holds.
    pub fn iter(&self) -> Iter<'a> {
        Iter {
            file: self.file,
            root: Some(self.root),
            stack: Vec::new(),
            budget: self.file.data.len() / self.file.page_size + 2,
            last: None,
            done: false,
        }
    }

    /// What `key` holds, if it is present: a descent from the root through the branch pages
    /// whose keys bracket it.
    pub fn get(&self, key: &[u8]) -> Result<Option<Value<'a>>, Error> {
        let mut page = match self.root {
            Root::Page(id) => self.file.tree_page(id)?,
            Root::Inline(page) => page,
        };
        // A tree deeper than the file has pages has a cycle.
        let mut budget = self.file.data.len() / self.file.page_size + 2;
        while page.flags == FLAG_BRANCH {
            // The last child whose first key is not above `key` (the first child if none is).
            let mut child = None;
            for i in 0..page.count {
                let (k, id) = page.branch_element(i)?;
                if child.is_some() && k > key {
                    break;
                }
                child = Some(id);
            }
            let Some(id) = child else {
                return Ok(None);
            };
            budget -= 1;
            if budget == 0 {
                return Err(Error::Cycle {
                    page: page.id,
                    offset: page.base as u64,
                });
            }
            page = self.file.tree_page(id)?;
        }
        for i in 0..page.count {
            let e = page.leaf_element(i)?;
            match e.key.cmp(key) {
                std::cmp::Ordering::Less => {}
                std::cmp::Ordering::Equal => return value_of(self.file, &page, &e).map(Some),
                std::cmp::Ordering::Greater => break,
            }
        }
        Ok(None)
    }

    /// The nested bucket `name`, if there is one.
    pub fn bucket(&self, name: &[u8]) -> Result<Option<Bucket<'a>>, Error> {
        Ok(match self.get(name)? {
            Some(Value::Bucket(b)) => Some(b),
            _ => None,
        })
    }

    /// The names of the nested buckets, in order.
    pub fn bucket_names(&self) -> Result<Vec<&'a [u8]>, Error> {
        let mut names = Vec::new();
        for entry in self.iter() {
            let (k, v) = entry?;
            if v.is_bucket() {
                names.push(k);
            }
        }
        Ok(names)
    }
}

/// What a leaf element holds.
fn value_of<'a>(file: File<'a>, page: &Page<'a>, e: &LeafElement<'a>) -> Result<Value<'a>, Error> {
    Ok(if e.flags & LEAF_BUCKET != 0 {
        Value::Bucket(Bucket::from_value(file, page, e.value)?)
    } else {
        Value::Data(e.value)
    })
}

/// The keys of a bucket in order, from [`Bucket::iter`]. After an error it ends.
pub struct Iter<'a> {
    file: File<'a>,
    /// The root, until the first step loads it.
    root: Option<Root<'a>>,
    /// The pages from the root down to the current leaf, each with its next element.
    stack: Vec<(Page<'a>, usize)>,
    /// Pages this walk may still enter: a tree reaching more pages than the file holds has a
    /// cycle.
    budget: usize,
    last: Option<&'a [u8]>,
    done: bool,
}

impl<'a> Iter<'a> {
    fn push(&mut self, page: Page<'a>) -> Result<(), Error> {
        if self.budget == 0 {
            return Err(Error::Cycle {
                page: page.id,
                offset: page.base as u64,
            });
        }
        self.budget -= 1;
        self.stack.push((page, 0));
        Ok(())
    }

    fn step(&mut self) -> Result<Option<(&'a [u8], Value<'a>)>, Error> {
        if let Some(root) = self.root.take() {
            let page = match root {
                Root::Page(id) => self.file.tree_page(id)?,
                Root::Inline(page) => page,
            };
            self.push(page)?;
        }
        loop {
            let Some((page, next)) = self.stack.last_mut() else {
                return Ok(None);
            };
            let page = *page;
            if *next >= page.count {
                self.stack.pop();
                continue;
            }
            let i = *next;
            *next += 1;
            if page.flags == FLAG_BRANCH {
                let (_, child) = page.branch_element(i)?;
                let child = self.file.tree_page(child)?;
                self.push(child)?;
                continue;
            }
            let e = page.leaf_element(i)?;
            if self.last.is_some_and(|last| e.key <= last) {
                return Err(Error::Unordered {
                    page: page.id,
                    offset: (page.base + e.at) as u64,
                });
            }
            self.last = Some(e.key);
            return Ok(Some((e.key, value_of(self.file, &page, &e)?)));
        }
    }
}

impl<'a> Iterator for Iter<'a> {
    type Item = Result<(&'a [u8], Value<'a>), Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.step() {
            Ok(Some(entry)) => Some(Ok(entry)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// An open bbolt file: its current meta and, through it, the root bucket.
#[derive(Clone, Copy, Debug)]
pub struct Db<'a> {
    file: File<'a>,
    meta: Meta,
    meta_page: u64,
}

impl<'a> Db<'a> {
    /// Validates both meta pages (magic, version, checksum, page size) and takes the valid one
    /// with the higher transaction id. Pages are read, and checked, as they are reached.
    pub fn open(data: &'a [u8]) -> Result<Db<'a>, Error> {
        if data.len() < PAGE_HEADER_SIZE + META_SIZE {
            return Err(Error::TooShort { len: data.len() });
        }
        let first = Meta::parse(data, 0, 0);
        // Meta 1 sits one page in; without a valid meta 0 the page size is a guess, confirmed by
        // the meta found there naming that page size.
        let sizes: Vec<usize> = match &first {
            Ok(m) => vec![m.page_size as usize],
            Err(_) => {
                let claimed = u32_at(data, PAGE_HEADER_SIZE + 8) as usize;
                std::iter::once(claimed)
                    .chain((7..=16).map(|s| 1usize << s))
                    .filter(|s| (MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(s))
                    .collect()
            }
        };
        let mut second = Err(Error::TooShort { len: data.len() });
        for (n, &size) in sizes.iter().enumerate() {
            let found = Meta::parse(data, 1, size).and_then(|m| {
                if m.page_size as usize == size {
                    Ok(m)
                } else {
                    Err(Error::BadPageSize {
                        page: 1,
                        offset: (size + PAGE_HEADER_SIZE + 8) as u64,
                        found: m.page_size.into(),
                    })
                }
            });
            if found.is_ok() || n == 0 {
                second = found;
            }
            if second.is_ok() {
                break;
            }
        }
        let (meta, meta_page) = match (first, second) {
            (Ok(a), Ok(b)) if b.txid > a.txid => (b, 1),
            (Ok(a), _) => (a, 0),
            (Err(_), Ok(b)) => (b, 1),
            (Err(a), Err(b)) => {
                return Err(Error::NoValidMeta {
                    first: Box::new(a),
                    second: Box::new(b),
                })
            }
        };
        Ok(Db {
            file: File {
                data,
                page_size: meta.page_size as usize,
                high_water: meta.high_water,
            },
            meta,
            meta_page,
        })
    }

    /// The current meta.
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// Which meta page (0 or 1) is current.
    pub fn meta_page(&self) -> u64 {
        self.meta_page
    }

    pub fn page_size(&self) -> usize {
        self.file.page_size
    }

    /// The root bucket, whose keys are the top-level buckets.
    pub fn root(&self) -> Bucket<'a> {
        Bucket {
            file: self.file,
            root: Root::Page(self.meta.root),
            sequence: self.meta.sequence,
        }
    }

    /// The names of the top-level buckets, in order.
    pub fn buckets(&self) -> Result<Vec<&'a [u8]>, Error> {
        self.root().bucket_names()
    }

    /// The top-level bucket `name`, if there is one.
    pub fn bucket(&self, name: &[u8]) -> Result<Option<Bucket<'a>>, Error> {
        self.root().bucket(name)
    }

    /// The free page ids the freelist page lists (none when the file stores no freelist).
    pub fn freelist(&self) -> Result<Vec<u64>, Error> {
        if self.meta.freelist == NO_FREELIST {
            return Ok(Vec::new());
        }
        let page = self.file.page(self.meta.freelist)?;
        if page.flags != FLAG_FREELIST {
            return Err(page.bad_type("freelist"));
        }
        let (mut count, mut start) = (page.count as u64, PAGE_HEADER_SIZE);
        if page.count == usize::from(FREELIST_COUNT_OVERFLOW) {
            if page.bytes.len() < PAGE_HEADER_SIZE + 8 {
                return Err(page.err_at(PAGE_HEADER_SIZE, "freelist count"));
            }
            count = u64_at(page.bytes, PAGE_HEADER_SIZE);
            start += 8;
        }
        let end = usize::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(8))
            .and_then(|len| len.checked_add(start))
            .filter(|&end| end <= page.bytes.len())
            .ok_or_else(|| page.err_at(start, "freelist ids"))?;
        Ok(page.bytes[start..end]
            .chunks_exact(8)
            .map(|c| u64_at(c, 0))
            .collect())
    }
}
