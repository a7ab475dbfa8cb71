//! Thread per core: the data path runs on `workers` serving threads.
//!
//! Each serving thread is a single-threaded Tokio runtime with its own
//! listening socket ([`Listener::into_worker_sockets`]), its own upstream
//! connections ([`Proxy::for_worker`]) and every task of the connections it
//! accepted: a request is read, forwarded, answered and logged on one thread,
//! with no work stealing and no wake-up sent to another thread. This is the
//! shape of nginx's workers and actix-web's runtime. Against Tokio's
//! work-stealing runtime on the same machine it cut CPU per small request by
//! about a sixth and raised throughput by about a fifth (`BENCHMARKS.md`).
//!
//! What is shared stays shared: routes, admission, access tokens and their
//! rate limits, the concurrency limit, metrics and WebSocket tunnels. The
//! calling runtime keeps the control plane (signals, admin port, key-file
//! watchers) and tells every thread when to stop accepting; each then drains
//! its own connections ([`server::serve`]).

use std::future::Future;
use std::io;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::ops::listener::{Listener, WorkerSocket};
use crate::ops::server;
use crate::proxy::tunnel::Tunnels;
use crate::proxy::Proxy;

/// Serves on `config.workers` threads until `stop_accepting` resolves and
/// every thread has drained; the first thread's error, if any, is returned.
pub(crate) async fn serve(
    listener: Listener,
    proxy: Proxy,
    tunnels: Arc<Tunnels>,
    stop_accepting: impl Future<Output = ()>,
    config: &Config,
) -> io::Result<()> {
    let sockets = listener.into_worker_sockets(config.workers, config.listen_backlog)?;
    let (stop, stopping) = watch::channel(false);
    let (report, mut reports) = mpsc::unbounded_channel::<io::Result<()>>();
    let mut started = 0;
    let mut outcome = Ok(());
    for (index, socket) in sockets.into_iter().enumerate() {
        let proxy = match index {
            0 => Ok(proxy.clone()),
            _ => proxy.for_worker(config, index),
        };
        let spawned = proxy.and_then(|proxy| {
            spawn_worker(
                index,
                socket,
                proxy,
                Arc::clone(&tunnels),
                stopping.clone(),
                config.clone(),
                report.clone(),
            )
        });
        match spawned {
            Ok(()) => started += 1,
            Err(err) => {
                outcome = Err(err);
                break;
            }
        }
    }
    drop(report);

    // A thread that ends before it was told to (it could not register its
    // socket) stops the others too: half a proxy must not look healthy.
    let mut finished = 0;
    if outcome.is_ok() {
        tokio::pin!(stop_accepting);
        tokio::select! {
            () = &mut stop_accepting => {}
            early = reports.recv() => {
                if let Some(result) = early {
                    finished += 1;
                    outcome = result.and(Err(io::Error::other(
                        "a serving thread stopped before shutdown",
                    )));
                }
            }
        }
    }
    let _ = stop.send(true);
    // Each thread reports once; the channel closes when the last has ended.
    while let Some(result) = reports.recv().await {
        finished += 1;
        outcome = outcome.and(result);
    }
    if finished < started {
        // A thread ended without a report: it panicked.
        outcome = outcome.and(Err(thread_lost()));
    }
    outcome
}

/// Starts serving thread `index`: its runtime, its listener, its warm
/// connections, then the accept loop until `stopping` turns true.
fn spawn_worker(
    index: usize,
    socket: WorkerSocket,
    proxy: Proxy,
    tunnels: Arc<Tunnels>,
    mut stopping: watch::Receiver<bool>,
    config: Config,
    report: mpsc::UnboundedSender<io::Result<()>>,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name(format!("keyrelay-worker-{index}"))
        .spawn(move || {
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .and_then(|runtime| {
                    let served = runtime.block_on(async move {
                        let listener = socket.into_listener()?;
                        // Warm connections open in the background: readiness
                        // does not wait for them. The set aborts them when
                        // the thread has drained.
                        let mut keepers = tokio::task::JoinSet::new();
                        for keeper in proxy.warm_keepers() {
                            keepers.spawn(keeper);
                        }
                        let stop = async move {
                            let _ = stopping.wait_for(|stop| *stop).await;
                        };
                        server::serve(listener, proxy, tunnels, stop, &config).await
                    });
                    // Connection and pool tasks still parked on this
                    // runtime close their sockets here, before `run` returns.
                    drop(runtime);
                    served
                });
            let _ = report.send(result);
        })
        .map(drop)
}

fn thread_lost() -> io::Error {
    io::Error::other("a serving thread ended unexpectedly")
}
