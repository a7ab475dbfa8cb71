//! Optional path policy: which methods and paths the key may be used for.
//!
//! A frontend that only needs `POST /production/predict` should not be able to
//! use the key for anything else on the upstream. Rules are `METHOD /path` or
//! `/path`; a path ending in `*` matches as a prefix. No rules: everything passes.

use http::Method;

/// One allowed method (or any) and path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    method: Option<Method>,
    path: String,
    prefix: bool,
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(method) = &self.method {
            write!(f, "{method} ")?;
        }
        write!(f, "{}{}", self.path, if self.prefix { "*" } else { "" })
    }
}

/// The allowlist; empty means no restriction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PathPolicy {
    rules: Vec<Rule>,
}

impl PathPolicy {
    /// Parses rules such as `POST /production/predict` or `/v1/*`.
    pub fn parse(rules: &[String]) -> Result<Self, String> {
        let rules = rules
            .iter()
            .map(|text| {
                let text = text.trim();
                let (method, path) = match text.split_once(char::is_whitespace) {
                    Some((method, path)) => {
                        let method = Method::from_bytes(method.to_ascii_uppercase().as_bytes())
                            .map_err(|_| format!("{text:?}: {method:?} is not a method"))?;
                        (Some(method), path.trim())
                    }
                    None => (None, text),
                };
                if !path.starts_with('/') {
                    return Err(format!("{text:?}: the path must start with /"));
                }
                let (path, prefix) = match path.strip_suffix('*') {
                    Some(stem) => (stem, true),
                    None => (path, false),
                };
                Ok(Rule {
                    method,
                    path: path.to_owned(),
                    prefix,
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(Self { rules })
    }

    /// True when there are no rules (everything passes).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// How many rules there are.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// The rules (as written back, `METHOD /path`) that can match no path
    /// under the route prefix `prefix` (`/llama` serves `/llama` and
    /// `/llama/...`; `/` serves everything).
    pub fn rules_outside(&self, prefix: &str) -> Vec<String> {
        let under = format!("{}/", prefix.trim_end_matches('/'));
        self.rules
            .iter()
            .filter(|rule| {
                let inside = prefix == "/"
                    || rule.path == prefix
                    || rule.path.starts_with(&under)
                    || rule.prefix && under.starts_with(&rule.path);
                !inside
            })
            .map(Rule::to_string)
            .collect()
    }

    /// True when a rule that names `method` itself matches `path` (a rule
    /// without a method does not count): methods refused unless named, such
    /// as TRACE, pass only then.
    pub fn names(&self, method: &Method, path: &str) -> bool {
        !is_ambiguous(path)
            && self
                .rules
                .iter()
                .any(|rule| rule.method.as_ref() == Some(method) && rule.matches(path))
    }

    /// True when `method` and `path` (without query) match a rule, or there are none.
    ///
    /// With rules in force, a path with dot segments or encoded separators is
    /// refused outright: an upstream or CDN that normalises `/v1/../admin` (or
    /// `/v1/%2e%2e/admin`) would otherwise reach outside an allowed prefix.
    pub fn allows(&self, method: &Method, path: &str) -> bool {
        self.rules.is_empty()
            || !is_ambiguous(path)
                && self.rules.iter().any(|rule| {
                    rule.method.as_ref().is_none_or(|m| m == method) && rule.matches(path)
                })
    }
}

impl Rule {
    fn matches(&self, path: &str) -> bool {
        if self.prefix {
            path.starts_with(&self.path)
        } else {
            path == self.path
        }
    }
}

/// True when `path` has `.`/`..` segments (also percent-encoded) or encoded
/// slashes or backslashes, which different servers resolve differently.
fn is_ambiguous(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") || lower.contains('\\') {
        return true;
    }
    lower
        .replace("%2e", ".")
        .split('/')
        .any(|segment| segment == "." || segment == "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_match_method_and_exact_or_prefix_path() {
        let policy =
            PathPolicy::parse(&["post /production/predict".to_owned(), "/v1/*".to_owned()])
                .expect("valid");
        assert!(policy.allows(&Method::POST, "/production/predict"));
        assert!(!policy.allows(&Method::GET, "/production/predict"));
        assert!(!policy.allows(&Method::POST, "/production/predict/x"));
        assert!(policy.allows(&Method::GET, "/v1/models"));
        assert!(!policy.allows(&Method::POST, "/v2/chat"));
        assert!(PathPolicy::default().allows(&Method::DELETE, "/anything"));
    }

    #[test]
    fn dot_segments_cannot_escape_a_prefix() {
        let policy = PathPolicy::parse(&["/v1/*".to_owned()]).expect("valid");
        for path in [
            "/v1/../admin",
            "/v1/%2e%2e/admin",
            "/v1/%2E%2E/admin",
            "/v1/./../admin",
            "/v1/..%2fadmin",
            "/v1/.",
            "/v1/a\\..\\b",
        ] {
            assert!(!policy.allows(&Method::GET, path), "{path}");
        }
        assert!(policy.allows(&Method::GET, "/v1/models.json"));
        assert!(PathPolicy::default().allows(&Method::GET, "/v1/../admin"));
    }

    #[test]
    fn rules_outside_a_route_prefix_are_found() {
        let rules = [
            "POST /v1/*",
            "/llama/v1/*",
            "GET /llama",
            "/ll*",
            "/llamas/x",
            "/*",
        ]
        .map(str::to_owned);
        let policy = PathPolicy::parse(&rules).expect("valid");
        assert_eq!(policy.rules_outside("/llama"), ["POST /v1/*", "/llamas/x"]);
        assert!(policy.rules_outside("/").is_empty());
    }

    #[test]
    fn bad_rules_are_reported() {
        assert!(PathPolicy::parse(&["GE{T /x".to_owned()]).is_err());
        assert!(PathPolicy::parse(&["POST predict".to_owned()]).is_err());
    }
}
