//! `key_command`: a helper program that prints the upstream key.
//!
//! The command is an argv list, run directly (never through a shell), with
//! no stdin, under `key_command_timeout`. Its stdout is the key: either the
//! bare secret, or a JSON object with `token` (kubectl's ExecCredential
//! `status.token` too) and optionally `expires_at` (RFC 3339; kubectl's
//! `status.expirationTimestamp`) or `expires_in` (seconds). Without either,
//! `key_command_ttl` is the value's lifetime.
//!
//! Nothing the command prints on stdout ever reaches a message: errors say
//! what was wrong with it, never what it was. Its stderr (the first
//! [`MAX_STDERR`] bytes, the key masked out of it) is for the log.
//!
//! The run is synchronous (threads read the pipes, the caller polls the
//! child), so the same code serves the first run while the configuration
//! is checked, before any runtime exists for it, and the refreshes, which
//! run it on the blocking pool ([`crate::secrets::refresh`]).

use std::fmt;
use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use zeroize::{Zeroize, Zeroizing};

use crate::secrets::key::ApiKey;

/// The most stdout a helper may print: keys and tokens are short, and JWTs
/// with their JSON around them stay far below this.
const MAX_STDOUT: usize = 64 * 1024;

/// The most of a helper's stderr kept for the log; the rest is read and dropped.
pub const MAX_STDERR: usize = 4 * 1024;

/// How often a running helper is checked on.
const POLL: Duration = Duration::from_millis(5);

/// How long the pipes may stay open after the helper exited (something it
/// started may hold them) before the run counts as failed.
const PIPE_GRACE: Duration = Duration::from_millis(500);

/// The longest stretch a value counts as expired before its stated expiry,
/// so that a request sent just before it does not arrive just after; a
/// tenth of the lifetime when that is shorter (a 2 s token keeps 1.8 s).
const EXPIRY_MARGIN: Duration = Duration::from_secs(10);

/// A helper command with its timing settings.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyCommand {
    argv: Vec<String>,
    ttl: Duration,
    timeout: Duration,
}

/// Only the program's name: arguments could carry something private (a
/// vault path, a token flag) and are configuration, not for the log.
impl fmt::Debug for KeyCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "KeyCommand({} +{} args, ttl {:?}, timeout {:?})",
            self.program(),
            self.argv.len().saturating_sub(1),
            self.ttl,
            self.timeout
        )
    }
}

/// When a fetched value was asked for and until when it is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetime {
    /// When the run that fetched it started.
    pub started: Instant,
    /// How long that run took (the refresh starts early enough for the
    /// next one to take as long, and then some).
    pub took: Duration,
    /// When it stops being used: its stated expiry (or the run's start plus
    /// `key_command_ttl`) less the margin.
    pub expires: Instant,
}

/// What one run of the helper produced.
pub struct Fetched {
    /// The key.
    pub key: ApiKey,
    /// Its lifetime.
    pub lifetime: Lifetime,
    /// The helper's stderr, bounded, with the key masked out; may be empty.
    pub stderr: String,
}

impl fmt::Debug for Fetched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fetched")
            .field("key", &self.key)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl KeyCommand {
    /// `argv` is the program and its arguments (not empty); `ttl` is the
    /// lifetime of a value printed without an expiry; `timeout` bounds a run.
    pub fn new(argv: Vec<String>, ttl: Duration, timeout: Duration) -> Self {
        Self { argv, ttl, timeout }
    }

    /// The program's name, for logs and messages.
    pub fn program(&self) -> &str {
        self.argv.first().map_or("", String::as_str)
    }

    /// Runs the helper once and reads the key it prints. The error says
    /// what went wrong (with the helper's stderr), never what it printed.
    pub fn run(&self) -> Result<Fetched, String> {
        let started = Instant::now();
        let output = run_bounded(&self.argv, self.timeout)?;
        let stderr = output.stderr;
        if !output.status.success() {
            return Err(format!(
                "{} {}{}",
                self.program(),
                describe_status(output.status),
                stderr_part(&stderr)
            ));
        }
        let printed = parse_stdout(&output.stdout).map_err(|problem| {
            format!(
                "{} printed {problem}{}",
                self.program(),
                stderr_part(&stderr)
            )
        })?;
        let lifetime = match printed.expiry {
            Expiry::In(seconds) => started.checked_add(seconds),
            Expiry::At(at) => at
                .duration_since(SystemTime::now())
                .ok()
                .and_then(|left| Instant::now().checked_add(left)),
            Expiry::Unstated => started.checked_add(self.ttl),
        }
        .and_then(|expires| Lifetime::until(started, expires))
        .ok_or_else(|| {
            format!(
                "{} printed a token that {SHORT_LIVED} (check the clock, or its expires_at / expires_in){}",
                self.program(),
                stderr_part(&stderr)
            )
        })?;
        let stderr = printed.key.mask_in(&stderr);
        Ok(Fetched {
            key: printed.key,
            lifetime,
            stderr,
        })
    }
}

