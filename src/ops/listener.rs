//! Where keyrelay listens: a TCP address, or a Unix domain socket
//! (`--listen unix:/path`) whose file permissions are set on creation.
//!
//! A Unix socket keeps keyrelay off the network entirely: only processes that
//! can open the file (by `unix_socket_mode` and directory permissions) reach it.

use std::fmt;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UnixListener, UnixSocket, UnixStream};

use crate::config::ListenAddr;

/// A bound listener.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// A Unix domain socket; the file is removed when the last listener
    /// sharing it is dropped.
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
    Unix(std::os::unix::net::UnixListener, Arc<SocketFile>),
}

/// The socket file, removed on drop so a restart can bind again, unless
/// the path no longer names this socket (another process has since put its
/// own there: removing it would cut that one off).
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    /// Device and inode of the socket keyrelay bound.
    id: Option<(u64, u64)>,
}

impl SocketFile {
    fn new(path: PathBuf) -> Self {
        let id = file_id(&path);
        Self { path, id }
    }
}

/// The device and inode `path` names (not following a symlink).
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|meta| (meta.dev(), meta.ino()))
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if self.id.is_some() && file_id(&self.path) == self.id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
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
            Ok(Listener::Tcp(reuseport_socket(*addr)?.listen(backlog)?))
        }
        ListenAddr::Unix(path) => {
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                if !meta.file_type().is_socket() {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("{} exists and is not a socket", path.display()),
                    ));
                }
                ensure_socket_stale(path).await?;
                std::fs::remove_file(path)?;
            }
            let listener = bind_unix_with_mode(path, mode, backlog)?;
            Ok(Listener::Unix(
                listener,
                Arc::new(SocketFile::new(path.clone())),
            ))
        }
    }
}

/// Fails with "address in use" unless the socket file at `path` is stale:
/// nothing accepts connections on it any more (a run that was killed left
/// it). A live socket belongs to another process, often a second keyrelay
/// started with the same `listen`: replacing it would take its clients.
/// The connect does not block (a live server with a full backlog answers
/// "try again", which counts as live), and connecting is the one test that
/// works across processes and containers sharing the directory.
async fn ensure_socket_stale(path: &Path) -> io::Result<()> {
    match UnixStream::connect(path).await {
        Ok(_live) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "{} is a socket another process is listening on (another keyrelay?); \
                 stop it or choose another path",
                path.display()
            ),
        )),
        Err(err)
            if matches!(
                err.kind(),
                io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
            ) =>
        {
            Ok(())
        }
        Err(err) => Err(io::Error::new(
            err.kind(),
            format!(
                "cannot tell whether the socket {} is still in use ({err}); \
                 not replacing it",
                path.display()
            ),
        )),
    }
}

/// A TCP socket for `addr` with `SO_REUSEPORT`, so each serving thread can
/// have its own listening socket on the port (see
/// [`Listener::into_worker_sockets`]), and `SO_REUSEADDR`, as std's
/// `TcpListener::bind` sets on Unix: a restart can bind while old
/// connections sit in TIME_WAIT.
fn reuseport_socket(addr: std::net::SocketAddr) -> io::Result<TcpSocket> {
    let socket = reuseaddr_socket(addr)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

/// A TCP socket of `addr`'s family with `SO_REUSEADDR`, not yet bound.
fn reuseaddr_socket(addr: std::net::SocketAddr) -> io::Result<TcpSocket> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
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
fn ensure_port_free(addr: std::net::SocketAddr) -> io::Result<()> {
    reuseaddr_socket(addr)?.bind(addr)
}

/// Binds a Unix socket that appears at `path` only once it is listening and
/// has permissions `mode`: it is bound under a temporary name beside `path`,
/// chmod-ed before it listens (until then a connect is refused, so no one
/// gets in under the umask's mode), then renamed into place (a rename keeps
/// the bound inode).
///
/// Binding at `path` directly would leave a window in which the file exists
/// with the umask's mode (wider than `mode` under a lax umask) and in which a
/// client that waits for the file to appear, as sidecars and scripts do, is
/// refused because listen() has not run yet.
fn bind_unix_with_mode(path: &Path, mode: u32, backlog: u32) -> io::Result<UnixListener> {
    let mut staging = path.as_os_str().to_owned();
    staging.push(format!(".{}", std::process::id()));
    let staging = PathBuf::from(staging);
    // A socket left by a run that died here (in a container the pid is
    // often the same); any other file of that name is not ours to remove.
    if std::fs::symlink_metadata(&staging).is_ok_and(|meta| meta.file_type().is_socket()) {
        std::fs::remove_file(&staging)?;
    }
    let socket = UnixSocket::new_stream()?;
    if let Err(err) = socket.bind(&staging) {
        if err.kind() != io::ErrorKind::InvalidInput {
            return Err(err);
        }
        // The staging name is longer than a socket address may be (108
        // bytes on Linux) while `path` itself fits: bind in place instead.
        let socket = UnixSocket::new_stream()?;
        socket.bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        return socket.listen(backlog);
    }
    let placed = std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(mode))
        .and_then(|()| socket.listen(backlog))
        .and_then(|listener| {
            std::fs::rename(&staging, path)?;
            Ok(listener)
        });
    if placed.is_err() {
        let _ = std::fs::remove_file(&staging);
    }
    placed
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
                let spread = socket2::SockRef::from(&first).reuse_port()?;
                let addr = first.local_addr()?;
                let mut sockets = Vec::with_capacity(workers);
                for _ in 1..workers {
                    let sibling = if spread {
                        reuseport_socket(addr)?
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

impl WorkerSocket {
    /// The listener, registered with the calling thread's runtime.
    pub fn into_listener(self) -> io::Result<Listener> {
        match self {
            Self::Tcp(socket) => {
                socket.set_nonblocking(true)?;
                Ok(Listener::Tcp(TcpListener::from_std(socket)?))
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn socket_mode(path: &Path) -> u32 {
        std::fs::metadata(path)
            .expect("socket file")
            .permissions()
            .mode()
            & 0o777
    }

    #[tokio::test]
    async fn a_unix_socket_appears_with_its_mode_and_leaves_no_staging_file() {
        let dir = std::env::temp_dir().join(format!("keyrelay-listener-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("k.sock");
        let listener = bind(&ListenAddr::Unix(path.clone()), 0o600, 16)
            .await
            .expect("bind");
        assert_eq!(socket_mode(&path), 0o600);
        let client = UnixStream::connect(&path).await.expect("connect");
        listener.accept().await.expect("accept");
        drop(client);
        drop(listener);
        let left: Vec<_> = std::fs::read_dir(&dir).expect("read dir").collect();
        assert!(left.is_empty(), "left behind: {left:?}");
        std::fs::remove_dir(&dir).expect("remove dir");
    }

    #[tokio::test]
    async fn a_path_too_long_for_a_staging_name_still_binds_with_its_mode() {
        let dir = std::env::temp_dir().join(format!("keyrelay-long-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        // 107 bytes is the longest socket path Linux takes (108 with the NUL);
        // macOS takes 103.
        let limit = if cfg!(target_os = "linux") { 107 } else { 103 };
        let room = limit - dir.as_os_str().len() - 1;
        let path = dir.join("s".repeat(room));
        let listener = bind(&ListenAddr::Unix(path.clone()), 0o640, 16)
            .await
            .expect("bind a path of the longest length");
        assert_eq!(socket_mode(&path), 0o640);
        drop(listener);
        assert!(!path.exists(), "socket file removed on drop");
        std::fs::remove_dir(&dir).expect("remove dir");
    }
}
