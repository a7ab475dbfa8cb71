//! Route policy: the settings a `[[routes]]` entry takes from the top level
//! unless it sets its own, declared once in the `route_policy!` list below,
//! each with where its value came from ([`Source`]). `allowed_paths` and
//! `token_budget` depend on that source (see [`path_policy`],
//! [`budget_account`]).

use super::{RawRoute, Reported, Scope, DEFAULT_ROUTE};
use crate::config::check::Problems;
use crate::config::parse::{split_list, Switch};
use crate::config::settings::SETTINGS;
use crate::config::RawConfig;
use crate::guard::paths::PathPolicy;

/// A whole-number setting: `Ok(None)` is the top level's "off" (a route
/// writes a number or leaves the setting out); `Err` is top-level text that
/// is not a number.
pub(super) type Number = Result<Option<u64>, Reported>;

/// Where a route's policy value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    /// The route set it (or it is the default route, whose own settings
    /// are the top level's).
    Own,
    /// A `[[routes]]` entry left it out and took the top level's.
    Top,
}

/// One route policy value and where it came from.
pub(super) struct Inherit<T> {
    pub(super) value: T,
    pub(super) from: Source,
}

/// A route policy value as the top level writes it (a `RawConfig` field of
/// type `Top`) and as a `[[routes]]` entry does (an `Option<Route>` field).
pub(super) trait PolicyValue: Clone {
    /// The `RawRoute` field's type, inside its `Option`.
    type Route;
    /// The `RawConfig` field's type.
    type Top: AtDefault;
    /// A route's own value of setting `key` (as its problems name it).
    fn own(route: &Self::Route, key: &str, found: &mut Problems) -> Self;
    /// The top level's value of setting `key`, read once (problems reported).
    fn top(top: &Self::Top, key: &str, found: &mut Problems) -> Self;
    /// True when this is setting `key`'s default value.
    fn at_default(&self, key: &str) -> bool;
}

/// Policy values written the same way at the top level and in a route.
macro_rules! written_alike {
    ($($ty:ty),*) => {$(
        impl PolicyValue for $ty {
            type Route = $ty;
            type Top = $ty;
            fn own(route: &$ty, _key: &str, _found: &mut Problems) -> Self {
                route.clone()
            }
            fn top(top: &$ty, _key: &str, _found: &mut Problems) -> Self {
                top.clone()
            }
            fn at_default(&self, key: &str) -> bool {
                AtDefault::is_default(self, key)
            }
        }
    )*};
}

written_alike!(String, Vec<String>);

/// A switch, read as on or off; a route's that is neither is reported
/// here, the top level's with the other top-level switches.
impl PolicyValue for bool {
    type Route = Switch;
    type Top = Switch;
    fn own(route: &Switch, key: &str, found: &mut Problems) -> Self {
        if let Some(message) = route.invalid() {
            found.report(key, message);
        }
        route.on()
    }
    fn top(top: &Switch, _key: &str, _found: &mut Problems) -> Self {
        top.on()
    }
    fn at_default(&self, key: &str) -> bool {
        *self == (default_of(key) == "true")
    }
}

/// A number: a route writes one (a TOML integer, read as text), the top
/// level a number or "off", as flags and environment variables set it too.
impl PolicyValue for Number {
    type Route = String;
    type Top = String;
    fn own(route: &String, key: &str, found: &mut Problems) -> Self {
        match route.trim().parse::<u64>() {
            Ok(number) => Ok(Some(number)),
            Err(_) => Err(found.refuse(key, format!("{route:?} is not a whole number"))),
        }
    }
    fn top(top: &String, key: &str, found: &mut Problems) -> Self {
        found.optional::<u64>(key, top, "a whole number")
    }
    fn at_default(&self, key: &str) -> bool {
        *self == Ok(default_of(key).parse::<u64>().ok())
    }
}

/// Declares [`Policy`]: per setting, a route's own value or the top level's.
macro_rules! route_policy {
    ($($field:ident: $ty:ty),* $(,)?) => {
        /// A route's policy settings, each its own or inherited.
        pub(super) struct Policy {
            $(pub(super) $field: Inherit<$ty>,)*
        }

        impl Policy {
            /// The top-level settings, as the default route's own; what
            /// cannot be read is reported here, once.
            pub(super) fn top(raw: &RawConfig, found: &mut Problems) -> Self {
                Self {
                    $($field: Inherit {
                        value: <$ty as PolicyValue>::top(&raw.$field, stringify!($field), found),
                        from: Source::Own,
                    },)*
                }
            }

            /// A `[[routes]]` entry's: what it sets (problems reported in
            /// `scope`), else the top level's.
            pub(super) fn of(
                route: &RawRoute,
                top: &Policy,
                scope: &Scope,
                found: &mut Problems,
            ) -> Self {
                Self {
                    $($field: match &route.$field {
                        Some(value) => Inherit {
                            value: <$ty as PolicyValue>::own(
                                value,
                                &scope.setting(stringify!($field)),
                                found,
                            ),
                            from: Source::Own,
                        },
                        None => Inherit { value: top.$field.value.clone(), from: Source::Top },
                    },)*
                }
            }

            /// True when setting `key` has its default value here.
            pub(super) fn is_default(&self, key: &str) -> bool {
                $(
                    if key == stringify!($field) {
                        return PolicyValue::at_default(&self.$field.value, key);
                    }
                )*
                false
            }

            /// The top-level settings that are set (not at their default)
            /// while every `[[routes]]` entry sets its own: without a
            /// default route they would apply to nothing.
            pub(super) fn overridden_everywhere(raw: &RawConfig) -> Vec<&'static str> {
                let mut unused = Vec::new();
                $(
                    if !raw.$field.is_default(stringify!($field))
                        && raw.routes.iter().all(|route| route.$field.is_some())
                    {
                        unused.push(stringify!($field));
                    }
                )*
                unused
            }
        }
    };
}

