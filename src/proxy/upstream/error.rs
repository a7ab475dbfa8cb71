//! Why a request could not be sent upstream: one error for both pools and
//! the connector under them.
//!
//! The cause is typed where the failure happens: the connector
//! ([`super::connect`]) for DNS, TCP, TLS and the connect timeout, the
//! pools for what fails on a connection. It is found from the error's
//! chain by type (keyrelay's own resolver error, `io::ErrorKind`,
//! `rustls::Error`, hyper's error kinds, the request body's own errors),
//! never by its text, once, on the failure path. `proxy/error.rs` maps each
//! [`Cause`] to the client's answer in one `match`.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::proxy::request_body::{BodyTimeout, BodyTooLarge, ClientBodyError};

type BoxError = Box<dyn StdError + Send + Sync>;

/// Why a request could not be sent upstream, from either pool. Cloning
/// shares it (an HTTP/2 connection attempt fails all its waiters alike).
#[derive(Clone, Debug)]
pub(crate) struct SendError {
    cause: Cause,
    /// What failed, in keyrelay's words.
    context: &'static str,
    /// The underlying error, if there is one.
    source: Option<Arc<dyn StdError + Send + Sync>>,
    /// It failed while connecting: the request never left keyrelay.
    connecting: bool,
}

/// What made a request fail on its way upstream.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Cause {
    // No connection: the request never left keyrelay.
    /// The upstream's host name did not resolve.
    Dns,
    /// The upstream refused the TCP connection.
    Refused,
    /// TLS failed: the handshake (untrusted, wrong name, ...), or an alert
    /// later on the connection.
    Tls(rustls::Error),
    /// DNS, TCP and TLS together took longer than `connect_timeout`.
    ConnectTimeout,
    /// Any other failure to connect (unreachable, HTTP/2 refused in ALPN,
    /// a server that allows no HTTP/2 stream, ...).
    Connect,
    // On a connection: the client's body as it was streamed.
    /// The client's body went over `max_request_body` (the limit in bytes).
    BodyTooLarge(u64),
    /// The client paused its body longer than `request_body_timeout`.
    BodyTimeout(Duration),
    /// The client's body was malformed.
    BadBody,
    /// The client went away before its body ended (its connection closed
    /// before the announced length, or it reset its HTTP/2 stream).
    ClientGone,
    // On a connection: the upstream.
    /// The connection closed before the response head (a stale connection
    /// not sent again, or one lost under the request).
    Closed,
    /// Anything else on the connection, e.g. a response that is not HTTP.
    Protocol,
}

impl SendError {
    /// A failure to open a connection, its cause read from `err`'s chain.
    pub(super) fn connecting(err: impl Into<BoxError>) -> Self {
        Self::classified(
            "could not connect to the upstream",
            Arc::from(err.into()),
            true,
        )
    }

    /// A request that failed on its connection, its cause read from `err`'s
    /// chain.
    pub(super) fn sending(err: hyper::Error) -> Self {
        Self::classified("the upstream connection failed", Arc::new(err), false)
    }

    /// The whole connect (DNS, TCP, TLS) took longer than the limit.
    pub(super) fn connect_timeout() -> Self {
        Self::new(
            Cause::ConnectTimeout,
            "connecting to the upstream (DNS, TCP and TLS) timed out",
        )
        .while_connecting()
    }

    /// A failure to connect that keyrelay found itself; `why` is what the
    /// client is told.
    pub(super) fn cannot_connect(why: &'static str) -> Self {
        Self::new(Cause::Connect, why).while_connecting()
    }

    fn while_connecting(mut self) -> Self {
        self.connecting = true;
        self
    }

    /// True when no connection could be made, so the request never left
    /// keyrelay and sending it again cannot make the upstream process it
    /// twice.
    pub(crate) fn never_sent(&self) -> bool {
        self.connecting
    }

    /// The connection closed and the request was never answered.
    pub(super) fn connection_lost() -> Self {
        Self::new(
            Cause::Closed,
            "the upstream connection closed before answering the request",
        )
    }

    fn new(cause: Cause, context: &'static str) -> Self {
        Self {
            cause,
            context,
            source: None,
            connecting: false,
        }
    }

    fn classified(
        context: &'static str,
        source: Arc<dyn StdError + Send + Sync>,
        connecting: bool,
    ) -> Self {
        let mut found = Found::default();
        walk(&*source, &mut |err| found.inspect(err));
        Self {
            cause: found.cause(connecting),
            context,
            source: Some(source),
            connecting,
        }
    }

    /// Why the request failed.
    pub(crate) fn cause(&self) -> &Cause {
        &self.cause
    }

    /// The most specific text about the failure: the innermost error of its
    /// chain, else keyrelay's own words.
    pub(crate) fn detail(&self) -> String {
        match self.innermost() {
            Some(err) => err.to_string(),
            None => self.context.to_owned(),
        }
    }

    fn innermost(&self) -> Option<&(dyn StdError + 'static)> {
        let source: &(dyn StdError + 'static) = self.source.as_deref()?;
        let mut innermost = source;
        walk(source, &mut |err| innermost = err);
        Some(innermost)
    }
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.context)?;
        match self.innermost() {
            Some(err) => write!(f, ": {err}"),
            None => Ok(()),
        }
    }
}

