//! The cluster token and API keys: compared in constant time, never shown by `Debug`.
//!
//! One comparison for the whole project: the operator's gManager and the workers (their HTTP
//! routes and their peer connections) all check tokens through [`tokens_match`].

use std::sync::Arc;

use subtle::ConstantTimeEq;

/// Whether a presented token equals the expected one. The time taken depends only on the
/// lengths, never on how much of a guess matched.
pub fn tokens_match(presented: &[u8], expected: &[u8]) -> bool {
    bool::from(presented.ct_eq(expected))
}

/// A credential held in memory. Cheap to clone; `Debug` prints `<redacted>`, so a struct that
/// holds one can derive `Debug` without leaking it into logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(Arc::from(value.into()))
    }

    /// The value, for clients that must present it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this secret (constant time).
    pub fn matches(&self, presented: &str) -> bool {
        tokens_match(presented.as_bytes(), self.0.as_bytes())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_equal_tokens_match() {
        assert!(tokens_match(b"secret", b"secret"));
        assert!(!tokens_match(b"secret", b"secreT"));
        assert!(!tokens_match(b"secret", b"secret2"));
        assert!(!tokens_match(b"secre", b"secret"));
        assert!(!tokens_match(b"", b"x"));
        assert!(tokens_match(b"", b""));
    }

    #[test]
    fn debug_never_shows_the_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        assert!(!format!("{:?}", Some(s.clone())).contains("hunter2"));
        assert!(s.matches("hunter2") && !s.matches("hunter"));
    }
}
