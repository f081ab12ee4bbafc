//! The metrics and health listener: `/metrics`; the Kubernetes probes `/startup`,
//! `/liveness` and `/readiness` (also as `/healthz`, `/livez`, `/readyz`); and, when enabled,
//! `POST /quitquitquit`.
//!
//! A deliberately small HTTP/1.1 server (one request per connection): it must keep answering
//! while iampool drains, and it must not pull a web framework into a sidecar.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info};

use super::Metrics;

/// What the health endpoints ask of the running pooler.
pub trait Health: Send + Sync + 'static {
    /// Can serve clients now (listening, upstream reachable or pool warm, not draining).
    fn ready(&self) -> bool;
    /// Start-up finished: listeners bound and every pool has logged in once.
    fn started(&self) -> bool;
    /// Begin a graceful shutdown (`POST /quitquitquit`).
    fn quit(&self);
}

/// Which optional endpoints are served.
#[derive(Clone, Copy, Debug, Default)]
pub struct Routes {
    /// `POST /quitquitquit` shuts iampool down (setting `quitquitquit`); only from loopback
    /// addresses, so a pod's neighbours on the network cannot stop it.
    pub quitquitquit: bool,
}

pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<dyn Health>,
    routes: Routes,
) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "metrics and health listening");
    }
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (metrics, health) = (metrics.clone(), health.clone());
        tokio::spawn(async move {
            // Only the pod's own containers may end it, whatever address metrics listen on.
            let routes = Routes {
                quitquitquit: routes.quitquitquit && peer.ip().is_loopback(),
            };
            let request = handle(stream, &metrics, &*health, routes);
            if let Err(e) = tokio::time::timeout(Duration::from_secs(10), request).await {
                debug!(error = %e, "metrics request timed out");
            }
        });
    }
}

async fn handle(
    mut stream: TcpStream,
    metrics: &Metrics,
    health: &dyn Health,
    routes: Routes,
) -> std::io::Result<()> {
    // Read the request head (bounded).
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 16 * 1024 {
            return respond(&mut stream, 431, "text/plain", "request header too large\n").await;
        }
    }
    let line = buf.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    if path == "/quitquitquit" {
        if !routes.quitquitquit {
            return respond(&mut stream, 404, "text/plain", "not found\n").await;
        }
        if method != "POST" {
            return respond(&mut stream, 405, "text/plain", "only POST\n").await;
        }
        respond(&mut stream, 200, "text/plain", "shutting down\n").await?;
        health.quit();
        return Ok(());
    }
    if method != "GET" && method != "HEAD" {
        return respond(&mut stream, 405, "text/plain", "only GET\n").await;
    }
    match path {
        "/metrics" => {
            let body = metrics.render();
            respond(
                &mut stream,
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                &body,
            )
            .await
        }
        "/liveness" | "/healthz" | "/livez" => {
            respond(&mut stream, 200, "text/plain", "ok\n").await
        }
        "/readiness" | "/readyz" => {
            if health.ready() {
                respond(&mut stream, 200, "text/plain", "ready\n").await
            } else {
                respond(&mut stream, 503, "text/plain", "not ready\n").await
            }
        }
        "/startup" => {
            if health.started() {
                respond(&mut stream, 200, "text/plain", "started\n").await
            } else {
                respond(&mut stream, 503, "text/plain", "starting\n").await
            }
        }
        _ => respond(&mut stream, 404, "text/plain", "not found\n").await,
    }
}

async fn respond(
    stream: &mut TcpStream,
    code: u16,
    ctype: &str,
    body: &str,
) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