/// Whether a top-level value is its setting's default (from `SETTINGS`).
pub(super) trait AtDefault {
    fn is_default(&self, key: &str) -> bool;
}

fn default_of(key: &str) -> &'static str {
    SETTINGS
        .iter()
        .find(|setting| setting.key == key)
        .map_or("", |setting| setting.default)
}

impl AtDefault for String {
    fn is_default(&self, key: &str) -> bool {
        self.trim() == default_of(key)
    }
}

impl AtDefault for Vec<String> {
    fn is_default(&self, key: &str) -> bool {
        let set: Vec<&str> = self
            .iter()
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
            .collect();
        set == split_list(default_of(key))
    }
}

impl AtDefault for Switch {
    fn is_default(&self, key: &str) -> bool {
        self.on() == (default_of(key) == "true")
    }
}

// Every per-route policy setting that also exists at the top level: a
// `[[routes]]` entry that leaves it out takes the top level's value, one
// that sets it (even to `[]`) keeps its own, and a top-level value that
// every route overrides, with no top-level route to use it, is refused.
// Adding one is one line here, given a `RawConfig` field and an `Option`
// `RawRoute` field of the same name (of the types a `PolicyValue` pairs),
// plus a row in the README's "Route policy" table. Settings that apply
// process-wide (token_rate_limit, access_token_budget, max_request_body,
// max_concurrent_requests) are not route policy.
route_policy! {
    auth_header: String,
    auth_template: String,
    auth_query: String,
    strip_request_headers: Vec<String>,
    set_request_headers: Vec<String>,
    allowed_paths: Vec<String>,
    token_budget: Vec<String>,
    add_stream_usage: bool,
    // Request rules ([`RequestRules`]).
    budget_reserve: Number,
    unparsed_budget_requests: String,
    max_output_tokens: Number,
    over_max_output_tokens: String,
    allowed_models: Vec<String>,
    // Retries ([`RetryPolicy`]).
    retry_on: Vec<String>,
    retry_attempts: Number,
    retry_methods: Vec<String>,
    retry_budget: String,
    retry_max_wait: String,
    retry_buffer: String,
    eject_after: Number,
    eject_for: String,
    // The timing of a route's own key_command ([`super::credential`]).
    key_command_ttl: String,
    key_command_timeout: String,
}

/// The account a route's `token_budget` is counted in: its own name when
/// it sets one, else the top level's budget, one budget shared by the
/// default route and every route that inherits it (as `default`).
pub(super) fn budget_account(name: &str, policy: &Policy) -> String {
    match policy.token_budget.from {
        Source::Own => name.to_owned(),
        Source::Top => DEFAULT_ROUTE.to_owned(),
    }
}

/// The route's `allowed_paths`. Rules match the local path, prefix
/// included, so a rule outside the route's prefix can never match there: a
/// route's own such rule is a mistake, and so is an inherited list none of
/// whose rules can match (an inherited list may hold rules for other routes).
pub(super) fn path_policy(
    rules: &Inherit<Vec<String>>,
    prefix: &str,
    scope: &Scope,
    found: &mut Problems,
) -> Option<PathPolicy> {
    let setting = scope.setting("allowed_paths");
    let policy = PathPolicy::parse(&rules.value)
        .map_err(|message| found.report(&setting, message))
        .ok()?;
    let outside = policy.rules_outside(prefix);
    match rules.from {
        Source::Own if !outside.is_empty() => {
            for rule in outside {
                found.report(
                    &setting,
                    format!(
                        "{rule:?} can never match: this route serves only paths under {prefix} \
                         (rules match the local path, prefix included)"
                    ),
                );
            }
            None
        }
        Source::Top if !policy.is_empty() && outside.len() == policy.len() => {
            found.report(
                &setting,
                format!(
                    "inherits the top-level allowed_paths, and none of its rules can match under \
                     this route's prefix {prefix} (rules match the local path, prefix included); \
                     give the route its own allowed_paths (or [] for none)"
                ),
            );
            None
        }
        _ => Some(policy),
    }
}
