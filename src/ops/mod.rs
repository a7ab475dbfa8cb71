//! What runs around the data path: listening and accepting on the serving
//! threads, the process's
//! lifecycle (readiness, drain, signals), the admin listener and its health,
//! readiness and metrics endpoints, logging, and the per-request record that
//! feeds the access log and the metrics.

pub(crate) mod admin;
pub(crate) mod client_idle;
pub mod health;
pub(crate) mod lifecycle;
pub mod listener;
pub(crate) mod request_record;
pub(crate) mod server;
pub mod signals;
pub(crate) mod workers;
