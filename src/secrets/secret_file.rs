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

use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
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

/// Reads a key file: surrounding whitespace (the trailing newline editors add)
/// is dropped, and an empty file counts as no key.
pub fn read(path: &Path) -> Result<ApiKey, String> {
    read_secret(path).map(ApiKey::new)
}

/// Reads a file holding one secret (a key or a token), trimmed; empty is an error.
/// Refuses anything but a regular file (FIFO, socket, device, directory),
/// without blocking on it.
pub fn read_secret(path: &Path) -> Result<String, String> {
    let cannot = |err: std::io::Error| format!("cannot read {}: {err}", path.display());
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a
    // writer. It changes nothing for a regular file.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(cannot)?;
    // The file opened, not the path: a swap in between cannot slip by.
    let meta = file.metadata().map_err(cannot)?;
    if !meta.is_file() {
        return Err(format!(
            "{} is {}, not a regular file; a key or token file must be a plain file",
            path.display(),
            kind_of(meta.file_type())
        ));
    }
    if meta.len() > MAX_SECRET_FILE {
        return Err(format!(
            "{} holds {} bytes, more than a key or token file may ({MAX_SECRET_FILE})",
            path.display(),
            meta.len()
        ));
    }
    let mut text = Zeroizing::new(String::new());
    file.take(MAX_SECRET_FILE)
        .read_to_string(&mut text)
        .map_err(cannot)?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(secret.to_owned())
}

/// What a file that is not regular is, for the message.
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
    let hangups = signal(SignalKind::hangup())
        .map_err(
            |err| tracing::warn!(error = %err, "no SIGHUP handler; secret files are still polled"),
        )
        .ok();
    poll(path, what, apply, hangups)
}

async fn poll(
    path: PathBuf,
    what: &'static str,
    mut apply: impl FnMut(Result<String, String>) -> Result<bool, String>,
    mut hangups: Option<tokio::signal::unix::Signal>,
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
