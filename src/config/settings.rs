//! The settings table: every key keyrelay accepts, its default, its help
//! text and the shape of its value. `--help`, the config file, the
//! `KEYRELAY_*` variables and the README's table are all generated from or
//! checked against it, so they cannot drift apart.

/// The config-file key of the route table (`[[routes]]`).
pub const ROUTES_KEY: &str = "routes";

/// Prefix of the environment variables that set keyrelay's own settings.
pub const ENV_PREFIX: &str = "KEYRELAY";

/// One setting: its key in the config file, how to set it elsewhere, its default.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// Key in the TOML file; also the suffix of the `KEYRELAY_` variable.
    pub key: &'static str,
    /// Default value as a user would write it, or "" when there is none.
    pub default: &'static str,
    /// One line saying what the setting does.
    pub help: &'static str,
    /// How the value is written.
    pub kind: Kind,
}

/// The shape of a setting's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One value.
    Text,
    /// A list: a TOML array, a comma-separated variable, or a repeatable flag.
    List,
    /// A boolean: `true`/`false`, or a flag without a value.
    Switch,
}

/// The default of the setting `key` ("" when it has none or is unknown).
pub fn default_of(key: &str) -> &'static str {
    SETTINGS
        .iter()
        .find(|setting| setting.key == key)
        .map_or("", |setting| setting.default)
}

impl Setting {
    /// The environment variable that sets this setting, e.g. `KEYRELAY_LISTEN`.
    pub fn env_var(&self) -> String {
        format!("{ENV_PREFIX}_{}", self.key.to_ascii_uppercase())
    }

    /// The command-line flag that sets this setting, e.g. `--listen`.
    pub fn flag(&self) -> String {
        format!("--{}", self.key.replace('_', "-"))
    }
}

