//! Where and how keyrelay listens: the address, the kernel's backlog, the
//! serving threads, the Unix socket's mode, the shutdown timings, and the
//! admin listener, which must not be left open to the network.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::{Problems, Reported};
use crate::config::{ListenAddr, RawConfig, UNIX_LISTEN_UNSUPPORTED};

/// The listener settings besides its address.
pub(super) struct Serving {
    pub(super) backlog: u32,
    pub(super) workers: usize,
    pub(super) unix_socket_mode: u32,
    pub(super) shutdown_grace: Option<Duration>,
    pub(super) shutdown_delay: Option<Duration>,
}

/// `listen`: `IP:port` or `unix:/absolute/path` (Unix only).
pub(super) fn listen_addr(raw: &RawConfig, found: &mut Problems) -> Result<ListenAddr, Reported> {
    parse_listen(&raw.listen, cfg!(unix)).map_err(|problem| found.refuse("listen", problem))
}

/// `text` as a listen address, or why not; `unix_sockets` says whether this
/// platform has Unix domain sockets (a parameter, so the Windows answer is
/// tested on Linux too).
fn parse_listen(text: &str, unix_sockets: bool) -> Result<ListenAddr, String> {
    match text.strip_prefix("unix:") {
        Some(_) if !unix_sockets => Err(format!("{text:?}: {UNIX_LISTEN_UNSUPPORTED}")),
        Some(path) if path.starts_with('/') => Ok(ListenAddr::Unix(PathBuf::from(path))),
        _ => text
            .parse::<SocketAddr>()
            .map(ListenAddr::Tcp)
            .map_err(|_| {
                let unix = if unix_sockets {
                    " or unix:/absolute/path"
                } else {
                    ""
                };
                format!("{text:?} is not an IP:port address{unix}")
            }),
    }
}

/// The TCP address of a listener, if it is one (what network exposure is
/// judged by).
pub(super) fn tcp(listen: &ListenAddr) -> Option<SocketAddr> {
    match listen {
        ListenAddr::Tcp(addr) => Some(*addr),
        ListenAddr::Unix(_) => None,
    }
}

/// `listen_backlog`, `workers`, `unix_socket_mode`, `shutdown_grace`,
/// `shutdown_delay`.
pub(super) fn serving(raw: &RawConfig, found: &mut Problems) -> Result<Serving, Reported> {
    let backlog = found.number(
        "listen_backlog",
        &raw.listen_backlog,
        1..=MAX_LISTEN_BACKLOG,
        "a number of connections",
    );
    let workers = parse_workers(&raw.workers);
    if workers.is_none() {
        found.report(
            "workers",
            format!(
                "{:?} is not auto or a number of threads from 1 to {MAX_WORKERS}",
                raw.workers
            ),
        );
    }
    let unix_socket_mode = u32::from_str_radix(raw.unix_socket_mode.trim(), 8)
        .ok()
        .filter(|mode| *mode <= 0o777);
    if unix_socket_mode.is_none() {
        found.report(
            "unix_socket_mode",
            format!(
                "{:?} is not an octal mode such as 0600",
                raw.unix_socket_mode
            ),
        );
    }
    let shutdown_grace = found.optional_duration("shutdown_grace", &raw.shutdown_grace);
    let shutdown_delay = found.optional_duration("shutdown_delay", &raw.shutdown_delay);
    Ok(Serving {
        backlog: backlog?,
        workers: workers.ok_or(Reported)?,
        unix_socket_mode: unix_socket_mode.ok_or(Reported)?,
        shutdown_grace: shutdown_grace?,
        shutdown_delay: shutdown_delay?,
    })
}

/// `admin_listen`, "off" or an address kept off the network (see
/// [`check_admin_exposure`]).
pub(super) fn admin_listen(
    raw: &RawConfig,
    listen: Option<SocketAddr>,
    found: &mut Problems,
) -> Result<Option<SocketAddr>, Reported> {
    let admin =
        found.optional::<SocketAddr>("admin_listen", &raw.admin_listen, "an IP:port address")?;
    if let Some(admin) = admin {
        check_admin_exposure(raw, admin, listen, found);
    }
    Ok(admin)
}

