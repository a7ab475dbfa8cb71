//! Config loading on arbitrary TOML files.
//!
//! Each input is written to a file under /dev/shm (the loader takes a path,
//! not a string) and loaded with a fixed environment holding two keys and an
//! access token. Whatever the file says:
//!
//! - `config::load` never panics;
//! - an error has at least one problem, each naming a setting (a non-empty
//!   name that the message repeats), and never contains a key or token value;
//! - a loaded config has at least one route, and its `Debug` output never
//!   contains a key or token value either.
//!
//! Inputs naming device or kernel files (`/dev/`, `/proc/`, `/sys/`) are
//! skipped: `key_file = "/dev/zero"` would make any loader read forever, which
//! is the operator's choice, not a bug.
#![no_main]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use keyrelay::config::{self, Sources};
use libfuzzer_sys::fuzz_target;

const SECRETS: [&str; 3] = [
    "kr-fuzz-KEY-5f3c9a1e7b2d4c6f",
    "kr-fuzz-OTHER-0a9b8c7d6e5f",
    "tok-fuzz-access-3b8e1f0a9c7d",
];

fn file() -> &'static PathBuf {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        dir.join(format!("keyrelay-fuzz-config-{}.toml", std::process::id()))
    })
}

fn env() -> &'static HashMap<String, String> {
    static ENV: OnceLock<HashMap<String, String>> = OnceLock::new();
    ENV.get_or_init(|| {
        HashMap::from([
            ("BASETEN_API_KEY".to_owned(), SECRETS[0].to_owned()),
            ("LLAMA_KEY".to_owned(), SECRETS[1].to_owned()),
            ("FRONTEND_TOKEN".to_owned(), SECRETS[2].to_owned()),
        ])
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if ["/dev/", "/proc/", "/sys/"]
        .iter()
        .any(|p| text.contains(p))
    {
        return;
    }
    let path = file();
    std::fs::write(path, text).expect("write the fuzz config file");
    let sources = Sources {
        file: Some(path.clone()),
        env: env().clone(),
        overrides: Vec::new(),
    };
    match config::load(&sources) {
        Ok(config) => {
            assert!(!config.routes.is_empty(), "a loaded config has a route");
            let debug = format!("{config:?}");
            for secret in SECRETS {
                assert!(
                    !debug.contains(secret),
                    "a secret in the config's Debug output"
                );
            }
        }
        Err(err) => {
            assert!(!err.problems.is_empty(), "an error with no problem");
            let shown = err.to_string();
            for problem in &err.problems {
                assert!(
                    !problem.setting.trim().is_empty(),
                    "a problem naming no setting: {problem:?}"
                );
                assert!(shown.contains(&problem.setting), "{shown}");
            }
            for secret in SECRETS {
                assert!(!shown.contains(secret), "a secret in the error: {shown}");
                assert!(
                    !format!("{err:?}").contains(secret),
                    "a secret in the error's Debug"
                );
            }
        }
    }
});
