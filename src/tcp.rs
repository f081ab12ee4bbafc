//! TCP options on client and server sockets: keepalive and TCP_USER_TIMEOUT (PgBouncer's
//! tcp_* settings).

use std::io;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

use crate::config::TcpOptions;

/// Sets `options` on `tcp`. What an option leaves unset keeps the system's value.
pub fn apply(tcp: &TcpStream, options: &TcpOptions) -> io::Result<()> {
    let socket = SockRef::from(tcp);
    if options.keepalive {
        let mut keepalive = TcpKeepalive::new();
        if let Some(idle) = options.keepidle {
            keepalive = keepalive.with_time(idle);
        }
        if let Some(interval) = options.keepintvl {
            keepalive = keepalive.with_interval(interval);
        }
        if let Some(probes) = options.keepcnt {
            keepalive = keepalive.with_retries(probes);
        }
        socket.set_tcp_keepalive(&keepalive)?;
    } else {
        socket.set_keepalive(false)?;
    }
    if let Some(timeout) = options.user_timeout {
        socket.set_tcp_user_timeout(Some(timeout))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dialled = TcpStream::connect(listener.local_addr().unwrap());
        let (dialled, accepted) = tokio::join!(dialled, listener.accept());
        (dialled.unwrap(), accepted.unwrap().0)
    }

    #[tokio::test]
    async fn options_are_what_the_socket_reports() {
        let (a, _b) = pair().await;
        let options = TcpOptions {
            keepalive: true,
            keepidle: Some(Duration::from_secs(77)),
            keepintvl: Some(Duration::from_secs(7)),
            keepcnt: Some(4),
            user_timeout: Some(Duration::from_millis(12_500)),
        };
        apply(&a, &options).unwrap();
        let s = SockRef::from(&a);
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_time().unwrap(), Duration::from_secs(77));
        assert_eq!(s.tcp_keepalive_interval().unwrap(), Duration::from_secs(7));
        assert_eq!(s.tcp_keepalive_retries().unwrap(), 4);
        assert_eq!(
            s.tcp_user_timeout().unwrap(),
            Some(Duration::from_millis(12_500))
        );
    }

    #[tokio::test]
    async fn defaults_turn_keepalive_on_and_keep_the_system_timing() {
        let (a, b) = pair().await;
        let system = SockRef::from(&b).tcp_keepalive_time().unwrap();
        apply(&a, &TcpOptions::default()).unwrap();
        let s = SockRef::from(&a);
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_time().unwrap(), system);
        assert_eq!(s.tcp_user_timeout().unwrap(), None);

        let off = TcpOptions {
            keepalive: false,
            ..TcpOptions::default()
        };
        apply(&a, &off).unwrap();
        assert!(!SockRef::from(&a).keepalive().unwrap());
    }
}
