//! Python scripts from `tests/clients/` as child processes the test talks to
//! line by line: it reads what a script prints (each wait bounded by
//! [`STEP`], start-up by [`STARTUP`]), writes lines to its stdin, and waits
//! for it to exit.
//!
//! A failure message includes everything the script wrote to stderr, so a
//! Python traceback shows up in the test output. Children are killed when
//! dropped.
//!
//! The interpreter is [`interpreter`]: a virtual environment under the
//! target directory, built from `tests/requirements.txt` on first use, so
//! `cargo test` needs nothing but python3 on the machine.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::support::STEP;

/// Bound on a script's start-up: the interpreter, its imports, binding.
pub(crate) const STARTUP: Duration = Duration::from_secs(60);

/// How long a failing script is given to finish its traceback.
const DYING_GRACE: Duration = Duration::from_secs(2);

/// How long [`Script::while_running`] still waits for its future once the
/// script has exited: longer than [`DYING_GRACE`], which a future failing on
/// another script's output spends before it panics.
const EXIT_GRACE: Duration = Duration::from_secs(3);

/// Proxy variables Python HTTP stacks honour; a test's traffic stays on 127.0.0.1.
const PROXY_VARIABLES: [&str; 8] = [
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "grpc_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "GRPC_PROXY",
];

/// Names an interpreter to use instead of building the test environment
/// (one that already has the packages in `tests/requirements.txt`).
pub(crate) const OVERRIDE: &str = "KEYRELAY_TEST_PYTHON";

/// The Python the tests run their clients and servers with.
///
/// Unless [`OVERRIDE`] names one, this is the virtual environment that
/// `tests/clients/test_venv.py` builds from `tests/requirements.txt` under
/// Cargo's target directory: once per machine, and again only when the
/// requirements change. That script locks against the other test binaries;
/// the `OnceLock` makes the threads of this one ask only once. A failure to
/// build it fails the test with the script's explanation; nothing is skipped.
pub(crate) fn interpreter() -> &'static Path {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match PYTHON.get_or_init(build_environment) {
        Ok(path) => path,
        Err(why) => panic!("no Python test environment: {why}"),
    }
}

