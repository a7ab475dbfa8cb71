//! The log writer: lines gathered in memory, written to stderr by a thread
//! of their own, so a request never waits on the terminal or a log collector.
//!
//! A line is appended to one shared buffer under a mutex held for a copy of
//! a few hundred bytes; there is no allocation and no channel message per
//! line. The writer thread swaps the buffer for an empty one and writes
//! the whole batch with one `write(2)`. After a write it lingers
//! [`LINGER`] before looking again, so under load lines are written in
//! batches at most a few hundred times a second, and the thread is woken
//! (a futex call on the request's thread) only when it had gone idle.
//!
//! When the buffer holds [`LogWriter::start`]'s limit because the output
//! is stalled, new lines are dropped and counted rather than waited for.
//! Dropping the [`WriterGuard`] writes out everything appended before it.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long the writer waits after a write before taking the next batch:
/// the most a line is held back under load, and what bounds the writes
/// per second.
const LINGER: Duration = Duration::from_millis(5);

/// How long stopping waits for the last lines to be written. An output
/// stalled for good (a log collector that stopped reading) must not keep
/// the process from exiting.
const STOP_WAIT: Duration = Duration::from_secs(2);

/// Where lines wait for the writer thread.
#[derive(Debug, Default)]
struct Pending {
    lines: Vec<u8>,
    /// The writer is asleep until a line arrives (or it is stopped).
    idle: bool,
    stop: bool,
    /// The writer thread has written its last batch and returned.
    done: bool,
}

#[derive(Debug)]
struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    limit: usize,
    dropped: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A panic while holding the lock leaves only bytes behind: keep going.
        self.pending
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

/// A handle that appends lines for the writer thread; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct LogWriter {
    shared: Arc<Shared>,
}

/// Stops the writer thread when dropped, after it has written every line
/// appended before.
#[derive(Debug)]
pub(crate) struct WriterGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl LogWriter {
    /// Starts the writer thread on `output`, holding at most `limit` bytes of
    /// lines not yet written.
    pub(crate) fn start(output: impl Write + Send + 'static, limit: usize) -> (Self, WriterGuard) {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending {
                lines: Vec::with_capacity(limit.min(64 * 1024)),
                ..Pending::default()
            }),
            wake: Condvar::new(),
            limit,
            dropped: AtomicU64::new(0),
        });
        let thread = std::thread::Builder::new()
            .name("keyrelay-log".into())
            .spawn({
                let shared = Arc::clone(&shared);
                move || write_batches(&shared, output)
            })
            .expect("spawning the log writer thread");
        let guard = WriterGuard {
            shared: Arc::clone(&shared),
            thread: Some(thread),
        };
        (Self { shared }, guard)
    }

    /// Queues `line` (which should end in a newline), or drops and counts it
    /// when the writer is that far behind. Never waits for the output.
    pub(crate) fn append(&self, line: &[u8]) {
        let mut pending = self.shared.lock();
        if pending.stop || pending.lines.len() + line.len() > self.shared.limit {
            drop(pending);
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        pending.lines.extend_from_slice(line);
        if pending.idle {
            pending.idle = false;
            drop(pending);
            self.shared.wake.notify_one();
        }
    }

    /// Lines dropped so far because the writer was behind.
    pub(crate) fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

/// The writer thread: takes whatever has gathered, writes it, lingers, and
/// sleeps when there is nothing.
fn write_batches(shared: &Shared, mut output: impl Write) {
    let mut batch = Vec::new();
    loop {
        let mut pending = shared.lock();
        while pending.lines.is_empty() && !pending.stop {
            pending.idle = true;
            pending = shared
                .wake
                .wait(pending)
                .unwrap_or_else(|poison| poison.into_inner());
        }
        let stop = pending.stop;
        std::mem::swap(&mut batch, &mut pending.lines);
        drop(pending);
        if !batch.is_empty() {
            // A failed write (stderr closed) loses that batch; there is
            // nowhere left to report it.
            let _ = output.write_all(&batch).and_then(|()| output.flush());
            batch.clear();
        }
        if stop {
            shared.lock().done = true;
            shared.wake.notify_all();
            return;
        }
        let pending = shared.lock();
        if !pending.stop {
            let _ = shared.wake.wait_timeout(pending, LINGER);
        }
    }
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        let mut pending = self.shared.lock();
        pending.stop = true;
        self.shared.wake.notify_all();
        let (pending, _) = self
            .shared
            .wake
            .wait_timeout_while(pending, STOP_WAIT, |pending| !pending.done)
            .unwrap_or_else(|poison| poison.into_inner());
        let done = pending.done;
        drop(pending);
        // A writer still stuck on its output is left behind; the process exits anyway.
        if let Some(thread) = self.thread.take().filter(|_| done) {
            let _ = thread.join();
        }
    }
}

