//! LLM token usage, read off responses as they stream past.
//!
//! Model APIs bill per token, and report the count inside the response:
//! on the last Server-Sent Event of a stream, or in a JSON body. [`tap`]
//! reads it there without delaying or copying what the client receives,
//! and [`event`] knows the OpenAI and Anthropic shapes. The access record
//! (`telemetry`) turns the report into metrics and access-log fields, and
//! the request's context (`proxy`) charges it to the request's
//! [`budget`]s when it settles; [`state_file`] keeps them across restarts.
//! The figures themselves (`Usage`, `UsageReport`, `Overshoot`) are
//! telemetry's types, re-exported here.

pub mod budget;
pub mod event;
pub mod inspect;
pub mod redis_store;
pub mod state_file;
pub mod stream_usage;
pub mod tap;

pub use crate::telemetry::tokens::Usage;
pub use budget::{BudgetLimit, Budgets, Estimate, Reservation};
pub use tap::{GaveUp, UsageReport, UsageTap};
