//! `Transfer-Encoding: chunked` request bodies (Go, Node and Java clients send them when they
//! do not know the length up front). Chunk-size lines are parsed by
//! [`httparse::parse_chunk_size`] and trailers by [`httparse::parse_headers`]; this module
//! only walks the chunks, bounds the decoded size, and copies the data out once the body is
//! complete.

/// How far a chunked body has been checked, kept between reads so each byte is walked once.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Scan {
    /// Offset (from the start of the body) of the next chunk-size line.
    pos: usize,
    /// Data bytes in the chunks before `pos`.
    decoded: usize,
}

/// Where a chunked body stands.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Chunked {
    /// More bytes are needed.
    Partial,
    /// The body (last chunk and trailers included) ends at this offset.
    Complete(usize),
    /// Unacceptable: answer with this status and message, then close.
    Invalid(u16, &'static str),
}

/// Most trailer fields accepted after the last chunk.
const MAX_TRAILERS: usize = 16;

/// Continues checking `body` (the bytes after the request head) from `scan`; the decoded size
/// may not exceed `limit`.
pub(super) fn scan(body: &[u8], scan: &mut Scan, limit: usize) -> Chunked {
    loop {
        let rest = &body[scan.pos..];
        let (line, size) = match httparse::parse_chunk_size(rest) {
            Ok(httparse::Status::Complete(pair)) => pair,
            Ok(httparse::Status::Partial) => return Chunked::Partial,
            Err(_) => return Chunked::Invalid(400, "invalid chunk size in a chunked body"),
        };
        if size == 0 {
            let mut trailers = [httparse::EMPTY_HEADER; MAX_TRAILERS];
            return match httparse::parse_headers(&rest[line..], &mut trailers) {
                Ok(httparse::Status::Complete((len, _))) => Chunked::Complete(scan.pos + line + len),
                Ok(httparse::Status::Partial) => Chunked::Partial,
                Err(_) => Chunked::Invalid(400, "invalid trailer in a chunked body"),
            };
        }
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        if size > limit.saturating_sub(scan.decoded) {
            return Chunked::Invalid(413, "request body too large");
        }
        let data_end = line + size;
        let Some(crlf) = rest.get(data_end..data_end + 2) else {
            return Chunked::Partial;
        };
        if crlf != b"\r\n" {
            return Chunked::Invalid(400, "chunk data not followed by CRLF");
        }
        scan.decoded += size;
        scan.pos += data_end + 2;
    }
}

/// The data of a complete chunked body of `end` bytes, as [`scan`] found it.
pub(super) fn decode(body: &[u8], end: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < end {
        let Ok(httparse::Status::Complete((line, size))) = httparse::parse_chunk_size(&body[pos..end]) else {
            break;
        };
        if size == 0 {
            break;
        }
        let start = pos + line;
        let stop = start + size as usize;
        out.extend_from_slice(&body[start..stop]);
        pos = stop + 2;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(body: &[u8], limit: usize) -> Result<Vec<u8>, Chunked> {
        match scan(body, &mut Scan::default(), limit) {
            Chunked::Complete(end) => Ok(decode(body, end)),
            other => Err(other),
        }
    }

    #[test]
    fn decodes_chunks_extensions_and_trailers() {
        assert_eq!(whole(b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\n\r\n", 100), Ok(b"Wikipedia".to_vec()));
        assert_eq!(whole(b"A\r\n0123456789\r\n0\r\nX-Sum: 1\r\n\r\n", 100), Ok(b"0123456789".to_vec()));
        assert_eq!(whole(b"0\r\n\r\n", 100), Ok(Vec::new()));
        let body = b"3\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1\r\n";
        assert_eq!(scan(body, &mut Scan::default(), 100), Chunked::Complete(13), "stops at its own end");
    }

    #[test]
    fn resumes_across_reads() {
        let body = b"4\r\nWiki\r\n5\r\npedia\r\n0\r\n\r\n";
        let mut state = Scan::default();
        for cut in 0..body.len() {
            let got = scan(&body[..cut], &mut state, 100);
            assert_eq!(got, Chunked::Partial, "cut at {cut}");
        }
        assert_eq!(scan(body, &mut state, 100), Chunked::Complete(body.len()));
        assert_eq!(decode(body, body.len()), b"Wikipedia");
    }

    #[test]
    fn bounds_and_errors() {
        assert_eq!(
            whole(b"5\r\nhello\r\n0\r\n\r\n", 4),
            Err(Chunked::Invalid(413, "request body too large"))
        );
        assert!(matches!(whole(b"3\r\nab\r\n0\r\n\r\n", 100), Err(Chunked::Invalid(400, _))));
        assert!(matches!(whole(b"zz\r\n", 100), Err(Chunked::Invalid(400, _))));
        assert!(matches!(whole(b"3\r\nabcX\r\n", 100), Err(Chunked::Invalid(400, _))));
        assert!(matches!(whole(b"ffffffffffffffff\r\n", 100), Err(Chunked::Invalid(413, _))));
        assert!(matches!(whole(b"fffffffffffffffff\r\n", 100), Err(Chunked::Invalid(400, _))));
    }
}
