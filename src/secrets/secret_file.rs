//! The upstream key from a file, kept current without a restart.
//!
//! Kubernetes mounts Secrets as files and swaps them atomically on rotation.
//! keyrelay reads the file at startup, then re-reads it every
//! [`POLL_INTERVAL`] and on SIGHUP. A changed key applies to new requests;
//! streams in flight keep the connection they have. If the file becomes
//! empty or unreadable, the previous key stays in use and an error is logged
//! (once per distinct problem, not every poll). Access-token files are
//! watched by the same loop ([`watch_secret`]).
//!
//! A secret file must be a regular file: a FIFO would block the open until
//! a writer came, a device or directory is a mistake, so the file is opened
//! without blocking and refused unless `fstat` says it is regular (at
//! startup a config error naming the setting, on a re-read a logged problem
//! with the previous secret kept). The re-reads run on the blocking pool
//! under [`READ_TIMEOUT`], never on the control-plane thread, which also
//! serves signals, the drain and the admin port: a slow or hung network
//! mount delays only the re-read, and a hung read is waited for, not
//! started again beside it.
//!
//! On Windows there is no SIGHUP: the poll alone re-reads the file. The file
//! is opened sharing read, write and delete (std's default there), so
//! keyrelay's brief open never makes an editor's or a deploy tool's
//! replace-by-rename fail, and the next poll reads the file now at the path.
//! A program that holds the file open without sharing it (or with a byte
//! range locked) makes the open or read fail with a sharing or lock
//! violation: that read is retried a few times ([`LOCK_ATTEMPTS`]) before it
//! counts as a problem, and after that the previous secret is kept and the
//! next poll tries again.

use std::io::Read;
#[cfg(unix)]
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
#[cfg(unix)]
use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinHandle;
use zeroize::Zeroizing;

use crate::secrets::credential::LiveCredential;
use crate::secrets::key::ApiKey;

/// How often the key file is re-read. Reading a small file once a second
/// catches every kind of replacement (rewrite, rename, symlink swap) simply.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The longest a re-read may take before the watcher reports it and keeps
/// the previous secret; the read itself is awaited again on the next round.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The most a secret file may hold: keys and tokens are short.
const MAX_SECRET_FILE: u64 = 64 * 1024;

/// Reads of a file another program holds locked (Windows), before the lock
/// counts as a problem: a program saving the file holds it for milliseconds.
pub const LOCK_ATTEMPTS: u32 = 4;

/// The wait between those reads.
const LOCK_RETRY_DELAY: Duration = Duration::from_millis(50);

/// Windows' ERROR_SHARING_VIOLATION: the file is open elsewhere without
/// sharing read access.
const WINDOWS_SHARING_VIOLATION: i32 = 32;

/// Windows' ERROR_LOCK_VIOLATION: part of the file is locked (`LockFileEx`).
const WINDOWS_LOCK_VIOLATION: i32 = 33;

/// Reads a key file: surrounding whitespace (the trailing newline editors add)
/// is dropped, and an empty file counts as no key.
pub fn read(path: &Path) -> Result<ApiKey, String> {
    read_secret(path).map(ApiKey::new)
}

/// Reads a file holding one secret (a key or a token), trimmed; empty is an error.
/// Refuses anything but a regular file (FIFO, socket, device, directory),
/// without blocking on it. A file another program holds locked is read
/// again up to [`LOCK_ATTEMPTS`] times.
pub fn read_secret(path: &Path) -> Result<String, String> {
    let cannot = |err: std::io::Error| {
        let hint = if is_lock_conflict(&err) {
            " (another program holds it open without sharing it)"
        } else {
            ""
        };
        format!("cannot read {}: {err}{hint}", path.display())
    };
    let read = retry_while_locked(LOCK_ATTEMPTS, LOCK_RETRY_DELAY, is_lock_conflict, || {
        read_secret_once(path)
    });
    match read {
        Ok(Ok(secret)) => Ok(secret),
        Ok(Err(refused)) => Err(refused),
        Err(err) => Err(cannot(err)),
    }
}

/// One read of [`read_secret`]: an I/O error, or the file read and either
/// its secret or why it is refused.
fn read_secret_once(path: &Path) -> std::io::Result<Result<String, String>> {
    let file = open_without_blocking(path)?;
    // The file opened, not the path: a swap in between cannot slip by.
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Ok(Err(format!(
            "{} is {}, not a regular file; a key or token file must be a plain file",
            path.display(),
            kind_of(meta.file_type())
        )));
    }
    if meta.len() > MAX_SECRET_FILE {
        return Ok(Err(format!(
            "{} holds {} bytes, more than a key or token file may ({MAX_SECRET_FILE})",
            path.display(),
            meta.len()
        )));
    }
    let mut text = Zeroizing::new(String::new());
    file.take(MAX_SECRET_FILE).read_to_string(&mut text)?;
    let secret = text.trim();
    if secret.is_empty() {
        return Ok(Err(format!("{} is empty", path.display())));
    }
    Ok(Ok(secret.to_owned()))
}

