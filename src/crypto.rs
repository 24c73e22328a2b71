//! Pure cryptographic helpers: session tokens and their hashes. No I/O beyond the OS RNG.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::TryRng;
use rand::rngs::SysRng;
use sha2::{Digest, Sha256};

/// Bytes of randomness in a session token.
pub const TOKEN_BYTES: usize = 32;
/// Length of a token as the client sees it: 32 bytes in base64url without padding.
pub const TOKEN_LEN: usize = 43;

/// The SHA-256 of a token: the only form in which a token is stored or compared.
///
/// Keeping only the hash means a copy of the database cannot be used to impersonate anyone.
pub type TokenHash = [u8; 32];

/// A fresh session token: 32 bytes straight from the OS CSPRNG, base64url without padding.
pub fn new_token() -> Result<String, rand::rngs::SysError> {
    let mut bytes = [0u8; TOKEN_BYTES];
    SysRng.try_fill_bytes(&mut bytes)?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

/// Whether `token` has the shape of one we issue, so that junk never costs a lookup.
pub fn is_token_shaped(token: &str) -> bool {
    token.len() == TOKEN_LEN
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The hash under which `token` is stored.
pub fn token_hash(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn tokens_are_43_chars_of_base64url_carrying_32_bytes() {
        let token = new_token().unwrap();
        assert_eq!(token.len(), TOKEN_LEN);
        assert!(is_token_shaped(&token));
        assert_eq!(URL_SAFE_NO_PAD.decode(&token).unwrap().len(), TOKEN_BYTES);
    }

    #[test]
    fn tokens_do_not_repeat() {
        let tokens: HashSet<String> = (0..10_000).map(|_| new_token().unwrap()).collect();
        assert_eq!(tokens.len(), 10_000);
    }

    #[test]
    fn junk_is_not_token_shaped() {
        assert!(!is_token_shaped(""));
        assert!(!is_token_shaped(&"a".repeat(42)));
        assert!(!is_token_shaped(&"a".repeat(44)));
        assert!(!is_token_shaped(&format!("{}=", "a".repeat(42))));
        assert!(!is_token_shaped(&format!("{}+", "a".repeat(42))));
    }

    #[test]
    fn hash_is_sha256_of_the_token_text() {
        // sha256("abc"), from FIPS 180-2.
        let expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let got: String = token_hash("abc")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(got, expected);
    }
}