/// The least a fetched value must have left to count as fetched: one that
/// expires sooner (`expires_in: 0.05`, a clock far off) is a failure,
/// tried again after a backoff, rather than a source run again and again
/// as fast as it answers.
const MIN_LIFETIME: Duration = Duration::from_secs(1);

/// How a value with less than [`MIN_LIFETIME`] left is described.
pub(crate) const SHORT_LIVED: &str = "has already expired or expires within a second";

impl Lifetime {
    /// The lifetime of a value asked for at `started` (the fetch ends now)
    /// whose source says it expires at `expires`: used until the margin
    /// before it. `None` when less than [`MIN_LIFETIME`] would be left.
    pub(crate) fn until(started: Instant, expires: Instant) -> Option<Self> {
        let lifetime = expires.saturating_duration_since(started);
        let expires = expires - EXPIRY_MARGIN.min(lifetime / 10);
        (expires.saturating_duration_since(Instant::now()) >= MIN_LIFETIME).then(|| Self {
            started,
            took: started.elapsed(),
            expires,
        })
    }
}

/// The stderr excerpt appended to a failure message.
fn stderr_part(stderr: &str) -> String {
    let stderr = stderr.trim();
    if stderr.is_empty() {
        String::new()
    } else {
        format!("; its stderr: {stderr}")
    }
}

fn describe_status(status: ExitStatus) -> String {
    match status.code() {
        Some(code) => format!("exited with status {code}"),
        None => format!("was stopped ({status})"),
    }
}

/// What the helper printed, read.
struct Printed {
    key: ApiKey,
    expiry: Expiry,
}

enum Expiry {
    In(Duration),
    At(SystemTime),
    Unstated,
}

/// Reads the helper's stdout: a JSON object (it starts with `{`) or the
/// bare key. Problems are described without quoting any of it.
fn parse_stdout(stdout: &[u8]) -> Result<Printed, String> {
    let text = std::str::from_utf8(stdout).map_err(|_| "bytes that are not UTF-8".to_owned())?;
    let text = text.trim();
    if text.is_empty() {
        return Err("nothing on stdout".to_owned());
    }
    // `jq .token` without -r prints the token in quotes; no key starts
    // with a quote or a bracket, so this is JSON, and not the kind read.
    if text.starts_with(['"', '[']) {
        return Err(
            "a JSON string or array, not the bare key or a JSON object with \"token\" \
             (jq -r prints a string bare)"
                .to_owned(),
        );
    }
    if !text.starts_with('{') {
        return Ok(Printed {
            key: ApiKey::new(text.to_owned()),
            expiry: Expiry::Unstated,
        });
    }
    // serde_json's syntax errors name a position only, never the text.
    let mut json: serde_json::Value = serde_json::from_str(text).map_err(|err| {
        format!(
            "JSON that does not parse (line {}, column {})",
            err.line(),
            err.column()
        )
    })?;
    let expiry = json_expiry(&json)?;
    let token = match json.get_mut("token") {
        Some(token) => token.take(),
        None => json
            .pointer_mut("/status/token")
            .map(serde_json::Value::take)
            .unwrap_or_default(),
    };
    let serde_json::Value::String(token) = token else {
        return Err(
            "JSON without a \"token\" string (or kubectl's \"status\": {\"token\": ...})"
                .to_owned(),
        );
    };
    let key = ApiKey::new(token);
    if key.is_blank() {
        return Err("JSON whose token is empty".to_owned());
    }
    Ok(Printed { key, expiry })
}

