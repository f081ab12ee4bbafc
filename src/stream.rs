//! One byte-stream type for both sides: plain TCP, unix socket, or TLS over TCP.
//!
//! An enum rather than a boxed trait object keeps dispatch static and lets the relay poll
//! reads and writes on the same stream from one task.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// A client that negotiated TLS with iampool.
    TlsServer(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// iampool's TLS connection to an upstream.
    TlsClient(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::TlsServer(_) | Stream::TlsClient(_))
    }

    /// The peer's IP address (None for a unix socket, or if the socket has none any more).
    pub fn peer_ip(&self) -> Option<std::net::IpAddr> {
        match self {
            Stream::Tcp(s) => s.peer_addr().ok(),
            Stream::TlsServer(s) => s.get_ref().0.peer_addr().ok(),
            Stream::TlsClient(s) => s.get_ref().0.peer_addr().ok(),
            Stream::Unix(_) => None,
        }
        .map(|a| a.ip())
    }

    /// Waits until the socket has something to read, without a buffer to read into, so an
    /// idle connection holds none. `false` for TLS streams, whose decrypted bytes may
    /// already wait inside the TLS layer: read those with a buffer.
    pub async fn readable(&self) -> io::Result<bool> {
        match self {
            Stream::Tcp(s) => s.readable().await.map(|()| true),
            Stream::Unix(s) => s.readable().await.map(|()| true),
            Stream::TlsServer(_) | Stream::TlsClient(_) => Ok(false),
        }
    }
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Tcp($s) => {
                let $s = Pin::new($s);
                $e
            }
            Stream::Unix($s) => {
                let $s = Pin::new($s);
                $e
            }
            Stream::TlsServer($s) => {
                let $s = Pin::new($s.as_mut());
                $e
            }
            Stream::TlsClient($s) => {
                let $s = Pin::new($s.as_mut());
                $e
            }
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        dispatch!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        dispatch!(self, s => s.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        dispatch!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        dispatch!(self, s => s.poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        dispatch!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Unix(s) => s.is_write_vectored(),
            Stream::TlsServer(s) => s.is_write_vectored(),
            Stream::TlsClient(s) => s.is_write_vectored(),
        }
    }
}

/// Reads one whole message (outside the hot path: logins, auth exchanges, resets).
/// Leftover bytes stay in `buf` for the next call. The length is checked against `max`
/// before the buffer grows for the body.
pub async fn read_message(
    stream: &mut Stream,
    buf: &mut bytes::BytesMut,
    max: usize,
) -> io::Result<(u8, bytes::BytesMut)> {
    use crate::protocol::framing::Header;
    use bytes::Buf;
    use tokio::io::AsyncReadExt;
    loop {
        match Header::parse(buf, max) {
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            Ok(Some(h)) if buf.len() >= h.frame_len() => {
                let mut frame = buf.split_to(h.frame_len());
                frame.advance(crate::protocol::framing::HEADER_LEN);
                return Ok((h.tag, frame));
            }
            Ok(Some(h)) => buf.reserve(h.frame_len() - buf.len()),
            Ok(None) => buf.reserve(512),
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}
