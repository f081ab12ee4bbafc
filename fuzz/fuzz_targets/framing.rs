//! The framer: `Scanner` over a stream split at arbitrary points must find exactly the
//! frames a single pass of `Header::parse` finds (same tags, lengths and first error), never
//! claim more bytes than it was given, and never panic. Each complete frame's body also goes
//! through the body decoders the relay uses on server messages.
#![no_main]

use iampool::protocol::framing::{startup_packet_len, Header, Scanner, Step};
use iampool::protocol::messages::{parse_error_fields, parse_parameter_status, BodyReader};
use iampool_fuzz::{split, Choices};
use libfuzzer_sys::fuzz_target;

/// Headers of the frames that start in `stream`, and whether framing failed, in one pass.
fn reference(stream: &[u8], max: usize) -> (Vec<Header>, bool) {
    let mut headers = Vec::new();
    let mut pos = 0;
    loop {
        match Header::parse(&stream[pos..], max) {
            Err(_) => return (headers, true),
            Ok(None) => return (headers, false),
            Ok(Some(h)) => {
                headers.push(h);
                if stream.len() - pos < h.frame_len() {
                    return (headers, false);
                }
                pos += h.frame_len();
            }
        }
    }
}

fn decode_body(tag: u8, body: &[u8]) {
    let fields = parse_error_fields(body);
    let _ = fields.is_fatal();
    if let Ok((name, value)) = parse_parameter_status(body) {
        assert!(name.len() + value.len() + 2 <= body.len());
    }
    let mut r = BodyReader::new(body);
    match tag % 3 {
        0 => while r.cstr().is_ok() {},
        1 => while r.i32().is_ok() {},
        _ => {
            while let Ok(n) = r.i32() {
                if usize::try_from(n).map_or(true, |n| r.bytes(n).is_err()) {
                    break;
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut c = Choices::new(data);
    let max = 5 + (u16::from_be_bytes([c.byte(), c.byte()]) as usize) * 16;
    let sizes = c.take(8).to_vec();
    let stream = c.rest();
    let _ = startup_packet_len(stream);

    let (want, want_error) = reference(stream, max);
    let mut sc = Scanner::default();
    let mut pending: Vec<u8> = Vec::new();
    let mut seen = Vec::new();
    let mut error = false;
    let mut consumed = 0usize;
    'outer: for part in split(stream, &sizes) {
        pending.extend_from_slice(part);
        let mut pos = 0;
        loop {
            match sc.step(&pending[pos..], max) {
                Err(_) => {
                    error = true;
                    break 'outer;
                }
                Ok(Step::NeedMore) => break,
                Ok(Step::Continue(n)) => {
                    assert!(n > 0 && n <= pending.len() - pos);
                    sc.consume_body(n);
                    pos += n;
                }
                Ok(Step::Message { header, complete }) => {
                    let avail = pending.len() - pos;
                    assert_eq!(complete, avail >= header.frame_len());
                    if complete {
                        decode_body(header.tag, &pending[pos + 5..pos + header.frame_len()]);
                    }
                    seen.push(header);
                    let n = sc.consume_message(header, avail);
                    assert!(n <= avail);
                    pos += n;
                }
            }
        }
        consumed += pos;
        pending.drain(..pos);
    }
    assert!(consumed <= stream.len());
    assert_eq!(seen, want);
    assert_eq!(error, want_error);
    if !error {
        // Scanning stops only for want of bytes: at a boundary with less than a header left,
        // or inside a body with nothing left.
        assert_eq!(consumed + pending.len(), stream.len());
        if sc.at_boundary() {
            assert!(pending.len() < 5);
        } else {
            assert!(pending.is_empty());
        }
    }
});
