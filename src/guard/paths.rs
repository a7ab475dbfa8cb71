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
                if let Some(why) = ambiguity(path) {
                    return Err(format!(
                        "{text:?}: the path has {why}, and such paths are refused when \
                         allowed_paths is set, so the rule could never match"
                    ));
                }
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
        ambiguity(path).is_none()
            && self
                .rules
                .iter()
                .any(|rule| rule.method.as_ref() == Some(method) && rule.matches(path))
    }

    /// True when [`check`](Self::check) lets the request pass.
    pub fn allows(&self, method: &Method, path: &str) -> bool {
        self.check(method, path) == PathVerdict::Allowed
    }

    /// Whether `method` and `path` (without query) may pass: every request
    /// may when there are no rules.
    ///
    /// With rules in force, a path that servers resolve differently is
    /// refused before any rule is tried: an upstream, a CDN or a framework
    /// that normalises `/v1/../admin`, `/v1/%2e%2e/admin`, `/v1/..;/admin`
    /// (Tomcat, Spring) or decodes twice (`%252e`) would otherwise reach
    /// outside an allowed prefix. See [`ambiguity`].
    pub fn check(&self, method: &Method, path: &str) -> PathVerdict {
        if self.rules.is_empty() {
            return PathVerdict::Allowed;
        }
        if let Some(why) = ambiguity(path) {
            return PathVerdict::Ambiguous(why);
        }
        let matched = self
            .rules
            .iter()
            .any(|rule| rule.method.as_ref().is_none_or(|m| m == method) && rule.matches(path));
        if matched {
            PathVerdict::Allowed
        } else {
            PathVerdict::NotAllowed
        }
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

/// What the path policy says of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathVerdict {
    /// No rules, or a rule matches.
    Allowed,
    /// Rules are set and none matches.
    NotAllowed,
    /// Rules are set and the path could mean different paths to different
    /// servers; says why.
    Ambiguous(&'static str),
}

/// Why `path` could be read as another path by some server, if it could.
///
/// Each segment is percent-decoded once and refused when the result is or
/// holds a dot segment (`.`, `..`, also between encoded slashes, as in
/// `..%2fadmin`), or holds a `\` or `;`, a `%` (decoded again, it is
/// another escape), a control character, or bytes that are not UTF-8
/// (overlong forms such as `%c0%ae` are how IIS-era servers were walked out
/// of their roots). Raw backslashes and `;` parameters are refused too, and
/// so are malformed escapes (`%zz`, a trailing `%`), which servers repair in
/// different ways. Legitimate escapes pass: `%20`, and an encoded slash
/// with no dot segment beside it (`/v1/models/org%2Fmodel`), which can only
/// add segments below the prefix a rule matched literally. Runs only on
/// routes with `allowed_paths`.
pub fn ambiguity(path: &str) -> Option<&'static str> {
    let bytes = path.as_bytes();
    if bytes.contains(&b'\\') {
        return Some("a backslash");
    }
    if bytes.contains(&b';') {
        return Some("a ; parameter");
    }
    // Most paths have no escape at all: only the dot-segment check is left.
    let mut decoded = Vec::new();
    for segment in path.split('/') {
        let raw = segment.as_bytes();
        let segment: &[u8] = if raw.contains(&b'%') {
            decoded.clear();
            let mut rest = raw;
            // Bounded: each iteration takes at least one byte.
            while let Some((&byte, tail)) = rest.split_first() {
                if byte != b'%' {
                    decoded.push(byte);
                    rest = tail;
                    continue;
                }
                let (Some(high), Some(low)) = (
                    tail.first().copied().and_then(hex_value),
                    tail.get(1).copied().and_then(hex_value),
                ) else {
                    return Some("a malformed percent escape");
                };
                let value = high << 4 | low;
                match value {
                    b'%' => return Some("an encoded %"),
                    b'\\' => return Some("an encoded backslash"),
                    b';' => return Some("an encoded ;"),
                    _ => decoded.push(value),
                }
                rest = &tail[2..];
            }
            if std::str::from_utf8(&decoded).is_err() {
                return Some("a percent escape that is not UTF-8 (overlong or invalid)");
            }
            &decoded
        } else {
            raw
        };
        // Split again: an upstream that decodes %2F sees these as segments.
        if segment
            .split(|byte| *byte == b'/')
            .any(|part| part == b"." || part == b"..")
        {
            return Some("a dot segment");
        }
        if segment.iter().any(|b| b.is_ascii_control()) {
            return Some("a control character");
        }
    }
    None
}

/// The value of one hex digit (of a percent-escape).
pub(crate) fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
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
        assert_eq!(
            policy.check(&Method::POST, "/v2/chat"),
            PathVerdict::NotAllowed
        );
        assert!(PathPolicy::default().allows(&Method::DELETE, "/anything"));
    }

    #[test]
    fn ambiguous_paths_are_refused_before_any_rule() {
        let policy = PathPolicy::parse(&["/v1/*".to_owned()]).expect("valid");
        for path in [
            "/v1/../admin",
            "/v1/%2e%2e/admin",
            "/v1/%2E%2E/admin",
            "/v1/.%2e/admin",
            "/v1/./../admin",
            "/v1/..%2fadmin",
            "/v1/a%2f..%2f..%2fadmin",
            "/v1/%2F.",
            "/v1/.",
            "/v1/a\\..\\b",
            "/v1/..%5cadmin",
            "/v1/..;/admin",
            "/v1/x;jsessionid=1",
            "/v1/%3b/admin",
            "/v1/%252e%252e/admin",
            "/v1/%25",
            "/v1/%c0%ae%c0%ae/admin",
            "/v1/%e0%80%ae",
            "/v1/%ff",
            "/v1/%",
            "/v1/%2",
            "/v1/%zz",
            "/v1/%u002e",
            "/v1/%+1",
            "/v1/a%00.json",
            "/v1/a%0d%0a",
        ] {
            assert!(
                matches!(policy.check(&Method::GET, path), PathVerdict::Ambiguous(_)),
                "{path}: {:?}",
                policy.check(&Method::GET, path)
            );
        }
        for path in [
            "/v1/models.json",
            "/v1/files/my%20file",
            "/v1/caf%C3%A9",
            "/v1/a.b/c",
            "/v1/models/meta-llama%2FLlama-3.1-8B",
            "/v1/%2F",
            "/v1//models",
        ] {
            assert!(policy.allows(&Method::GET, path), "{path}");
        }
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
        // A rule no request could match is a mistake too.
        for rule in ["/v1/..;/x", "/v1/%2e%2e/*", "/v1/a;b", "/v1/%25"] {
            assert!(PathPolicy::parse(&[rule.to_owned()]).is_err(), "{rule}");
        }
        assert!(PathPolicy::parse(&["POST /v1/files/my%20file".to_owned()]).is_ok());
    }
}
