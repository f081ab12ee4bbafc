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
        self.peer_addr().map(|a| a.ip())
    }

    /// The peer's address and port (None for a unix socket, or if the socket has none any
    /// more).
    pub fn peer_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Stream::Tcp(s) => s.peer_addr().ok(),
            Stream::TlsServer(s) => s.get_ref().0.peer_addr().ok(),
            Stream::TlsClient(s) => s.get_ref().0.peer_addr().ok(),
            Stream::Unix(_) => None,
        }
    }

    /// The socket's file descriptor (the TCP socket under TLS).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::TlsServer(s) => s.get_ref().0.as_raw_fd(),
            Stream::TlsClient(s) => s.get_ref().0.as_raw_fd(),
        }
    }

    /// This end's address (None for a unix socket).
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Stream::Tcp(s) => s.local_addr().ok(),
            Stream::TlsServer(s) => s.get_ref().0.local_addr().ok(),
            Stream::TlsClient(s) => s.get_ref().0.local_addr().ok(),
            Stream::Unix(_) => None,
        }
    }

    /// The TLS session as the admin console describes it, in the shape PgBouncer uses:
    /// `version/cipher suite/key exchange`, e.g. `TLSv1.3/TLS_AES_256_GCM_SHA384/ECDH=X25519`.
    /// Empty without TLS.
    pub fn tls_description(&self) -> String {
        let state: &rustls::CommonState = match self {
            Stream::TlsServer(s) => s.get_ref().1,
            Stream::TlsClient(s) => s.get_ref().1,
            Stream::Tcp(_) | Stream::Unix(_) => return String::new(),
        };
        let version = match state.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_owned(),
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_owned(),
            Some(v) => format!("{v:?}"),
            None => "-".to_owned(),
        };
        // rustls names TLS 1.3 suites TLS13_*; the IANA (and OpenSSL) name is TLS_*.
        let cipher = state
            .negotiated_cipher_suite()
            .map(|s| {
                let name = format!("{:?}", s.suite());
                match name.strip_prefix("TLS13_") {
                    Some(rest) => format!("TLS_{rest}"),
                    None => name,
                }
            })
            .unwrap_or_else(|| "-".to_owned());
        match state.negotiated_key_exchange_group() {
            Some(g) => format!("{version}/{cipher}/ECDH={:?}", g.name()),
            None => format!("{version}/{cipher}"),
        }
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
