//! Decryptor: opens `encryptedData` with a user's session_key and checks what comes out.
//!
//! The checks run in a fixed order, each with its own error: the input's shape (base64, 16-byte
//! key and iv, whole blocks, a signature of 40 hex digits), then padding and JSON (a rotated session_key fails here), then the
//! watermark's appid, then the openId, then the `rawData` signature. The decrypted text and the
//! session_key are never logged.
//!
//! CBC has no integrity of its own, and the client chooses the IV: it controls the first 16
//! bytes of what decrypts (flipping the IV of a real profile turns `{"avatarUrl":"ht` into
//! `{"unionId":"EVIL`). So a profile must name the session's openid in its `openId` (one that
//! names none is refused too), and what it says of the unionid is checked by the storage: it may
//! confirm the user's unionid, never change it nor take another user's.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::Error;
use crate::crypto::{decrypt_encrypted_data, raw_data_signature_matches};
use crate::user::{EncryptedData, Phone, Profile};

/// The actor. Configuration comes in [`DecryptorArgs`].
pub struct Decryptor;

/// What the decryptor is started with (and its whole state): nothing, each message names the
/// app whose watermark the data must carry.
#[derive(Clone, Debug, Default)]
pub struct DecryptorArgs;

/// Messages of the decryptor.
pub enum DecryptorMsg {
    /// Open a profile from `wx.getUserInfo` / `getUserProfile`.
    Profile {
        /// The session's app: the data's watermark must name it.
        appid: Arc<str>,
        /// The identity's stored session_key.
        session_key: String,
        /// The session's openid, which the profile's openId must equal.
        openid: String,
        /// What the client sent.
        data: EncryptedData,
        /// Where the profile goes.
        reply: RpcReplyPort<Result<Profile, Error>>,
    },
    /// Open a phone number from the phone-number button.
    Phone {
        /// The session's app: the data's watermark must name it.
        appid: Arc<str>,
        /// The identity's stored session_key.
        session_key: String,
        /// What the client sent.
        data: EncryptedData,
        /// Where the phone number goes.
        reply: RpcReplyPort<Result<Phone, Error>>,
    },
    /// Test hook: suffer a fault inside the handler.
    #[cfg(feature = "fault-injection")]
    Inject(crate::Fault),
}

impl Actor for Decryptor {
    type Msg = DecryptorMsg;
    type State = DecryptorArgs;
    type Arguments = DecryptorArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: DecryptorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        _state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            DecryptorMsg::Profile {
                appid,
                session_key,
                openid,
                data,
                reply,
            } => {
                let _ = reply.send(open_profile(&appid, &session_key, &openid, &data));
            }
            DecryptorMsg::Phone {
                appid,
                session_key,
                data,
                reply,
            } => {
                let _ = reply.send(open_phone(&appid, &session_key, &data));
            }
            #[cfg(feature = "fault-injection")]
            DecryptorMsg::Inject(fault) => fault.strike("Decryptor").await,
        }
        Ok(())
    }
}

/// The watermark WeChat puts beside the payload's own fields. Read in a pass of its own: serde's
/// `flatten` would buffer the whole document and cost more than the two passes together.
#[derive(Deserialize)]
struct Sealed {
    watermark: Watermark,
}

#[derive(Deserialize)]
struct Watermark {
    appid: String,
}

/// Decrypts and checks a profile; see the module docs for the order of the checks.
pub fn open_profile(
    appid: &str,
    session_key: &str,
    openid: &str,
    data: &EncryptedData,
) -> Result<Profile, Error> {
    let signed = match (&data.raw_data, &data.signature) {
        (Some(_), Some(signature))
            if signature.len() != 40 || !signature.bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            return Err(Error::InvalidRequest(
                "signature must be 40 hex digits (a SHA-1)".into(),
            ));
        }
        (Some(raw_data), Some(signature)) => Some((raw_data, signature)),
        (None, None) => None,
        _ => {
            return Err(Error::InvalidRequest(
                "send rawData and signature together, or neither".into(),
            ));
        }
    };
    let profile: Profile = open(appid, session_key, data)?;
    // WeChat always puts the openId in a profile: one without it was tampered with.
    if profile.open_id.as_deref() != Some(openid) {
        return Err(Error::OpenidMismatch);
    }
    if let Some((raw_data, signature)) = signed
        && !raw_data_signature_matches(raw_data, session_key, signature)
    {
        return Err(Error::SignatureMismatch);
    }
    Ok(profile)
}

/// Decrypts and checks a phone number.
pub fn open_phone(appid: &str, session_key: &str, data: &EncryptedData) -> Result<Phone, Error> {
    open(appid, session_key, data)
}

