//! What runs around the data path: listening and accepting on the serving
//! threads, the process's
//! lifecycle (readiness, drain, signals), the admin listener and its health,
//! readiness and metrics endpoints, and `keyrelay health`. The top layer:
//! it runs the data path ([`crate::proxy`]) and nothing below names it.

pub(crate) mod admin;
pub(crate) mod client_idle;
pub mod health;
pub(crate) mod lifecycle;
pub mod listener;
pub(crate) mod server;
pub mod signals;
pub mod socket_activation;
pub(crate) mod workers;
