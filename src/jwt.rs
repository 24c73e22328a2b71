//! Signed access tokens as JWTs (RFC 7519) signed with Ed25519 (`alg` `EdDSA`, RFC 8037), and
//! their public keys as a JWK Set (RFC 7517). Pure functions: no I/O, no clock, no async.
//!
//! The header and the claims are serde structs written by serde_json; nothing here writes JSON by
//! hand. Verification accepts one algorithm, `EdDSA`, with a key named by `kid`: a token that
//! says `none`, or `HS256` in the hope of being checked with the public key as an HMAC secret, is
//! refused before any key is looked at.

use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair as _, ParsedPublicKey};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The one `alg` we sign with and accept.
pub const ALG: &str = "EdDSA";

/// A private Ed25519 key, made from its 32-byte seed: it signs tokens.
///
/// aws-lc's Ed25519 (assembly for the curve) signs in less than half the time of ed25519-dalek
/// and ring, measured beside it (`benches/HISTORY.md`), and a login signs once.
pub struct SigningKey(Ed25519KeyPair);

impl SigningKey {
    /// The key of `seed`.
    pub fn from_bytes(seed: &[u8; 32]) -> SigningKey {
        SigningKey(Ed25519KeyPair::from_seed_unchecked(seed).expect("any 32 bytes are a seed"))
    }

    /// Its public half.
    pub fn verifying_key(&self) -> VerifyingKey {
        let bytes = self.0.public_key().as_ref();
        VerifyingKey::from_bytes(bytes.try_into().expect("an Ed25519 public key is 32 bytes"))
            .expect("a key pair's public key parses")
    }
}

/// A public Ed25519 key: it verifies tokens.
#[derive(Clone)]
pub struct VerifyingKey(ParsedPublicKey);

impl VerifyingKey {
    /// The key whose encoding is `bytes`. aws-lc keeps the bytes as they are (a point that is
    /// not on the curve fails every verification); it does not refuse small-order points, which
    /// could only come from a broker's own JWKS, whose keys a verifier trusts anyway.
    pub fn from_bytes(bytes: &[u8; 32]) -> Option<VerifyingKey> {
        ParsedPublicKey::new(&ED25519, bytes).ok().map(VerifyingKey)
    }

    /// Its 32-byte encoding (the bytes it was made from, as aws-lc keeps them).
    pub fn as_bytes(&self) -> &[u8; 32] {
        self.0.as_ref().try_into().expect("made from 32 bytes")
    }
}

impl PartialEq for VerifyingKey {
    fn eq(&self, other: &VerifyingKey) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for VerifyingKey {}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "VerifyingKey({})",
            URL_SAFE_NO_PAD.encode(self.as_bytes())
        )
    }
}

/// What an access token says. Its JSON form is the token's payload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    /// Who issued it: the broker's `WXBROKER_ISSUER`.
    pub iss: String,
    /// Whom it is for: the appid of the mini program the session was opened through.
    pub aud: String,
    /// The same appid, under a name of its own (absent from tokens of brokers before several
    /// apps, whose `aud` was their one appid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub appid: Option<String>,
    /// The user's uid, as a string (JWT's `sub` is a string).
    pub sub: String,
    /// The user's openid.
    pub openid: String,
    /// The user's unionid, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unionid: Option<String>,
    /// The session's id as the admin routes show it (the hex SHA-256 of the session token):
    /// what a revocation names.
    pub sid: String,
    /// Unix seconds of issue.
    pub iat: u64,
    /// Unix seconds after which it is refused.
    pub exp: u64,
    /// A random id, unique per token.
    pub jti: String,
}

impl AccessClaims {
    /// The uid of `sub`, if it is one.
    pub fn uid(&self) -> Option<u64> {
        self.sub.parse().ok()
    }
}

/// The JOSE header of our tokens.
#[derive(Serialize, Deserialize)]
struct Header<'a> {
    alg: &'a str,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<&'a str>,
    #[serde(default)]
    kid: Option<&'a str>,
}

