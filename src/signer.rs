//! Signer: the broker's signed access tokens. It keeps the keys read from the store (rereading
//! them every few seconds, so that a rotation on another broker of the same Redis reaches it),
//! signs in the request's own task (a signature is pure CPU, tens of microseconds: no actor), and
//! answers the JWKS and rotations from the store itself, so that every broker publishes a new key
//! the moment it is stored.

use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Serialize;
use tokio::task::JoinHandle;

use crate::jwt::{AccessClaims, JwkSet};
use crate::keyring::{AccessPolicy, KeyRecord, KeyRing};
use crate::storage::{Keys, Storage};
use crate::{Clock, Config, Error};

/// How often a broker rereads the keys (well within [`crate::keyring::ACCESS_SLACK`]).
const KEY_REFRESH: Duration = Duration::from_secs(5);

/// A signed access token and its lifetime, as the login and `POST /v1/token` answer them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessToken {
    /// The JWT.
    pub token: String,
    /// Seconds until its `exp`.
    pub expires_in: u64,
}

/// Whose token to sign: a live session.
pub(crate) struct Subject<'a> {
    /// The user's uid.
    pub uid: u64,
    /// The session's app: the token's `aud` and `appid`.
    pub appid: &'a str,
    /// The user's openid in that app.
    pub openid: &'a str,
    /// The user's unionid, if known.
    pub unionid: Option<&'a str>,
    /// The session's id (hex of its token's hash).
    pub sid: String,
    /// Unix seconds at which the session dies unless used: the token never outlives it.
    pub session_expires_at: u64,
}

/// A key as the admin sees it after a rotation: never its private part.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyInfo {
    /// The key's id, as tokens and the JWKS name it.
    pub kid: String,
    /// Unix seconds of its creation.
    pub created_at: u64,
    /// Unix seconds of its retirement; absent for the key that signs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retired_at: Option<u64>,
    /// Unix seconds at which a retired key leaves the JWKS (every token it signed has expired).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub published_until: Option<u64>,
}

/// What a rotation did: the key that signs from now on, and every published key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rotation {
    /// The new key's id.
    pub kid: String,
    /// The published keys, newest first.
    pub keys: Vec<KeyInfo>,
}

/// The broker's signer (present while signed tokens are on).
pub(crate) struct Signer {
    keys: Keys,
    policy: AccessPolicy,
    issuer: String,
    clock: Clock,
    ring: RwLock<Arc<KeyRing>>,
    refresher: Mutex<Option<JoinHandle<()>>>,
}

impl Signer {
    /// The signer of `config`, with the keys of `storage` (the first one made if none is stored
    /// yet); `None` when signed tokens are off.
    pub(crate) async fn start(
        storage: &Storage,
        config: &Config,
    ) -> Result<Option<Arc<Signer>>, Error> {
        let Some(policy) = config.access_policy() else {
            return Ok(None);
        };
        let keys = storage.keys();
        let clock = config.clock.clone();
        let stored = keys.ensure(policy, clock.now()).wait().await?;
        let ring = ring(&stored, policy, clock.now())?;
        let signer = Arc::new(Signer {
            keys,
            policy,
            issuer: config.issuer.clone(),
            clock,
            ring: RwLock::new(Arc::new(ring)),
            refresher: Mutex::new(None),
        });
        let refresher = tokio::spawn(refresh(Arc::downgrade(&signer)));
        *signer.refresher.lock().unwrap_or_else(|p| p.into_inner()) = Some(refresher);
        Ok(Some(signer))
    }

    /// An access token for `subject`, issued at `now`.
    pub(crate) fn sign(&self, subject: Subject<'_>, now: u64) -> AccessToken {
        let exp = now
            .saturating_add(self.policy.ttl)
            .min(subject.session_expires_at);
        let claims = AccessClaims {
            iss: self.issuer.clone(),
            aud: subject.appid.to_owned(),
            appid: Some(subject.appid.to_owned()),
            sub: subject.uid.to_string(),
            openid: subject.openid.to_owned(),
            unionid: subject.unionid.map(str::to_owned),
            sid: subject.sid,
            iat: now,
            exp,
            jti: URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>()),
        };
        let ring = self.ring.read().unwrap_or_else(|p| p.into_inner()).clone();
        AccessToken {
            token: ring.sign(&claims),
            expires_in: exp.saturating_sub(now),
        }
    }

    /// The published keys, as stored right now.
    pub(crate) async fn jwks(&self) -> Result<JwkSet, Error> {
        let stored = self.keys.list().wait().await?;
        Ok(ring(&stored, self.policy, self.clock.now())?.jwks())
    }

    /// Retires the signing key; a new one signs from now on (on this broker at once, on the
    /// others of a shared store within a few seconds).
    pub(crate) async fn rotate(&self) -> Result<Rotation, Error> {
        let now = self.clock.now();
        let stored = self.keys.rotate(self.policy, now).wait().await?;
        let ring = ring(&stored, self.policy, now)?;
        let rotation = Rotation {
            kid: ring.active_kid().to_owned(),
            keys: ring
                .published()
                .map(|key| KeyInfo {
                    kid: key.kid.clone(),
                    created_at: key.created_at,
                    retired_at: key.retired_at,
                    published_until: key.retired_at.map(|at| at + self.policy.keep()),
                })
                .collect(),
        };
        self.install(ring);
        tracing::info!(kid = rotation.kid, "rotated the access-token signing key");
        Ok(rotation)
    }

    /// Stops rereading the keys (at broker shutdown).
    pub(crate) fn close(&self) {
        if let Some(task) = self
            .refresher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            task.abort();
        }
    }

    fn install(&self, ring: KeyRing) {
        *self.ring.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ring);
    }
}

/// The ring of `stored`, or an error if no key may sign (the store lost them, or was changed by
/// hand).
fn ring(stored: &[KeyRecord], policy: AccessPolicy, now: u64) -> Result<KeyRing, Error> {
    KeyRing::new(stored, policy, now)
        .ok_or_else(|| Error::Storage("no access-token signing key is stored".into()))
}

/// Rereads the keys every [`KEY_REFRESH`] while the signer lives.
async fn refresh(signer: Weak<Signer>) {
    let mut ticks = tokio::time::interval(KEY_REFRESH);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Some(signer) = signer.upgrade() else {
            return;
        };
        let now = signer.clock.now();
        match signer.keys.list().wait().await {
            Ok(stored) => match KeyRing::new(&stored, signer.policy, now) {
                Some(ring) => signer.install(ring),
                None => tracing::warn!("the store holds no signing key; signing with the last one"),
            },
            Err(e) => tracing::debug!(error = %e, "cannot reread the signing keys"),
        }
    }
}