impl StdError for SendError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source.as_deref().map(|err| err as _)
    }
}

/// The upstream's host name did not resolve: the error keyrelay's resolver
/// (see [`super::connect`]) gives, so the cause is known by its type.
#[derive(Debug)]
pub(crate) struct DnsError(pub(super) std::io::Error);

impl fmt::Display for DnsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the upstream host name did not resolve: {}", self.0)
    }
}

impl StdError for DnsError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&self.0)
    }
}

/// Calls `visit` on every error of `err`'s chain, outermost first.
/// `io::Error::source()` skips the error it wraps, and TLS errors come
/// wrapped in more than one `io::Error`, so each layer is unwrapped too.
fn walk<'a>(
    err: &'a (dyn StdError + 'static),
    visit: &mut dyn FnMut(&'a (dyn StdError + 'static)),
) {
    let mut current = Some(err);
    while let Some(err) = current {
        visit(err);
        let mut wrapped = io_inner(err);
        while let Some(inner) = wrapped {
            visit(inner);
            wrapped = io_inner(inner);
        }
        current = err.source();
    }
}

/// The error an `io::Error` wraps, if `err` is one.
fn io_inner<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a (dyn StdError + 'static)> {
    err.downcast_ref::<std::io::Error>()?
        .get_ref()
        .map(|inner| inner as _)
}

/// What an error chain revealed, by type.
#[derive(Default)]
struct Found {
    tls: Option<rustls::Error>,
    body_too_large: Option<u64>,
    body_timeout: Option<Duration>,
    client_body: bool,
    client_gone: bool,
    dns: bool,
    refused: bool,
    timed_out: bool,
    closed: bool,
}

impl Found {
    fn inspect(&mut self, err: &(dyn StdError + 'static)) {
        if let Some(body) = err.downcast_ref::<ClientBodyError>() {
            self.client_body = true;
            self.client_gone |= body.client_gone();
        }
        if let Some(too_large) = err.downcast_ref::<BodyTooLarge>() {
            self.body_too_large = Some(too_large.0);
        }
        if let Some(timeout) = err.downcast_ref::<BodyTimeout>() {
            self.body_timeout = Some(timeout.0);
        }
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            self.tls.get_or_insert_with(|| tls.clone());
        }
        self.dns |= err.is::<DnsError>();
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => self.refused = true,
                std::io::ErrorKind::TimedOut => self.timed_out = true,
                _ => {}
            }
        }
        if let Some(hyper) = err.downcast_ref::<hyper::Error>() {
            self.closed |=
                hyper.is_incomplete_message() || hyper.is_closed() || hyper.is_canceled();
        }
    }

    /// The most specific cause: the client's own body first (it failed as
    /// the request was streamed), then TLS, DNS, a refusal, and the rest by
    /// whether a connection was being opened.
    fn cause(self, connecting: bool) -> Cause {
        if let Some(limit) = self.body_too_large {
            Cause::BodyTooLarge(limit)
        } else if let Some(limit) = self.body_timeout {
            Cause::BodyTimeout(limit)
        } else if self.client_gone {
            Cause::ClientGone
        } else if self.client_body {
            Cause::BadBody
        } else if let Some(tls) = self.tls {
            Cause::Tls(tls)
        } else if self.dns {
            Cause::Dns
        } else if self.refused {
            Cause::Refused
        } else if connecting && self.timed_out {
            Cause::ConnectTimeout
        } else if connecting {
            Cause::Connect
        } else if self.closed {
            Cause::Closed
        } else {
            Cause::Protocol
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[test]
    fn connect_causes_are_read_by_type() {
        let dns = DnsError(io::Error::other("Name or service not known"));
        // Wrapped as hyper-util wraps a resolver error, under text that
        // says nothing of DNS.
        let wrapped = io::Error::other(dns);
        assert_eq!(SendError::connecting(wrapped).cause(), &Cause::Dns);

        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(SendError::connecting(refused).cause(), &Cause::Refused);

        let timed_out = io::Error::from(io::ErrorKind::TimedOut);
        assert_eq!(
            SendError::connecting(timed_out).cause(),
            &Cause::ConnectTimeout
        );

        let unknown = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let tls = io::Error::new(io::ErrorKind::InvalidData, unknown.clone());
        assert_eq!(
            SendError::connecting(io::Error::other(tls)).cause(),
            &Cause::Tls(unknown)
        );

        let other = SendError::connecting(io::Error::other("network is unreachable"));
        assert_eq!(other.cause(), &Cause::Connect);
        assert_eq!(other.detail(), "network is unreachable");
        // The text "dns error" alone no longer counts as a DNS failure.
        assert_eq!(SendError::connecting("dns error").cause(), &Cause::Connect);
    }

    #[test]
    fn errors_without_a_source_tell_their_own_words() {
        let lost = SendError::connection_lost();
        assert_eq!(lost.cause(), &Cause::Closed);
        assert_eq!(
            lost.detail(),
            "the upstream connection closed before answering the request"
        );
        let none = SendError::cannot_connect("the upstream allows no HTTP/2 streams");
        assert_eq!(none.cause(), &Cause::Connect);
        assert_eq!(none.to_string(), "the upstream allows no HTTP/2 streams");
    }
}
