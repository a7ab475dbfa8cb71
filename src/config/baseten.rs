//! Baseten shortcuts: `--model ID` (or `--chain ID`, `--model-apis`) instead of a URL.
//!
//! A model or chain lives at `https://model-ID.api.baseten.co` (or `chain-ID`),
//! with every endpoint under a stage prefix: `/environments/NAME`,
//! `/deployment/ID` or `/development`. With a shortcut, local paths are
//! mapped under that prefix, so apps call short paths:
//!
//! | local path | upstream path (environment `production`) |
//! |---|---|
//! | `/predict`, `/async_predict`, `/wake`, `/websocket`, `/run_remote` | `/environments/production/...` |
//! | `/v1/chat/completions` (OpenAI-compatible server) | `/environments/production/sync/v1/chat/completions` |
//! | `/environments/...`, `/deployment/...`, `/development/...`, `/production/...`, `/async_request/...` | unchanged |
//!
//! Model APIs (`--model-apis`) are one shared host with plain `/v1/...` paths.

use std::fmt;

/// Host of Baseten's shared OpenAI-compatible Model APIs.
pub const MODEL_APIS_URL: &str = "https://inference.baseten.co";

/// Paths that already name their stage (or need none) and pass unchanged.
const STAGED_PREFIXES: [&str; 5] = [
    "/environments/",
    "/deployment/",
    "/development/",
    "/production/",
    "/async_request/",
];

/// What a shortcut points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A dedicated model deployment.
    Model(String),
    /// A Truss chain.
    Chain(String),
    /// The shared Model APIs.
    ModelApis,
}

/// Which deployment of a model or chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stage {
    /// A named environment (`production` by default).
    Environment(String),
    /// A specific deployment id.
    Deployment(String),
    /// The development deployment.
    Development,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Environment(name) => write!(f, "/environments/{name}"),
            Self::Deployment(id) => write!(f, "/deployment/{id}"),
            Self::Development => f.write_str("/development"),
        }
    }
}

/// The upstream base URL of `target`.
pub fn upstream_url(target: &Target) -> String {
    match target {
        Target::Model(id) => format!("https://model-{id}.api.baseten.co"),
        Target::Chain(id) => format!("https://chain-{id}.api.baseten.co"),
        Target::ModelApis => MODEL_APIS_URL.to_owned(),
    }
}

/// Checks an id or environment name: letters, digits, `-` and `_` only, so
/// it can go into a host name or path as is.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The upstream path for local `path_and_query` under `stage` (the table above).
pub fn map_path(stage: &Stage, path_and_query: &str) -> String {
    if STAGED_PREFIXES
        .iter()
        .any(|prefix| path_and_query.starts_with(prefix))
    {
        return path_and_query.to_owned();
    }
    let sync = if path_and_query.starts_with("/v1/") || path_and_query == "/v1" {
        "/sync"
    } else {
        ""
    };
    format!("{stage}{sync}{path_and_query}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_follow_baseten_host_names() {
        assert_eq!(
            upstream_url(&Target::Model("abc123".into())),
            "https://model-abc123.api.baseten.co"
        );
        assert_eq!(
            upstream_url(&Target::Chain("xyz".into())),
            "https://chain-xyz.api.baseten.co"
        );
        assert_eq!(upstream_url(&Target::ModelApis), MODEL_APIS_URL);
    }

    #[test]
    fn short_paths_go_under_the_stage() {
        let production = Stage::Environment("production".into());
        assert_eq!(
            map_path(&production, "/predict"),
            "/environments/production/predict"
        );
        assert_eq!(
            map_path(&production, "/v1/chat/completions?x=1"),
            "/environments/production/sync/v1/chat/completions?x=1"
        );
        assert_eq!(
            map_path(&Stage::Deployment("d1".into()), "/async_predict"),
            "/deployment/d1/async_predict"
        );
        assert_eq!(map_path(&Stage::Development, "/wake"), "/development/wake");
        assert_eq!(
            map_path(&Stage::Environment("staging".into()), "/run_remote"),
            "/environments/staging/run_remote"
        );
    }

    #[test]
    fn staged_paths_pass_unchanged() {
        let production = Stage::Environment("production".into());
        for path in [
            "/production/predict",
            "/environments/staging/predict",
            "/deployment/abc/predict",
            "/development/predict",
            "/async_request/req-1",
        ] {
            assert_eq!(map_path(&production, path), path);
        }
    }

    #[test]
    fn names_are_host_and_path_safe() {
        assert!(valid_name("abc123"));
        assert!(valid_name("my_env-2"));
        for bad in ["", "a.b", "a/b", "a b", "a?b", "évian"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
