//! The startup phase: SSL/GSS negotiation, cancel requests, the startup packet, client
//! authentication and the welcome (ParameterStatus, BackendKeyData, ReadyForQuery).

use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::debug;

use super::console::{self, Role};
use super::{auth, Context};
use crate::config::ClientTls;
use crate::pool::Pool;
use crate::protocol::framing::{startup_packet_len, CANCEL_REQUEST, GSSENC_REQUEST, SSL_REQUEST};
use crate::protocol::messages::{self, sqlstate, BodyReader, Severity, TxStatus};
use crate::server::connect::ServerParamList;
use crate::server::params::{canonical_startup_value, SessionParams};
use crate::stream::Stream;

/// A client that finished the startup phase.
pub struct Login {
    pub stream: Stream,
    pub leftover: BytesMut,
    pub user: String,
    pub database: String,
    pub target: Target,
    pub params: SessionParams,
}

/// Where a logged-in client's queries go.
pub enum Target {
    Pool(Arc<Pool>),
    /// The admin console, and what this user may do there.
    Admin(Role),
}

/// The startup phase ended without a session.
#[derive(Debug)]
pub enum Refused {
    /// A cancel request was handled, or the client went away.
    Done,
    /// The client got a FATAL with this SQLSTATE.
    Fatal(&'static str),
}

/// A FATAL for the client, then the connection closes.
struct Fatal(&'static str, String);

/// Reads one startup-phase packet. Like PostgreSQL (ProcessStartupPacket), bytes that are
/// not one end the connection without a word to the client: an invalid length ("invalid
/// length of startup packet") and an end of stream inside a packet ("incomplete startup
/// packet") are only logged, and an end of stream before any byte is not even that (health
/// checks and clients that declined iampool's SSL answer do it).
async fn read_startup_packet(stream: &mut Stream, buf: &mut BytesMut) -> Result<BytesMut, Fatal> {
    loop {
        match startup_packet_len(buf) {
            Err(e) => {
                debug!(error = %e, "invalid length of startup packet; closing");
                return Err(gone());
            }
            Ok(Some(len)) if buf.len() >= len => return Ok(buf.split_to(len)),
            Ok(Some(len)) => buf.reserve(len - buf.len()),
            Ok(None) => buf.reserve(64),
        }
        match stream.read_buf(buf).await {
            Ok(0) | Err(_) => {
                if !buf.is_empty() {
                    debug!(received = buf.len(), "incomplete startup packet; closing");
                }
                return Err(gone());
            }
            Ok(_) => {}
        }
    }
}

/// Runs the startup phase for one client connection.
pub async fn handshake(
    ctx: &impl Context,
    stream: Stream,
    over_limit: bool,
    key: (i32, i32),
) -> Result<Login, Refused> {
    let mut buf = BytesMut::with_capacity(512);
    let (mut stream, packet) = match negotiate(ctx, stream, &mut buf).await {
        Ok(v) => v,
        Err((Some(mut s), fatal)) => return Err(refuse(&mut s, fatal).await),
        // Already answered (or nothing to say).
        Err((None, Fatal(code, _))) if !code.is_empty() => return Err(Refused::Fatal(code)),
        Err((None, _)) => return Err(Refused::Done),
    };
    match login(ctx, &mut stream, &mut buf, &packet, over_limit, key).await {
        Ok((user, database, target, params)) => Ok(Login {
            stream,
            leftover: buf,
            user,
            database,
            target,
            params,
        }),
        Err(f) => Err(refuse(&mut stream, f).await),
    }
}

/// Refuses a connection before reading anything from it (53300, too many connections).
pub async fn refuse_now(stream: &mut Stream, message: &str) {
    let mut b = BytesMut::new();
    messages::error_response(
        &mut b,
        Severity::Fatal,
        sqlstate::TOO_MANY_CONNECTIONS,
        message,
    );
    let _ = stream.write_all(&b).await;
    let _ = stream.flush().await;
}

async fn refuse(stream: &mut Stream, Fatal(code, message): Fatal) -> Refused {
    if code.is_empty() {
        return Refused::Done;
    }
    debug!(code, %message, "client refused at startup");
    let mut b = BytesMut::new();
    messages::error_response(&mut b, Severity::Fatal, code, &message);
    let _ = stream.write_all(&b).await;
    let _ = stream.flush().await;
    Refused::Fatal(code)
}

fn gone() -> Fatal {
    Fatal("", String::new())
}

type Negotiated = Result<(Stream, BytesMut), (Option<Stream>, Fatal)>;

/// SSLRequest / GSSENCRequest / CancelRequest, until the client sends its startup packet.
async fn negotiate(ctx: &impl Context, mut stream: Stream, buf: &mut BytesMut) -> Negotiated {
    // As in PostgreSQL, each of SSLRequest and GSSENCRequest is answered once; a second one
    // is an unsupported protocol version.
    let mut ssl_done = false;
    let mut gss_done = false;
    loop {
        let packet = match read_startup_packet(&mut stream, buf).await {
            Ok(p) => p,
            Err(f) => return Err((Some(stream), f)),
        };
        let code = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
        match code {
            SSL_REQUEST if !ssl_done => {
                ssl_done = true;
                let acceptor = ctx.tls_acceptor();
                match (acceptor, stream) {
                    (Some(acceptor), Stream::Tcp(mut tcp)) => {
                        // Bytes pipelined behind the SSLRequest would bypass TLS: refuse them.
                        if !buf.is_empty() {
                            let f = Fatal(
                                sqlstate::PROTOCOL_VIOLATION,
                                "received unencrypted data after SSL request".into(),
                            );
                            return Err((Some(Stream::Tcp(tcp)), f));
                        }
                        if tcp.write_all(b"S").await.is_err() {
                            return Err((None, gone()));
                        }
                        match acceptor.accept(tcp).await {
                            Ok(tls) => stream = Stream::TlsServer(Box::new(tls)),
                            Err(e) => {
                                debug!(error = %e, "client TLS handshake failed");
                                return Err((None, gone()));
                            }
                        }
                    }
                    (_, mut other) => {
                        if other.write_all(b"N").await.is_err() {
                            return Err((None, gone()));
                        }
                        stream = other;
                        if let Some(f) = unencrypted_after(buf, "SSL request") {
                            return Err((Some(stream), f));
                        }
                    }
                }
            }
            GSSENC_REQUEST if !gss_done => {
                gss_done = true;
                if stream.write_all(b"N").await.is_err() {
                    return Err((None, gone()));
                }
                if let Some(f) = unencrypted_after(buf, "GSSAPI encryption request") {
                    return Err((Some(stream), f));
                }
            }
            CANCEL_REQUEST if packet.len() != 16 => {
                debug!(
                    len = packet.len(),
                    "invalid length of startup packet (cancel request); closing"
                );
                return Err((None, gone()));
            }
            CANCEL_REQUEST => {
                let mut r = BodyReader::new(&packet[8..]);
                let pid = r.i32().unwrap_or(0);
                let secret = r.i32().unwrap_or(0);
                ctx.cancel_keys().cancel(pid, secret).await;
                return Err((None, gone()));
            }
            code if code >> 16 == 3 => return Ok((stream, packet)),
            code => {
                let message = format!(
                    "unsupported frontend protocol {}.{}: server supports 3.0 to 3.0",
                    code >> 16,
                    code & 0xffff
                );
                if code >> 16 >= 3 {
                    return Err((
                        Some(stream),
                        Fatal(sqlstate::FEATURE_NOT_SUPPORTED, message),
                    ));
                }
                // PostgreSQL answers an older protocol in that protocol's error format:
                // 'E', then the text, NUL-terminated.
                let mut b = BytesMut::new();
                b.extend_from_slice(b"EFATAL:  ");
                b.extend_from_slice(message.as_bytes());
                b.extend_from_slice(b"\n\0");
                let _ = stream.write_all(&b).await;
                let _ = stream.flush().await;
                debug!(%message, "client refused at startup");
                return Err((None, Fatal(sqlstate::FEATURE_NOT_SUPPORTED, message)));
            }
        }
    }
}

/// Bytes that arrived with an SSLRequest or GSSENCRequest, before its answer, were not
/// encrypted and may have been injected: refused, as PostgreSQL does.
fn unencrypted_after(buf: &BytesMut, request: &str) -> Option<Fatal> {
    (!buf.is_empty()).then(|| {
        Fatal(
            sqlstate::PROTOCOL_VIOLATION,
            format!("received unencrypted data after {request}"),
        )
    })
}

/// The startup packet's parameters, client authentication and the welcome.
async fn login(
    ctx: &impl Context,
    stream: &mut Stream,
    buf: &mut BytesMut,
    packet: &[u8],
    over_limit: bool,
    key: (i32, i32),
) -> Result<(String, String, Target, SessionParams), Fatal> {
    let config = ctx.config();
    // Startup parameters, decoded strictly.
    let minor = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]) & 0xffff;
    let mut r = BodyReader::new(&packet[8..]);
    let mut user = None;
    let mut database = None;
    let mut startup_params: Vec<(String, String)> = Vec::new();
    let mut unsupported_options = Vec::new();
    let bad = |_| {
        Fatal(
            sqlstate::PROTOCOL_VIOLATION,
            "invalid startup packet layout: expected terminator as last byte".into(),
        )
    };
    loop {
        let name = r.cstr().map_err(bad)?;
        if name.is_empty() {
            break;
        }
        let value = r.cstr().map_err(bad)?;
        match name {
            "user" => user = Some(value.to_owned()),
            "database" => database = Some(value.to_owned()),
            "replication" => {
                return Err(Fatal(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "replication connections are not supported by iampool".into(),
                ))
            }
            "options" if !ignored(&config.ignore_startup_parameters, name) => {
                startup_params.extend(parse_options(value))
            }
            "options" => {}
            n if n.starts_with("_pq_.") => unsupported_options.push(n.to_owned()),
            n => startup_params.push((n.to_owned(), value.to_owned())),
        }
    }
    if !r.is_empty() {
        return Err(bad(messages::DecodeError::Truncated));
    }
    let from = config
        .application_name_add_host
        .then(|| match stream.peer_addr() {
            Some(addr) => addr.to_string(),
            None => "unix".to_owned(),
        });
    adjust_startup_params(
        &mut startup_params,
        &config.ignore_startup_parameters,
        from.as_deref(),
    );
    if minor > 0 || !unsupported_options.is_empty() {
        let mut b = BytesMut::new();
        messages::negotiate_protocol_version(&mut b, 0, &unsupported_options);
        stream.write_all(&b).await.map_err(|_| gone())?;
    }

