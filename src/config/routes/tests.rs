use crate::config::baseten::Stage;
use crate::config::load::tests::sources;
use crate::config::{load, Config, ConfigError, Sources, UpstreamHttp};

const KEY: (&str, &str) = ("BASETEN_API_KEY", "k-123");

fn settings(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let mut all = vec![KEY];
    all.extend_from_slice(pairs);
    load(&sources(&all))
}

fn problems(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    settings(pairs)
        .expect_err("refused")
        .problems
        .into_iter()
        .map(|p| (p.setting, p.message))
        .collect()
}

fn set_headers(config: &Config) -> Vec<(String, String)> {
    config.routes[0]
        .set_headers
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_str().expect("ascii").to_owned()))
        .collect()
}

fn with_file(toml: &str, pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let path = std::env::temp_dir().join(format!(
        "keyrelay-routes-{}-{}.toml",
        std::process::id(),
        toml.len()
    ));
    std::fs::write(&path, toml).expect("write");
    let mut all = vec![KEY];
    all.extend_from_slice(pairs);
    let loaded = load(&Sources {
        file: Some(path.clone()),
        ..sources(&all)
    });
    std::fs::remove_file(&path).expect("remove");
    loaded
}

#[test]
fn grpc_shortcut_builds_the_grpc_host_http2_and_the_model_headers() {
    let config = settings(&[
        ("KEYRELAY_MODEL", "abc123"),
        ("KEYRELAY_GRPC", "true"),
        ("KEYRELAY_ENVIRONMENT", "staging"),
    ])
    .expect("valid");
    let route = &config.routes[0];
    assert_eq!(
        route.upstream.to_string(),
        "https://model-abc123.grpc.api.baseten.co"
    );
    assert_eq!(route.http, UpstreamHttp::Http2);
    assert_eq!(route.stage, None, "gRPC paths are method names, not mapped");
    assert_eq!(route.credential.header, "baseten-authorization");
    assert_eq!(route.credential.value.as_bytes(), b"Api-Key k-123");
    assert!(route.credential.strip.iter().any(|h| h == "authorization"));
    for stage_header in ["x-baseten-environment", "x-baseten-deployment"] {
        assert!(
            route.credential.strip.iter().any(|h| h == stage_header),
            "a client's {stage_header} is removed"
        );
    }
    assert_eq!(
        set_headers(&config),
        [
            ("baseten-model-id".to_owned(), "model-abc123".to_owned()),
            ("x-baseten-environment".to_owned(), "staging".to_owned())
        ]
    );

    let deployment = settings(&[
        ("KEYRELAY_MODEL", "abc123"),
        ("KEYRELAY_GRPC", "true"),
        ("KEYRELAY_DEPLOYMENT", "dep42"),
    ])
    .expect("valid");
    assert_eq!(
        set_headers(&deployment)[1],
        ("x-baseten-deployment".to_owned(), "dep42".to_owned())
    );
    let production =
        settings(&[("KEYRELAY_MODEL", "abc123"), ("KEYRELAY_GRPC", "true")]).expect("valid");
    assert_eq!(
        set_headers(&production).len(),
        1,
        "no stage header: production"
    );
}

#[test]
fn grpc_and_regional_refuse_what_they_cannot_reach() {
    let grpc_chain = problems(&[("KEYRELAY_CHAIN", "c1"), ("KEYRELAY_GRPC", "true")]);
    assert_eq!(grpc_chain[0].0, "grpc");
    assert!(
        grpc_chain[0].1.contains("goes with model"),
        "{grpc_chain:?}"
    );
    let grpc_dev = problems(&[
        ("KEYRELAY_MODEL", "m"),
        ("KEYRELAY_GRPC", "true"),
        ("KEYRELAY_DEVELOPMENT", "true"),
    ]);
    assert!(grpc_dev[0].1.contains("development"), "{grpc_dev:?}");
    let regional = problems(&[("KEYRELAY_MODEL", "m"), ("KEYRELAY_REGIONAL", "true")]);
    assert_eq!(regional[0].0, "regional");
    assert!(regional[0].1.contains("environment"), "{regional:?}");
    let both = problems(&[
        ("KEYRELAY_MODEL", "m"),
        ("KEYRELAY_ENVIRONMENT", "e"),
        ("KEYRELAY_REGIONAL", "true"),
        ("KEYRELAY_GRPC", "true"),
    ]);
    assert!(
        both[0].1.contains("only one of grpc and regional"),
        "{both:?}"
    );
    let grpc_http1 = problems(&[
        ("KEYRELAY_MODEL", "m"),
        ("KEYRELAY_GRPC", "true"),
        ("KEYRELAY_UPSTREAM_HTTP", "1.1"),
    ]);
    assert_eq!(grpc_http1[0].0, "upstream_http", "{grpc_http1:?}");
    let model_id = problems(&[
        ("KEYRELAY_MODEL", "m"),
        ("KEYRELAY_GRPC", "true"),
        ("KEYRELAY_SET_REQUEST_HEADERS", "baseten-model-id: other"),
    ]);
    assert_eq!(model_id[0].0, "set_request_headers");
}

