//! Secrets: the upstream key as a type that cannot be printed by accident
//! ([`key`]); the route's credential as the data path reads it, whatever its
//! source, with its expiry ([`credential`]); the watcher that keeps key and
//! access-token files current without a restart ([`secret_file`]); and the
//! helper command, the OAuth2 client and Google's credentials that fetch
//! expiring keys ([`key_command`], [`oauth`], [`google`]) with the task
//! that refreshes them ([`refresh`]).

pub mod credential;
pub mod google;
pub(crate) mod key;
pub mod key_command;
pub mod oauth;
pub mod refresh;
pub mod secret_file;
