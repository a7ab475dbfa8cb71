//! `usage_state_file`: what the budgets have spent, kept across restarts.
//!
//! The file is written atomically (a temporary file in the same directory,
//! then a rename), every few seconds while tokens are being spent and once
//! more at shutdown, so a crash loses at most those seconds. A file that
//! cannot be read as keyrelay's state is reported at startup, moved aside
//! (`.corrupt`) for a person to look at, and not trusted: the budgets start
//! from zero rather than from a guess.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::Budgets;

/// How often spent tokens are written while they change.
pub const SAVE_INTERVAL: Duration = Duration::from_secs(5);

/// Restores the budgets from `path`, if it exists, and reports what happened.
pub fn load(path: &Path, budgets: &Budgets) {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return,
        Err(err) => {
            tracing::error!(file = %path.display(), error = %err, "usage_state_file: cannot read it; budgets start from zero");
            return;
        }
    };
    match budgets.restore(&text, SystemTime::now()) {
        Ok(accounts) => {
            tracing::info!(file = %path.display(), accounts, "usage_state_file: budgets restored");
        }
        Err(problem) => {
            let aside = aside(path);
            let moved = std::fs::rename(path, &aside).is_ok();
            tracing::error!(
                file = %path.display(),
                problem = %problem,
                moved_to = moved.then(|| aside.display().to_string()),
                "usage_state_file is corrupt, so it is not trusted: budgets start from zero"
            );
        }
    }
}

/// Writes the budgets' state to `path` whenever it changed, every
/// [`SAVE_INTERVAL`], until the task is dropped.
pub async fn keep_saved(path: PathBuf, budgets: Arc<Budgets>) {
    let mut ticks = tokio::time::interval(SAVE_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if let Some(state) = budgets.state_if_changed() {
            write_logged(&path, &state);
        }
    }
}

/// Writes the state now (at shutdown).
pub fn save(path: &Path, budgets: &Budgets) {
    write_logged(path, &budgets.state());
}

fn write_logged(path: &Path, state: &str) {
    if let Err(err) = write_atomically(path, state) {
        tracing::error!(file = %path.display(), error = %err, "usage_state_file: cannot write it");
    }
}

/// Replaces `path` with `contents` so that a reader (or a crash) sees the
/// old file or the new one, never a part.
fn write_atomically(path: &Path, contents: &str) -> std::io::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    {
        let mut file = std::fs::File::create(&temporary)?;
        std::io::Write::write_all(&mut file, contents.as_bytes())?;
        file.sync_all()?;
    }
    std::fs::rename(&temporary, path)
}

fn aside(path: &Path) -> PathBuf {
    let mut aside = path.as_os_str().to_owned();
    aside.push(".corrupt");
    PathBuf::from(aside)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::BudgetLimit;

    fn budgets() -> Budgets {
        Budgets::new(
            vec![(
                "default".to_owned(),
                vec![BudgetLimit::parse("1000/day").expect("budget")],
            )],
            Vec::new(),
            Vec::new(),
        )
    }

    #[tokio::test]
    async fn saved_state_loads_back_and_a_corrupt_file_is_moved_aside() {
        let dir = std::env::temp_dir().join(format!("keyrelay-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("usage.json");

        let spent = Arc::new(budgets());
        let estimate = crate::usage::Estimate {
            prompt: 0,
            output: 10,
        };
        let reservation = spent.reserve(0, None, estimate, SystemTime::now()).await;
        let reservation = reservation.expect("admitted").expect("budgeted");
        reservation.settle(250, SystemTime::now(), |_| {});
        save(&path, &spent);
        let restarted = budgets();
        load(&path, &restarted);
        assert_eq!(
            restarted.report(SystemTime::now()).await["budgets"][0]["spent"],
            250
        );

        std::fs::write(&path, "{\"version\":1,\"accounts\":[").expect("write");
        let fresh = budgets();
        load(&path, &fresh);
        assert_eq!(
            fresh.report(SystemTime::now()).await["budgets"][0]["spent"],
            0
        );
        assert!(!path.exists(), "the corrupt file is moved aside");
        assert!(aside(&path).exists());
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
