//! PostgreSQL's legacy MD5 password authentication: the stored hash, the salted response a
//! client sends, and its constant-time check. No I/O.

use md5::{Digest, Md5};

/// The hash PostgreSQL stores for an md5 role: `"md5" + hex(md5(password ‖ user))`.
pub fn md5_password_hash(user: &str, password: &str) -> String {
    let mut h = Md5::new();
    h.update(password.as_bytes());
    h.update(user.as_bytes());
    format!("md5{}", hex::encode(h.finalize()))
}

/// What a client sends for AuthenticationMD5Password given the stored hash:
/// `"md5" + hex(md5(hex_part ‖ salt))`. A hash without the `md5` prefix is taken as the
/// bare hex part.
pub fn md5_salted_response(stored_hash: &str, salt: [u8; 4]) -> String {
    let hex_part = stored_hash.strip_prefix("md5").unwrap_or(stored_hash);
    let mut h = Md5::new();
    h.update(hex_part.as_bytes());
    h.update(salt);
    format!("md5{}", hex::encode(h.finalize()))
}

/// Checks a client's PasswordMessage payload (without its trailing NUL) against the
/// stored hash, in constant time. A stored value that is not an md5 hash never matches.
pub fn md5_verify(stored_hash: &str, salt: [u8; 4], client_response: &[u8]) -> bool {
    let valid_hash = stored_hash.len() == 35
        && stored_hash.starts_with("md5")
        && stored_hash[3..].bytes().all(|b| b.is_ascii_hexdigit());
    if !valid_hash {
        return false;
    }
    let expected = md5_salted_response(stored_hash, salt);
    crate::protocol::scram::constant_time_eq(expected.as_bytes(), client_response)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected values computed independently with Python's hashlib.
    const HASH: &str = "md553f48b7c4b76a86ce72276c5755f217d";
    const SALT: [u8; 4] = [1, 2, 3, 4];
    const RESPONSE: &str = "md5bb41a296aab6baccb36ff243a562abff";

    #[test]
    fn hash_and_response_match_reference() {
        assert_eq!(md5_password_hash("postgres", "secret"), HASH);
        assert_eq!(md5_salted_response(HASH, SALT), RESPONSE);
        assert_eq!(md5_salted_response(&HASH[3..], SALT), RESPONSE);
    }

    #[test]
    fn verify() {
        assert!(md5_verify(HASH, SALT, RESPONSE.as_bytes()));
        assert!(!md5_verify(HASH, [1, 2, 3, 5], RESPONSE.as_bytes()));
        assert!(!md5_verify(HASH, SALT, &RESPONSE.as_bytes()[..34]));
        assert!(!md5_verify(HASH, SALT, b""));
        assert!(!md5_verify(HASH, SALT, b"secret"));
        // Stored values that are not md5 hashes (plain text, SCRAM) never match.
        assert!(!md5_verify("secret", SALT, b"secret"));
        assert!(!md5_verify("md5\u{e9}", SALT, b"md5"));
        assert!(!md5_verify("", SALT, b""));
    }
}
