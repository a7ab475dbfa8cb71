//! keyrelay's integration tests: one test binary (one link on a 2-core
//! machine, not 25), a module per behaviour family, and the helpers in
//! [`support`] declared once. Every test drives keyrelay through real
//! sockets on 127.0.0.1:0, in-process (`keyrelay::run`) or as the binary.
//!
//! Run one family with `cargo test --test it <module>::`.

mod support;

mod access_log;
mod auth_query;
mod backpressure;
mod budget_escapes;
mod burst;
mod cancellation;
mod client_timeouts;
mod clients;
mod completions_and_man;
mod config_errors;
mod credentials;
mod demo;
mod forwarding;
mod google_credentials;
mod grpc;
mod hostile_input;
mod http2_upstream;
mod key_command;
mod key_rotation;
mod layering;
mod lifecycle;
mod metrics;
mod oauth;
mod operations;
mod providers;
mod retries;
mod routes;
mod sdk_anthropic;
mod sdk_openai;
mod secrets;
mod security;
// systemd exists on Linux only.
#[cfg(target_os = "linux")]
mod socket_activation;
mod streaming;
mod traces;
mod unix_socket;
mod upstream_faults;
mod upstream_pool;
mod usage;
mod warm_connections;
mod websocket;
mod websocket_client;
mod workers;
