//! Message framing: the one place where bytes from the wire become message boundaries.
//!
//! Every length is checked here before anything is allocated for the message it announces:
//! a regular message is a type byte plus an `i32` length that counts itself (so at least 4),
//! and a startup-phase packet is an `i32` length (at least 8) plus a code. Both are capped.

use thiserror::Error;

/// Type byte + length.
pub const HEADER_LEN: usize = 5;

/// PostgreSQL never sends a message over 1 GiB; the cap on what a server may send.
pub const MAX_SERVER_MESSAGE: usize = (1 << 30) + 1;

/// Startup packets are small; PostgreSQL itself caps them at 10,000 bytes.
pub const MAX_STARTUP_PACKET: usize = 10_000;

/// Startup-phase request codes (the `i32` after the length).
pub const PROTOCOL_3_0: u32 = 196_608;
pub const SSL_REQUEST: u32 = 80_877_103;
pub const GSSENC_REQUEST: u32 = 80_877_104;
pub const CANCEL_REQUEST: u32 = 80_877_102;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    #[error("invalid message length {len} (type {tag:?})")]
    TooShort { tag: char, len: i64 },
    #[error("message of {len} bytes (type {tag:?}) exceeds max_message_size {max}")]
    TooLong { tag: char, len: i64, max: usize },
    #[error("invalid startup packet length {len}")]
    BadStartupLength { len: i64 },
}

/// A regular message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub tag: u8,
    /// The announced length, which counts the 4 length bytes but not the tag.
    pub len: u32,
}

impl Header {
    /// Parses a header from the front of `buf`. `Ok(None)` means fewer than 5 bytes are there.
    /// `max` bounds the whole message (tag included).
    #[inline]
    pub fn parse(buf: &[u8], max: usize) -> Result<Option<Header>, FrameError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let tag = buf[0];
        let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
        if len < 4 {
            return Err(FrameError::TooShort {
                tag: tag as char,
                len: len.into(),
            });
        }
        if len as usize + 1 > max {
            return Err(FrameError::TooLong {
                tag: tag as char,
                len: len.into(),
                max,
            });
        }
        Ok(Some(Header {
            tag,
            len: len as u32,
        }))
    }

    /// Bytes of body after the header.
    #[inline]
    pub fn body_len(&self) -> usize {
        self.len as usize - 4
    }

    /// The whole message on the wire: tag + length + body.
    #[inline]
    pub fn frame_len(&self) -> usize {
        self.len as usize + 1
    }
}

/// Length of a startup-phase packet at the front of `buf` (length word included),
/// or `Ok(None)` if fewer than 4 bytes are there.
pub fn startup_packet_len(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if !(8..=MAX_STARTUP_PACKET as i32).contains(&len) {
        return Err(FrameError::BadStartupLength { len: len.into() });
    }
    Ok(Some(len as usize))
}

/// A streaming scanner that walks message boundaries over a byte stream that arrives
/// in arbitrary chunks, without copying. It tells the caller which messages start in the
/// buffer and whether they are complete, so that the relay can inspect the few message
/// types it must and forward everything else, even a partial body, unchanged.
#[derive(Debug, Default, Clone)]
pub struct Scanner {
    /// Body bytes of the current (already announced) message not yet seen.
    remaining: usize,
}

/// One step of the scanner over a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// `n` bytes belong to the body of a message whose header was already reported.
    Continue(usize),
    /// A message starts here. `complete` is true when the whole frame is in the buffer.
    Message { header: Header, complete: bool },
    /// Not enough bytes for a header: wait for more.
    NeedMore,
}

impl Scanner {
    /// True when the stream is exactly at a message boundary.
    #[inline]
    pub fn at_boundary(&self) -> bool {
        self.remaining == 0
    }

