//! Writing a fresh bbolt file: the layout `bbolt compact` would give, with every page full.

use super::format::*;

/// A top-level bucket to write: its name and its keys with their values.
pub type BucketData = (Vec<u8>, Vec<(Vec<u8>, Vec<u8>)>);

/// One leaf element to write.
struct Item<'x> {
    flags: u32,
    key: &'x [u8],
    value: &'x [u8],
}

struct Writer {
    out: Vec<u8>,
    page_size: usize,
    /// The next free page id (the high-water mark).
    next: u64,
}

fn len_u32(n: usize, what: &str) -> u32 {
    u32::try_from(n).unwrap_or_else(|_| panic!("{what} of {n} bytes does not fit a bbolt file"))
}

impl Writer {
    /// `n` consecutive new pages, zeroed; returns the first id.
    fn alloc(&mut self, n: usize) -> (u64, usize) {
        let id = self.next;
        self.next += n as u64;
        let start = self.out.len();
        self.out.resize(start + n * self.page_size, 0);
        (id, start)
    }

    /// A page (with overflow pages if it needs them) whose header says `flags` and `count` and
    /// whose body is `body_len` bytes; `fill` writes the body. Returns the page id.
    fn page(
        &mut self,
        flags: u16,
        count: usize,
        body_len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> u64 {
        let size = PAGE_HEADER_SIZE + body_len;
        let pages = size.div_ceil(self.page_size).max(1);
        let (id, start) = self.alloc(pages);
        let buf = &mut self.out[start..start + pages * self.page_size];
        put_u64(buf, 0, id);
        put_u16(buf, 8, flags);
        put_u16(
            buf,
            10,
            u16::try_from(count).expect("element count fits u16"),
        );
        put_u32(buf, 12, len_u32(pages - 1, "overflow"));
        fill(&mut buf[PAGE_HEADER_SIZE..]);
        id
    }

    fn leaf(&mut self, items: &[Item<'_>]) -> u64 {
        self.page(FLAG_LEAF, items.len(), leaf_body_len(items), |body| {
            fill_leaf(body, items)
        })
    }

    fn branch(&mut self, children: &[(&[u8], u64)]) -> u64 {
        let heads = children.len() * ELEMENT_SIZE;
        let data: usize = children.iter().map(|(k, _)| k.len()).sum();
        self.page(FLAG_BRANCH, children.len(), heads + data, |body| {
            let mut pos = heads;
            for (n, (key, child)) in children.iter().enumerate() {
                let at = n * ELEMENT_SIZE;
                put_u32(body, at, len_u32(pos - at, "a page"));
                put_u32(body, at + 4, len_u32(key.len(), "a key"));
                put_u64(body, at + 8, *child);
                body[pos..pos + key.len()].copy_from_slice(key);
                pos += key.len();
            }
        })
    }

    /// Splits `sizes` (the bytes each element takes, its header included) into runs that fill
    /// a page each; an element larger than a page gets a page (and overflow pages) of its own.
    fn runs(&self, sizes: impl Iterator<Item = usize>) -> Vec<std::ops::Range<usize>> {
        let mut runs = Vec::new();
        let (mut start, mut used) = (0, PAGE_HEADER_SIZE);
        let mut n = 0;
        for size in sizes {
            let count = n - start;
            if count > 0 && (used + size > self.page_size || count >= usize::from(u16::MAX) - 1) {
                runs.push(start..n);
                start = n;
                used = PAGE_HEADER_SIZE;
            }
            used += size;
            n += 1;
        }
        runs.push(start..n);
        runs
    }

    /// Writes a tree of `items` (sorted, distinct keys): leaf pages, then branch pages above
    /// them up to a single root. Returns the root page id.
    fn tree(&mut self, items: &[Item<'_>]) -> u64 {
        let runs = self.runs(
            items
                .iter()
                .map(|i| ELEMENT_SIZE + i.key.len() + i.value.len()),
        );
        let mut level: Vec<(&[u8], u64)> = runs
            .into_iter()
            .map(|r| {
                let first: &[u8] = items.get(r.start).map_or(&[], |i| i.key);
                (first, self.leaf(&items[r]))
            })
            .collect();
        while level.len() > 1 {
            let runs = self.runs(level.iter().map(|(k, _)| ELEMENT_SIZE + k.len()));
            level = runs
                .into_iter()
                .map(|r| (level[r.start].0, self.branch(&level[r])))
                .collect();
        }
        level[0].1
    }
}

/// The bytes a leaf page of `items` takes after its header.
fn leaf_body_len(items: &[Item<'_>]) -> usize {
    let data: usize = items.iter().map(|i| i.key.len() + i.value.len()).sum();
    items.len() * ELEMENT_SIZE + data
}

/// Writes the elements of a leaf page, then their keys and values, into `body` (the page after
/// its header).
fn fill_leaf(body: &mut [u8], items: &[Item<'_>]) {
    let mut pos = items.len() * ELEMENT_SIZE;
    for (n, item) in items.iter().enumerate() {
        let at = n * ELEMENT_SIZE;
        put_u32(body, at, item.flags);
        put_u32(body, at + 4, len_u32(pos - at, "a page"));
        put_u32(body, at + 8, len_u32(item.key.len(), "a key"));
        put_u32(body, at + 12, len_u32(item.value.len(), "a value"));
        body[pos..pos + item.key.len()].copy_from_slice(item.key);
        pos += item.key.len();
        body[pos..pos + item.value.len()].copy_from_slice(item.value);
        pos += item.value.len();
    }
}

/// Sorts by key and keeps the last of equal keys.
fn sorted<T>(entries: &[(Vec<u8>, T)]) -> Vec<&(Vec<u8>, T)> {
    let mut v: Vec<&(Vec<u8>, T)> = entries.iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out: Vec<&(Vec<u8>, T)> = Vec::with_capacity(v.len());
    for e in v {
        match out.last_mut() {
            Some(last) if last.0 == e.0 => *last = e,
            _ => out.push(e),
        }
    }
    out
}

/// How [`write_with`] lays a file out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteOptions {
    /// Bytes a page; etcd's files use the machine's page size, 4096.
    pub page_size: usize,
    /// Stores a small bucket inside its entry in the root bucket, as bbolt itself does: when its
    /// one leaf page (header included) takes at most a quarter of a page. Otherwise every bucket
    /// has a root page of its own.
    pub inline_buckets: bool,
}

/// A complete bbolt file holding `buckets` (top-level buckets, none nested), with pages of
/// `page_size` bytes and every bucket on pages of its own: [`write_with`] without inline
/// buckets.
pub fn write(buckets: &[BucketData], page_size: usize) -> Vec<u8> {
    write_with(
        buckets,
        WriteOptions {
            page_size,
            inline_buckets: false,
        },
    )
}

/// A complete bbolt file holding `buckets` (top-level buckets, none nested): meta pages 0 and 1
/// (transaction ids 0 and 1, the same root), an empty freelist on page 2, then each bucket's
/// tree (leaf pages filled to the page size, branch pages above them, overflow pages for
/// elements larger than a page) unless it is stored inline, then the root bucket's tree. Keys
/// and bucket names are sorted; of equal ones the last given wins. Bucket sequences are 0.
///
/// Panics if the page size is below [`MIN_PAGE_SIZE`] or above 16 MiB, or if a key or value is
/// 4 GiB or larger.
pub fn write_with(buckets: &[BucketData], options: WriteOptions) -> Vec<u8> {
    let page_size = options.page_size;
    assert!(
        (MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size),
        "page size {page_size} out of range"
    );
    let mut w = Writer {
        out: Vec::new(),
        page_size,
        next: 0,
    };
    w.alloc(3);
    let buckets = sorted(buckets);
    let mut headers: Vec<Vec<u8>> = Vec::with_capacity(buckets.len());
    for (_, entries) in &buckets {
        let entries = sorted(entries);
        let items: Vec<Item<'_>> = entries
            .iter()
            .map(|(k, v)| Item {
                flags: 0,
                key: k,
                value: v,
            })
            .collect();
        let inline_len = PAGE_HEADER_SIZE + leaf_body_len(&items);
        let mut header = vec![0u8; BUCKET_HEADER_SIZE];
        if options.inline_buckets && inline_len <= page_size / 4 {
            // Root 0 and sequence 0, then the bucket's one leaf page (page id 0).
            header.resize(BUCKET_HEADER_SIZE + inline_len, 0);
            let page = &mut header[BUCKET_HEADER_SIZE..];
            put_u16(page, 8, FLAG_LEAF);
            put_u16(
                page,
                10,
                u16::try_from(items.len()).expect("fits a quarter page"),
            );
            fill_leaf(&mut page[PAGE_HEADER_SIZE..], &items);
        } else {
            put_u64(&mut header, 0, w.tree(&items));
        }
        headers.push(header);
    }
    let items: Vec<Item<'_>> = buckets
        .iter()
        .zip(&headers)
        .map(|((name, _), header)| Item {
            flags: LEAF_BUCKET,
            key: name,
            value: header,
        })
        .collect();
    let root = w.tree(&items);

    // The freelist page: no free pages.
    let ps = page_size;
    put_u64(&mut w.out, 2 * ps, 2);
    put_u16(&mut w.out, 2 * ps + 8, FLAG_FREELIST);

    for txid in 0..2u64 {
        let p = txid as usize * ps;
        put_u64(&mut w.out, p, txid);
        put_u16(&mut w.out, p + 8, FLAG_META);
        let m = p + PAGE_HEADER_SIZE;
        put_u32(&mut w.out, m, MAGIC);
        put_u32(&mut w.out, m + 4, VERSION);
        put_u32(&mut w.out, m + 8, len_u32(page_size, "a page"));
        put_u32(&mut w.out, m + 12, 0);
        put_u64(&mut w.out, m + 16, root);
        put_u64(&mut w.out, m + 24, 0);
        put_u64(&mut w.out, m + 32, 2);
        put_u64(&mut w.out, m + 40, w.next);
        put_u64(&mut w.out, m + 48, txid);
        let sum = fnv1a64(&w.out[m..m + META_SUMMED]);
        put_u64(&mut w.out, m + 56, sum);
    }
    w.out
}