fn open<T: DeserializeOwned>(
    appid: &str,
    session_key: &str,
    data: &EncryptedData,
) -> Result<T, Error> {
    let plaintext = decrypt_encrypted_data(session_key, &data.iv, &data.encrypted_data)?;
    // serde's messages can quote the plaintext: none of it goes anywhere.
    let sealed: Sealed = serde_json::from_slice(&plaintext).map_err(|_| Error::DecryptFailed)?;
    if sealed.watermark.appid != appid {
        return Err(Error::WatermarkMismatch);
    }
    serde_json::from_slice(&plaintext).map_err(|_| Error::DecryptFailed)
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;

    use super::*;
    use crate::crypto::{encrypt_for_client, raw_data_signature};

    const APPID: &str = "wx-test";
    const KEY: &str = "tiihtNczf5v6AKRyjwEUhQ==";
    const OTHER_KEY: &str = "AAECAwQFBgcICQoLDA0ODw==";
    const IV: [u8; 16] = [9; 16];

    fn seal(key: &str, plaintext: &str) -> EncryptedData {
        EncryptedData {
            encrypted_data: encrypt_for_client(key, &IV, plaintext.as_bytes()).unwrap(),
            iv: STANDARD.encode(IV),
            raw_data: None,
            signature: None,
        }
    }

    fn profile_json(openid: &str, appid: &str) -> String {
        format!(
            r#"{{"openId":"{openid}","unionId":"u1","nickName":"Ann","gender":2,"city":"Hangzhou","province":"Zhejiang","country":"China","avatarUrl":"https://a/b","language":"zh_CN","watermark":{{"appid":"{appid}","timestamp":1700000000}}}}"#
        )
    }

    #[test]
    fn a_good_profile_opens_with_and_without_signature() {
        let mut data = seal(KEY, &profile_json("o1", APPID));
        let profile = open_profile(APPID, KEY, "o1", &data).unwrap();
        assert_eq!(profile.union_id.as_deref(), Some("u1"));
        assert_eq!(profile.gender, Some(2));
        assert_eq!(profile.nick_name.as_deref(), Some("Ann"));

        let raw = r#"{"nickName":"Ann"}"#;
        data.raw_data = Some(raw.into());
        data.signature = Some(raw_data_signature(raw, KEY));
        assert_eq!(open_profile(APPID, KEY, "o1", &data).unwrap(), profile);
    }

    #[test]
    fn every_check_fails_with_its_own_error() {
        let good = seal(KEY, &profile_json("o1", APPID));
        // Made for a session_key that has since rotated.
        assert_eq!(
            open_profile(APPID, OTHER_KEY, "o1", &good),
            Err(Error::DecryptFailed)
        );
        // Decrypts, but is not JSON.
        assert_eq!(
            open_profile(APPID, KEY, "o1", &seal(KEY, "not json")),
            Err(Error::DecryptFailed)
        );
        // JSON without a watermark.
        assert_eq!(
            open_profile(APPID, KEY, "o1", &seal(KEY, r#"{"openId":"o1"}"#)),
            Err(Error::DecryptFailed)
        );
        assert_eq!(
            open_profile(
                APPID,
                KEY,
                "o1",
                &seal(KEY, &profile_json("o1", "wx-other"))
            ),
            Err(Error::WatermarkMismatch)
        );
        assert_eq!(
            open_profile(APPID, KEY, "o2", &good),
            Err(Error::OpenidMismatch)
        );
        let without_openid = profile_json("o1", APPID).replace(r#""openId":"o1","#, "");
        assert_eq!(
            open_profile(APPID, KEY, "o1", &seal(KEY, &without_openid)),
            Err(Error::OpenidMismatch)
        );

        let mut tampered = good.clone();
        tampered.raw_data = Some(r#"{"nickName":"Ann"}"#.into());
        tampered.signature = Some(raw_data_signature(r#"{"nickName":"Bob"}"#, KEY));
        assert_eq!(
            open_profile(APPID, KEY, "o1", &tampered),
            Err(Error::SignatureMismatch)
        );

        let mut not_a_sha1 = tampered.clone();
        not_a_sha1.signature = Some("0".repeat(39));
        assert!(matches!(
            open_profile(APPID, KEY, "o1", &not_a_sha1),
            Err(Error::InvalidRequest(_))
        ));

        let mut half = good.clone();
        half.raw_data = Some("{}".into());
        assert!(matches!(
            open_profile(APPID, KEY, "o1", &half),
            Err(Error::InvalidRequest(_))
        ));

        let mut truncated = good.clone();
        truncated.encrypted_data =
            STANDARD.encode(&STANDARD.decode(&good.encrypted_data).unwrap()[..16 * 2 - 1]);
        assert!(matches!(
            open_profile(APPID, KEY, "o1", &truncated),
            Err(Error::InvalidRequest(_))
        ));

        let mut short_iv = good.clone();
        short_iv.iv = STANDARD.encode([1u8; 8]);
        assert!(matches!(
            open_profile(APPID, KEY, "o1", &short_iv),
            Err(Error::InvalidRequest(_))
        ));

        let mut bad_base64 = good;
        bad_base64.encrypted_data = "***".into();
        assert!(matches!(
            open_profile(APPID, KEY, "o1", &bad_base64),
            Err(Error::InvalidRequest(_))
        ));
    }

    #[test]
    fn phones_open_with_string_or_numeric_country_codes() {
        for country_code in [r#""86""#, "86"] {
            let text = format!(
                r#"{{"phoneNumber":"13800138000","purePhoneNumber":"13800138000","countryCode":{country_code},"watermark":{{"appid":"{APPID}","timestamp":1}}}}"#
            );
            let phone = open_phone(APPID, KEY, &seal(KEY, &text)).unwrap();
            assert_eq!(
                (
                    phone.pure_phone_number.as_str(),
                    phone.country_code.as_str()
                ),
                ("13800138000", "86")
            );
        }
        let wrong_app = r#"{"phoneNumber":"1","purePhoneNumber":"1","countryCode":"86","watermark":{"appid":"x","timestamp":1}}"#;
        assert_eq!(
            open_phone(APPID, KEY, &seal(KEY, wrong_app)),
            Err(Error::WatermarkMismatch)
        );
    }
}
