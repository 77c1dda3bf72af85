//! Secrets (AccessTokens, vouchers) in logs: a short prefix and the length, never whole.

use std::fmt;

/// Shows a secret as its first four characters and its length: enough to tell two
/// devices apart in a log, too little to reuse.
pub struct Redacted<'a>(pub &'a str);

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let prefix: String = self.0.chars().take(4).collect();
        write!(f, "{prefix}…({} chars)", self.0.chars().count())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shows_prefix_and_length_only() {
        let token = "2072aae3-596c-3977-4a14-b127dcef41e0";
        assert_eq!(Redacted(token).to_string(), "2072…(36 chars)");
        assert_eq!(format!("{:?}", Redacted("ab")), "ab…(2 chars)");
    }

    #[test]
    fn auth_request_debug_never_shows_the_token() {
        let request =
            crate::v1::AuthRequest { access_token: "secret-token-value".into(), ..Default::default() };
        let shown = format!("{request:?}");
        assert!(!shown.contains("secret-token-value"), "{shown}");
        assert!(shown.contains("secr…(18 chars)"), "{shown}");
    }
}
