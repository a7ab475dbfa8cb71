//! systemd socket activation (sd_listen_fds(3)): started for
//! `keyrelay.socket` (deploy/systemd/), keyrelay serves on the listening
//! socket systemd passes as fd 3 and binds nothing itself.
//!
//! systemd says it passed sockets in `LISTEN_FDS` (how many, from fd 3) and
//! `LISTEN_PID` (the process they are for: a variable a child inherited is
//! not the child's, so it is ignored when the pid is not this one). The
//! socket's address then takes the place of `listen` for every rule that
//! judges it (access tokens beyond loopback, the admin port), so a socket
//! unit cannot put keyrelay on the network where `listen` could not.
//!
//! One TCP socket, listening (`Accept=no`, the default): keyrelay has one
//! main listener, and a Unix socket it did not create has no file for it to
//! own (use `listen = "unix:/path"` for that).

use std::collections::HashMap;
use std::net::TcpListener;

use crate::ops::listener::Listener;

/// The first descriptor systemd passes (SD_LISTEN_FDS_START).
#[cfg(target_os = "linux")]
const FIRST_FD: i32 = 3;

/// The listening socket systemd passed this process, if it passed one;
/// `Err` (a sentence for the operator) if what it passed cannot be served on.
///
/// `env` is the process environment; `pid` this process's id.
pub fn take(env: &HashMap<String, String>, pid: u32) -> Result<Option<TcpListener>, String> {
    if !passed_to(env, pid)? {
        return Ok(None);
    }
    take_first().map(Some)
}

/// Takes fd 3 as a listening TCP socket.
#[cfg(target_os = "linux")]
fn take_first() -> Result<TcpListener, String> {
    let socket = listenfd::ListenFd::from_env()
        .take_tcp_listener(0)
        .map_err(|err| {
            format!(
                "fd {FIRST_FD} is not a TCP socket ({err}): give keyrelay.socket a \
                 ListenStream= of an IP:port (for a Unix socket, use listen = \"unix:/path\" \
                 without socket activation)"
            )
        })?
        .ok_or_else(|| format!("fd {FIRST_FD} was already taken"))?;
    let listening = socket2::SockRef::from(&socket)
        .is_listener()
        .map_err(|err| format!("cannot read fd {FIRST_FD}'s state: {err}"))?;
    if !listening {
        return Err(format!(
            "fd {FIRST_FD} is a connection, not a listening socket: keyrelay.socket \
             needs Accept=no (the default)"
        ));
    }
    Ok(socket)
}

/// systemd, whose protocol this is, runs on Linux only.
#[cfg(not(target_os = "linux"))]
fn take_first() -> Result<TcpListener, String> {
    Err("LISTEN_FDS is systemd's, and keyrelay takes sockets from it on Linux only".to_owned())
}

/// Whether `LISTEN_FDS`/`LISTEN_PID` pass one socket to process `pid`.
fn passed_to(env: &HashMap<String, String>, pid: u32) -> Result<bool, String> {
    let (Some(fds), Some(for_pid)) = (env.get("LISTEN_FDS"), env.get("LISTEN_PID")) else {
        return Ok(false);
    };
    if for_pid.trim().parse::<u32>().ok() != Some(pid) {
        return Ok(false);
    }
    match fds.trim().parse::<u32>() {
        Ok(0) => Ok(false),
        Ok(1) => Ok(true),
        Ok(count) => Err(format!(
            "systemd passed {count} sockets (LISTEN_FDS={count}) and keyrelay serves on one: \
             give keyrelay.socket a single ListenStream="
        )),
        Err(_) => Err(format!("LISTEN_FDS={fds:?} is not a number of sockets")),
    }
}

/// `socket` as the listener [`crate::run`] takes, on the calling runtime.
pub fn into_listener(socket: TcpListener) -> std::io::Result<Listener> {
    socket.set_nonblocking(true)?;
    Ok(Listener::from(tokio::net::TcpListener::from_std(socket)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect()
    }

    #[test]
    fn one_socket_for_this_pid_is_taken() {
        let vars = env(&[("LISTEN_FDS", "1"), ("LISTEN_PID", "42")]);
        assert_eq!(passed_to(&vars, 42), Ok(true));
    }

    #[test]
    fn sockets_for_another_pid_or_without_a_pid_are_not_ours() {
        for vars in [
            env(&[("LISTEN_FDS", "1"), ("LISTEN_PID", "41")]),
            env(&[("LISTEN_FDS", "1")]),
            env(&[("LISTEN_FDS", "1"), ("LISTEN_PID", "x")]),
            env(&[("LISTEN_FDS", "0"), ("LISTEN_PID", "42")]),
            env(&[]),
        ] {
            assert_eq!(passed_to(&vars, 42), Ok(false), "{vars:?}");
        }
    }

    #[test]
    fn more_than_one_socket_or_a_bad_count_is_an_error() {
        let two = passed_to(&env(&[("LISTEN_FDS", "2"), ("LISTEN_PID", "42")]), 42);
        assert!(two.is_err_and(|message| message.contains("single ListenStream")));
        let bad = passed_to(&env(&[("LISTEN_FDS", "one"), ("LISTEN_PID", "42")]), 42);
        assert!(bad.is_err());
    }
}