/// Opens `path` for reading. O_NONBLOCK: opening a FIFO for reading would
/// otherwise wait for a writer. It changes nothing for a regular file.
#[cfg(unix)]
fn open_without_blocking(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
}

/// Opens `path` for reading, sharing read, write and delete access (std's
/// default on Windows), so a replace-by-rename is never refused because of
/// it. Opening a named pipe there does not wait for its server.
#[cfg(not(unix))]
fn open_without_blocking(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::File::open(path)
}

/// Runs `read` until it succeeds, fails otherwise than `locked` says, or has
/// run `attempts` times, waiting `delay` between runs.
fn retry_while_locked<T>(
    attempts: u32,
    delay: Duration,
    locked: impl Fn(&std::io::Error) -> bool,
    mut read: impl FnMut() -> std::io::Result<T>,
) -> std::io::Result<T> {
    let mut attempt = 1;
    loop {
        match read() {
            Err(err) if attempt < attempts && locked(&err) => {
                attempt += 1;
                std::thread::sleep(delay);
            }
            done => return done,
        }
    }
}

/// Whether `err` says another program holds the file locked; only Windows
/// locks files against readers.
fn is_lock_conflict(err: &std::io::Error) -> bool {
    cfg!(windows) && is_windows_lock_error(err.raw_os_error())
}

/// Whether a Windows error code is a sharing or lock violation.
fn is_windows_lock_error(code: Option<i32>) -> bool {
    matches!(
        code,
        Some(WINDOWS_SHARING_VIOLATION | WINDOWS_LOCK_VIOLATION)
    )
}

/// What a file that is not regular is, for the message.
#[cfg(unix)]
fn kind_of(kind: std::fs::FileType) -> &'static str {
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO (named pipe)"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() || kind.is_block_device() {
        "a device"
    } else {
        "a special file"
    }
}

/// What a file that is not regular is, for the message.
#[cfg(not(unix))]
fn kind_of(kind: std::fs::FileType) -> &'static str {
    if kind.is_dir() {
        "a directory"
    } else {
        "a special file"
    }
}

/// [`read_secret`] on the blocking pool, waited for at most
/// [`READ_TIMEOUT`]. A read still running after that is kept in `reading`
/// and awaited by the next call instead of starting another one, so a hung
/// file system holds one blocking thread, not one per poll.
async fn read_off_thread(
    path: &Path,
    reading: &mut Option<JoinHandle<Result<String, String>>>,
) -> Result<String, String> {
    let mut read = match reading.take() {
        Some(read) => read,
        None => {
            let path = path.to_owned();
            tokio::task::spawn_blocking(move || read_secret(&path))
        }
    };
    match tokio::time::timeout(READ_TIMEOUT, &mut read).await {
        Ok(Ok(secret)) => secret,
        Ok(Err(failed)) => Err(format!("reading {} failed: {failed}", path.display())),
        Err(_) => {
            *reading = Some(read);
            Err(format!(
                "reading {} has taken longer than {READ_TIMEOUT:?} (a slow or hung file system?)",
                path.display()
            ))
        }
    }
}

/// Starts watching `path`: installs the SIGHUP handler now (so a SIGHUP right
/// after startup re-reads the key instead of killing the process), then
/// re-reads the file every [`POLL_INTERVAL`] and on SIGHUP, rendering it with
/// `template` into `live` and counting each change in `reloads` (the
/// `credential_reloads` metric). The returned future runs until dropped.
pub fn watch(
    path: PathBuf,
    template: String,
    live: Arc<LiveCredential>,
    reloads: Counter,
) -> impl std::future::Future<Output = ()> {
    let shown = path.display().to_string();
    watch_secret(path, "upstream key", move |read| {
        let keep = |problem| format!("{problem}; keeping the previous key");
        let value = ApiKey::new(read.map_err(keep)?)
            .header_value(&template)
            .map_err(|err| keep(format!("the key in {shown} {err}")))?;
        if value == live.current() {
            return Ok(false);
        }
        live.replace(value);
        reloads.inc();
        Ok(true)
    })
}

