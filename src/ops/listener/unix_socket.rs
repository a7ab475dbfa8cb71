//! The Unix domain socket listener (`--listen unix:/path`): the socket file
//! appears only once it listens and has its mode, a stale file left by a
//! killed run is replaced and a live one is not, and the file is removed when
//! the last listener sharing it is dropped. Unix only: on Windows a `unix:`
//! listen address is a config error (`config::check::listener`).

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::{UnixListener, UnixSocket, UnixStream};

use super::Listener;

/// Binds a Unix socket at `path` with permissions `mode` (see [`super::bind`]).
pub(super) async fn bind(path: &Path, mode: u32, backlog: u32) -> io::Result<Listener> {
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
        Arc::new(SocketFile::new(path.to_owned())),
    ))
}

/// The socket file, removed on drop so a restart can bind again, unless
/// the path no longer names this socket (another process has since put its
/// own there: removing it would cut that one off).
#[derive(Debug)]
pub struct SocketFile {
    pub(super) path: PathBuf,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ListenAddr;
    use crate::ops::listener::bind;

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
