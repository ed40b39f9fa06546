//! Makes one etcd client habit acceptable to our HTTP/2 server: gRPC-Go, dialed with a member's
//! client URL as its target (what `etcdctl endpoint status --cluster`, `endpoint health
//! --cluster` and clients that sync endpoints from MemberList do), sends the whole URL, scheme
//! included, as the `:authority` pseudo-header. etcd's Go server ignores it; the `h2` crate
//! rejects such a stream as malformed before any handler runs.
//!
//! So the bytes a client sends pass through [`AuthorityFix`] first. It parses HTTP/2 frames
//! until the first request's header block: if its `:authority` is a plain `host:port`, every
//! later byte passes untouched (the normal case, costing one look at the connection's first
//! frames). If it carries a scheme, `http://` is overwritten in place with an equally long
//! user-info prefix (`xxxxxx@host:port`, a valid authority) in this and every later header
//! block of the connection. Keeping the decoded length keeps HPACK's dynamic table, which
//! counts entry sizes on both ends, identical for client and server.

/// The HTTP/2 client connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// HTTP/2's default SETTINGS_MAX_FRAME_SIZE, which our server keeps.
const MAX_FRAME: usize = 16_384;
/// Frames looked at before giving up on finding a first request (then everything passes).
const MAX_INSPECTED: u32 = 16;
/// HPACK's static table index of `:authority`.
const AUTHORITY_INDEX: u64 = 1;

/// Where the filter is in the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Reading frames, rewriting header blocks' `:authority` when it is a URL.
    Inspect { rewriting: bool },
    /// The connection's authority is fine: nothing more to look at.
    Pass,
}

impl crate::runtime::io::ReadFilter for AuthorityFix {
    fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        AuthorityFix::feed(self, input, out)
    }

    fn done(&self) -> bool {
        AuthorityFix::done(self)
    }
}

/// A read-side filter over one HTTP/2 connection's client bytes.
#[derive(Debug)]
pub struct AuthorityFix {
    mode: Mode,
    /// Frames seen while no request has decided the mode yet.
    inspected: u32,
    preface_left: usize,
    /// Bytes of an incomplete frame.
    partial: Vec<u8>,
}

impl Default for AuthorityFix {
    fn default() -> Self {
        AuthorityFix {
            mode: Mode::Inspect { rewriting: false },
            inspected: 0,
            preface_left: PREFACE.len(),
            partial: Vec::new(),
        }
    }
}

impl AuthorityFix {
    /// Whether everything from now on passes untouched.
    pub fn done(&self) -> bool {
        self.mode == Mode::Pass && self.partial.is_empty()
    }

    /// Feeds bytes read from the client and appends what the server should read to `out`.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        if self.preface_left > 0 {
            let n = self.preface_left.min(input.len());
            out.extend_from_slice(&input[..n]);
            self.preface_left -= n;
            input = &input[n..];
        }
        if self.mode == Mode::Pass && self.partial.is_empty() {
            out.extend_from_slice(input);
            return;
        }
        self.partial.extend_from_slice(input);
        let mut at = 0;
        while self.partial.len() - at >= FRAME_HEADER {
            if self.mode == Mode::Pass {
                break;
            }
            let h = &self.partial[at..];
            let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
            if len > MAX_FRAME {
                // Larger than HTTP/2's default frame limit: not ours to buffer; the server
                // will refuse it.
                self.mode = Mode::Pass;
                break;
            }
            if h.len() < FRAME_HEADER + len {
                break;
            }
            let frame = &self.partial[at..at + FRAME_HEADER + len];
            filter_frame(&mut self.mode, frame, out);
            at += FRAME_HEADER + len;
            self.inspected += 1;
            if self.mode == (Mode::Inspect { rewriting: false }) && self.inspected >= MAX_INSPECTED
            {
                self.mode = Mode::Pass;
            }
        }
        if self.mode == Mode::Pass {
            out.extend_from_slice(&self.partial[at..]);
            self.partial.clear();
        } else {
            self.partial.drain(..at);
        }
    }
}

