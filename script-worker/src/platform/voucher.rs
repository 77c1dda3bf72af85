//! The voucher: how the platform names a device of ours.
//!
//! ThingsPanel stores the voucher form's values as Go's `json.Marshal` wrote them and
//! matches the string exactly, so we must write it byte for byte as Go does: keys
//! sorted, no spaces, `<` `>` `&` and U+2028/U+2029 escaped as `\u…`, control
//! characters as `\n` `\r` `\t` `\b` `\f` or `\u00XX`.

/// The voucher of an AccessToken: `{"access_token":"<token>"}` as Go writes it.
pub fn of_token(token: &str) -> String {
    let mut out = String::with_capacity(token.len() + 20);
    out.push_str(r#"{"access_token":"#);
    push_go_string(&mut out, token);
    out.push('}');
    out
}

/// Appends `text` as a Go-escaped JSON string literal.
fn push_go_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '<' | '>' | '&' | '\u{2028}' | '\u{2029}' => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A short stable digest of a voucher for cache keys (never the voucher itself).
pub fn digest(voucher: &str) -> String {
    use sha2::{Digest, Sha256};
    let hash = Sha256::digest(voucher.as_bytes());
    crate::hex(&hash[..12])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_token() {
        assert_eq!(
            of_token("2072aae3-596c-3977-4a14-b127dcef41e0"),
            r#"{"access_token":"2072aae3-596c-3977-4a14-b127dcef41e0"}"#
        );
    }

    #[test]
    fn escapes_as_go_does() {
        // Go: json.Marshal(map[string]string{"access_token": "a<b>&c\"d\\e\nf\u0001g\u2028é"})
        assert_eq!(
            of_token("a<b>&c\"d\\e\nf\u{1}g\u{2028}é"),
            r#"{"access_token":"a\u003cb\u003e\u0026c\"d\\e\nf\u0001g\u2028é"}"#
        );
    }

    #[test]
    fn digest_is_short_and_stable() {
        assert_eq!(digest("x").len(), 24);
        assert_eq!(digest("x"), digest("x"));
        assert_ne!(digest("x"), digest("y"));
    }
}
