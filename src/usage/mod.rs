//! LLM token usage, read off responses as they stream past.
//!
//! Model APIs bill per token, and report the count inside the response:
//! on the last Server-Sent Event of a stream, or in a JSON body. [`tap`]
//! reads it there without delaying or copying what the client receives,
//! and [`event`] knows the OpenAI and Anthropic shapes. The request record
//! turns the report into metrics and access-log fields, and charges it to
//! the request's [`budget`]s, which [`state_file`] keeps across restarts.

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