/// `tracing-subscriber` formats each event into a buffer of its own and
/// writes it with one `write_all`, so each event arrives here whole.
impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// An output that records what it is given, and can be held stalled.
    #[derive(Clone)]
    struct Output {
        written: Arc<Mutex<Vec<u8>>>,
        writes: Arc<AtomicU64>,
        gate: Arc<Mutex<Option<mpsc::Receiver<()>>>>,
    }

    impl Output {
        fn new() -> Self {
            Self {
                written: Arc::default(),
                writes: Arc::default(),
                gate: Arc::default(),
            }
        }

        /// Holds the next write until the returned sender is dropped.
        fn stall(&self) -> mpsc::Sender<()> {
            let (release, gate) = mpsc::channel();
            *self.gate.lock().expect("gate") = Some(gate);
            release
        }

        fn text(&self) -> String {
            String::from_utf8(self.written.lock().expect("written").clone()).expect("UTF-8")
        }
    }

    impl Write for Output {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Some(gate) = self.gate.lock().expect("gate").take() {
                let _ = gate.recv();
            }
            self.writes.fetch_add(1, Ordering::Relaxed);
            self.written.lock().expect("written").extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_appended_before_the_guard_drops_is_written_in_order() {
        let output = Output::new();
        let (writer, guard) = LogWriter::start(output.clone(), 1 << 20);
        for n in 0..10_000 {
            writer.append(format!("line {n}\n").as_bytes());
        }
        drop(guard);
        let text = output.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 10_000);
        assert!(lines
            .iter()
            .enumerate()
            .all(|(n, l)| *l == format!("line {n}")));
        assert!(
            output.writes.load(Ordering::Relaxed) < 1_000,
            "lines are written in batches, not one write each"
        );
        assert_eq!(writer.dropped(), 0);
    }

    #[test]
    fn a_stalled_output_drops_and_counts_lines_instead_of_waiting() {
        let output = Output::new();
        let release = output.stall();
        let (writer, guard) = LogWriter::start(output.clone(), 100);
        // The first line reaches the writer, which then blocks on the output.
        writer.append(b"first\n");
        while !writer.shared.lock().lines.is_empty() {
            std::thread::yield_now();
        }
        // 10 bytes a line: ten fit in the limit, the other ninety are dropped.
        for n in 0..100 {
            writer.append(format!("line {n:04}\n").as_bytes());
        }
        let dropped = writer.dropped();
        // Released before asserting: a failed assertion must not leave the
        // guard joining a writer stuck on the gate.
        drop(release);
        drop(guard);
        assert_eq!(dropped, 90);
        let text = output.text();
        assert!(text.starts_with("first\nline 0000\n"), "{text}");
        assert_eq!(text.lines().count(), 11, "{text}");
    }

    #[test]
    fn stopping_does_not_wait_for_an_output_stalled_for_good() {
        let output = Output::new();
        let release = output.stall();
        let (writer, guard) = LogWriter::start(output.clone(), 1 << 20);
        writer.append(b"never written\n");
        let started = std::time::Instant::now();
        drop(guard);
        let waited = started.elapsed();
        drop(release);
        assert!(
            (STOP_WAIT..STOP_WAIT * 3).contains(&waited),
            "stopping waited {waited:?}"
        );
    }

    #[test]
    fn an_idle_writer_wakes_for_a_single_line() {
        let output = Output::new();
        let (writer, _guard) = LogWriter::start(output.clone(), 1 << 20);
        for n in 0..3 {
            // Let the writer go idle, then expect the line to be written anyway.
            std::thread::sleep(LINGER * 4);
            writer.append(format!("line {n}\n").as_bytes());
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !output.text().contains(&format!("line {n}\n")) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "line {n} never written"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}
