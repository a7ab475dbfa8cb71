//! What a request asks a model for, read from its JSON body within a bound:
//! how many output tokens it may generate, which model, whether it streams.
//!
//! Budgets reserve from it, the route's request caps (`max_output_tokens`,
//! `allowed_models`) are checked against it, and `add_stream_usage` rewrites
//! it. It is read only on routes that have one of these, once, and at most
//! [`MAX_BODY`] bytes of it: a longer body is forwarded as it came (the bytes
//! read first, then the rest), and counts as unparsed.
//!
//! OpenAI-compatible servers are lenient, so the reading is too: any
//! content type but `multipart/*`, a body with or without a length
//! (chunked), a UTF-8 byte order mark before the JSON, `"stream": "true"`
//! (pydantic's lax booleans), numbers written as strings.
//!
//! `body` reads the body, `fields` reads what it asks for out of the
//! JSON, `path` finds the model a request target names, and `caps`
//! checks a route's request caps against all of these.

mod body;
mod caps;
mod fields;
mod path;
#[cfg(test)]
mod tests;

pub use body::{may_be_json, read, ReadBody, ReadFailed, MAX_BODY, READ_LIMIT};
pub use caps::{Broken, OverCap, RequestCaps, Unparsed};
pub use fields::{
    choices, count, max_output, parse, prompt_estimate, truthy, NotACount, DEFAULT_BUDGET_RESERVE,
    MAX_PROMPT_ESTIMATE, NESTED_OUTPUT_FIELDS, OUTPUT_FIELDS, READ_FIELDS,
};
pub(crate) use path::percent_decode;
pub use path::{is_completions_path, path_model, target_models};