    if config.client_tls == ClientTls::Require && !stream.is_tls() {
        return Err(Fatal(
            sqlstate::INVALID_AUTHORIZATION,
            "TLS is required (client_tls = require): connect with sslmode=require".into(),
        ));
    }
    let Some(user) = user.filter(|u| !u.is_empty()) else {
        return Err(Fatal(
            sqlstate::INVALID_AUTHORIZATION,
            "no PostgreSQL user name specified in startup packet".into(),
        ));
    };
    let database = database
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());
    if over_limit {
        return Err(Fatal(
            sqlstate::TOO_MANY_CONNECTIONS,
            "no more connections allowed (max_client_conn)".into(),
        ));
    }
    let pool = ctx.pool(&database);
    if pool.is_none() && !console::is_console_database(&database) {
        return Err(Fatal(
            sqlstate::INVALID_CATALOG_NAME,
            format!("database \"{database}\" does not exist"),
        ));
    }

    // Too many failed logins from this address: refused before any password is checked.
    let peer = stream.peer_ip();
    let guard = ctx.login_guard();
    if let Some(wait) = guard.blocked(peer, config.auth_failure_limit, Instant::now()) {
        return Err(Fatal(
            sqlstate::TOO_MANY_CONNECTIONS,
            format!(
                "too many failed logins from this address (auth_failure_limit); try again in {} s",
                wait.as_secs() + 1
            ),
        ));
    }
    let users = ctx.users();
    if let Err((code, msg)) = auth::authenticate(stream, buf, config.auth_type, &users, &user).await
    {
        if code == sqlstate::INVALID_PASSWORD {
            guard.failed(peer, Instant::now());
            // As PostgreSQL's auth_delay: every wrong guess costs the guesser time.
            tokio::time::sleep(config.auth_failure_delay).await;
        }
        return Err(Fatal(code, msg));
    }

    // The admin console: checked after authentication, so only a signed-in user learns
    // whether it may use it.
    let Some(pool) = pool else {
        let role = console::role(&config, &user).ok_or_else(|| {
            Fatal(
                sqlstate::INVALID_AUTHORIZATION,
                format!("not allowed: user \"{user}\" is not in admin_users or stats_users"),
            )
        })?;
        let welcome = console::welcome_params();
        let params = welcome_client(stream, &welcome, &startup_params, key).await?;
        return Ok((user, database, Target::Admin(role), params));
    };

    // Admin DISABLE, answered as PostgreSQL answers for a database that allows no
    // connections; checked after authentication, like the console.
    if pool.is_disabled() {
        return Err(Fatal(
            sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "database \"{database}\" is not currently accepting connections (admin DISABLE)"
            ),
        ));
    }

    // The welcome: the server's parameters with the client's own values on top.
    let welcome = pool.welcome_params().await.map_err(|e| {
        let code: &'static str = match e.sqlstate() {
            "28P01" => sqlstate::INVALID_PASSWORD,
            "28000" => sqlstate::INVALID_AUTHORIZATION,
            "3D000" => sqlstate::INVALID_CATALOG_NAME,
            "57P01" => sqlstate::ADMIN_SHUTDOWN,
            _ => sqlstate::SQLCLIENT_UNABLE_TO_ESTABLISH,
        };
        Fatal(code, e.to_string())
    })?;
    let params = welcome_client(stream, &welcome, &startup_params, key).await?;
    Ok((user, database, Target::Pool(pool), params))
}