/// The expiry a JSON answer states, if any.
fn json_expiry(json: &serde_json::Value) -> Result<Expiry, String> {
    let at = json
        .get("expires_at")
        .or_else(|| json.pointer("/status/expirationTimestamp"))
        .filter(|at| !at.is_null());
    if let Some(at) = at {
        let text = at.as_str().ok_or_else(|| {
            "an expires_at (or expirationTimestamp) that is not a string".to_owned()
        })?;
        let parsed =
            time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
                .map_err(|_| {
                    "an expires_at (or expirationTimestamp) that is not an RFC 3339 time \
             such as 2030-01-31T12:00:00Z"
                        .to_owned()
                })?;
        return Ok(Expiry::At(SystemTime::from(parsed)));
    }
    match json.get("expires_in").filter(|v| !v.is_null()) {
        None => Ok(Expiry::Unstated),
        Some(seconds) => seconds_of(seconds)
            .map(Expiry::In)
            .ok_or_else(|| "an expires_in that is not a number of seconds".to_owned()),
    }
}

/// An `expires_in` as every source writes it: a number of seconds, or
/// one in a string (Azure AD v1 wrote "3599"); `None` if it is not one
/// (negative, too large for a `Duration`, not a number).
pub(crate) fn seconds_of(value: &serde_json::Value) -> Option<Duration> {
    value
        .as_f64()
        .or_else(|| value.as_str().and_then(|s| s.trim().parse().ok()))
        .filter(|s| s.is_finite() && *s >= 0.0)
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
}

/// What a finished run left.
struct Output {
    status: ExitStatus,
    stdout: Zeroizing<Vec<u8>>,
    stderr: String,
}

/// Runs `argv` with no stdin, waiting at most `timeout` (then it is
/// killed, with everything it started), keeping at most [`MAX_STDOUT`] of
/// stdout (more is an error) and [`MAX_STDERR`] of stderr.
///
/// Only stdout is waited for until the deadline. stderr is for the log:
/// a process the helper left behind (an agent it started) may hold it
/// open for good, and that costs the run [`PIPE_GRACE`] at most, never
/// its whole timeout.
fn run_bounded(argv: &[String], timeout: Duration) -> Result<Output, String> {
    let deadline = Instant::now() + timeout;
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| "the command is empty".to_owned())?;
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // A group of its own, so that stopping it stops what it started too
    // (`sh -c` runs its commands as children).
    #[cfg(unix)]
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = command
        .spawn()
        .map_err(|err| format!("cannot start {program}: {err}"))?;
    let stdout = reader(child.stdout.take(), MAX_STDOUT);
    let stderr = reader(child.stderr.take(), MAX_STDERR);
    let said = |stderr: &mpsc::Receiver<Drained>| {
        (stderr.recv_timeout(PIPE_GRACE))
            .map(|read| read.text())
            .unwrap_or_default()
    };
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL),
            Ok(None) => {
                stop(&mut child);
                return Err(format!(
                    "{program} did not finish within key_command_timeout ({timeout:?}) and was killed{}",
                    stderr_part(&said(&stderr))
                ));
            }
            Err(err) => {
                stop(&mut child);
                return Err(format!("waiting for {program} failed: {err}"));
            }
        }
    };
    let wait = deadline
        .saturating_duration_since(Instant::now())
        .max(PIPE_GRACE);
    let Ok(stdout) = stdout.recv_timeout(wait) else {
        // What holds it is what the helper left running: stopped too.
        stop(&mut child);
        return Err(format!(
            "{program} exited but its stdout stayed open until key_command_timeout \
             (a process it started holds it?){}",
            stderr_part(&said(&stderr))
        ));
    };
    let stderr = said(&stderr);
    if stdout.overflowed {
        return Err(format!(
            "{program} printed more than {MAX_STDOUT} bytes on stdout{}",
            stderr_part(&stderr)
        ));
    }
    Ok(Output {
        status,
        stdout: stdout.bytes,
        stderr,
    })
}

