//! Where keyrelay listens: a TCP address, or a Unix domain socket
//! (`--listen unix:/path`) whose file permissions are set on creation.
//!
//! A Unix socket keeps keyrelay off the network entirely: only processes that
//! can open the file (by `unix_socket_mode` and directory permissions) reach it.

use std::fmt;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UnixListener, UnixSocket, UnixStream};

use crate::config::ListenAddr;

/// A bound listener.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// A Unix domain socket; the file is removed when the listener is dropped.
    Unix(UnixListener, SocketFile),
}

/// The socket file, removed on drop so a restart can bind again.
#[derive(Debug)]
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl From<TcpListener> for Listener {
    fn from(listener: TcpListener) -> Self {
        Self::Tcp(listener)
    }
}

/// Binds `addr` with room for `backlog` pending connections; a Unix socket
/// file gets permissions `mode` (e.g. 0o600). A stale socket file left by a
/// previous run is replaced; any other file is not.
///
/// The backlog is what a burst of new connections (a frontend fanning out, a
/// restarted app pool) queues in before keyrelay accepts them: when it is
/// full the kernel drops SYNs and each such client waits 1 s, then 3 s, to
/// retry. std and tokio bind with 128 or 1024; keyrelay asks for more.
pub async fn bind(addr: &ListenAddr, mode: u32, backlog: u32) -> io::Result<Listener> {
    let backlog = effective_backlog(backlog);
    match addr {
        ListenAddr::Tcp(addr) => {
            let socket = if addr.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            // What std's TcpListener::bind does on Unix: a restart can bind
            // while old connections sit in TIME_WAIT.
            socket.set_reuseaddr(true)?;
            socket.bind(*addr)?;
            Ok(Listener::Tcp(socket.listen(backlog)?))
        }
        ListenAddr::Unix(path) => {
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                if !meta.file_type().is_socket() {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("{} exists and is not a socket", path.display()),
                    ));
                }
                std::fs::remove_file(path)?;
            }
            let socket = UnixSocket::new_stream()?;
            socket.bind(path)?;
            let listener = socket.listen(backlog)?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
            Ok(Listener::Unix(listener, SocketFile(path.clone())))
        }
    }
}

/// `requested`, or the kernel's ceiling when that is lower (the kernel would
/// cut it silently; saying so at startup tells the operator which knob to turn).
fn effective_backlog(requested: u32) -> u32 {
    match max_backlog() {
        Some(ceiling) if ceiling < requested => {
            tracing::info!(
                listen_backlog = requested,
                somaxconn = ceiling,
                "listen_backlog capped by the kernel's net.core.somaxconn; raise that sysctl for a larger queue"
            );
            ceiling
        }
        _ => requested,
    }
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
            Self::Unix(_, file) => Ok(ListenAddr::Unix(file.0.clone())),
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
    Unix(UnixStream),
}

impl Stream {
    /// Waits until the client has sent at least one byte (or closed).
    pub async fn wait_for_data(&self) -> io::Result<()> {
        let mut first = [0u8; 1];
        match self {
            Self::Tcp(stream) => stream.peek(&mut first).await.map(drop),
            Self::Unix(stream) => stream.readable().await,
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
            Self::Unix(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Tcp(stream) => stream.is_write_vectored(),
            Self::Unix(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(stream) => Pin::new(stream).poll_flush(cx),
            Self::Unix(stream) => Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(stream) => Pin::new(stream).poll_shutdown(cx),
            Self::Unix(stream) => Pin::new(stream).poll_shutdown(cx),
        }
    }
}