#[test]
fn regional_shortcut_puts_the_environment_in_the_host() {
    let config = settings(&[
        ("KEYRELAY_MODEL", "abc123"),
        ("KEYRELAY_ENVIRONMENT", "staging"),
        ("KEYRELAY_REGIONAL", "true"),
    ])
    .expect("valid");
    let route = &config.routes[0];
    assert_eq!(
        route.upstream.to_string(),
        "https://model-abc123-staging.api.baseten.co"
    );
    assert_eq!(route.stage, Some(Stage::Regional));
    assert_eq!(route.http, UpstreamHttp::Http1);
}

#[test]
fn upstream_http_takes_three_values_and_the_old_switch() {
    let http = |pairs: &[(&str, &str)]| {
        let mut all = vec![("KEYRELAY_UPSTREAM", "https://a.test")];
        all.extend_from_slice(pairs);
        settings(&all).map(|config| config.routes[0].http)
    };
    assert_eq!(http(&[]).expect("valid"), UpstreamHttp::Http1);
    assert_eq!(
        http(&[("KEYRELAY_UPSTREAM_HTTP", "2")]).expect("valid"),
        UpstreamHttp::Http2
    );
    assert_eq!(
        http(&[("KEYRELAY_UPSTREAM_HTTP", "auto")]).expect("valid"),
        UpstreamHttp::Auto
    );
    assert_eq!(
        http(&[("KEYRELAY_UPSTREAM_HTTP2", "true")]).expect("valid"),
        UpstreamHttp::Http2
    );
    let bad = http(&[("KEYRELAY_UPSTREAM_HTTP", "h3")]).expect_err("refused");
    assert_eq!(bad.problems[0].setting, "upstream_http");
    assert!(bad.problems[0].message.contains("1.1, 2, auto"));
    let contradiction = http(&[
        ("KEYRELAY_UPSTREAM_HTTP", "auto"),
        ("KEYRELAY_UPSTREAM_HTTP2", "true"),
    ])
    .expect_err("refused");
    assert_eq!(contradiction.problems[0].setting, "upstream_http2");
}

#[test]
fn request_rules_are_checked_and_routes_inherit_them_unless_they_set_their_own() {
    use crate::usage::inspect::{OverCap, Unparsed};
    let config = with_file(
        r#"
max_output_tokens = 1000
allowed_models = ["small"]
budget_reserve = 512
token_budget = ["100000/day"]

[[routes]]
name = "inherits"
prefix = "/a"
upstream = "https://a.test"
key_env = "BASETEN_API_KEY"

[[routes]]
name = "own"
prefix = "/b"
upstream = "https://b.test"
key_env = "BASETEN_API_KEY"
token_budget = ["10/minute"]
budget_reserve = 64
unparsed_budget_requests = "refuse"
max_output_tokens = 50
over_max_output_tokens = "clamp"
allowed_models = []
"#,
        &[],
    )
    .expect("valid");
    let rules = |name: &str| {
        &config
            .routes
            .iter()
            .find(|r| r.name == name)
            .expect("route")
            .rules
    };
    assert_eq!(rules("inherits").budget_reserve, 512);
    assert_eq!(rules("inherits").caps.max_output_tokens, Some(1000));
    assert_eq!(rules("inherits").caps.allowed_models, ["small"]);
    assert_eq!(rules("own").budget_reserve, 64);
    assert_eq!(rules("own").unparsed_budget_requests, Unparsed::Refuse);
    assert_eq!(rules("own").caps.over_max_output_tokens, OverCap::Clamp);
    assert!(rules("own").caps.allowed_models.is_empty());

    let refused = with_file(
        r#"
budget_reserve = "lots"
over_max_output_tokens = "trim"

[[routes]]
name = "r"
prefix = "/r"
upstream = "https://r.test"
key_env = "BASETEN_API_KEY"
unparsed_budget_requests = "drop"
max_output_tokens = 0
allowed_models = [" "]
"#,
        &[],
    )
    .expect_err("refused");
    let settings: Vec<&str> = refused
        .problems
        .iter()
        .map(|p| p.setting.as_str())
        .collect();
    for expected in [
        "budget_reserve",
        "over_max_output_tokens",
        r#"routes[0] "r".unparsed_budget_requests"#,
        r#"routes[0] "r".max_output_tokens"#,
        r#"routes[0] "r".allowed_models"#,
    ] {
        assert!(settings.contains(&expected), "{expected} in {settings:?}");
    }
}