/// Passes one whole frame on, rewriting a header block's `:authority` when it is a URL.
fn filter_frame(mode: &mut Mode, frame: &[u8], out: &mut Vec<u8>) {
    let (kind, flags) = (frame[3], frame[4]);
    let Mode::Inspect { rewriting } = *mode else {
        out.extend_from_slice(frame);
        return;
    };
    // A header block split over CONTINUATION frames is left alone (gRPC's are small).
    if kind != HEADERS || flags & END_HEADERS == 0 {
        out.extend_from_slice(frame);
        return;
    }
    let payload = &frame[FRAME_HEADER..];
    let mut start = 0;
    let mut end = payload.len();
    if flags & PADDED != 0 {
        let Some(&pad) = payload.first() else {
            out.extend_from_slice(frame);
            return;
        };
        start = 1;
        end = end.saturating_sub(usize::from(pad));
    }
    let priority = if flags & PRIORITY != 0 { 5 } else { 0 };
    if start + priority > end {
        // Malformed: the server will say so.
        out.extend_from_slice(frame);
        return;
    }
    let block = &payload[start + priority..end];
    match rewrite_block(block) {
        // Re-framed, the block must still fit the frame size limit.
        Some((_, fixed)) if 5 + fixed.len() > MAX_FRAME => out.extend_from_slice(frame),
        Some((authority_is_url, fixed)) => {
            if !rewriting && !authority_is_url {
                *mode = Mode::Pass;
                out.extend_from_slice(frame);
                return;
            }
            *mode = Mode::Inspect { rewriting: true };
            // Re-frame without padding: same stream, same flags otherwise.
            let body_len = priority + fixed.len();
            out.extend_from_slice(&[
                (body_len >> 16) as u8,
                (body_len >> 8) as u8,
                body_len as u8,
                kind,
                flags & !PADDED,
            ]);
            out.extend_from_slice(&frame[5..FRAME_HEADER]);
            out.extend_from_slice(&payload[start..start + priority]);
            out.extend_from_slice(&fixed);
        }
        None => {
            // The first request carries no authority literal we can read: nothing to fix on
            // this connection.
            if !rewriting {
                *mode = Mode::Pass;
            }
            out.extend_from_slice(frame)
        }
    }
}

/// Reads an HPACK integer with an `n`-bit prefix at `*at`.
fn read_int(b: &[u8], at: &mut usize, n: u32) -> Option<u64> {
    let mask = (1u16 << n) as u8 - 1;
    let mut v = u64::from(*b.get(*at)? & mask);
    *at += 1;
    if v < u64::from(mask) {
        return Some(v);
    }
    let mut shift = 0;
    loop {
        let byte = *b.get(*at)?;
        *at += 1;
        v = v.checked_add(u64::from(byte & 0x7f).checked_shl(shift)?)?;
        if byte & 0x80 == 0 {
            return Some(v);
        }
        shift += 7;
        if shift > 56 {
            return None;
        }
    }
}