/// Whether `name` is in ignore_startup_parameters (lower case there; GUC names are not
/// case-sensitive).
fn ignored(ignore: &[String], name: &str) -> bool {
    ignore.iter().any(|i| i.eq_ignore_ascii_case(name))
}

/// What iampool makes of the client's startup parameters: those in
/// ignore_startup_parameters dropped, and with application_name_add_host the client's
/// address (`from`) appended to its application_name ("app" when it sent none), as
/// PgBouncer names clients.
fn adjust_startup_params(
    params: &mut Vec<(String, String)>,
    ignore: &[String],
    from: Option<&str>,
) {
    params.retain(|(n, _)| !ignored(ignore, n));
    let Some(from) = from else {
        return;
    };
    let named = params
        .iter_mut()
        .rev()
        .find(|(n, _)| n.eq_ignore_ascii_case("application_name"));
    match named {
        Some((_, v)) => *v = format!("{v} - {from}"),
        None => params.push(("application_name".to_owned(), format!("app - {from}"))),
    }
}

/// Sends the welcome (`welcome` with the client's own values on top, BackendKeyData,
/// ReadyForQuery) and returns the client's session parameters.
async fn welcome_client(
    stream: &mut Stream,
    welcome: &ServerParamList,
    startup_params: &[(String, String)],
    key: (i32, i32),
) -> Result<SessionParams, Fatal> {
    let mut params = SessionParams::default();
    for (n, v) in welcome.iter() {
        params.set_reported(n, v);
    }
    for (n, v) in startup_params {
        // The spelling PostgreSQL would report (client_encoding `utf8` is `UTF8`).
        params.set_startup(n, &canonical_startup_value(n, v));
    }
    let mut out = BytesMut::with_capacity(512);
    for (n, v) in welcome.iter() {
        let v = params.reported(n).unwrap_or(v);
        messages::parameter_status(&mut out, n, v);
    }
    messages::backend_key_data(&mut out, key.0, key.1);
    messages::ready_for_query(&mut out, TxStatus::Idle);
    stream.write_all(&out).await.map_err(|_| gone())?;
    stream.flush().await.map_err(|_| gone())?;
    Ok(params)
}