/// Kills the helper's process group (itself and whatever it started and
/// left in it) and reaps the helper.
fn stop(child: &mut Child) {
    #[cfg(unix)]
    {
        let group = rustix::process::Pid::from_child(child);
        let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// One pipe, read to its end.
struct Drained {
    bytes: Zeroizing<Vec<u8>>,
    overflowed: bool,
}

impl Drained {
    /// As text for the log: invalid UTF-8 replaced, control characters
    /// (other than newlines and tabs) dropped so a log line stays one line.
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes)
            .chars()
            .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
            .filter(|c| !c.is_control() || *c == '\t')
            .collect()
    }
}

/// Reads `pipe` to its end on a thread of its own, keeping at most `max`
/// bytes; the rest is read and dropped, so the helper never blocks on a
/// full pipe.
fn reader(pipe: Option<impl Read + Send + 'static>, max: usize) -> mpsc::Receiver<Drained> {
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        // Allocated once at full size: growing would leave copies of the
        // secret behind in freed memory.
        let mut bytes = Zeroizing::new(Vec::with_capacity(max));
        let mut overflowed = false;
        let mut chunk = [0u8; 4096];
        if let Some(mut pipe) = pipe {
            loop {
                match pipe.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let room = max - bytes.len();
                        bytes.extend_from_slice(&chunk[..n.min(room)]);
                        overflowed |= n > room;
                    }
                }
            }
        }
        chunk.zeroize();
        let _ = sender.send(Drained { bytes, overflowed });
    });
    receiver
}