/// Watches a file holding one secret (`what`, for the logs): installs the
/// SIGHUP handler now, then re-reads the file every [`POLL_INTERVAL`] and on
/// SIGHUP and hands each read (the trimmed secret, or why it could not be
/// read) to `apply`, which answers whether anything changed or what is wrong
/// and what it did about it. Problems are logged once per distinct problem,
/// not on every poll. The returned future runs until dropped.
pub fn watch_secret(
    path: PathBuf,
    what: &'static str,
    apply: impl FnMut(Result<String, String>) -> Result<bool, String> + Send + 'static,
) -> impl std::future::Future<Output = ()> + Send {
    poll(path, what, apply, hangups())
}

/// SIGHUP, which asks for a re-read between polls.
#[cfg(unix)]
pub(crate) type Hangups = tokio::signal::unix::Signal;

/// A SIGHUP stream (`None` if the handler cannot be installed; always on
/// Windows, which has none).
#[cfg(unix)]
pub(crate) fn hangups() -> Option<Hangups> {
    signal(SignalKind::hangup())
        .map_err(
            |err| tracing::warn!(error = %err, "no SIGHUP handler; secret files are still polled"),
        )
        .ok()
}

/// Windows has no SIGHUP: the poll alone re-reads the file.
#[cfg(not(unix))]
pub(crate) enum Hangups {}

#[cfg(not(unix))]
impl Hangups {
    pub(crate) async fn recv(&mut self) -> Option<()> {
        match *self {}
    }
}

#[cfg(not(unix))]
pub(crate) fn hangups() -> Option<Hangups> {
    None
}

async fn poll(
    path: PathBuf,
    what: &'static str,
    mut apply: impl FnMut(Result<String, String>) -> Result<bool, String>,
    mut hangups: Option<Hangups>,
) {
    let mut ticks = tokio::time::interval(POLL_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_problem: Option<String> = None;
    let mut reading = None;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            Some(()) = async { hangups.as_mut()?.recv().await } => {
                tracing::info!(file = %path.display(), "SIGHUP: re-reading the {what} file");
            }
        }
        match apply(read_off_thread(&path, &mut reading).await) {
            Ok(changed) => {
                last_problem = None;
                if changed {
                    tracing::info!(file = %path.display(), "{what} reloaded; new requests use it");
                }
            }
            Err(problem) => {
                if last_problem.as_deref() != Some(problem.as_str()) {
                    tracing::error!(%problem, "{what} file unusable");
                    last_problem = Some(problem);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::io::{Error, ErrorKind};

    fn locked(err: &Error) -> bool {
        err.kind() == ErrorKind::ResourceBusy
    }

    #[test]
    fn a_locked_file_is_read_again_until_the_lock_is_gone() {
        let mut reads = 0;
        let read = retry_while_locked(4, Duration::ZERO, locked, || {
            reads += 1;
            match reads {
                1 | 2 => Err(Error::from(ErrorKind::ResourceBusy)),
                _ => Ok("key"),
            }
        });
        assert_eq!(read.expect("read once unlocked"), "key");
        assert_eq!(reads, 3);
    }

    #[test]
    fn a_lock_that_stays_is_reported_after_the_last_attempt() {
        let mut reads = 0;
        let read: std::io::Result<()> = retry_while_locked(4, Duration::ZERO, locked, || {
            reads += 1;
            Err(Error::from(ErrorKind::ResourceBusy))
        });
        assert_eq!(
            read.expect_err("still locked").kind(),
            ErrorKind::ResourceBusy
        );
        assert_eq!(reads, 4);
    }

    #[test]
    fn other_failures_are_not_read_again() {
        let mut reads = 0;
        let read: std::io::Result<()> = retry_while_locked(4, Duration::ZERO, locked, || {
            reads += 1;
            Err(Error::from(ErrorKind::NotFound))
        });
        assert_eq!(read.expect_err("missing").kind(), ErrorKind::NotFound);
        assert_eq!(reads, 1);
    }

    #[test]
    fn sharing_and_lock_violations_are_the_windows_lock_errors() {
        assert!(is_windows_lock_error(Some(32)));
        assert!(is_windows_lock_error(Some(33)));
        // ERROR_FILE_NOT_FOUND, ERROR_ACCESS_DENIED: not a passing lock.
        assert!(!is_windows_lock_error(Some(2)));
        assert!(!is_windows_lock_error(Some(5)));
        assert!(!is_windows_lock_error(None));
        // On Unix the same numbers mean other things (32 is EPIPE).
        assert_eq!(
            is_lock_conflict(&Error::from_raw_os_error(32)),
            cfg!(windows)
        );
    }
}