    /// Looks at `buf` (the unconsumed bytes from the current position).
    #[inline]
    pub fn step(&self, buf: &[u8], max: usize) -> Result<Step, FrameError> {
        if self.remaining > 0 {
            if buf.is_empty() {
                return Ok(Step::NeedMore);
            }
            return Ok(Step::Continue(self.remaining.min(buf.len())));
        }
        match Header::parse(buf, max)? {
            None => Ok(Step::NeedMore),
            Some(header) => Ok(Step::Message {
                header,
                complete: buf.len() >= header.frame_len(),
            }),
        }
    }

    /// Consumes `n` bytes of a body reported by [`Step::Continue`].
    #[inline]
    pub fn consume_body(&mut self, n: usize) {
        self.remaining -= n;
    }

    /// Consumes a message header; `available` is how many bytes of the frame (header
    /// included) are in the buffer and are being passed on now. Returns bytes consumed.
    #[inline]
    pub fn consume_message(&mut self, header: Header, available: usize) -> usize {
        let frame = header.frame_len();
        if available >= frame {
            frame
        } else {
            self.remaining = frame - available;
            available
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn header_rejects_short_and_long_lengths() {
        let mut b = vec![b'Q'];
        b.extend_from_slice(&3i32.to_be_bytes());
        assert!(matches!(
            Header::parse(&b, 1024),
            Err(FrameError::TooShort { .. })
        ));
        let mut b = vec![b'Q'];
        b.extend_from_slice(&i32::MAX.to_be_bytes());
        assert!(matches!(
            Header::parse(&b, 1024),
            Err(FrameError::TooLong { .. })
        ));
        let mut b = vec![b'Q'];
        b.extend_from_slice(&(-5i32).to_be_bytes());
        assert!(matches!(
            Header::parse(&b, 1024),
            Err(FrameError::TooShort { .. })
        ));
        assert_eq!(Header::parse(&b[..4], 1024), Ok(None));
    }

    #[test]
    fn header_accepts_exact_cap() {
        let m = msg(b'd', &[0u8; 11]);
        assert_eq!(Header::parse(&m, 16).unwrap().unwrap().frame_len(), m.len());
        assert!(Header::parse(&m, 15).is_err());
    }

    #[test]
    fn startup_lengths() {
        assert_eq!(startup_packet_len(&[0, 0]), Ok(None));
        assert!(startup_packet_len(&3i32.to_be_bytes()).is_err());
        assert!(startup_packet_len(&i32::MAX.to_be_bytes()).is_err());
        assert!(startup_packet_len(&(-1i32).to_be_bytes()).is_err());
        assert_eq!(startup_packet_len(&8i32.to_be_bytes()), Ok(Some(8)));
        assert!(startup_packet_len(&10_001i32.to_be_bytes()).is_err());
    }

    /// Feeds a stream in every possible chunking and checks the scanner sees the same messages.
    #[test]
    fn scanner_handles_any_chunking() {
        let mut stream = Vec::new();
        stream.extend(msg(b'Q', b"select 1\0"));
        stream.extend(msg(b'd', &[7u8; 100]));
        stream.extend(msg(b'S', b""));
        for chunk in 1..stream.len() {
            let mut sc = Scanner::default();
            let mut pending: Vec<u8> = Vec::new();
            let mut seen = Vec::new();
            let mut forwarded = 0usize;
            for part in stream.chunks(chunk) {
                pending.extend_from_slice(part);
                let mut pos = 0;
                loop {
                    match sc.step(&pending[pos..], 1 << 20).unwrap() {
                        Step::NeedMore => break,
                        Step::Continue(n) => {
                            sc.consume_body(n);
                            pos += n;
                        }
                        Step::Message { header, .. } => {
                            seen.push(header.tag);
                            let avail = pending.len() - pos;
                            pos += sc.consume_message(header, avail);
                        }
                    }
                }
                forwarded += pos;
                pending.drain(..pos);
            }
            assert_eq!(seen, vec![b'Q', b'd', b'S'], "chunk {chunk}");
            assert_eq!(forwarded, stream.len());
            assert!(sc.at_boundary());
        }
    }
}
