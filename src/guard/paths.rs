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

    /// True when `method` and `path` (without query) match a rule, or there are none.
    pub fn allows(&self, method: &Method, path: &str) -> bool {
        self.rules.is_empty()
            || self.rules.iter().any(|rule| {
                rule.method.as_ref().is_none_or(|m| m == method)
                    && if rule.prefix {
                        path.starts_with(&rule.path)
                    } else {
                        path == rule.path
                    }
            })
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
        assert!(!policy.allows(&Method::POST, "/v2/chat"));
        assert!(PathPolicy::default().allows(&Method::DELETE, "/anything"));
    }

    #[test]
    fn bad_rules_are_reported() {
        assert!(PathPolicy::parse(&["GE{T /x".to_owned()]).is_err());
        assert!(PathPolicy::parse(&["POST predict".to_owned()]).is_err());
    }
}
