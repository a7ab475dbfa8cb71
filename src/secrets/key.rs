//! The upstream API key as a type that cannot be printed by accident.
//!
//! `Debug` and `Display` print a mask, the backing string is zeroized when the
//! key is dropped, and the header value built from it is marked sensitive so
//! that `http`'s own `Debug` output and HPACK indexing leave it alone.

use std::fmt;

use bytes::Bytes;
use http::HeaderValue;
use zeroize::Zeroizing;

/// What every secret prints as, wherever it is formatted.
pub(crate) const MASK: &str = "***";

/// The placeholder in a credential template that the key replaces.
pub(crate) const KEY_PLACEHOLDER: &str = "{key}";

/// The API key keyrelay injects into upstream requests.
#[derive(Clone)]
pub struct ApiKey(Zeroizing<String>);

impl ApiKey {
    /// Wraps a key read from the environment or a file.
    pub fn new(value: String) -> Self {
        Self(Zeroizing::new(value))
    }

    /// Renders `template` (e.g. `Api-Key {key}`) into a sensitive header value.
    ///
    /// Fails when the key holds bytes a header value cannot carry; the error
    /// deliberately says nothing about the key itself.
    pub fn header_value(&self, template: &str) -> Result<HeaderValue, InvalidKeyBytes> {
        let rendered = template.replace(KEY_PLACEHOLDER, &self.0);
        // `http` takes bytes 0x80-0xFF (obs-text), but no key or token is
        // anything but ASCII: one with `é` in it is a paste or encoding
        // mistake of its source, reported rather than sent.
        if !rendered.is_ascii() {
            return Err(InvalidKeyBytes);
        }
        let mut value =
            HeaderValue::from_maybe_shared(Bytes::from(rendered)).map_err(|_| InvalidKeyBytes)?;
        value.set_sensitive(true);
        Ok(value)
    }

    /// True when `text` contains the key (a pasted secret in a setting that
    /// is not kept secret).
    pub fn is_in(&self, text: &str) -> bool {
        let key = self.0.trim();
        !key.is_empty() && text.contains(key)
    }

    /// `text` with every occurrence of the key replaced by the mask (a
    /// key helper that echoes its token on stderr, `set -x` in a script).
    pub(crate) fn mask_in(&self, text: &str) -> String {
        let key = self.0.trim();
        if key.is_empty() {
            text.to_owned()
        } else {
            text.replace(key, MASK)
        }
    }

    /// The secret itself, for the one place that must send it other than in
    /// a header (an OAuth2 token request's body or Basic credentials).
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }

    /// True when the key is empty or only whitespace, which counts as missing.
    pub fn is_blank(&self) -> bool {
        self.0.trim().is_empty()
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey({MASK})")
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(MASK)
    }
}

/// The key (or the template around it) contains bytes not allowed in a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidKeyBytes;

impl fmt::Display for InvalidKeyBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "contains characters that are not allowed in an HTTP header value \
             (line breaks, control characters or non-ASCII)",
        )
    }
}

impl std::error::Error for InvalidKeyBytes {}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "sk-very-secret-value";

    #[test]
    fn debug_and_display_are_masked() {
        let key = ApiKey::new(KEY.to_owned());
        assert_eq!(format!("{key}"), MASK);
        assert!(!format!("{key:?}").contains(KEY));
        assert!(!format!("{key:#?}").contains(KEY));
    }

    #[test]
    fn header_value_renders_template_and_is_sensitive() {
        let value = ApiKey::new(KEY.to_owned())
            .header_value("Api-Key {key}")
            .expect("valid key");
        assert_eq!(value.as_bytes(), format!("Api-Key {KEY}").as_bytes());
        assert!(value.is_sensitive());
        assert!(!format!("{value:?}").contains(KEY));
    }

    #[test]
    fn key_with_newline_is_rejected_without_echoing_it() {
        let err = ApiKey::new("abc\ndef".to_owned())
            .header_value("Bearer {key}")
            .expect_err("newline is not allowed");
        assert!(!err.to_string().contains("abc"));
    }

    #[test]
    fn blank_key_counts_as_missing() {
        assert!(ApiKey::new("  ".to_owned()).is_blank());
        assert!(!ApiKey::new("k".to_owned()).is_blank());
    }
}
