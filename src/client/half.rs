//! One direction of the relay: a read buffer, the bytes scanned in it and waiting to go out,
//! and the staging area for messages iampool changes, drops or makes up.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::AsyncWrite;

use super::prepared::Staging;
use crate::protocol::framing::Scanner;
use crate::stream::Stream;

/// Read size per syscall, and how many unsent bytes a direction may hold before it stops reading.
pub const READ_CHUNK: usize = 16 * 1024;
pub const HIGH_WATER: usize = 64 * 1024;
/// Buffers larger than this are freed rather than kept for reuse.
const SHRINK_ABOVE: usize = 256 * 1024;
/// Spare buffers kept per thread for the next message to arrive.
const SPARE_PER_THREAD: usize = 64;

thread_local! {
    /// Buffers of idle sessions, for whichever session on this thread reads next: an idle
    /// client holds no buffer, and steady traffic allocates none.
    static SPARE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// A buffer for the next read: a spare one if this thread has one.
fn take_spare() -> BytesMut {
    SPARE
        .with(|s| s.borrow_mut().pop())
        .unwrap_or_else(|| BytesMut::with_capacity(READ_CHUNK))
}

/// Keeps an empty buffer for reuse, or frees it if it grew large or enough are kept.
fn give_spare(mut b: BytesMut) {
    if b.capacity() == 0 || b.capacity() > SHRINK_ABOVE {
        return;
    }
    b.clear();
    // An empty, unshared buffer reclaims the space in front of it without allocating.
    b.reserve(READ_CHUNK);
    SPARE.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < SPARE_PER_THREAD {
            s.push(b);
        }
    });
}

/// One direction of the relay: a read buffer whose front `ready` bytes are scanned and
/// waiting to be written to the other side. When a message must be changed, dropped or
/// made up, the ready bytes move to `out` first (so order is kept) and the change is written
/// there; `out` goes out before `buf[..ready]`. Sessions that change nothing never copy.
#[derive(Default)]
pub struct Half {
    pub buf: BytesMut,
    pub ready: usize,
    pub scan: Scanner,
    pub out: BytesMut,
    /// Bytes written since the last flush (TLS streams buffer until flushed).
    pub unflushed: bool,
    /// Size of an inspected message that is not complete yet, so the buffer can grow for it.
    pub want: usize,
}

impl Staging for Half {
    fn staged(&mut self) -> &mut BytesMut {
        self.stage_ready();
        self.out_buf()
    }
}

impl Half {
    /// A half whose buffer already holds `bytes` (read along with the startup packet).
    pub fn with_bytes(bytes: BytesMut) -> Half {
        Half {
            buf: bytes,
            ..Half::default()
        }
    }

    pub fn reserve(&mut self) {
        if self.buf.capacity() == 0 {
            self.buf = take_spare();
        }
        let spare = self.buf.capacity() - self.buf.len();
        let need = READ_CHUNK.max(self.want.saturating_sub(self.buf.len() - self.ready));
        if spare < need {
            self.buf.reserve(need);
        }
    }

    /// Gives the buffers back while they are empty (between a client's requests), so an
    /// idle client holds none; the next read takes one again.
    pub fn release_buffers(&mut self) {
        if self.buf.is_empty() && self.ready == 0 {
            give_spare(std::mem::take(&mut self.buf));
        }
        if self.out.is_empty() {
            give_spare(std::mem::take(&mut self.out));
        }
    }

    /// The staging buffer, taken from the spares when it has none.
    pub fn out_buf(&mut self) -> &mut BytesMut {
        if self.out.capacity() == 0 {
            self.out = take_spare();
        }
        &mut self.out
    }

    /// Nothing scanned is waiting and the stream sits at a message boundary.
    pub fn settled(&self) -> bool {
        self.ready == 0 && self.out.is_empty() && !self.unflushed && self.scan.at_boundary()
    }

    /// Moves the scanned bytes to `out`, so the message at `buf[0]` can be changed or dropped.
    pub fn stage_ready(&mut self) {
        if self.ready > 0 {
            let ready = self.ready;
            self.out_buf();
            self.out.extend_from_slice(&self.buf[..ready]);
            self.buf.advance(self.ready);
            self.ready = 0;
        }
    }

    /// Throws away what is scanned and due to the other side (its reader is gone).
    pub fn discard_ready(&mut self) {
        self.buf.advance(self.ready);
        self.ready = 0;
        self.out.clear();
    }

    /// Drops a complete message at the scan position (after staging what came before it).
    pub fn drop_message(&mut self, len: usize) {
        self.stage_ready();
        self.buf.advance(len);
    }

    pub fn poll_write_to(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut Stream,
    ) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            // One vectored write for the changed bytes and the unchanged ones after them.
            let slices = [
                io::IoSlice::new(&self.out),
                io::IoSlice::new(&self.buf[..self.ready]),
            ];
            let n = if self.ready > 0 && dst.is_write_vectored() {
                Pin::new(&mut *dst).poll_write_vectored(cx, &slices)
            } else {
                Pin::new(&mut *dst).poll_write(cx, &self.out)
            };
            match n {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    let from_out = n.min(self.out.len());
                    self.out.advance(from_out);
                    let from_buf = n - from_out;
                    self.buf.advance(from_buf);
                    self.ready -= from_buf;
                    self.unflushed = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        while self.ready > 0 {
            match Pin::new(&mut *dst).poll_write(cx, &self.buf[..self.ready]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.buf.advance(n);
                    self.ready -= n;
                    self.unflushed = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if self.unflushed {
            match Pin::new(&mut *dst).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.unflushed = false,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}