fn write_int(out: &mut Vec<u8>, first: u8, n: u32, v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    let mut rest = v - max;
    while rest >= 0x80 {
        out.push((rest & 0x7f) as u8 | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// Reads an HPACK string at `*at`: (decoded bytes).
fn read_string(b: &[u8], at: &mut usize) -> Option<Vec<u8>> {
    let huffman = *b.get(*at)? & 0x80 != 0;
    let len = usize::try_from(read_int(b, at, 7)?).ok()?;
    let raw = b.get(*at..at.checked_add(len)?)?;
    *at += len;
    if !huffman {
        return Some(raw.to_vec());
    }
    let mut out = Vec::with_capacity(len * 2);
    httlib_huffman::decode(raw, &mut out, httlib_huffman::DecoderSpeed::FourBits).ok()?;
    Some(out)
}

/// `http://host:port` → `xxxxxx@host:port` (same length; `None` if not a URL).
fn as_authority(value: &[u8]) -> Option<Vec<u8>> {
    let scheme_end = value.windows(3).position(|w| w == b"://")? + 3;
    if value[scheme_end..].contains(&b'@') {
        return None;
    }
    let mut v = vec![b'x'; scheme_end];
    v[scheme_end - 1] = b'@';
    v.extend_from_slice(&value[scheme_end..]);
    Some(v)
}

/// Walks a header block; returns whether its `:authority` was a URL and the block with every
/// such value replaced. `None` when the block has no `:authority` literal or cannot be parsed.
fn rewrite_block(b: &[u8]) -> Option<(bool, Vec<u8>)> {
    let mut out = Vec::with_capacity(b.len() + 8);
    let mut at = 0;
    let mut seen = None;
    while at < b.len() {
        let first = b[at];
        let begin = at;
        let prefix = match first {
            f if f & 0x80 != 0 => {
                read_int(b, &mut at, 7)?;
                out.extend_from_slice(&b[begin..at]);
                continue;
            }
            f if f & 0xe0 == 0x20 => {
                read_int(b, &mut at, 5)?;
                out.extend_from_slice(&b[begin..at]);
                continue;
            }
            f if f & 0xc0 == 0x40 => 6,
            _ => 4,
        };
        let index = read_int(b, &mut at, prefix)?;
        let is_authority = if index == 0 {
            read_string(b, &mut at)? == b":authority"
        } else {
            index == AUTHORITY_INDEX
        };
        let name_end = at;
        let value_start = at;
        let value = read_string(b, &mut at)?;
        match is_authority.then(|| as_authority(&value)) {
            Some(fixed) => {
                seen = Some(seen.unwrap_or(false) || fixed.is_some());
                out.extend_from_slice(&b[begin..name_end]);
                match fixed {
                    Some(v) => {
                        write_int(&mut out, 0, 7, v.len());
                        out.extend_from_slice(&v);
                    }
                    None => out.extend_from_slice(&b[value_start..at]),
                }
            }
            None => out.extend_from_slice(&b[begin..at]),
        }
    }
    seen.map(|url| (url, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(out: &mut Vec<u8>, s: &[u8], huffman: bool) {
        if huffman {
            let mut h = Vec::new();
            httlib_huffman::encode(s, &mut h).unwrap();
            write_int(out, 0x80, 7, h.len());
            out.extend_from_slice(&h);
        } else {
            write_int(out, 0, 7, s.len());
            out.extend_from_slice(s);
        }
    }

    /// A header block as gRPC-Go sends it: `:method POST` (indexed), `:authority` as a literal
    /// with incremental indexing, `:path` with a literal name.
    fn block(authority: &[u8], huffman: bool) -> Vec<u8> {
        let mut b = vec![0x83];
        write_int(&mut b, 0x40, 6, 1);
        string(&mut b, authority, huffman);
        b.push(0x00);
        string(&mut b, b":path", false);
        string(&mut b, b"/etcdserverpb.Maintenance/Status", huffman);
        b
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let n = payload.len();
        let mut f = vec![(n >> 16) as u8, (n >> 8) as u8, n as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// The `:authority` values the filtered stream's header blocks carry.
    fn authorities(mut bytes: &[u8]) -> Vec<Vec<u8>> {
        bytes = &bytes[PREFACE.len()..];
        let mut out = Vec::new();
        while bytes.len() >= FRAME_HEADER {
            let len = (usize::from(bytes[1]) << 8) | usize::from(bytes[2]);
            let (kind, payload) = (bytes[3], &bytes[FRAME_HEADER..FRAME_HEADER + len]);
            if kind == HEADERS {
                let mut at = 1;
                read_int(payload, &mut at, 6).unwrap();
                out.push(read_string(payload, &mut at).unwrap());
            }
            bytes = &bytes[FRAME_HEADER + len..];
        }
        out
    }

    fn run(input: &[u8], chunk: usize) -> (Vec<u8>, bool) {
        let mut fix = AuthorityFix::default();
        let mut out = Vec::new();
        for c in input.chunks(chunk) {
            fix.feed(c, &mut out);
        }
        (out, fix.done())
    }

    #[test]
    fn urls_become_authorities_and_plain_authorities_pass_untouched() {
        for huffman in [false, true] {
            let mut stream = PREFACE.to_vec();
            stream.extend(frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]));
            stream.extend(frame(
                HEADERS,
                END_HEADERS,
                1,
                &block(b"http://127.0.0.1:2379", huffman),
            ));
            stream.extend(frame(0x0, 0x1, 1, b"\0\0\0\0\0"));
            stream.extend(frame(HEADERS, END_HEADERS | PADDED, 3, &{
                let mut p = vec![3];
                p.extend(block(b"https://127.0.0.1:2379", huffman));
                p.extend([0, 0, 0]);
                p
            }));
            for chunk in [1, 7, 4096] {
                let (out, done) = run(&stream, chunk);
                assert!(!done);
                assert_eq!(
                    authorities(&out),
                    vec![
                        b"xxxxxx@127.0.0.1:2379".to_vec(),
                        b"xxxxxxx@127.0.0.1:2379".to_vec()
                    ]
                );
                for a in authorities(&out) {
                    let s = String::from_utf8(a).unwrap();
                    assert!(s.parse::<http::uri::Authority>().is_ok(), "{s}");
                }
            }

            let mut plain = PREFACE.to_vec();
            plain.extend(frame(
                HEADERS,
                END_HEADERS,
                1,
                &block(b"127.0.0.1:2379", huffman),
            ));
            plain.extend(frame(
                HEADERS,
                END_HEADERS,
                3,
                &block(b"http://later:1", huffman),
            ));
            for chunk in [1, 5, 4096] {
                let (out, done) = run(&plain, chunk);
                assert_eq!(out, plain, "decided on the first request");
                assert!(done);
            }
        }
    }

    #[test]
    fn big_frames_and_requests_without_an_authority_end_the_inspection() {
        // A frame announcing more than 16 KiB is not buffered: everything passes from there.
        let mut stream = PREFACE.to_vec();
        stream.extend(&frame(0x0, 0, 1, &[])[..FRAME_HEADER]);
        stream[PREFACE.len()] = 0x01; // 65,536 + bytes
        let (out, done) = run(&stream, 4096);
        assert_eq!(out, stream);
        assert!(done);
        // A first request whose authority is indexed (no literal to read) decides too.
        let mut plain = PREFACE.to_vec();
        plain.extend(frame(HEADERS, END_HEADERS, 1, &[0x83, 0x81]));
        plain.extend(frame(
            HEADERS,
            END_HEADERS,
            3,
            &block(b"http://later:1", false),
        ));
        let (out, done) = run(&plain, 7);
        assert_eq!(out, plain);
        assert!(done);
    }

    #[test]
    fn garbage_passes_through_unchanged() {
        let mut stream = PREFACE.to_vec();
        stream.extend(frame(HEADERS, END_HEADERS, 1, &[0x41, 0xff, 0xff]));
        stream.extend(frame(HEADERS, END_HEADERS | PRIORITY, 1, &[1, 2]));
        let (out, _) = run(&stream, 3);
        assert_eq!(out, stream);
    }
}
