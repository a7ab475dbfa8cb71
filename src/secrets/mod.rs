//! Secrets: the upstream key as a type that cannot be printed by accident
//! ([`key`]), and the watcher that keeps key and access-token files current
//! without a restart ([`secret_file`]).

pub(crate) mod key;
pub mod secret_file;
