//! What runs around the data path: listening and accepting, the process's
//! lifecycle (readiness, drain, signals), the admin listener and its health,
//! readiness and metrics endpoints, logging, and the per-request record that
//! feeds the access log and the metrics.

pub mod admin;
pub mod health;
pub mod lifecycle;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod request_record;
pub mod server;
pub mod signals;