/// The admin port takes no access token, so tokens cannot be what lets it
/// onto the network by themselves: beyond loopback it needs
/// `allow_unauthenticated_network`, or a main listener that is itself on
/// the network behind access tokens (a deployment meant for other machines,
/// as deploy/kubernetes/shared.yaml, where a NetworkPolicy guards the admin
/// port). `/quitquitquit` stays loopback-only either way.
fn check_admin_exposure(
    raw: &RawConfig,
    admin: SocketAddr,
    listen: Option<SocketAddr>,
    found: &mut Problems,
) {
    if admin.ip().is_loopback() || raw.allow_unauthenticated_network.on() {
        return;
    }
    let tokens = raw.access_token_env.iter().any(|n| !n.is_empty())
        || raw.access_token_files.iter().any(|p| !p.is_empty());
    let networked = listen.is_some_and(|addr| !addr.ip().is_loopback());
    if tokens && networked {
        return;
    }
    found.report(
        "admin_listen",
        format!(
            "{admin} is reachable from other machines, and the admin port takes no access token \
             (its /metrics and /usage would be open to them): keep it on loopback \
             (127.0.0.1:9901), or pass --allow-unauthenticated-network if something else \
             (a NetworkPolicy, a firewall) already restricts who can connect"
        ),
    );
}

/// Largest accepted `listen_backlog`: the kernel keeps the backlog in a
/// 16-bit field on some systems, and more than this is never useful.
const MAX_LISTEN_BACKLOG: u32 = 65_535;

/// Most serving threads: far beyond any core count keyrelay is run on, and
/// each thread holds its own upstream connections.
const MAX_WORKERS: usize = 256;

/// `workers`: `auto` is the CPUs this process may run on, which
/// `available_parallelism` reads from the affinity mask and the cgroup
/// quota (a pod limited to 2 CPUs on a 64-core node gets 2).
fn parse_workers(raw: &str) -> Option<usize> {
    match raw.trim() {
        "auto" => Some(
            std::thread::available_parallelism()
                .map_or(1, std::num::NonZeroUsize::get)
                .min(MAX_WORKERS),
        ),
        number => number
            .parse::<usize>()
            .ok()
            .filter(|workers| (1..=MAX_WORKERS).contains(workers)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_listen_addresses_are_refused_where_there_are_no_unix_sockets() {
        let refused = parse_listen("unix:/run/keyrelay.sock", false).expect_err("refused");
        assert!(refused.contains("not supported on Windows"), "{refused}");
        assert!(
            refused.contains("127.0.0.1:8080"),
            "names what to use instead: {refused}"
        );
        let windows_path = parse_listen(r"unix:C:\keyrelay.sock", false).expect_err("refused");
        assert!(
            windows_path.contains("not supported on Windows"),
            "{windows_path}"
        );
        assert_eq!(
            parse_listen("unix:/run/keyrelay.sock", true),
            Ok(ListenAddr::Unix(PathBuf::from("/run/keyrelay.sock")))
        );
    }

    #[test]
    fn a_bad_address_offers_unix_sockets_only_where_they_exist() {
        let unix = parse_listen("nowhere", true).expect_err("bad");
        assert_eq!(
            unix,
            r#""nowhere" is not an IP:port address or unix:/absolute/path"#
        );
        let windows = parse_listen("nowhere", false).expect_err("bad");
        assert_eq!(windows, r#""nowhere" is not an IP:port address"#);
        assert!(parse_listen("unix:relative.sock", true).is_err());
        assert_eq!(
            parse_listen("127.0.0.1:8080", false),
            Ok(ListenAddr::Tcp(([127, 0, 0, 1], 8080).into()))
        );
    }
}