#[test]
fn top_level_request_rules_every_route_overrides_are_refused() {
    let route = |name: &str, prefix: &str, own: &str| {
        format!(
            "[[routes]]\nname = {name:?}\nprefix = {prefix:?}\nupstream = \"https://a.test\"\n\
             key_env = \"BASETEN_API_KEY\"\ntoken_budget = [\"10/minute\"]\n{own}\n"
        )
    };
    let own = "budget_reserve = 64\nunparsed_budget_requests = \"forward\"\n\
               max_output_tokens = 50\nover_max_output_tokens = \"refuse\"\nallowed_models = []";
    let top = "budget_reserve = 512\nunparsed_budget_requests = \"refuse\"\n\
               max_output_tokens = \"1000\"\nover_max_output_tokens = \"clamp\"\n\
               allowed_models = [\"small\"]\n";
    let refused = with_file(
        &format!("{top}{}{}", route("a", "/a", own), route("b", "/b", own)),
        &[],
    )
    .expect_err("refused");
    let unused: Vec<&str> = refused
        .problems
        .iter()
        .filter(|p| p.message.contains("would apply to nothing"))
        .map(|p| p.setting.as_str())
        .collect();
    assert_eq!(
        unused,
        [
            "budget_reserve",
            "unparsed_budget_requests",
            "max_output_tokens",
            "over_max_output_tokens",
            "allowed_models"
        ],
        "{refused}"
    );
    // One route that inherits them is enough for them to apply.
    with_file(
        &format!("{top}{}{}", route("a", "/a", own), route("b", "/b", "")),
        &[],
    )
    .expect("valid");
}

#[test]
fn an_inherited_request_rule_mistake_is_named_once_where_it_is_written() {
    let route = |name: &str| {
        format!(
            "[[routes]]\nname = {name:?}\nprefix = \"/{name}\"\nupstream = \"https://a.test\"\n\
             key_env = \"BASETEN_API_KEY\"\n"
        )
    };
    let refused = with_file(
        &format!(
            "over_max_output_tokens = \"trim\"\nbudget_reserve = \"lots\"\n{}{}",
            route("a"),
            route("b")
        ),
        &[],
    )
    .expect_err("refused");
    let settings: Vec<&str> = refused
        .problems
        .iter()
        .map(|p| p.setting.as_str())
        .collect();
    assert_eq!(
        settings,
        ["budget_reserve", "over_max_output_tokens"],
        "{refused}"
    );
}

#[test]
fn routes_inherit_upstream_http_and_static_headers_unless_they_set_their_own() {
    let config = with_file(
        r#"
upstream_http = "auto"
set_request_headers = ["x-team: ml"]

[[routes]]
name = "inherits"
prefix = "/a"
upstream = "https://a.test"
key_env = "BASETEN_API_KEY"

[[routes]]
name = "own"
prefix = "/b"
upstream = "https://b.test"
key_env = "BASETEN_API_KEY"
upstream_http = "1.1"
set_request_headers = []

[[routes]]
name = "old-switch"
prefix = "/c"
upstream = "https://c.test"
key_env = "BASETEN_API_KEY"
http2 = true

[[routes]]
name = "grpc"
prefix = "/d"
model = "abc"
grpc = true
key_env = "BASETEN_API_KEY"
"#,
        &[],
    )
    .expect("valid");
    let route = |name: &str| {
        config
            .routes
            .iter()
            .find(|r| r.name == name)
            .expect("route")
    };
    assert_eq!(route("inherits").http, UpstreamHttp::Auto);
    assert_eq!(route("inherits").set_headers.len(), 1);
    assert_eq!(route("own").http, UpstreamHttp::Http1);
    assert!(route("own").set_headers.is_empty());
    assert_eq!(route("old-switch").http, UpstreamHttp::Http2);
    assert_eq!(route("grpc").http, UpstreamHttp::Http2);
    assert_eq!(route("grpc").credential.header, "baseten-authorization");
    let names: Vec<&str> = route("grpc")
        .set_headers
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(names, ["x-team", "baseten-model-id"]);

    let refused = with_file(
        r#"
[[routes]]
name = "grpc"
prefix = "/"
model = "abc"
grpc = true
key_env = "BASETEN_API_KEY"
upstream_http = "1.1"
set_request_headers = ["x-ok: 1", "cookie: a=b"]
"#,
        &[],
    )
    .expect_err("refused");
    let settings: Vec<&str> = refused
        .problems
        .iter()
        .map(|p| p.setting.as_str())
        .collect();
    assert_eq!(
        settings,
        [
            r#"routes[0] "grpc".set_request_headers"#,
            r#"routes[0] "grpc".upstream_http"#
        ]
    );
}