/// Why a token is refused. Its `Display` is for logs; a client only ever learns that its token is
/// invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not three base64url parts, or a header or payload that is not the JSON we issue.
    #[error("the token is not a well-formed JWT of ours")]
    Malformed,
    /// An `alg` other than `EdDSA` (`none`, `HS256`, ...).
    #[error("the token's alg is not EdDSA")]
    Algorithm,
    /// No published key has the token's `kid`.
    #[error("no known key has the token's kid")]
    UnknownKey,
    /// The signature does not verify under the key its `kid` names.
    #[error("the token's signature does not verify")]
    Signature,
    /// Its `exp` has passed (beyond the leeway).
    #[error("the token has expired")]
    Expired,
    /// Its `iat` is in the future (beyond the leeway).
    #[error("the token was issued in the future")]
    NotYetValid,
    /// Another issuer's token.
    #[error("the token's issuer is not the expected one")]
    Issuer,
    /// A token for another mini program.
    #[error("the token is for another audience")]
    Audience,
    /// Its session was logged out or revoked, or its user's sessions all were.
    #[error("the token's session was revoked")]
    Revoked,
    /// The verifier has not yet read the revocation feed once, so it cannot tell.
    #[error("the verifier has not read the revocation feed yet")]
    NotSynced,
}

/// A key's id: its RFC 7638 thumbprint (base64url SHA-256 of the canonical JWK), so that the same
/// key always has the same id, whichever broker computes it.
pub fn thumbprint(key: &VerifyingKey) -> String {
    /// The required members of an OKP key, in the lexicographic order RFC 7638 asks for; serde
    /// writes them in declaration order, without whitespace.
    #[derive(Serialize)]
    struct Canonical<'a> {
        crv: &'a str,
        kty: &'a str,
        x: &'a str,
    }
    let x = URL_SAFE_NO_PAD.encode(key.as_bytes());
    let canonical = serde_json::to_vec(&Canonical {
        crv: "Ed25519",
        kty: "OKP",
        x: &x,
    })
    .expect("a JWK serializes");
    URL_SAFE_NO_PAD.encode(Sha256::digest(&canonical))
}

/// Signs `claims` with `key`, whose id is `kid`: `header.payload.signature`.
pub fn sign(key: &SigningKey, kid: &str, claims: &AccessClaims) -> String {
    let header = Header {
        alg: ALG,
        typ: Some("JWT"),
        kid: Some(kid),
    };
    let header = serde_json::to_vec(&header).expect("a header serializes");
    let payload = serde_json::to_vec(claims).expect("claims serialize");
    let mut token = String::with_capacity(4 * (header.len() + payload.len() + 64) / 3 + 8);
    URL_SAFE_NO_PAD.encode_string(&header, &mut token);
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(&payload, &mut token);
    let signature = key.0.sign(token.as_bytes());
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(signature.as_ref(), &mut token);
    token
}

/// A token taken apart, its signature not yet checked.
pub struct Unverified<'a> {
    kid: String,
    /// `header.payload`, the signed bytes.
    signed: &'a str,
    payload: &'a str,
    signature: [u8; 64],
}

/// Takes `token` apart: three base64url parts, a header with `alg` `EdDSA` and a `kid`, a
/// 64-byte signature. Checks nothing else.
pub fn parse(token: &str) -> Result<Unverified<'_>, Refusal> {
    let (signed, signature) = token.rsplit_once('.').ok_or(Refusal::Malformed)?;
    let (header, payload) = signed.split_once('.').ok_or(Refusal::Malformed)?;
    let header = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| Refusal::Malformed)?;
    let header: Header = serde_json::from_slice(&header).map_err(|_| Refusal::Malformed)?;
    if header.alg != ALG {
        return Err(Refusal::Algorithm);
    }
    let kid = header.kid.ok_or(Refusal::Malformed)?.to_owned();
    let mut bytes = [0u8; 64];
    match URL_SAFE_NO_PAD.decode_slice(signature, &mut bytes) {
        Ok(64) => {}
        _ => return Err(Refusal::Malformed),
    }
    Ok(Unverified {
        kid,
        signed,
        payload,
        signature: bytes,
    })
}

impl Unverified<'_> {
    /// The id of the key that must verify it.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The claims, read before the signature is checked: for cheap checks (expiry, audience)
    /// that spare the signature's cost on tokens refused anyway.
    pub fn claims(&self) -> Result<AccessClaims, Refusal> {
        let payload = URL_SAFE_NO_PAD
            .decode(self.payload)
            .map_err(|_| Refusal::Malformed)?;
        serde_json::from_slice(&payload).map_err(|_| Refusal::Malformed)
    }

    /// Checks the signature under `key` (an `s` beyond the group order is refused, so a
    /// signature cannot be altered into another valid one).
    pub fn verify(&self, key: &VerifyingKey) -> Result<(), Refusal> {
        key.0
            .verify_sig(self.signed.as_bytes(), &self.signature)
            .map_err(|_| Refusal::Signature)
    }
}

