//! Where keyrelay listens: a TCP address, or a Unix domain socket
//! (`--listen unix:/path`) whose file permissions are set on creation.
//!
//! A Unix socket keeps keyrelay off the network entirely: only processes that
//! can open the file (by `unix_socket_mode` and directory permissions) reach it.
//! Windows builds listen on TCP only ([`unix_socket`] is Unix-only).

use std::fmt;
use std::io;
use std::pin::Pin;
#[cfg(unix)]
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
#[cfg(unix)]
use tokio::net::{UnixListener, UnixStream};

use crate::config::ListenAddr;

#[cfg(unix)]
mod unix_socket;
#[cfg(unix)]
pub use unix_socket::SocketFile;

/// A bound listener.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// A Unix domain socket; the file is removed when the last listener
    /// sharing it is dropped.
    #[cfg(unix)]
    Unix(UnixListener, Arc<SocketFile>),
}

/// One serving thread's listening socket on its way to that thread: not yet
/// registered with any runtime ([`WorkerSocket::into_listener`] does that on
/// the thread that will accept on it).
#[derive(Debug)]
pub enum WorkerSocket {
    /// TCP.
    Tcp(std::net::TcpListener),
    /// A Unix domain socket.
    #[cfg(unix)]
    Unix(std::os::unix::net::UnixListener, Arc<SocketFile>),
}

impl From<TcpListener> for Listener {
    fn from(listener: TcpListener) -> Self {
        Self::Tcp(listener)
    }
}

/// Binds `addr` with room for `backlog` pending connections; a Unix socket
/// file gets permissions `mode` (e.g. 0o600). A stale socket file left by a
/// previous run is replaced; a live one (something accepts on it) and any
/// other file are not.
///
/// The backlog is what a burst of new connections (a frontend fanning out, a
/// restarted app pool) queues in before keyrelay accepts them: when it is
/// full the kernel drops SYNs and each such client waits 1 s, then 3 s, to
/// retry. std and tokio bind with 128 or 1024; keyrelay asks for more.
pub async fn bind(addr: &ListenAddr, mode: u32, backlog: u32) -> io::Result<Listener> {
    let backlog = effective_backlog(backlog);
    match addr {
        ListenAddr::Tcp(addr) => {
            if addr.port() != 0 {
                ensure_port_free(*addr)?;
            }
            Ok(Listener::Tcp(listening_socket(*addr)?.listen(backlog)?))
        }
        #[cfg(unix)]
        ListenAddr::Unix(path) => unix_socket::bind(path, mode, backlog).await,
        #[cfg(not(unix))]
        ListenAddr::Unix(path) => {
            // Config checks refuse this first; an embedding program may not.
            let _ = (path, mode); // a file mode means something for Unix sockets only
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                crate::config::UNIX_LISTEN_UNSUPPORTED,
            ))
        }
    }
}

