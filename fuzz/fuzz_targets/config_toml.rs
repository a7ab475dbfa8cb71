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
//!   contains a key or token value either;
//! - in a loaded config, route names and prefixes are unique; no static
//!   header (`set_request_headers`) carries credentials (a credential header
//!   name, the route's own `auth_header`, or a value holding a key) or sets a
//!   header keyrelay manages (framing, hop-by-hop, `host`, the request id),
//!   and none is set twice; the credential header is not a managed one
//!   either; and a route's `allowed_paths`, when set, has a rule that can
//!   match under the route's prefix (a list that matches nothing there is a
//!   config mistake).
//!
//! Skipped inputs: those naming device or kernel files (`/dev/`, `/proc/`,
//! `/sys/`): opening some devices has effects (`/dev/watchdog`) and some
//! kernel files block on read (`/proc/kmsg`), which is the operator's
//! choice, not a bug; and those spelling a key or token themselves (a
//! secret the file states is the operator's text, shown where it was
//! written). Both are looked for in the text with TOML's line-continuing
//! backslashes and whitespace left out, and inputs with `\u`, `\U` or `\x`
//! escapes, which could spell either, are skipped too.
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

/// Header names keyrelay manages itself (config/request_headers.rs MANAGED).
const MANAGED: [&str; 11] = [
    "connection",
    "content-length",
    "host",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "http2-settings",
    "x-request-id",
];

/// Header names that carry credentials, never set statically.
const CREDENTIALS: [&str; 5] = [
    "baseten-authorization",
    "authorization",
    "proxy-authorization",
    "cookie",
    "x-api-key",
];

/// True for an input the target does not load (see the module docs).
fn skipped(text: &str) -> bool {
    let plain: String = text
        .chars()
        .filter(|c| *c != '\\' && !c.is_whitespace())
        .collect();
    ["\\u", "\\U", "\\x"].iter().any(|e| text.contains(e))
        || ["/dev/", "/proc/", "/sys/"]
            .iter()
            .chain(SECRETS.iter())
            .any(|p| plain.contains(p))
}

fn check_loaded(config: &keyrelay::Config) {
    assert!(!config.routes.is_empty(), "a loaded config has a route");
    for (i, a) in config.routes.iter().enumerate() {
        for b in &config.routes[i + 1..] {
            assert_ne!(a.name, b.name, "two routes share a name");
            assert_ne!(a.prefix, b.prefix, "two routes share a prefix");
        }
        let header = a.credential.header.as_str();
        assert!(
            !MANAGED.contains(&header),
            "route {}: the key goes in {header}, which keyrelay manages",
            a.name
        );
        for (n, (name, value)) in a.set_headers.iter().enumerate() {
            assert!(
                !MANAGED.contains(&name.as_str()) && !CREDENTIALS.contains(&name.as_str()),
                "route {}: static header {name}",
                a.name
            );
            assert_ne!(
                *name, a.credential.header,
                "route {}: a static header in the credential header",
                a.name
            );
            assert!(
                a.set_headers[..n].iter().all(|(seen, _)| seen != name),
                "route {}: static header {name} set twice",
                a.name
            );
            let value = String::from_utf8_lossy(value.as_bytes());
            assert!(
                !SECRETS[..2].iter().any(|key| value.contains(key)),
                "route {}: a key in static header {name}",
                a.name
            );
        }
        assert!(
            a.paths.is_empty() || a.paths.rules_outside(&a.prefix).len() < a.paths.len(),
            "route {}: no rule of allowed_paths can match under {}: {:?}",
            a.name,
            a.prefix,
            a.paths
        );
    }
    let debug = format!("{config:?}");
    for secret in SECRETS {
        assert!(
            !debug.contains(secret),
            "a secret in the config's Debug output"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if skipped(text) {
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
        Ok(config) => check_loaded(&config),
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
