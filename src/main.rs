//! The `keyrelay` binary: parse flags, load config, start logging, run.

use std::io::{self, Write};
use std::process::ExitCode;

use keyrelay::config::cli::{self, Action};
use keyrelay::config::{self, OverrideValue, Sources};
use keyrelay::demo::{self, DemoError};
use keyrelay::ops::{signals, socket_activation};
use keyrelay::telemetry::logging;

/// jemalloc rather than glibc's malloc: a minute after a burst of 2,000
/// held streams ended, glibc still held all of its 74 MiB peak; jemalloc,
/// whose background thread purges freed pages while keyrelay is idle, is
/// back to 12 MiB (idle: 9), and packs each stream's buffers tighter
/// (issue 29, BENCHMARKS.md). The x86_64 static musl binary (release archive
/// and container image) uses it too: musl's malloc costs 10% more
/// instructions per request. The aarch64 musl binary keeps musl's: it is
/// cross-built, so jemalloc would be configured for 4 KiB pages and abort on
/// the 16 and 64 KiB pages some arm64 kernels use.
#[cfg(all(target_os = "linux", any(target_env = "gnu", target_arch = "x86_64")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Starts jemalloc's background purging: without it jemalloc purges only
/// when it is called, and a process gone idle after a burst keeps its
/// pages. One thread is enough for a proxy's allocation rate. A failure
/// costs only memory, so it is ignored (logging is not set up yet).
#[cfg(all(target_os = "linux", any(target_env = "gnu", target_arch = "x86_64")))]
fn purge_in_background() {
    let _ = tikv_jemalloc_ctl::max_background_threads::write(1);
    let _ = tikv_jemalloc_ctl::background_thread::write(true);
}

/// EX_USAGE from sysexits.h: the configuration or command line is wrong.
const EXIT_USAGE: u8 = 64;
/// EX_UNAVAILABLE: a resource the proxy needs (its port) could not be had.
const EXIT_UNAVAILABLE: u8 = 69;

fn main() -> ExitCode {
    #[cfg(all(target_os = "linux", any(target_env = "gnu", target_arch = "x86_64")))]
    purge_in_background();
    let matches = match cli::command().try_get_matches() {
        Ok(matches) => matches,
        Err(err) => {
            let usage_error = err.use_stderr();
            // Prints help/version to stdout, errors to stderr.
            let _ = err.print();
            return if usage_error {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let (action, sources) = cli::interpret(&matches, Sources::from_process_env());

    match action {
        Action::Proxy => block_on(run_proxy(sources)),
        Action::Health(url) => block_on(async move {
            match keyrelay::ops::health::check(&url).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(reason) => {
                    eprintln!("keyrelay health: {reason}");
                    ExitCode::FAILURE
                }
            }
        }),
        Action::Demo => block_on(async move {
            match demo::run(sources).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(DemoError::Config(err)) => {
                    eprintln!("keyrelay: {err}");
                    ExitCode::from(EXIT_USAGE)
                }
                Err(DemoError::Io(err)) => {
                    eprintln!("keyrelay demo: {err}");
                    ExitCode::FAILURE
                }
            }
        }),
        // Generated text needs neither the configuration nor the runtime.
        Action::Completions(shell) => print_generated(Ok(cli::completions(shell))),
        Action::Man => print_generated(cli::man_page()),
    }
}

/// Runs `task` to completion on a new single-threaded Tokio runtime: the
/// control plane (signals, admin port, file watchers, the demo's mock model).
/// The proxy's data path runs on its own serving threads (`ops::workers`).
fn block_on(task: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(task),
        Err(err) => {
            eprintln!("keyrelay: cannot start the async runtime: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Writes a completion script or man page to stdout; a closed pipe
/// (`keyrelay man | head`) is reported, not a panic.
fn print_generated(text: io::Result<Vec<u8>>) -> ExitCode {
    let written = text.and_then(|bytes| {
        let mut stdout = io::stdout().lock();
        stdout.write_all(&bytes)?;
        stdout.flush()
    });
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("keyrelay: cannot write to stdout: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run_proxy(mut sources: Sources) -> ExitCode {
    let activated = match socket_activation::take(&sources.env, std::process::id()) {
        Ok(socket) => socket,
        Err(err) => {
            eprintln!("keyrelay: listen: socket activation: {err}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // The passed socket stands in for `listen`, so the rules that judge
    // `listen` (access tokens beyond loopback) judge where it really is.
    let activated_addr = activated
        .as_ref()
        .and_then(|socket| socket.local_addr().ok());
    if let Some(addr) = activated_addr {
        sources.set("listen", OverrideValue::Text(addr.to_string()));
    }
    let config = match config::load(&sources) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("keyrelay: {err}");
            if let Some(addr) = activated_addr {
                eprintln!(
                    "keyrelay: (listen is {addr}, the socket systemd passed: socket activation)"
                );
            }
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // Held to the end: dropping it writes out every queued log line.
    let _log = logging::init(config.log_format);
    // Before the socket exists: a supervisor (or test) that sees the socket
    // and at once asks keyrelay to stop gets a drain, not the default
    // action of a signal nothing handles yet.
    let shutdown = signals::shutdown_requested();
    let bound = match activated {
        Some(socket) => {
            tracing::info!(
                listen = activated_addr.map(tracing::field::display),
                "socket activation: serving on the socket systemd passed (fd 3), binding nothing"
            );
            socket_activation::into_listener(socket)
        }
        None => {
            keyrelay::ops::listener::bind(
                &config.listen,
                config.unix_socket_mode,
                config.listen_backlog,
            )
            .await
        }
    };
    let listener = match bound {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!(
                "keyrelay: listen: cannot listen on {}: {err}",
                config.listen
            );
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
    };
    match keyrelay::run(config, listener, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("keyrelay: {err}");
            ExitCode::FAILURE
        }
    }
}
