//! The domain's words for people: a user as embedders and the HTTP API see it ([`User`]), as it
//! is stored ([`UserRecord`]), how to find one ([`UserKey`]) and what a login did to it
//! ([`Registration`]). Both stores and the actors speak them; they depend on nothing of ours.
//!
//! The field names of [`Profile`], [`Phone`] and [`EncryptedData`] are WeChat's own, so the same
//! shapes serve for decrypting, storing and answering.

use std::borrow::Cow;

use serde::{Deserialize, Deserializer, Serialize};

/// A user as the broker stores it, without the session_key. Its JSON form (camelCase) is the
/// `/v1/me` answer, the admin's, and one line of a backup (`wxbroker export`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct User {
    /// The user's stable id.
    pub uid: u64,
    /// The mini program of this identity. Absent in an export line of the default app's
    /// identities (and in every line of an export from before several apps); `/v1/me` and the
    /// admin always name it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub appid: Option<String>,
    /// The user's id within this mini program.
    pub openid: String,
    /// The user's id across the company's WeChat apps, once known.
    pub unionid: Option<String>,
    /// Every identity of the uid, (appid, openid), in `/v1/me` and the admin's lookup; an export
    /// line is one identity and lists none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<Identity>,
    /// The profile from the latest `/v1/userinfo`, if any.
    pub profile: Option<Profile>,
    /// The phone number from the latest `/v1/phone`, if any.
    pub phone: Option<Phone>,
    /// Unix seconds of the first login.
    pub created_at: u64,
    /// Unix seconds of the last login or update.
    pub updated_at: u64,
}

/// A registered user as stored: [`User`] plus the session_key, which never leaves the process.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct UserRecord {
    /// Our own stable id for the user: handed out once, never reused.
    pub uid: u64,
    /// The mini program of this identity; `None`: the default app (so a record written before
    /// several apps, which has none, is the default app's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub appid: Option<String>,
    /// The user's id within this mini program.
    pub openid: String,
    /// The user's id across the company's WeChat apps, once WeChat reveals it.
    pub unionid: Option<String>,
    /// The current session_key (base64, as WeChat sent it). Never leaves the process.
    pub session_key: String,
    /// Unix seconds of the first login.
    pub created_at: u64,
    /// Unix seconds of the last change (login or profile update).
    pub updated_at: u64,
    /// The latest decrypted profile.
    #[serde(default)]
    pub profile: Option<Profile>,
    /// The latest decrypted phone number.
    #[serde(default)]
    pub phone: Option<Phone>,
}

impl From<UserRecord> for User {
    fn from(record: UserRecord) -> User {
        User {
            uid: record.uid,
            appid: record.appid,
            openid: record.openid,
            unionid: record.unionid,
            identities: Vec::new(),
            profile: record.profile,
            phone: record.phone,
            created_at: record.created_at,
            updated_at: record.updated_at,
        }
    }
}

impl UserRecord {
    /// Where the record is stored: see [`identity_key`].
    pub fn key(&self) -> Cow<'_, str> {
        identity_key(self.appid.as_deref(), &self.openid)
    }
}

/// One identity of a user: who the person is in one mini program. A uid has one per app the
/// person logged in through, linked by the unionid WeChat gives them all.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    /// The mini program (`None` inside the stores: the default app).
    pub appid: Option<String>,
    /// The person's id within that mini program.
    pub openid: String,
}

/// The key a store files the identity (`appid`, `openid`) under: the openid alone for the
/// default app (`None`), as before several apps, so that existing data stays the default app's;
/// `appid:openid` for the others (neither holds a `:`).
pub fn identity_key<'a>(appid: Option<&str>, openid: &'a str) -> Cow<'a, str> {
    match appid {
        None => Cow::Borrowed(openid),
        Some(appid) => Cow::Owned(format!("{appid}:{openid}")),
    }
}

/// How to find a user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UserKey {
    /// By our uid (the uid's first identity).
    Uid(u64),
    /// By openid in the default app.
    Openid(String),
    /// By openid in a mini program (`None`: the default app).
    Identity(Identity),
    /// By unionid.
    Unionid(String),
}

/// The outcome of a login for the user's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    /// The user's stable id.
    pub uid: u64,
    /// The user's openid.
    pub openid: String,
    /// The unionid, if WeChat ever reported one.
    pub unionid: Option<String>,
    /// Whether this login created the user.
    pub is_new: bool,
}

/// A user's profile as `wx.getUserInfo` / `getUserProfile` deliver it (decrypted, no watermark).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Profile {
    /// The openid the data was made for.
    pub open_id: Option<String>,
    /// The unionid, when the mini program is bound to an Open Platform account.
    pub union_id: Option<String>,
    /// Display name.
    pub nick_name: Option<String>,
    /// Avatar image URL.
    pub avatar_url: Option<String>,
    /// 0 unknown, 1 male, 2 female.
    pub gender: Option<i64>,
    /// City, as the user set it.
    pub city: Option<String>,
    /// Province, as the user set it.
    pub province: Option<String>,
    /// Country, as the user set it.
    pub country: Option<String>,
    /// Language of the other fields, e.g. `zh_CN`.
    pub language: Option<String>,
}

/// A phone number as the phone-number button delivers it (decrypted, no watermark).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Phone {
    /// The number with its country code for numbers outside mainland China.
    pub phone_number: String,
    /// The number without country code.
    pub pure_phone_number: String,
    /// The country code, e.g. `86` (WeChat has sent it as a string and as a number).
    #[serde(deserialize_with = "string_or_number")]
    pub country_code: String,
}

/// Encrypted user data as the mini program sends it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EncryptedData {
    /// Base64 AES-128-CBC ciphertext.
    pub encrypted_data: String,
    /// Base64 16-byte IV.
    pub iv: String,
    /// The plain profile JSON (profiles only), signed by `signature`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_data: Option<String>,
    /// `hex(sha1(rawData + session_key))` (profiles only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

fn string_or_number<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Text(String),
        Number(u64),
    }
    Ok(match Either::deserialize(deserializer)? {
        Either::Text(text) => text,
        Either::Number(number) => number.to_string(),
    })
}