/// What a verifier expects of every token besides its signature.
#[derive(Clone, Debug)]
pub struct Expect {
    /// The issuer (`iss`).
    pub issuer: String,
    /// The audiences (`aud`) accepted: the appids of the mini programs whose tokens are.
    pub audiences: Vec<String>,
    /// Seconds of clock difference forgiven on `exp` and `iat`.
    pub leeway: u64,
}

impl Expect {
    /// Checks issuer, audience and times at `now`.
    pub fn check(&self, claims: &AccessClaims, now: u64) -> Result<(), Refusal> {
        if claims.iss != self.issuer {
            return Err(Refusal::Issuer);
        }
        if !self.audiences.contains(&claims.aud) {
            return Err(Refusal::Audience);
        }
        if now >= claims.exp.saturating_add(self.leeway) {
            return Err(Refusal::Expired);
        }
        if claims.iat > now.saturating_add(self.leeway) {
            return Err(Refusal::NotYetValid);
        }
        Ok(())
    }
}

/// A public key as a JWK: `kty` `OKP`, `crv` `Ed25519`, `x`, `kid`, `use` `sig`, `alg` `EdDSA`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    /// `OKP`.
    pub kty: String,
    /// `Ed25519`.
    pub crv: String,
    /// The public key, base64url.
    pub x: String,
    /// Its id, as tokens name it.
    pub kid: String,
    /// `sig`; absent is accepted.
    #[serde(rename = "use", default, skip_serializing_if = "Option::is_none")]
    pub use_: Option<String>,
    /// `EdDSA`; absent is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
}

impl Jwk {
    /// The JWK of `key`, with its thumbprint as `kid`.
    pub fn of(key: &VerifyingKey) -> Jwk {
        Jwk {
            kty: "OKP".into(),
            crv: "Ed25519".into(),
            x: URL_SAFE_NO_PAD.encode(key.as_bytes()),
            kid: thumbprint(key),
            use_: Some("sig".into()),
            alg: Some(ALG.into()),
        }
    }

    /// The key, if this is an Ed25519 signing key for `EdDSA`.
    pub fn verifying_key(&self) -> Option<VerifyingKey> {
        let usable = self.kty == "OKP"
            && self.crv == "Ed25519"
            && self.use_.as_deref().is_none_or(|u| u == "sig")
            && self.alg.as_deref().is_none_or(|a| a == ALG);
        if !usable {
            return None;
        }
        let mut bytes = [0u8; 32];
        match URL_SAFE_NO_PAD.decode_slice(&self.x, &mut bytes) {
            Ok(32) => VerifyingKey::from_bytes(&bytes),
            _ => None,
        }
    }
}

/// A JWK Set: `{"keys": [...]}`, the `/.well-known/jwks.json` answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JwkSet {
    /// The published keys. Entries that are not JWKs of ours are skipped when read.
    #[serde(deserialize_with = "usable_keys")]
    pub keys: Vec<Jwk>,
}

