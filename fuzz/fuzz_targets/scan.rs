//! The relay's scanners (`Scan::client`, `Scan::server`) over arbitrary byte streams in both
//! directions, split into reads at arbitrary points and interleaved, without prepared
//! statement rewriting (session or transaction mode):
//!
//! - forwarded bytes are exactly the input bytes, in order, whatever the split (up to where
//!   a side broke the protocol, or the client's Terminate, which is not forwarded), except
//!   that in transaction mode a server's FATAL ErrorResponse is held back (the relay tells
//!   the client with an ERROR and keeps its connection);
//! - a message the scanner holds back to see whole never exceeds `max_message_size`, and
//!   once the stream ends nothing but an incomplete message is left unforwarded;
//! - with pinning on (half the inputs, with a limit nothing reaches), the pin's own parsing
//!   of Query, Parse and Bind messages never panics and changes no byte;
//! - the server is never released (`Disposition::Clean`) while a ReadyForQuery is owed:
//!   every Query, FunctionCall and Sync sent has had its ReadyForQuery, the last one said
//!   idle (`I`), and no COPY started in between.
#![no_main]

use bytes::{Buf, BytesMut};
use std::sync::Arc;

use iampool::client::half::Half;
use iampool::client::pin::Pin;
use iampool::client::prepared::Tracker;
use iampool::client::scan::{Scan, ServerSide, Stop};
use iampool::pool::PinLimit;
use iampool::protocol::exchange::{Disposition, Exchange};
use iampool::protocol::framing::{Header, HEADER_LEN};
use iampool::protocol::messages::parse_error_fields;
use iampool::protocol::statements::ServerStatements;
use iampool::server::params::SessionParams;
use iampool_fuzz::{split, Choices};
use libfuzzer_sys::fuzz_target;

/// What a half has ready for the other side, taken out as the relay's write would.
fn take(h: &mut Half, into: &mut Vec<u8>) {
    into.extend_from_slice(&h.out);
    into.extend_from_slice(&h.buf[..h.ready]);
    h.buf.advance(h.ready);
    h.ready = 0;
    h.out.clear();
}

/// Frames whose header is at the front of `bytes` (the last may be partial): (tag, first
/// body byte). A message is owed its answer once its header has gone: a server may answer
/// before the rest arrives.
fn frames(mut bytes: &[u8]) -> Vec<(u8, Option<u8>)> {
    let mut out = Vec::new();
    while let Ok(Some(h)) = Header::parse(bytes, usize::MAX) {
        out.push((h.tag, bytes.get(5).copied().filter(|_| h.len > 4)));
        if bytes.len() < h.frame_len() {
            break;
        }
        bytes = &bytes[h.frame_len()..];
    }
    out
}

/// The server's bytes as the client should get them: in transaction mode without the whole
/// FATAL ErrorResponses, which the scanner holds back.
fn expected_to_client(server: &[u8], transaction_mode: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(server.len());
    let mut rest = server;
    while let Ok(Some(h)) = Header::parse(rest, usize::MAX) {
        if rest.len() < h.frame_len() {
            break;
        }
        let (frame, after) = rest.split_at(h.frame_len());
        let fatal = h.tag == b'E' && parse_error_fields(&frame[HEADER_LEN..]).is_fatal();
        if !(transaction_mode && fatal) {
            out.extend_from_slice(frame);
        }
        rest = after;
    }
    out.extend_from_slice(rest);
    out
}

