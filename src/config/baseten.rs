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
//!
//! Two more forms of a model's address:
//!
//! - **Regional** (`--regional`, with `--environment ENV`):
//!   `https://model-ID-ENV.api.baseten.co` names the environment in the host
//!   and takes bare paths (`/predict`, `/websocket`, `/sync/v1/...`); it
//!   refuses stage prefixes, so keyrelay answers those itself with a 400
//!   that says why rather than forward a request certain to fail.
//! - **gRPC** (`--grpc`): `https://model-ID.grpc.api.baseten.co` over HTTP/2,
//!   the key in `baseten-authorization`, and the model (and optionally its
//!   environment or deployment) named in headers rather than the path.

use std::fmt;

/// Host of Baseten's shared OpenAI-compatible Model APIs.
pub const MODEL_APIS_URL: &str = "https://inference.baseten.co";

/// Paths that already name their stage: they pass unchanged, except to a
/// regional host, which refuses them.
const STAGED_PREFIXES: [&str; 4] = [
    "/environments/",
    "/deployment/",
    "/development/",
    "/production/",
];

/// Paths that need no stage (an async request is found by its id alone).
const UNSTAGED_PREFIXES: [&str; 1] = ["/async_request/"];

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
    /// A regional host, which names the environment itself: paths go bare.
    Regional,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Environment(name) => write!(f, "/environments/{name}"),
            Self::Deployment(id) => write!(f, "/deployment/{id}"),
            Self::Development => f.write_str("/development"),
            Self::Regional => Ok(()),
        }
    }
}

/// A path with a stage prefix sent to a regional route, which the regional
/// host would refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StagedPathOnRegionalHost;

/// The header Baseten's gRPC endpoint reads the key from.
pub const GRPC_KEY_HEADER: &str = "baseten-authorization";

/// The headers that pick a model's stage on the gRPC endpoint: a client's
/// own values are always removed, so only the configured stage is called.
pub const GRPC_STAGE_HEADERS: [&str; 2] = ["x-baseten-environment", "x-baseten-deployment"];

/// The upstream of a model's gRPC server.
pub fn grpc_url(model: &str) -> String {
    format!("https://model-{model}.grpc.api.baseten.co")
}

/// The headers that tell Baseten's gRPC endpoint which model, and which of
/// its environments or deployments, a call is for (the path names only the
/// gRPC method).
/// Without a stage, Baseten serves the production environment.
pub fn grpc_headers(model: &str, stage: Option<&Stage>) -> Vec<(&'static str, String)> {
    let mut headers = vec![("baseten-model-id", format!("model-{model}"))];
    match stage {
        Some(Stage::Environment(name)) => headers.push(("x-baseten-environment", name.clone())),
        Some(Stage::Deployment(id)) => headers.push(("x-baseten-deployment", id.clone())),
        Some(Stage::Development | Stage::Regional) | None => {}
    }
    headers
}

/// The regional host of a model's environment.
pub fn regional_url(model: &str, environment: &str) -> String {
    format!("https://model-{model}-{environment}.api.baseten.co")
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

/// The upstream path for local `path_and_query` under `stage` (the table
/// above); on a regional host, staged paths are refused.
pub fn map_path(stage: &Stage, path_and_query: &str) -> Result<String, StagedPathOnRegionalHost> {
    let starts_with_any =
        |prefixes: &[&str]| prefixes.iter().any(|p| path_and_query.starts_with(p));
    if starts_with_any(&STAGED_PREFIXES) {
        return match stage {
            Stage::Regional => Err(StagedPathOnRegionalHost),
            _ => Ok(path_and_query.to_owned()),
        };
    }
    if starts_with_any(&UNSTAGED_PREFIXES) {
        return Ok(path_and_query.to_owned());
    }
    let path = path_and_query.split('?').next().unwrap_or_default();
    let sync = if path.starts_with("/v1/") || path == "/v1" {
        "/sync"
    } else {
        ""
    };
    Ok(format!("{stage}{sync}{path_and_query}"))
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
        let map = |stage: &Stage, path| map_path(stage, path).expect("mapped");
        assert_eq!(
            map(&production, "/predict"),
            "/environments/production/predict"
        );
        assert_eq!(
            map(&production, "/v1/chat/completions?x=1"),
            "/environments/production/sync/v1/chat/completions?x=1"
        );
        assert_eq!(
            map(&production, "/v1?a=/v1/"),
            "/environments/production/sync/v1?a=/v1/"
        );
        assert_eq!(
            map(&Stage::Deployment("d1".into()), "/async_predict"),
            "/deployment/d1/async_predict"
        );
        assert_eq!(map(&Stage::Development, "/wake"), "/development/wake");
        assert_eq!(
            map(&Stage::Environment("staging".into()), "/run_remote"),
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
            assert_eq!(map_path(&production, path).as_deref(), Ok(path));
        }
    }

    #[test]
    fn regional_hosts_take_bare_paths_and_refuse_staged_ones() {
        assert_eq!(
            regional_url("abc", "staging"),
            "https://model-abc-staging.api.baseten.co"
        );
        let map = |path| map_path(&Stage::Regional, path);
        assert_eq!(map("/predict").as_deref(), Ok("/predict"));
        assert_eq!(map("/websocket").as_deref(), Ok("/websocket"));
        assert_eq!(
            map("/v1/chat/completions").as_deref(),
            Ok("/sync/v1/chat/completions")
        );
        assert_eq!(map("/sync/v1/models").as_deref(), Ok("/sync/v1/models"));
        assert_eq!(map("/async_request/r1").as_deref(), Ok("/async_request/r1"));
        for staged in [
            "/production/predict",
            "/environments/staging/predict",
            "/development/predict",
        ] {
            assert_eq!(map(staged), Err(StagedPathOnRegionalHost), "{staged}");
        }
    }

    #[test]
    fn grpc_names_the_model_and_its_stage_in_headers() {
        assert_eq!(grpc_url("abc"), "https://model-abc.grpc.api.baseten.co");
        assert_eq!(
            grpc_headers("abc", None),
            [("baseten-model-id", "model-abc".to_owned())]
        );
        let header = |stage| grpc_headers("abc", Some(&stage));
        assert_eq!(
            header(Stage::Environment("staging".into())),
            [
                ("baseten-model-id", "model-abc".to_owned()),
                ("x-baseten-environment", "staging".to_owned())
            ]
        );
        assert_eq!(
            header(Stage::Deployment("d1".into())),
            [
                ("baseten-model-id", "model-abc".to_owned()),
                ("x-baseten-deployment", "d1".to_owned())
            ]
        );
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