// The helpers below are sh scripts.
#[cfg(unix)]
#[test]
fn a_route_key_command_runs_at_load_and_takes_the_top_level_timing() {
    let config = with_file(
        r#"
key_command_ttl = "90s"

[[routes]]
name = "helped"
prefix = "/h"
upstream = "https://h.test"
key_command = ["sh", "-c", "echo route-helper-key"]
auth_template = "Bearer {key}"

[[routes]]
name = "own_ttl"
prefix = "/o"
upstream = "https://o.test"
key_command = ["sh", "-c", "echo other-key"]
key_command_ttl = "1h"
"#,
        &[],
    )
    .expect("valid");
    let route = |name: &str| {
        let route = config.routes.iter().find(|r| r.name == name).expect(name);
        &route.credential
    };
    let helped = route("helped");
    assert_eq!(helped.value, "Bearer route-helper-key");
    let lifetime = helped.lifetime.expect("an expiring key");
    let lived = lifetime.expires.duration_since(lifetime.started).as_secs();
    // 90 s less the 9 s margin.
    assert_eq!(lived, 81);
    let own = route("own_ttl").lifetime.expect("an expiring key");
    assert_eq!(own.expires.duration_since(own.started).as_secs(), 3600 - 10);
    assert!(!format!("{config:?}").contains("route-helper-key"));
}

#[test]
fn key_command_problems_name_the_route_and_the_setting() {
    let found = with_file(
        r#"
key_command_timeout = "soon"

[[routes]]
name = "both"
prefix = "/b"
upstream = "https://b.test"
key_env = "BASETEN_API_KEY"
key_command = ["/nonexistent/helper"]

[[routes]]
name = "blank"
prefix = "/c"
upstream = "https://c.test"
key_command = [" "]
key_command_ttl = "0"
"#,
        &[],
    )
    .expect_err("refused")
    .problems;
    let settings: Vec<&str> = found.iter().map(|p| p.setting.as_str()).collect();
    for expected in [
        "key_command_timeout",
        "routes[0] \"both\".key_command",
        "routes[1] \"blank\".key_command_ttl",
        "routes[1] \"blank\".key_command",
    ] {
        assert!(settings.contains(&expected), "{expected}: {found:?}");
    }
    // The top-level problem is reported once, not per route.
    assert_eq!(
        settings
            .iter()
            .filter(|s| **s == "key_command_timeout")
            .count(),
        1,
        "{found:?}"
    );
}

#[test]
fn a_fallback_whose_budget_or_caps_a_failed_over_request_would_escape_is_refused() {
    let routes = |backup: &str| {
        format!(
            r#"
[[routes]]
name = "primary"
prefix = "/v1"
upstream = "https://a.test"
key_env = "BASETEN_API_KEY"
retry_on = ["503"]
fallback = ["backup"]

[[routes]]
name = "backup"
prefix = "/backup"
upstream = "https://b.test"
key_env = "BASETEN_API_KEY"
{backup}
"#
        )
    };
    for (own, needle) in [
        (r#"token_budget = ["1000/day"]"#, "token_budget"),
        (r#"allowed_models = ["small"]"#, "allowed_models"),
        ("max_output_tokens = 100", "max_output_tokens"),
    ] {
        let refused = match with_file(&routes(own), &[]) {
            Ok(_) => panic!("accepted a fallback with its own {own}"),
            Err(err) => err.problems,
        };
        assert!(
            refused
                .iter()
                .any(|p| p.setting == r#"routes "primary".fallback"# && p.message.contains(needle)),
            "{own}: {refused:?}"
        );
    }
    // The same budget and caps on both (inherited): one account, one rule.
    let shared = format!(
        "token_budget = [\"1000/day\"]\nallowed_models = [\"small\"]\n{}",
        routes("")
    );
    with_file(&shared, &[]).expect("valid");
}

#[test]
fn retry_methods_that_would_change_nothing_are_refused() {
    let route = |retry: &str| {
        format!(
            r#"
[[routes]]
name = "r"
prefix = "/v1"
upstream = "https://a.test"
key_env = "BASETEN_API_KEY"
{retry}
"#
        )
    };
    for retry in [
        // Connection failures are retried for every method.
        "retry_on = [\"connect\"]\nretry_methods = [\"POST\"]",
        // No method: the statuses are retried for nothing.
        "retry_on = [\"503\"]\nretry_methods = []",
    ] {
        let refused = match with_file(&route(retry), &[]) {
            Ok(_) => panic!("accepted, to no effect: {retry}"),
            Err(err) => err.problems,
        };
        assert!(
            refused
                .iter()
                .any(|p| p.setting == r#"routes[0] "r".retry_methods"#),
            "{retry}: {refused:?}"
        );
    }
    with_file(
        &route("retry_on = [\"connect\", \"503\"]\nretry_methods = [\"POST\"]"),
        &[],
    )
    .expect("valid");
}