fuzz_target!(|data: &[u8]| {
    let mut c = Choices::new(data);
    let transaction_mode = c.flag();
    let max_message = 64 + c.below(4096);
    let order = c.take(8).to_vec();
    let client_sizes = c.take(4).to_vec();
    let server_sizes = c.take(4).to_vec();
    let cut = c.below(256);
    let rest = c.rest();
    let (client, server) = rest.split_at(cut.min(rest.len()));

    let mut x = Exchange::default();
    let mut statements = ServerStatements::default();
    let mut params = SessionParams::default();
    let mut scan = Scan::new(
        BytesMut::new(),
        Tracker::new(0, Default::default()),
        SessionParams::default(),
        max_message,
        transaction_mode,
    );
    // Half the inputs pin clients that make session state (with room for every pin, so
    // nothing is refused and the bytes stay the client's): the pin bookkeeping sees the same
    // arbitrary messages.
    if transaction_mode && max_message % 2 == 1 {
        scan.pin = Pin::new(Some(Arc::new(PinLimit::new(usize::MAX))));
    }
    let client_parts = split(client, &client_sizes);
    let server_parts = split(server, &server_sizes);
    let (mut ci, mut si) = (0, 0);
    let (mut to_server, mut to_client) = (Vec::new(), Vec::new());
    let (mut client_stop, mut server_stop) = (None, None);
    let mut step = 0;
    while (ci < client_parts.len() && client_stop.is_none())
        || (si < server_parts.len() && server_stop.is_none())
    {
        let client_turn = (order.get(step % order.len().max(1)).copied().unwrap_or(0) & 1 == 0
            && ci < client_parts.len()
            && client_stop.is_none())
            || si >= server_parts.len()
            || server_stop.is_some();
        step += 1;
        let mut side = ServerSide {
            x: &mut x,
            statements: &mut statements,
            params: &mut params,
        };
        if client_turn {
            scan.c.buf.extend_from_slice(client_parts[ci]);
            ci += 1;
            let r = scan.client(&mut side);
            take(&mut scan.c, &mut to_server);
            assert!(scan.c.want <= max_message);
            if let Err(e) = r {
                client_stop = Some(e);
            }
        } else {
            scan.s.buf.extend_from_slice(server_parts[si]);
            si += 1;
            let r = scan.server(&mut side);
            take(&mut scan.s, &mut to_client);
            if let Err(e) = r {
                server_stop = Some(e);
            }
        }

        if x.disposition() == Disposition::Clean {
            let sent = frames(&to_server);
            let got = frames(&to_client);
            let owing = sent
                .iter()
                .filter(|(t, _)| matches!(t, b'Q' | b'F' | b'S'))
                .count();
            let readies: Vec<_> = got.iter().filter(|(t, _)| *t == b'Z').collect();
            let copy = got.iter().any(|(t, _)| matches!(t, b'G' | b'H' | b'W'));
            if !copy {
                assert_eq!(readies.len(), owing, "released with a ReadyForQuery owed");
                if let Some((_, status)) = readies.last() {
                    assert_eq!(*status, Some(b'I'), "released inside a transaction");
                }
            }
        }
    }

    // Forwarded bytes are the input's, in order. A stop leaves the rest unforwarded.
    assert!(client.starts_with(&to_server), "client bytes changed");
    let expected = expected_to_client(server, transaction_mode);
    assert!(expected.starts_with(&to_client), "server bytes changed");
    match &client_stop {
        Some(Stop::Terminate) => {
            // Everything before the Terminate went; the Terminate itself did not.
            let rest = &client[to_server.len()..];
            assert_eq!(rest.first(), Some(&b'X'));
        }
        Some(Stop::Client(_)) => {}
        Some(Stop::Server(_)) => panic!("the client scan blamed the server"),
        None => {
            // What is left is one message not yet complete (held to be seen whole).
            let left = &client[to_server.len()..];
            if let Ok(Some(h)) = Header::parse(left, usize::MAX) {
                assert!(
                    left.len() < h.frame_len(),
                    "a complete message was held back"
                );
            }
        }
    }
    match &server_stop {
        Some(Stop::Server(_)) => {}
        Some(other) => panic!("the server scan stopped with {other:?}"),
        None => {
            let left = &expected[to_client.len()..];
            if let Ok(Some(h)) = Header::parse(left, usize::MAX) {
                assert!(
                    left.len() < h.frame_len(),
                    "a complete message was held back"
                );
            }
        }
    }
});