// The helpers the tests run are sh scripts.
#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use crate::secrets::key::MASK;

    const TOKEN: &str = "tok-very-secret-81f2";

    fn sh(script: &str) -> KeyCommand {
        KeyCommand::new(
            vec!["sh".into(), "-c".into(), script.into()],
            Duration::from_secs(300),
            Duration::from_secs(5),
        )
    }

    fn header(fetched: &Fetched) -> String {
        let value = fetched.key.header_value("{key}").expect("valid");
        String::from_utf8(value.as_bytes().to_vec()).expect("text")
    }

    /// Asserts the seconds left of `fetched` are within `range`.
    fn assert_left(fetched: &Fetched, range: std::ops::RangeInclusive<f64>) {
        let left = fetched
            .lifetime
            .expires
            .saturating_duration_since(Instant::now())
            .as_secs_f64();
        assert!(range.contains(&left), "{left} s left, expected {range:?}");
    }

    fn rfc3339(at: time::OffsetDateTime) -> String {
        at.format(&time::format_description::well_known::Rfc3339)
            .expect("format")
    }

    #[test]
    fn a_bare_key_lives_for_the_ttl() {
        let fetched = sh(&format!("echo {TOKEN}")).run().expect("runs");
        assert_eq!(header(&fetched), TOKEN);
        // 300 s less the 10 s margin.
        assert_left(&fetched, 285.0..=290.0);
    }

    #[test]
    fn json_with_expires_in_and_kubectl_exec_credentials_are_read() {
        let fetched = sh(&format!(
            r#"echo '{{"token": "{TOKEN}", "expires_in": 100}}'"#
        ))
        .run()
        .expect("runs");
        assert_eq!(header(&fetched), TOKEN);
        assert_left(&fetched, 89.0..=90.0);

        let at = time::OffsetDateTime::now_utc() + time::Duration::seconds(1000);
        let at = rfc3339(at);
        let kubectl = format!(
            r#"{{"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
                "status": {{"token": "{TOKEN}", "expirationTimestamp": "{at}"}}}}"#
        );
        let fetched = sh(&format!("cat <<'EOF'\n{kubectl}\nEOF"))
            .run()
            .expect("runs");
        assert_eq!(header(&fetched), TOKEN);
        assert_left(&fetched, 985.0..=990.0);
    }

    #[test]
    fn expires_in_reads_as_every_source_writes_it() {
        let fetched = sh(&format!(
            r#"echo '{{"token": "{TOKEN}", "expires_in": " 100 "}}'"#
        ))
        .run()
        .expect("a number in a string");
        assert_left(&fetched, 89.0..=90.0);
        for bad in ["-5", "1e300", "18446744073709551616", "\"soon\"", "[1]"] {
            let value: serde_json::Value = serde_json::from_str(bad).expect(bad);
            assert_eq!(seconds_of(&value), None, "{bad}");
        }
    }

    #[test]
    fn an_offset_in_expires_at_is_honoured() {
        // 10:00+02:00 is 08:00Z: an hour from now in UTC+2 is an hour from now.
        let at = time::OffsetDateTime::now_utc()
            .to_offset(time::UtcOffset::from_hms(2, 0, 0).expect("offset"))
            + time::Duration::hours(1);
        let at = rfc3339(at);
        let fetched = sh(&format!(r#"echo '{{"token": "t", "expires_at": "{at}"}}'"#))
            .run()
            .expect("runs");
        assert_left(&fetched, 3585.0..=3590.0);
    }

    #[test]
    fn failures_never_quote_stdout() {
        let cases = [
            (format!("echo {TOKEN}; exit 3"), "exited with status 3"),
            (
                format!(r#"echo '{{"token": "{TOKEN}", "expires_in": "soon"}}'"#),
                "expires_in",
            ),
            (
                format!(r#"echo '{{"token": "{TOKEN}", "expires_at": "{TOKEN}"}}'"#),
                "RFC 3339",
            ),
            (
                format!(r#"echo '{{"tokn": "{TOKEN}"}}'"#),
                "without a \"token\"",
            ),
            (format!(r#"echo '{{"token": "{TOKEN}"'"#), "does not parse"),
            (
                format!(r#"echo '{{"token": "{TOKEN}", "expires_in": 0}}'"#),
                "already expired",
            ),
            ("true".to_owned(), "nothing on stdout"),
            (
                "head -c 70000 /dev/zero | tr '\\0' a".to_owned(),
                "more than",
            ),
        ];
        for (script, expected) in cases {
            let err = sh(&script).run().expect_err(&script);
            assert!(err.contains(expected), "{script}: {err}");
            assert!(!err.contains(TOKEN), "{script}: {err}");
        }
    }

    #[test]
    fn stderr_is_kept_bounded_and_the_key_masked_in_it() {
        let fetched = sh(&format!("echo fetching {TOKEN} >&2; echo {TOKEN}"))
            .run()
            .expect("runs");
        assert_eq!(fetched.stderr.trim(), format!("fetching {MASK}"));
        let err = sh("head -c 100000 /dev/zero | tr '\\0' e >&2; exit 1")
            .run()
            .expect_err("fails");
        assert!(err.len() < MAX_STDERR + 200, "{}", err.len());
    }

    #[test]
    fn a_hung_helper_is_killed_at_the_timeout() {
        let command = KeyCommand::new(
            vec!["sleep".into(), "30".into()],
            Duration::from_secs(300),
            Duration::from_millis(200),
        );
        let started = Instant::now();
        let err = command.run().expect_err("times out");
        assert!(err.contains("key_command_timeout"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn a_missing_program_is_named() {
        let command = KeyCommand::new(
            vec!["/nonexistent/helper".into()],
            Duration::from_secs(1),
            Duration::from_secs(1),
        );
        let err = command.run().expect_err("fails");
        assert!(err.contains("cannot start /nonexistent/helper"), "{err}");
        assert!(format!("{command:?}").contains("/nonexistent/helper"));
    }

    #[test]
    fn debug_shows_the_program_not_its_arguments() {
        let command = sh("vault kv get -field=token secret/x");
        let shown = format!("{command:?}");
        assert!(shown.starts_with("KeyCommand(sh +2 args"), "{shown}");
        assert!(!shown.contains("vault"), "{shown}");
    }
}
