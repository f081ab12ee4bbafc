//! Both sides of authentication, through the real async code over a socket pair: iampool
//! authenticating a client (`client::auth`: SCRAM-SHA-256 server side, md5, trust) and
//! iampool logging in to an upstream (`server::auth`: SCRAM client side, md5, cleartext).
//! The fuzzer plays the peer; it ends with an error or success, never a panic or a hang.
//!
//! The peer's input is a sequence of frames. Before each frame after the first, the peer
//! reads what iampool said so far; `@@` in the frame becomes the last SCRAM nonce iampool
//! sent (`r=...`), so the exchange gets past the nonce check to the proofs.
#![no_main]

use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;
use std::time::Duration;

use bytes::BytesMut;
use iampool::client::auth::{prepare_users, UserAuth};
use iampool::config::{AuthType, Secret, UserSecret};
use iampool::protocol::framing::Header;
use iampool::stream::Stream;
use iampool_fuzz::Choices;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

fn users() -> &'static HashMap<String, UserAuth> {
    static USERS: OnceLock<HashMap<String, UserAuth>> = OnceLock::new();
    USERS.get_or_init(|| {
        let mut users = BTreeMap::new();
        users.insert("alice".to_owned(), UserSecret::Plain(Secret::new("pw")));
        users.insert(
            "md5only".to_owned(),
            UserSecret::Md5(Secret::new("md5a1ffb4b0a4cdb8dd6bd8e9b7bbd12ae0")),
        );
        prepare_users(&users).expect("valid users")
    })
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    // Paused time: when both sides wait on each other, time jumps to the next timeout at
    // once, so "iampool says nothing more" is detected without waiting.
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime")
    })
}

/// Splits the peer's bytes into frames (the rest, if not a frame, is sent as it is).
fn frames(mut data: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while let Ok(Some(h)) = Header::parse(data, 1 << 16) {
        if data.len() < h.frame_len() {
            break;
        }
        out.push(data[..h.frame_len()].to_vec());
        data = &data[h.frame_len()..];
    }
    if !data.is_empty() {
        out.push(data.to_vec());
    }
    out
}

/// The last `r=` nonce in what iampool sent.
fn nonce(heard: &[u8]) -> Option<Vec<u8>> {
    let at = heard.windows(2).rposition(|w| w == b"r=")? + 2;
    let end = heard[at..]
        .iter()
        .position(|&b| b == b',' || !(0x21..=0x7e).contains(&b))
        .map_or(heard.len(), |i| at + i);
    Some(heard[at..end].to_vec())
}

/// `@@` replaced by `nonce`, and the length word fixed to match.
fn splice(frame: &[u8], nonce: &[u8]) -> Vec<u8> {
    if frame.len() < 5 || !frame.windows(2).any(|w| w == b"@@") {
        return frame.to_vec();
    }
    let mut body = Vec::new();
    let mut rest = &frame[5..];
    while let Some(i) = rest.windows(2).position(|w| w == b"@@") {
        body.extend_from_slice(&rest[..i]);
        body.extend_from_slice(nonce);
        rest = &rest[i + 2..];
    }
    body.extend_from_slice(rest);
    let mut out = vec![frame[0]];
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// An iteration count this large makes PBKDF2 take seconds (it is within iampool's cap, so
/// not a bug); such inputs are skipped to keep the fuzzer fast.
fn slow_iterations(data: &[u8]) -> bool {
    data.windows(2)
        .enumerate()
        .filter(|(_, w)| *w == b"i=")
        .any(|(i, _)| {
            let digits = data[i + 2..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .count();
            digits > 5 || (digits == 5 && data[i + 2] > b'1')
        })
}

async fn peer(mut end: UnixStream, frames: Vec<Vec<u8>>) {
    let mut heard = Vec::new();
    for (i, frame) in frames.iter().enumerate() {
        if i > 0 {
            // Read until iampool goes quiet.
            let mut buf = [0u8; 4096];
            loop {
                match tokio::time::timeout(Duration::from_secs(1), end.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return,
                    Ok(Ok(n)) => heard.extend_from_slice(&buf[..n]),
                    Err(_) => break,
                }
            }
        }
        let frame = match nonce(&heard) {
            Some(n) => splice(frame, &n),
            None => frame.clone(),
        };
        if end.write_all(&frame).await.is_err() {
            return;
        }
    }
    let _ = end.shutdown().await;
    // Drain until iampool is done, so its writes never block.
    let mut sink = Vec::new();
    let _ = end.read_to_end(&mut sink).await;
}

fuzz_target!(|data: &[u8]| {
    if slow_iterations(data) {
        return;
    }
    let mut c = Choices::new(data);
    let mode = c.byte();
    let frames = frames(c.rest());
    runtime().block_on(async move {
        let (ours, theirs) = UnixStream::pair().expect("socket pair");
        let mut stream = Stream::Unix(ours);
        let mut buf = BytesMut::new();
        let peer = tokio::spawn(peer(theirs, frames));
        let work = async {
            match mode % 8 {
                // iampool authenticates a client.
                0..=4 => {
                    let auth_type = match mode % 3 {
                        0 => AuthType::ScramSha256,
                        1 => AuthType::Md5,
                        _ => AuthType::Trust,
                    };
                    // An unknown user costs a PBKDF2 of the throwaway verifier: seldom.
                    let user = match mode >> 3 {
                        0 => "nobody",
                        1..=8 => "md5only",
                        _ => "alice",
                    };
                    let _ = iampool::client::auth::authenticate(
                        &mut stream,
                        &mut buf,
                        auth_type,
                        users(),
                        user,
                    )
                    .await;
                }
                // iampool logs in to a server.
                _ => {
                    let secret = (mode & 0x10 == 0).then(|| Secret::new("pw"));
                    let _ = iampool::server::auth::authenticate(
                        &mut stream,
                        &mut buf,
                        "alice",
                        &secret,
                        mode & 0x20 != 0,
                    )
                    .await;
                }
            }
            drop(stream);
        };
        // Both sides end on their own: iampool sees the peer's end of stream at the latest.
        tokio::time::timeout(Duration::from_secs(60), work)
            .await
            .expect("authentication finished");
        peer.await.expect("peer");
    });
});