/// A TCP socket bound to `addr` with `SO_REUSEPORT`, so each serving thread
/// can have its own listening socket on the port (see
/// [`Listener::into_worker_sockets`]), and `SO_REUSEADDR`, as std's
/// `TcpListener::bind` sets on Unix: a restart can bind while old
/// connections sit in TIME_WAIT.
#[cfg(unix)]
fn listening_socket(addr: std::net::SocketAddr) -> io::Result<TcpSocket> {
    let socket = reuseaddr_socket(addr)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

/// A plain TCP socket bound to `addr`, as std's `TcpListener::bind` binds on
/// Windows. There `SO_REUSEADDR` would let another program bind the same
/// port and take keyrelay's connections, a listener rebinds over TIME_WAIT
/// without it, and no option spreads connections across sockets, so the
/// serving threads share this one ([`Listener::into_worker_sockets`]). The
/// plain bind also refuses a port something already listens on.
#[cfg(not(unix))]
fn listening_socket(addr: std::net::SocketAddr) -> io::Result<TcpSocket> {
    let socket = new_tcp_socket(addr)?;
    socket.bind(addr)?;
    Ok(socket)
}

/// A TCP socket of `addr`'s family, not yet bound.
fn new_tcp_socket(addr: std::net::SocketAddr) -> io::Result<TcpSocket> {
    if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
}

/// A TCP socket of `addr`'s family with `SO_REUSEADDR`, not yet bound.
#[cfg(unix)]
fn reuseaddr_socket(addr: std::net::SocketAddr) -> io::Result<TcpSocket> {
    let socket = new_tcp_socket(addr)?;
    socket.set_reuseaddr(true)?;
    Ok(socket)
}

/// Fails with "address in use" when anything listens on `addr` already.
///
/// `SO_REUSEPORT` would otherwise let a second keyrelay started by the same
/// user on the same port bind without error and silently take half of the
/// first one's connections, with its own key and settings. A socket bound
/// without it conflicts with every listener on the port, as a plain bind
/// always did; it is closed before it ever listens.
#[cfg(unix)]
fn ensure_port_free(addr: std::net::SocketAddr) -> io::Result<()> {
    reuseaddr_socket(addr)?.bind(addr)
}

/// On Windows [`listening_socket`]'s own bind is the check.
#[cfg(not(unix))]
fn ensure_port_free(_addr: std::net::SocketAddr) -> io::Result<()> {
    Ok(())
}

/// `requested`, or the kernel's ceiling when that is lower (the kernel would
/// cut it silently; saying so at startup tells the operator which knob to turn).
fn effective_backlog(requested: u32) -> u32 {
    let backlog = capped_backlog(requested);
    if backlog < requested {
        tracing::info!(
            listen_backlog = requested,
            somaxconn = backlog,
            "listen_backlog capped by the kernel's net.core.somaxconn; raise that sysctl for a larger queue"
        );
    }
    backlog
}

/// `requested`, capped by the kernel's ceiling where it can be read.
fn capped_backlog(requested: u32) -> u32 {
    max_backlog().map_or(requested, |ceiling| ceiling.min(requested))
}

/// The kernel's ceiling on listen backlogs, where it can be read.
#[cfg(target_os = "linux")]
fn max_backlog() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Elsewhere (macOS: kern.ipc.somaxconn) the kernel caps it without telling.
#[cfg(not(target_os = "linux"))]
fn max_backlog() -> Option<u32> {
    None
}

impl Listener {
    /// Accepts the next connection, with a printable peer.
    pub async fn accept(&self) -> io::Result<(Stream, String)> {
        match self {
            Self::Tcp(listener) => {
                let (stream, peer) = listener.accept().await?;
                if let Err(err) = stream.set_nodelay(true) {
                    tracing::debug!(error = %err, "could not set TCP_NODELAY");
                }
                Ok((Stream::Tcp(stream), peer.to_string()))
            }
            #[cfg(unix)]
            Self::Unix(listener, _) => {
                let (stream, _) = listener.accept().await?;
                Ok((Stream::Unix(stream), "unix".to_owned()))
            }
        }
    }

    /// Where it listens, as the `listen` setting would say it.
    pub fn local_addr(&self) -> io::Result<ListenAddr> {
        match self {
            Self::Tcp(listener) => Ok(ListenAddr::Tcp(listener.local_addr()?)),
            #[cfg(unix)]
            Self::Unix(_, file) => Ok(ListenAddr::Unix(file.path.clone())),
        }
    }

    /// The sockets `workers` serving threads accept on, this one first.
    ///
    /// A TCP listener bound with `SO_REUSEPORT`, as [`bind`] binds, gets a
    /// sibling socket per further thread on the same address, each with a
    /// backlog of `backlog`: the kernel spreads new connections across them
    /// by a hash of the client's address and port, so every thread accepts
    /// its own even share and no two wake for the same connection (nginx's
    /// `reuseport`). Any other listener, a Unix socket (where Linux does not
    /// spread connections) or a TCP listener an embedding program bound
    /// itself, is shared: each thread gets a duplicate of the descriptor and
    /// accepts whichever connection it reaches first.
    pub fn into_worker_sockets(
        self,
        workers: usize,
        backlog: u32,
    ) -> io::Result<Vec<WorkerSocket>> {
        let workers = workers.max(1);
        match self {
            Self::Tcp(listener) => {
                let first = listener.into_std()?;
                let spread = spreads_connections(&first)?;
                let addr = first.local_addr()?;
                let mut sockets = Vec::with_capacity(workers);
                for _ in 1..workers {
                    let sibling = if spread {
                        listening_socket(addr)?
                            .listen(capped_backlog(backlog))?
                            .into_std()?
                    } else {
                        first.try_clone()?
                    };
                    sockets.push(WorkerSocket::Tcp(sibling));
                }
                sockets.insert(0, WorkerSocket::Tcp(first));
                Ok(sockets)
            }
            #[cfg(unix)]
            Self::Unix(listener, file) => {
                let first = listener.into_std()?;
                let mut sockets = Vec::with_capacity(workers);
                for _ in 1..workers {
                    sockets.push(WorkerSocket::Unix(first.try_clone()?, Arc::clone(&file)));
                }
                sockets.insert(0, WorkerSocket::Unix(first, file));
                Ok(sockets)
            }
        }
    }
}

/// Whether the kernel spreads new connections across sockets bound like
/// `socket` (`SO_REUSEPORT`, which [`bind`] sets on Unix).
#[cfg(unix)]
fn spreads_connections(socket: &std::net::TcpListener) -> io::Result<bool> {
    socket2::SockRef::from(socket).reuse_port()
}

/// Windows has no such option.
#[cfg(not(unix))]
fn spreads_connections(_socket: &std::net::TcpListener) -> io::Result<bool> {
    Ok(false)
}

impl WorkerSocket {
    /// The listener, registered with the calling thread's runtime.
    pub fn into_listener(self) -> io::Result<Listener> {
        match self {
            Self::Tcp(socket) => {
                socket.set_nonblocking(true)?;
                Ok(Listener::Tcp(TcpListener::from_std(socket)?))
            }
            #[cfg(unix)]
            Self::Unix(socket, file) => {
                socket.set_nonblocking(true)?;
                Ok(Listener::Unix(UnixListener::from_std(socket)?, file))
            }
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "{addr}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// An accepted connection of either kind.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix domain socket.
    #[cfg(unix)]
    Unix(UnixStream),
}

impl Stream {
    /// Waits for the client's first bytes and tells whether they surely
    /// begin an HTTP/1 request: they are there and are not the start of the
    /// HTTP/2 connection preface. Peeks, so nothing is consumed; a Unix
    /// socket (no peek) is never sure.
    pub async fn surely_http1(&self) -> io::Result<bool> {
        const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        let mut first = [0u8; HTTP2_PREFACE.len()];
        match self {
            Self::Tcp(stream) => {
                let n = stream.peek(&mut first).await?;
                Ok(n > 0 && !HTTP2_PREFACE.starts_with(&first[..n]))
            }
            #[cfg(unix)]
            Self::Unix(stream) => stream.readable().await.map(|()| false),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(stream) => Pin::new(stream).poll_read(cx, buf),
            #[cfg(unix)]
            Self::Unix(stream) => Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(stream) => Pin::new(stream).poll_write(cx, buf),
            #[cfg(unix)]
            Self::Unix(stream) => Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            #[cfg(unix)]
            Self::Unix(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Tcp(stream) => stream.is_write_vectored(),
            #[cfg(unix)]
            Self::Unix(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(stream) => Pin::new(stream).poll_flush(cx),
            #[cfg(unix)]
            Self::Unix(stream) => Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(stream) => Pin::new(stream).poll_shutdown(cx),
            #[cfg(unix)]
            Self::Unix(stream) => Pin::new(stream).poll_shutdown(cx),
        }
    }
}