/// The entries of a JWK Set that parse as [`Jwk`]s: a set that also holds, say, an RSA key stays
/// usable.
fn usable_keys<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Vec<Jwk>, D::Error> {
    let values: Vec<serde_json::Value> = Vec::deserialize(de)?;
    Ok(values
        .into_iter()
        .filter_map(|value| serde_json::from_value(value).ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn claims() -> AccessClaims {
        AccessClaims {
            iss: "wxbroker".into(),
            aud: "wx-app".into(),
            appid: Some("wx-app".into()),
            sub: "7".into(),
            openid: "o7".into(),
            unionid: None,
            sid: "ab".repeat(32),
            iat: 1000,
            exp: 1300,
            jti: "j1".into(),
        }
    }

    fn expect() -> Expect {
        Expect {
            issuer: "wxbroker".into(),
            audiences: vec!["wx-app".into(), "wx-lite".into()],
            leeway: 5,
        }
    }

    /// `token` with its payload replaced by `claims`, its header and signature kept.
    fn with_payload(token: &str, claims: &serde_json::Value) -> String {
        let parts: Vec<&str> = token.split('.').collect();
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        format!("{}.{payload}.{}", parts[0], parts[2])
    }

    #[test]
    fn a_signed_token_verifies_and_says_what_was_signed() {
        let key = key(1);
        let kid = thumbprint(&key.verifying_key());
        let token = sign(&key, &kid, &claims());
        let parsed = parse(&token).unwrap();
        assert_eq!(parsed.kid(), kid);
        parsed.verify(&key.verifying_key()).unwrap();
        assert_eq!(parsed.claims().unwrap(), claims());
        assert_eq!(parsed.claims().unwrap().uid(), Some(7));
        expect().check(&claims(), 1299).unwrap();
        // No unionid: the claim is left out, not null.
        let payload = token.split('.').nth(1).unwrap();
        let json = String::from_utf8(URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        assert!(!json.contains("unionid"), "{json}");
    }

    #[test]
    fn a_changed_payload_or_another_key_fails_the_signature() {
        let key = key(1);
        let token = sign(&key, "k", &claims());
        let mut changed = serde_json::to_value(claims()).unwrap();
        changed["sub"] = "8".into();
        let tampered = with_payload(&token, &changed);
        let parsed = parse(&tampered).unwrap();
        assert_eq!(parsed.verify(&key.verifying_key()), Err(Refusal::Signature));
        let parsed = parse(&token).unwrap();
        assert_eq!(
            parsed.verify(&self::key(2).verifying_key()),
            Err(Refusal::Signature)
        );
    }

    #[test]
    fn only_eddsa_with_a_kid_is_accepted() {
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims()).unwrap());
        for header in [
            r#"{"alg":"none","typ":"JWT","kid":"k"}"#,
            r#"{"alg":"HS256","typ":"JWT","kid":"k"}"#,
            r#"{"alg":"eddsa","kid":"k"}"#,
        ] {
            let token = format!("{}.{payload}.", URL_SAFE_NO_PAD.encode(header));
            assert_eq!(parse(&token).err(), Some(Refusal::Algorithm), "{header}");
        }
        let no_kid = format!(
            "{}.{payload}.{}",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"EdDSA"}"#),
            URL_SAFE_NO_PAD.encode([0u8; 64])
        );
        assert_eq!(parse(&no_kid).err(), Some(Refusal::Malformed));
        for junk in ["", "a", "a.b", "a.b.c", "..", "e30.e30.AAAA"] {
            assert_eq!(parse(junk).err(), Some(Refusal::Malformed), "{junk}");
        }
    }

    #[test]
    fn issuer_audience_and_times_are_checked_with_the_leeway() {
        let expect = expect();
        let claims = claims();
        assert_eq!(expect.check(&claims, 1304), Ok(()));
        assert_eq!(expect.check(&claims, 1305), Err(Refusal::Expired));
        assert_eq!(expect.check(&claims, 995), Ok(()));
        assert_eq!(expect.check(&claims, 994), Err(Refusal::NotYetValid));
        let other = AccessClaims {
            aud: "wx-other".into(),
            ..claims.clone()
        };
        assert_eq!(expect.check(&other, 1100), Err(Refusal::Audience));
        let lite = AccessClaims {
            aud: "wx-lite".into(),
            ..claims.clone()
        };
        assert_eq!(expect.check(&lite, 1100), Ok(()), "any of the audiences");
        let other = AccessClaims {
            iss: "someone".into(),
            ..claims
        };
        assert_eq!(expect.check(&other, 1100), Err(Refusal::Issuer));
    }

    #[test]
    fn a_jwk_round_trips_and_names_its_key_by_thumbprint() {
        let key = key(3).verifying_key();
        let jwk = Jwk::of(&key);
        let json = serde_json::to_value(&jwk).unwrap();
        assert_eq!(json["kty"], "OKP");
        assert_eq!(json["crv"], "Ed25519");
        assert_eq!(json["use"], "sig");
        assert_eq!(json["alg"], "EdDSA");
        assert_eq!(json["kid"], thumbprint(&key));
        assert_eq!(jwk.verifying_key(), Some(key));
        // RFC 8037 appendix A.3: the thumbprint of its example key.
        let rfc = Jwk {
            x: "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo".into(),
            ..jwk.clone()
        };
        assert_eq!(
            thumbprint(&rfc.verifying_key().unwrap()),
            "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
        );
        let wrong = Jwk {
            alg: Some("HS256".into()),
            ..jwk
        };
        assert_eq!(wrong.verifying_key(), None);
    }

    #[test]
    fn a_set_skips_keys_it_cannot_use() {
        let jwk = Jwk::of(&key(4).verifying_key());
        let text = serde_json::json!({ "keys": [
            { "kty": "RSA", "n": "AQAB", "e": "AQAB", "kid": "r" },
            jwk,
        ]})
        .to_string();
        let set: JwkSet = serde_json::from_str(&text).unwrap();
        assert_eq!(set.keys, [jwk]);
    }
}
