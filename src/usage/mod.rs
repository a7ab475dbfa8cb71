//! LLM token usage, read off responses as they stream past.
//!
//! Model APIs bill per token, and report the count inside the response:
//! on the last Server-Sent Event of a stream, or in a JSON body. [`tap`]
//! reads it there without delaying or copying what the client receives,
//! and [`event`] knows the OpenAI and Anthropic shapes. The request record
//! turns the report into metrics and access-log fields.

pub mod event;
pub mod tap;

pub use event::Usage;
pub use tap::{GaveUp, UsageReport, UsageTap};
