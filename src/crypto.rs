//! Pure cryptographic functions: session tokens and their hashes, WeChat's AES-128-CBC
//! `encryptedData`, and the `rawData` and session_key signatures. No I/O beyond the OS RNG, no async.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use aes::cipher::block_padding::Pkcs7;
use aes::cipher::{BlockModeDecrypt, BlockModeEncrypt, KeyIvInit};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hmac::{Hmac, KeyInit, Mac};
use rand::TryRng;
use rand::rngs::SysRng;
use sha1::Sha1;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::Error;

/// Bytes of randomness in a session token.
pub const TOKEN_BYTES: usize = 32;
/// Length of a token as the client sees it: 32 bytes in base64url without padding.
pub const TOKEN_LEN: usize = 43;

/// The SHA-256 of a token: the only form in which a token is stored or compared.
///
/// Keeping only the hash means a copy of the database cannot be used to impersonate anyone.
pub type TokenHash = [u8; 32];

/// A map keyed by token hash, hashed by eight of the hash's own bytes.
///
/// A token hash is a SHA-256 output, already uniform: hashing it again (SipHash, over all 32
/// bytes) only costs time. Flooding is no concern: such maps hold the hashes of tokens this server
/// drew from the OS CSPRNG, so whatever a client sends, the buckets stay evenly filled.
pub type TokenMap<V> = HashMap<TokenHash, V, BuildHasherDefault<TokenHasher>>;

/// The hasher of [`TokenMap`]: bytes 8..16 of the hash (the first two pick a session shard).
#[derive(Default)]
pub struct TokenHasher(u64);

impl Hasher for TokenHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        match bytes.get(8..16) {
            Some(word) => self.0 = u64::from_le_bytes(word.try_into().expect("eight bytes")),
            // An array also hashes its length first; fold in whatever else comes.
            None => {
                for &byte in bytes {
                    self.0 = self.0.rotate_left(8) ^ u64::from(byte);
                }
            }
        }
    }
}

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

/// Decrypts WeChat's `encryptedData` (all three arguments base64, as the client sends them).
///
/// Input that cannot be ciphertext at all is `InvalidRequest`; a padding failure is
/// `DecryptFailed` (almost always a session_key that rotated since the data was made). A wrong key
/// passes the padding check about once in 256 tries: the caller's JSON and watermark checks catch
/// those.
pub fn decrypt_encrypted_data(session_key: &str, iv: &str, data: &str) -> Result<Vec<u8>, Error> {
    let key = decode_16("session_key", session_key)?;
    let iv = decode_16("iv", iv)?;
    let data = STANDARD
        .decode(data)
        .map_err(|_| Error::InvalidRequest("encryptedData is not valid base64".into()))?;
    if data.is_empty() || data.len() % 16 != 0 {
        return Err(Error::InvalidRequest(
            "encryptedData must be a non-empty multiple of 16 bytes".into(),
        ));
    }
    cbc::Decryptor::<aes::Aes128>::new(&key.into(), &iv.into())
        .decrypt_padded_vec::<Pkcs7>(&data)
        .map_err(|_| Error::DecryptFailed)
}

/// Encrypts as WeChat's client does: the counterpart of [`decrypt_encrypted_data`], returning
/// base64. Used by the sandbox and by tests.
pub fn encrypt_for_client(
    session_key: &str,
    iv: &[u8; 16],
    plaintext: &[u8],
) -> Result<String, Error> {
    let key = decode_16("session_key", session_key)?;
    let data = cbc::Encryptor::<aes::Aes128>::new(&key.into(), iv.into())
        .encrypt_padded_vec::<Pkcs7>(plaintext);
    Ok(STANDARD.encode(data))
}

/// `hex(sha1(raw_data + session_key))`, the signature WeChat puts beside `rawData`.
pub fn raw_data_signature(raw_data: &str, session_key: &str) -> String {
    let mut sha1 = Sha1::new();
    sha1.update(raw_data.as_bytes());
    sha1.update(session_key.as_bytes());
    hex(&sha1.finalize())
}