fn build_environment() -> Result<PathBuf, String> {
    if let Some(python) = std::env::var_os(OVERRIDE).filter(|value| !value.is_empty()) {
        return Ok(PathBuf::from(python));
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("python-venv");
    // Blocking is fine: this runs once, before the test's first script, and
    // the test can do nothing useful until it is done.
    let output = std::process::Command::new("python3")
        .arg(format!("{root}/tests/clients/test_venv.py"))
        .arg(&venv)
        .arg(format!("{root}/tests/requirements.txt"))
        .stdin(Stdio::null())
        // Progress and errors go straight to the terminal, past libtest's capture.
        .stderr(Stdio::inherit())
        .output()
        .map_err(|err| {
            format!("cannot run python3 ({err}); the integration tests drive Python clients, so install python3")
        })?;
    if !output.status.success() {
        return Err(format!(
            "tests/clients/test_venv.py exited with {} (its explanation is printed above)",
            output.status
        ));
    }
    let path = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    if path.is_empty() {
        return Err("tests/clients/test_venv.py printed no interpreter path".to_owned());
    }
    Ok(PathBuf::from(path))
}

/// A running `tests/clients/<script>` under [`interpreter`].
pub(crate) struct Script {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr: Arc<Mutex<String>>,
    /// Copies stderr into `stderr`; done once the script has closed it.
    stderr_reader: Option<tokio::task::JoinHandle<()>>,
}

impl Script {
    /// Starts `tests/clients/<script>` with `args`, stdin and stdout piped.
    pub(crate) fn spawn(script: &str, args: &[&str]) -> Self {
        let path = format!("{}/tests/clients/{script}", env!("CARGO_MANIFEST_DIR"));
        Self::start(script, &[path.as_str()], args)
    }

    /// Starts the program `code` (as `python3 -c` takes it), called `name`
    /// in failure messages: a snippet a person is told to paste.
    pub(crate) fn spawn_code(name: &str, code: &str) -> Self {
        Self::start(name, &["-c", code], &[])
    }

    fn start(script: &str, program: &[&str], args: &[&str]) -> Self {
        let path = program.join(" ");
        let mut command = Command::new(interpreter());
        command
            .args(program)
            .args(args)
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONIOENCODING", "utf-8")
            .env("NO_PROXY", "127.0.0.1,localhost")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for variable in PROXY_VARIABLES {
            command.env_remove(variable);
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|err| panic!("spawn {} {path}: {err}", interpreter().display()));
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let mut pipe = child.stderr.take().expect("piped stderr");
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        let stderr_reader = tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&buf[..n]);
                sink.lock().expect("stderr lock").push_str(&text);
            }
        });
        Self {
            name: script.to_owned(),
            child,
            stdin,
            stdout,
            stderr,
            stderr_reader: Some(stderr_reader),
        }
    }

    /// Everything the script has written to stderr so far.
    pub(crate) fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr lock").clone()
    }

    /// Panics with `message`, the script's name and its stderr.
    async fn fail(&mut self, message: String) -> ! {
        // Give a dying interpreter a moment to finish its traceback.
        let _ = tokio::time::timeout(DYING_GRACE, self.child.wait()).await;
        panic!(
            "{}: {message}\n--- its stderr ---\n{}",
            self.name,
            self.stderr()
        );
    }

    /// The next line the script prints (without the newline), waiting at most [`STEP`].
    pub(crate) async fn line(&mut self, what: &str) -> String {
        self.line_within(STEP, what).await
    }

    /// The next line the script prints, waiting at most `bound`: for a
    /// script that prints nothing until a long run of work is done.
    pub(crate) async fn line_within(&mut self, bound: Duration, what: &str) -> String {
        match tokio::time::timeout(bound, self.stdout.next_line()).await {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) => self.fail(format!("exited before printing {what}")).await,
            Ok(Err(err)) => self.fail(format!("reading stdout for {what}: {err}")).await,
            Err(_) => {
                self.fail(format!("printed nothing for {bound:?} waiting for {what}"))
                    .await
            }
        }
    }

    /// Asserts that the next line the script prints is `expected`.
    pub(crate) async fn expect_line(&mut self, expected: &str) {
        let line = self.line(expected).await;
        if line != expected {
            self.fail(format!("printed {line:?}, expected {expected:?}"))
                .await;
        }
    }

    /// Waits for the script's first line, `expected` or `expected VALUE`
    /// (e.g. `port 43117`), and returns VALUE (empty if none).
    ///
    /// Scripts print it once imports are done and sockets bound. The wait is
    /// [`STARTUP`], not [`STEP`]: loading a large SDK on a busy machine takes
    /// seconds, and that is not what the tests measure.
    pub(crate) async fn started(&mut self, expected: &str) -> String {
        let what = format!("{expected:?} (started)");
        let line = self.line_within(STARTUP, &what).await;
        match line.strip_prefix(expected) {
            Some("") => String::new(),
            Some(rest) if rest.starts_with(' ') => rest.trim().to_owned(),
            _ => {
                self.fail(format!("printed {line:?} first, expected {what}"))
                    .await
            }
        }
    }

    /// Awaits `future` (which bounds its own wait), failing with the script's
    /// stderr if the script exits first, e.g. on an import error or traceback.
    ///
    /// A future already under way when the script exits gets [`EXIT_GRACE`]
    /// more: the exit can be noticed before output written just before it
    /// (say a server's line about the call that made the client exit), and
    /// that output is the better failure message.
    pub(crate) async fn while_running<F: std::future::Future>(
        &mut self,
        what: &str,
        future: F,
    ) -> F::Output {
        tokio::pin!(future);
        let exited = tokio::select! {
            // The future first: what the script did just before exiting counts.
            biased;
            output = &mut future => return output,
            status = self.child.wait() => status,
        };
        if let Ok(output) = tokio::time::timeout(EXIT_GRACE, &mut future).await {
            return output;
        }
        let status = exited.map_or_else(|err| err.to_string(), |status| status.to_string());
        // What it printed last (say a client's `status ...` line) often says why.
        let mut unread = Vec::new();
        while let Ok(Ok(Some(line))) = tokio::time::timeout(STEP, self.stdout.next_line()).await {
            unread.push(line);
        }
        self.fail(format!(
            "exited ({status}) while the test waited for {what}; its unread output: {unread:?}"
        ))
        .await
    }

    /// Writes `line` and a newline to the script's stdin.
    pub(crate) async fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin is still open");
        let written = tokio::time::timeout(STEP, async {
            stdin.write_all(format!("{line}\n").as_bytes()).await?;
            stdin.flush().await
        })
        .await;
        if !matches!(written, Ok(Ok(()))) {
            self.fail(format!("could not be sent {line:?} on stdin"))
                .await;
        }
    }

    /// Closes the script's stdin (it sees end of file).
    pub(crate) fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits at most [`STEP`] for the script to exit and returns its status.
    /// Everything it wrote to stderr is in [`stderr`](Self::stderr) by then.
    pub(crate) async fn exit_status(&mut self) -> ExitStatus {
        match tokio::time::timeout(STEP, self.child.wait()).await {
            Ok(Ok(status)) => {
                if let Some(reader) = self.stderr_reader.take() {
                    let _ = tokio::time::timeout(STEP, reader).await;
                }
                status
            }
            Ok(Err(err)) => self.fail(format!("wait: {err}")).await,
            Err(_) => self.fail(format!("did not exit within {STEP:?}")).await,
        }
    }

    /// Waits for the script to exit and asserts that it succeeded, with
    /// nothing left unread on its stdout.
    pub(crate) async fn success(mut self) {
        let status = self.exit_status().await;
        if !status.success() {
            self.fail(format!("failed: {status}")).await;
        }
        if let Ok(Ok(Some(extra))) = tokio::time::timeout(STEP, self.stdout.next_line()).await {
            self.fail(format!("printed an unexpected last line {extra:?}"))
                .await;
        }
    }
}