/// Parses the `options` startup parameter: `-c name=value` and `--name=value`, with `\`
/// escaping a space, as PostgreSQL does.
#[doc(hidden)] // pub for the fuzz targets
pub fn parse_options(options: &str) -> Vec<(String, String)> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_ascii_whitespace() => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let setting = if w == "-c" {
            it.next()
        } else if let Some(rest) = w.strip_prefix("--") {
            Some(rest.to_owned())
        } else {
            w.strip_prefix("-c").map(str::to_owned)
        };
        if let Some((n, v)) = setting.as_deref().and_then(|s| s.split_once('=')) {
            out.push((n.replace('-', "_"), v.to_owned()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{adjust_startup_params, parse_options};

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn ignored_parameters_are_dropped_and_the_host_is_added() {
        let ignore = vec!["extra_float_digits".to_owned()];
        let mut p = pairs(&[
            ("application_name", "psql"),
            ("Extra_Float_Digits", "3"),
            ("search_path", "a"),
        ]);
        adjust_startup_params(&mut p, &ignore, Some("10.0.0.7:51234"));
        assert_eq!(
            p,
            pairs(&[
                ("application_name", "psql - 10.0.0.7:51234"),
                ("search_path", "a")
            ])
        );
        let mut p = pairs(&[("search_path", "a")]);
        adjust_startup_params(&mut p, &[], Some("[::1]:5000"));
        assert_eq!(
            p,
            pairs(&[
                ("search_path", "a"),
                ("application_name", "app - [::1]:5000")
            ])
        );
        let mut p = pairs(&[("application_name", "psql")]);
        adjust_startup_params(&mut p, &[], None);
        assert_eq!(p, pairs(&[("application_name", "psql")]));
    }

    #[test]
    fn options_parsing() {
        assert_eq!(
            parse_options("-c search_path=a,b --statement-timeout=5s -cwork_mem=64MB -c x=a\\ b"),
            vec![
                ("search_path".into(), "a,b".into()),
                ("statement_timeout".into(), "5s".into()),
                ("work_mem".into(), "64MB".into()),
                ("x".into(), "a b".into()),
            ]
        );
    }
}