/// Every setting keyrelay knows. Anything else in a file or `KEYRELAY_*` is an error.
pub const SETTINGS: &[Setting] = &[
    Setting {
        key: "listen",
        default: "127.0.0.1:8080",
        help: "Address the proxy listens on (HTTP/1.1 and h2c on the same port), or unix:/path for a Unix socket (not on Windows); a socket systemd passes (socket activation, LISTEN_FDS) replaces it.",
        kind: Kind::Text,
    },
    Setting {
        key: "listen_backlog",
        default: "4096",
        help: "Connections the kernel queues for keyrelay before it accepts them (1 to 65535); a burst larger than this waits seconds on SYN retries. Capped by net.core.somaxconn.",
        kind: Kind::Text,
    },
    Setting {
        key: "workers",
        default: "auto",
        help: "Threads serving connections, each with its own listener socket and upstream connections; auto is one per CPU the process may use (its cgroup quota included).",
        kind: Kind::Text,
    },
    Setting {
        key: "upstream",
        default: "",
        help: "Base URL of the model endpoint; request paths are appended to its path.",
        kind: Kind::Text,
    },
    Setting {
        key: "model",
        default: "",
        help: "Baseten shortcut: proxy the model with this id (https://model-ID.api.baseten.co); /predict and /v1/... map under its environment.",
        kind: Kind::Text,
    },
    Setting {
        key: "chain",
        default: "",
        help: "Baseten shortcut: proxy the chain with this id (https://chain-ID.api.baseten.co); /run_remote maps under its environment.",
        kind: Kind::Text,
    },
    Setting {
        key: "model_apis",
        default: "false",
        help: "Baseten shortcut: proxy the shared OpenAI-compatible Model APIs (https://inference.baseten.co).",
        kind: Kind::Switch,
    },
    Setting {
        key: "grpc",
        default: "false",
        help: "With model: call the model's gRPC server (https://model-ID.grpc.api.baseten.co over HTTP/2, baseten-authorization and baseten-model-id set, and x-baseten-environment or x-baseten-deployment from environment or deployment).",
        kind: Kind::Switch,
    },
    Setting {
        key: "regional",
        default: "false",
        help: "With model and environment: call the regional host https://model-ID-ENV.api.baseten.co, which takes bare paths (/predict, /sync/v1/...).",
        kind: Kind::Switch,
    },
    Setting {
        key: "environment",
        default: "",
        help: "With model or chain: the environment to call (production when no stage is given).",
        kind: Kind::Text,
    },
    Setting {
        key: "deployment",
        default: "",
        help: "With model or chain: call this deployment id instead of an environment.",
        kind: Kind::Text,
    },
    Setting {
        key: "development",
        default: "false",
        help: "With model or chain: call the development deployment.",
        kind: Kind::Switch,
    },
    Setting {
        key: "provider",
        default: "",
        help: "Preset for a hosted API (openai, anthropic, gemini, azure-openai, vertex, openrouter, groq, together, fireworks, mistral, deepseek, baseten): its upstream, auth_header, auth_template, required headers and key_env, each overridden by the setting when written.",
        kind: Kind::Text,
    },
    Setting {
        key: "key_env",
        default: "BASETEN_API_KEY",
        help: "Environment variable holding the upstream API key.",
        kind: Kind::Text,
    },
    Setting {
        key: "auth_header",
        default: "authorization",
        help: "Header the key is injected into.",
        kind: Kind::Text,
    },
    Setting {
        key: "auth_template",
        default: "Api-Key {key}",
        help: "Value of the injected header; {key} is replaced by the key.",
        kind: Kind::Text,
    },
    Setting {
        key: "auth_query",
        default: "",
        help: "Query parameter the key goes in instead of a header (e.g. key, for Gemini's ?key=): added last, replacing any the client sent; auth_header is then only removed from clients' requests.",
        kind: Kind::Text,
    },
    Setting {
        key: "strip_request_headers",
        default: "authorization,proxy-authorization,x-api-key,cookie",
        help: "Client credential headers removed before forwarding (comma list).",
        kind: Kind::List,
    },
    Setting {
        key: "key_file",
        default: "",
        help: "File holding the upstream API key (e.g. a mounted Secret); re-read on change and SIGHUP. Overrides key_env.",
        kind: Kind::Text,
    },
    Setting {
        key: "key_command",
        default: "",
        help: "Helper command printing the upstream key (an argv list, run without a shell): the bare key, or JSON with token and expires_at (RFC 3339) or expires_in (seconds), kubectl ExecCredential too. Run at startup and again before expiry. Overrides key_file and key_env.",
        kind: Kind::List,
    },
    Setting {
        key: "key_command_ttl",
        default: "5m",
        help: "Lifetime of a key_command value printed without an expiry (or an OAuth2 token answered without expires_in); refreshed at 80% of it, and never sent after it.",
        kind: Kind::Text,
    },
    Setting {
        key: "key_command_timeout",
        default: "30s",
        help: "Longest a key_command run (or an OAuth2 token request) may take before it is stopped and counts as failed.",
        kind: Kind::Text,
    },
    Setting {
        key: "oauth_token_url",
        default: "",
        help: "OAuth2 token endpoint (client credentials, RFC 6749 4.4): the key is an access token fetched at startup and again before it expires. Overrides key_env; the default auth_template becomes \"Bearer {key}\".",
        kind: Kind::Text,
    },
    Setting {
        key: "oauth_client_id",
        default: "",
        help: "OAuth2 client id sent to oauth_token_url.",
        kind: Kind::Text,
    },
    Setting {
        key: "oauth_client_secret_env",
        default: "",
        help: "Environment variable holding the OAuth2 client secret (or set oauth_client_secret_file).",
        kind: Kind::Text,
    },
    Setting {
        key: "oauth_client_secret_file",
        default: "",
        help: "File holding the OAuth2 client secret (or set oauth_client_secret_env).",
        kind: Kind::Text,
    },
    Setting {
        key: "oauth_scope",
        default: "",
        help: "OAuth2 scope asked for, e.g. https://cognitiveservices.azure.com/.default.",
        kind: Kind::Text,
    },
    Setting {
        key: "oauth_audience",
        default: "",
        help: "OAuth2 audience asked for (Auth0-style token endpoints).",
        kind: Kind::Text,
    },
    Setting {
        key: "oauth_auth_method",
        default: "basic",
        help: "How the client authenticates to oauth_token_url: basic (client_secret_basic) or post (client_secret_post).",
        kind: Kind::Text,
    },
    Setting {
        key: "google_credentials",
        default: "false",
        help: "Fetch the key as a Google access token, as Application Default Credentials do: google_credentials_file, else the file GOOGLE_APPLICATION_CREDENTIALS names, else the GCP metadata server (GCE_METADATA_HOST to point elsewhere). On with provider = vertex unless another key source is set; the default auth_template becomes \"Bearer {key}\".",
        kind: Kind::Switch,
    },
    Setting {
        key: "google_credentials_file",
        default: "",
        help: "Google service-account key file (JSON): the key is an access token from the JWT-bearer grant signed with its private key at its token_uri, fetched at startup and again before it expires. Implies google_credentials.",
        kind: Kind::Text,
    },
    Setting {
        key: "google_scopes",
        default: "https://www.googleapis.com/auth/cloud-platform",
        help: "OAuth2 scopes asked for with Google credentials (comma list).",
        kind: Kind::List,
    },
    Setting {
        key: "allowed_hosts",
        default: "",
        help: "Host names accepted besides localhost, 127.0.0.1 and [::1]; others get 403 (DNS-rebinding defence).",
        kind: Kind::List,
    },
    Setting {
        key: "allowed_origins",
        default: "",
        help: "Browser origins allowed to call keyrelay, exactly (e.g. http://localhost:3000; http://localhost:* for any port of a loopback host); none by default.",
        kind: Kind::List,
    },
    Setting {
        key: "allow_credentials",
        default: "false",
        help: "Let allowed origins send cookies and HTTP auth (fetch credentials: \"include\"); exact origins only.",
        kind: Kind::Switch,
    },
    Setting {
        key: "access_token_env",
        default: "",
        help: "Variables each holding a local access token clients must present (the variable names the token).",
        kind: Kind::List,
    },
    Setting {
        key: "access_token_files",
        default: "",
        help: "Files each holding a local access token clients must present (the file name names the token); re-read on change and SIGHUP.",
        kind: Kind::List,
    },
    Setting {
        key: "token_rate_limit",
        default: "off",
        help: "Requests allowed per access token, e.g. 60/m or 5/s (bursts up to the count); 429 beyond it.",
        kind: Kind::Text,
    },
    Setting {
        key: "allowed_paths",
        default: "",
        help: "If set, only these `METHOD /path` rules (a trailing * matches a prefix) are forwarded; others get 403; ambiguous paths (dot segments, ;, %25, bad escapes, backslashes) get 400.",
        kind: Kind::List,
    },
    Setting {
        key: "allow_unauthenticated_network",
        default: "false",
        help: "Allow a non-loopback listen address without access tokens (anyone who can reach it can spend the key), and a non-loopback admin_listen (the admin port takes no token).",
        kind: Kind::Switch,
    },
    Setting {
        key: "allow_cleartext_upstream",
        default: "false",
        help: "Allow a plain http:// upstream whose host is not localhost or a loopback address: the key then crosses the network in clear text.",
        kind: Kind::Switch,
    },
    Setting {
        key: "ca_file",
        default: "",
        help: "PEM bundle of extra CA certificates trusted for the upstream, beside the web roots.",
        kind: Kind::Text,
    },
    Setting {
        key: "connect_timeout",
        default: "10s",
        help: "Limit on DNS + TCP + TLS to the upstream (504 when exceeded).",
        kind: Kind::Text,
    },
    Setting {
        key: "response_header_timeout",
        default: "off",
        help: "Limit on waiting for the upstream's response headers (504); off by default for cold starts.",
        kind: Kind::Text,
    },
    Setting {
        key: "idle_timeout",
        default: "5m",
        help: "Longest silence between response body frames before the stream is aborted.",
        kind: Kind::Text,
    },
    Setting {
        key: "pool_idle_timeout",
        default: "20s",
        help: "How long an idle upstream connection is kept for reuse.",
        kind: Kind::Text,
    },
    Setting {
        key: "pool_max_idle_per_host",
        default: "1024",
        help: "Most idle upstream connections kept for reuse, 0 to 65535 (high enough that bursts do not churn connections).",
        kind: Kind::Text,
    },
    Setting {
        key: "upstream_http",
        default: "",
        help: "HTTP version to the upstream: 1.1 (when unset; 2 with grpc), 2 (pooled, multiplexed connections with keepalive pings) or auto (the server's choice in TLS ALPN).",
        kind: Kind::Text,
    },
    Setting {
        key: "warm_connections",
        default: "1",
        help: "Connections to each upstream opened at startup and kept open by each serving thread (re-opened when the server closes them), so the first request pays no DNS, TCP or TLS handshake; 0 to 64, 0 turns it off.",
        kind: Kind::Text,
    },
    Setting {
        key: "upstream_http2",
        default: "false",
        help: "The same as upstream_http = \"2\".",
        kind: Kind::Switch,
    },
    Setting {
        key: "set_request_headers",
        default: "",
        help: "Static headers set on every upstream request, replacing any the client sent (\"name: value\" list; never secrets, the key goes in key_env, key_file or key_command).",
        kind: Kind::List,
    },
    Setting {
        key: "http2_keepalive_interval",
        default: "20s",
        help: "Interval of PING keepalives on HTTP/2 upstream connections.",
        kind: Kind::Text,
    },
    Setting {
        key: "http2_keepalive_timeout",
        default: "20s",
        help: "How long an HTTP/2 upstream connection may leave a PING unanswered before it is closed and its streams fail.",
        kind: Kind::Text,
    },
    Setting {
        key: "shutdown_grace",
        default: "30s",
        help: "On SIGTERM/SIGINT, how long streams in flight may finish before they are cut (off: no limit).",
        kind: Kind::Text,
    },
    Setting {
        key: "unix_socket_mode",
        default: "0600",
        help: "Permissions (octal) of the socket file when listen is unix:/path.",
        kind: Kind::Text,
    },
    Setting {
        key: "admin_listen",
        default: "off",
        help: "Address of the admin listener (/healthz, /readyz, /metrics, /usage, POST /quitquitquit); off by default. Beyond loopback it needs allow_unauthenticated_network, or a non-loopback listen guarded by access tokens.",
        kind: Kind::Text,
    },
    Setting {
        key: "shutdown_delay",
        default: "off",
        help: "On SIGTERM/SIGINT, keep accepting this long (readiness already failing) before draining.",
        kind: Kind::Text,
    },
    Setting {
        key: "max_concurrent_requests",
        default: "off",
        help: "Most requests (streams included) in flight at once, 1 to 1000000 or off; beyond it 503 with Retry-After.",
        kind: Kind::Text,
    },
    Setting {
        key: "max_request_header_size",
        default: "64KiB",
        help: "Largest request head accepted, 8KiB to 16MiB (HTTP/1.1 431 beyond it; HTTP/2 header list limit).",
        kind: Kind::Text,
    },
    Setting {
        key: "max_request_body",
        default: "off",
        help: "Largest request body forwarded (e.g. 100MiB; above 0); 413 beyond it. Off by default.",
        kind: Kind::Text,
    },
    Setting {
        key: "header_read_timeout",
        default: "30s",
        help: "How long an HTTP/1.1 client may take to send its request head (slow-header defence).",
        kind: Kind::Text,
    },
    Setting {
        key: "client_idle_timeout",
        default: "3m",
        help: "Close a client connection with no request in flight for this long (HTTP/2 and h2c included: PINGs do not count as activity); off to keep idle connections.",
        kind: Kind::Text,
    },
    Setting {
        key: "request_body_timeout",
        default: "60s",
        help: "Longest wait between two parts of a request body: 408 if the response has not started, else the upstream request is aborted; off to wait forever.",
        kind: Kind::Text,
    },
    Setting {
        key: "http2_max_concurrent_streams",
        default: "256",
        help: "Most concurrent streams per HTTP/2 client connection, 1 to 65535.",
        kind: Kind::Text,
    },
    Setting {
        key: "usage_tap",
        default: "on",
        help: "Read LLM token usage (OpenAI and Anthropic formats) off responses as they pass, for metrics and logs: on or off.",
        kind: Kind::Text,
    },
    Setting {
        key: "add_stream_usage",
        default: "false",
        help: "Add stream_options.include_usage to streaming chat/completions requests that lack it (bodies up to 1 MiB, any framing), and remove the usage-only event it adds from what the client receives.",
        kind: Kind::Switch,
    },
    Setting {
        key: "token_budget",
        default: "",
        help: "LLM tokens (prompt + completion) everyone may spend on the route per window, e.g. 2000000/day,50000/minute; 429 once used up.",
        kind: Kind::List,
    },
    Setting {
        key: "access_token_budget",
        default: "",
        help: "LLM tokens each local access token may spend per window, e.g. 200000/day; 429 once used up.",
        kind: Kind::List,
    },
    Setting {
        key: "budget_reserve",
        default: "4096",
        help: "Output tokens a budgeted request reserves when its body names no max_tokens (plus its body's bytes / 4 for the prompt); replaced by what it spent when it ends.",
        kind: Kind::Text,
    },
    Setting {
        key: "unparsed_budget_requests",
        default: "forward",
        help: "A budgeted request whose body is not a JSON object keyrelay can read within 1 MiB: forward (under budget_reserve) or refuse (400).",
        kind: Kind::Text,
    },
    Setting {
        key: "max_output_tokens",
        default: "off",
        help: "Most output tokens (max_tokens, max_completion_tokens, max_output_tokens, n_predict, and nested forms) a request may ask for; a request naming none gets it. Bodies keyrelay cannot read get 400.",
        kind: Kind::Text,
    },
    Setting {
        key: "over_max_output_tokens",
        default: "refuse",
        help: "A request asking for more than max_output_tokens: refuse (403) or clamp (the body is rewritten to the cap).",
        kind: Kind::Text,
    },
    Setting {
        key: "allowed_models",
        default: "",
        help: "The only models requests may name in their JSON body's \"model\" (or their path or query, Gemini/Azure/Bedrock/Realtime style); others get 403. Bodies keyrelay cannot read get 400.",
        kind: Kind::List,
    },
    Setting {
        key: "access_token_max_output_tokens",
        default: "off",
        help: "max_output_tokens for every request that presents a local access token, on top of the route's (the lower cap applies).",
        kind: Kind::Text,
    },
    Setting {
        key: "access_token_allowed_models",
        default: "",
        help: "The only models a request presenting a local access token may name (and the route's allowed_models too, if set); others get 403.",
        kind: Kind::List,
    },
    Setting {
        key: "retry_on",
        default: "",
        help: "Upstream answers a request is tried again for, before any response byte reached the client: statuses (429, 500-599) and connect (no connection could be made). Empty: no retries.",
        kind: Kind::List,
    },
    Setting {
        key: "retry_attempts",
        default: "2",
        help: "Most extra attempts per request (1 to 10) when retry_on matches.",
        kind: Kind::Text,
    },
    Setting {
        key: "retry_methods",
        default: "GET, HEAD, OPTIONS, PUT, DELETE",
        help: "Methods retried for a retry_on status; add POST for model APIs, whose POSTs are safe to retry before any response byte. connect failures are retried for every method (nothing was sent).",
        kind: Kind::List,
    },
    Setting {
        key: "retry_budget",
        default: "20%",
        help: "Most retries per route as a share of its requests over the last 10 s (at least 10 per 10 s), so a failing upstream is not hammered.",
        kind: Kind::Text,
    },
    Setting {
        key: "retry_max_wait",
        default: "10s",
        help: "Longest wait before an attempt (backoff with jitter, or the upstream's Retry-After); an answer asking for longer reaches the client at once.",
        kind: Kind::Text,
    },
    Setting {
        key: "retry_buffer",
        default: "1MiB",
        help: "Largest request body kept to send again: a body is retried only if its declared length is within this (it still streams to the first attempt).",
        kind: Kind::Text,
    },
    Setting {
        key: "eject_after",
        default: "5",
        help: "Consecutive failed attempts (retry_on matches) after which a route is skipped as a fallback target and primary for eject_for.",
        kind: Kind::Text,
    },
    Setting {
        key: "eject_for",
        default: "30s",
        help: "How long a failing route is skipped before one request probes it again.",
        kind: Kind::Text,
    },
    Setting {
        key: "upstream_name_header",
        default: "false",
        help: "Name the route whose upstream answered in an x-keyrelay-upstream response header (off: route names can reveal internals).",
        kind: Kind::Switch,
    },
    Setting {
        key: "usage_state_file",
        default: "",
        help: "File keeping what the token budgets have spent across restarts (written atomically every few seconds and at shutdown).",
        kind: Kind::Text,
    },
    Setting {
        key: "usage_store",
        default: "local",
        help: "Where token budgets are counted: local (this process) or redis://HOST:PORT/DB, shared by every replica.",
        kind: Kind::Text,
    },
    Setting {
        key: "usage_store_unavailable",
        default: "allow",
        help: "When the Redis usage_store cannot be reached: allow (serve unmetered) or deny (503 for budgeted requests).",
        kind: Kind::Text,
    },
    Setting {
        key: "otlp_endpoint",
        default: "",
        help: "OTLP collector that request spans are exported to, e.g. http://127.0.0.1:4318 (off when unset; OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT otherwise).",
        kind: Kind::Text,
    },
    Setting {
        key: "otlp_protocol",
        default: "",
        help: "How spans are exported: http/protobuf or grpc (OTEL_EXPORTER_OTLP_PROTOCOL otherwise; http/protobuf when neither is set).",
        kind: Kind::Text,
    },
    Setting {
        key: "log_format",
        default: "text",
        help: "Log output: text or json.",
        kind: Kind::Text,
    },
];
