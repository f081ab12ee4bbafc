//! Cancelling a backend's query: the CancelRequest itself, and the gate that keeps a
//! backend out of the pool while a cancel for it is on its way.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::protocol::framing::CANCEL_REQUEST;

/// Cancel requests on their way to one backend. While any is in flight the backend is not
/// handed to another client, so a cancel that arrives late can only hit the query it was
/// meant for or none (PostgreSQL ignores a cancel that reaches an idle backend).
#[derive(Debug, Default)]
pub struct CancelGate {
    inflight: AtomicUsize,
    done: Notify,
}

/// Held while one cancel request is being delivered.
#[derive(Debug)]
pub struct CancelPass(Arc<CancelGate>);

impl CancelGate {
    pub fn enter(self: &Arc<Self>) -> CancelPass {
        self.inflight.fetch_add(1, Ordering::AcqRel);
        CancelPass(self.clone())
    }

    pub fn busy(&self) -> bool {
        self.inflight.load(Ordering::Acquire) > 0
    }

    /// Resolves once no cancel is in flight.
    pub async fn wait(&self) {
        loop {
            let done = self.done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if !self.busy() {
                return;
            }
            done.await;
        }
    }
}

impl Drop for CancelPass {
    fn drop(&mut self) {
        if self.0.inflight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.done.notify_waiters();
        }
    }
}

/// Sends a CancelRequest for backend `pid` to `addr` and waits until the server has closed
/// the connection: PostgreSQL closes it after it has signalled the backend, so afterwards
/// the cancel can no longer reach a query that starts later. Bounded at 5 s.
pub async fn send_cancel(addr: SocketAddr, pid: i32, secret: i32) -> bool {
    let mut pkt = [0u8; 16];
    pkt[..4].copy_from_slice(&16i32.to_be_bytes());
    pkt[4..8].copy_from_slice(&CANCEL_REQUEST.to_be_bytes());
    pkt[8..12].copy_from_slice(&pid.to_be_bytes());
    pkt[12..].copy_from_slice(&secret.to_be_bytes());
    let sent = tokio::time::timeout(Duration::from_secs(5), async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(&pkt).await?;
        let mut sink = [0u8; 64];
        while s.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
    matches!(sent, Ok(Ok(())))
}