/// The signature WeChat's `checksession` and `resetusersessionkey` ask for: lowercase hex of
/// HMAC-SHA256 over the empty message, keyed with the session_key **string's bytes** (not the
/// decoded key: SDKs that used that got "invalid signature" back).
pub fn session_key_signature(session_key: &str) -> String {
    let mac = Hmac::<Sha256>::new_from_slice(session_key.as_bytes())
        .expect("HMAC takes a key of any length");
    hex(&mac.finalize().into_bytes())
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = String::with_capacity(2 * bytes.len());
    for byte in bytes {
        hex.push(DIGITS[usize::from(byte >> 4)] as char);
        hex.push(DIGITS[usize::from(byte & 0xf)] as char);
    }
    hex
}

/// The public name of a session: the hex of its token's hash. It lets an admin point at a
/// session without holding anything that could be used as the token.
pub fn session_id(hash: &TokenHash) -> String {
    hex(hash)
}

/// The token hash a [`session_id`] names, if `id` is one.
pub fn parse_session_id(id: &str) -> Option<TokenHash> {
    if id.len() != 64 {
        return None;
    }
    let mut hash = [0u8; 32];
    for (i, byte) in hash.iter_mut().enumerate() {
        *byte = u8::from_str_radix(id.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(hash)
}

/// Whether `signature` signs `raw_data` under `session_key`, compared in constant time.
pub fn raw_data_signature_matches(raw_data: &str, session_key: &str, signature: &str) -> bool {
    let expected = raw_data_signature(raw_data, session_key);
    let signature = signature.as_bytes();
    // Lengths are public; only the content is compared in constant time.
    expected.len() == signature.len()
        && expected
            .bytes()
            .zip(signature)
            .fold(subtle::Choice::from(1), |same, (a, b)| {
                same & a.ct_eq(&b.to_ascii_lowercase())
            })
            .into()
}

fn decode_16(what: &str, value: &str) -> Result<[u8; 16], Error> {
    let bytes = STANDARD
        .decode(value)
        .map_err(|_| Error::InvalidRequest(format!("{what} is not valid base64")))?;
    bytes
        .try_into()
        .map_err(|_| Error::InvalidRequest(format!("{what} must decode to exactly 16 bytes")))
}

#[cfg(test)]
mod tests {
    #[test]
    fn session_key_signature_follows_wechats_rule() {
        // The vector from WeChat's checksession documentation.
        assert_eq!(
            super::session_key_signature("tiihtNczf5v6AKRyjwEUhQ=="),
            "7154f9f8b4b76b92f541cbf0e37d48840fa06e5e42da92a6f80168a1516a4735"
        );
    }

    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    const KEY: &str = "tiihtNczf5v6AKRyjwEUhQ==";
    const IV: [u8; 16] = *b"0123456789abcdef";

    #[test]
    fn known_answer_aes_128_cbc_pkcs7() {
        // Built here: key = 16 bytes of 0x00..0x0f, iv = "0123456789abcdef", text = "wxbroker".
        // Cross-checked with `openssl enc -aes-128-cbc -K 000102030405060708090a0b0c0d0e0f
        // -iv 30313233343536373839616263646566`.
        let key = STANDARD.encode((0u8..16).collect::<Vec<_>>());
        let sealed = encrypt_for_client(&key, &IV, b"wxbroker").unwrap();
        assert_eq!(sealed, KNOWN_CIPHERTEXT);
        let opened = decrypt_encrypted_data(&key, &STANDARD.encode(IV), &sealed).unwrap();
        assert_eq!(opened, b"wxbroker");
    }

    const KNOWN_CIPHERTEXT: &str = "zswx6yvDFhAJXd2Ju4BRPw==";

    #[test]
    fn round_trip_of_a_profile_sized_payload() {
        let text =
            br#"{"openId":"o","nickName":"n","watermark":{"appid":"wx","timestamp":1}}"#.repeat(5);
        let sealed = encrypt_for_client(KEY, &IV, &text).unwrap();
        assert_eq!(
            decrypt_encrypted_data(KEY, &STANDARD.encode(IV), &sealed).unwrap(),
            text
        );
    }

    #[test]
    fn bad_input_is_invalid_request() {
        let iv = STANDARD.encode(IV);
        let sealed = encrypt_for_client(KEY, &IV, b"hello").unwrap();
        let cases = [
            ("%%%", iv.as_str(), sealed.as_str()),
            (KEY, "%%%", sealed.as_str()),
            (KEY, iv.as_str(), "%%%"),
            ("AAAA", iv.as_str(), sealed.as_str()),
            (KEY, "AAAA", sealed.as_str()),
            (KEY, iv.as_str(), ""),
            (KEY, iv.as_str(), "AAAA"),
        ];
        for (key, iv, data) in cases {
            assert!(
                matches!(
                    decrypt_encrypted_data(key, iv, data),
                    Err(Error::InvalidRequest(_))
                ),
                "{key} {iv} {data}"
            );
        }
    }

    #[test]
    fn a_rotated_key_or_bad_padding_is_decrypt_failed() {
        let iv = STANDARD.encode(IV);
        let sealed = encrypt_for_client(KEY, &IV, b"a message of some length").unwrap();
        let other_key = STANDARD.encode([7u8; 16]);
        // A wrong key passes padding about 1 in 256 times; this pair was checked to fail it.
        assert_eq!(
            decrypt_encrypted_data(&other_key, &iv, &sealed),
            Err(Error::DecryptFailed)
        );
        let mut bytes = STANDARD.decode(&sealed).unwrap();
        *bytes.last_mut().unwrap() ^= 0x01;
        let tampered = STANDARD.encode(bytes);
        assert_eq!(
            decrypt_encrypted_data(KEY, &iv, &tampered),
            Err(Error::DecryptFailed)
        );
    }

    #[test]
    fn raw_data_signatures() {
        // sha1("{}" + KEY), computed with `printf '%s' '{}tiihtNczf5v6AKRyjwEUhQ==' | sha1sum`.
        let signature = raw_data_signature("{}", KEY);
        assert_eq!(signature, KNOWN_SIGNATURE);
        assert!(raw_data_signature_matches("{}", KEY, &signature));
        assert!(raw_data_signature_matches(
            "{}",
            KEY,
            &signature.to_uppercase()
        ));
        assert!(!raw_data_signature_matches("{ }", KEY, &signature));
        assert!(!raw_data_signature_matches("{}", KEY, &signature[1..]));
        assert!(!raw_data_signature_matches("{}", KEY, ""));
    }

    const KNOWN_SIGNATURE: &str = "2b108b8388b55e9cd004b2ff88878cb464498df2";

    proptest! {
        #[test]
        fn arbitrary_input_never_panics(
            key in proptest::collection::vec(any::<u8>(), 0..40),
            iv in proptest::collection::vec(any::<u8>(), 0..40),
            data in proptest::collection::vec(any::<u8>(), 0..200),
            raw in ".*",
        ) {
            let outcome = decrypt_encrypted_data(&STANDARD.encode(&key), &STANDARD.encode(&iv), &STANDARD.encode(&data));
            if let Err(e) = outcome {
                prop_assert!(matches!(e, Error::InvalidRequest(_) | Error::DecryptFailed));
            }
            // Not base64 at all.
            let garbage = String::from_utf8_lossy(&data).into_owned();
            let _ = decrypt_encrypted_data(&garbage, &raw, &garbage);
        }
    }

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
        assert_eq!(hex(&token_hash("abc")), expected);
    }

    #[test]
    fn session_ids_round_trip_and_reject_junk() {
        let hash = token_hash("abc");
        assert_eq!(parse_session_id(&session_id(&hash)), Some(hash));
        assert_eq!(parse_session_id("ab"), None);
        assert_eq!(parse_session_id(&"zz".repeat(32)), None);
        assert_eq!(parse_session_id(&"é".repeat(32)), None);
    }
}
