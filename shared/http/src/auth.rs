//! Bearer-token authentication: JWTs signed RS256/ES256 by an identity provider publishing a
//! JWKS (Amazon Cognito in production), or HS256 with a shared secret (local development).
//!
//! Scopes come from the OAuth `scope` claim (space-separated, as Cognito issues them) or a
//! `scp` claim (string or array). Writes need `tandem:write`; reads need `tandem:read` only when
//! `TANDEM_READ_REQUIRES_AUTH=true`.
//!
//! `exp` is required and `nbf` is checked when present, both with [`CLOCK_LEEWAY_SECONDS`] of
//! clock skew allowed.
//!
//! The JWKS is fetched on the first request, re-fetched (single-flight: concurrent requests
//! share one fetch) on the first request after `TANDEM_JWKS_REFRESH_SECONDS`, so a key the
//! provider removed stops being trusted then, and re-fetched for a token naming an unknown key
//! id at most once per [`AuthSettings::jwks_min_refetch`]. A failed refresh keeps the last good
//! keys for at most [`AuthSettings::jwks_max_stale`] past the due refresh, retried every
//! `jwks_min_refetch`; after that, requests needing a key answer 503 until a fetch succeeds.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, RwLock};

use tandem_runtime::config::{self, ConfigError};

pub const WRITE_SCOPE: &str = "tandem:write";
pub const READ_SCOPE: &str = "tandem:read";

/// The local development HS256 secret (`make up`, the Lambda event fixtures, the README). It is
/// published, so the services accept it only with `TANDEM_DEV_MODE=true`.
pub const DEV_HS256_SECRET: &str = "tandem-local-development-secret-v2";

/// Shortest accepted HS256 secret: RFC 7518 (section 3.2) wants a key at least as long as the
/// 256-bit hash output.
pub const MIN_HS256_SECRET_BYTES: usize = 32;

/// Clock skew allowed on `exp` and `nbf`, in seconds.
pub const CLOCK_LEEWAY_SECONDS: u64 = 30;

/// Authentication settings, read from the environment.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// HS256 shared secret (`TANDEM_JWT_HS256_SECRET`), for local development. `from_env`
    /// refuses one shorter than [`MIN_HS256_SECRET_BYTES`], and [`DEV_HS256_SECRET`] unless
    /// `dev_mode`.
    pub hs256_secret: Option<SecretString>,
    /// JWKS document URL (`TANDEM_JWKS_URL`), e.g. Cognito's
    /// `https://cognito-idp.<region>.amazonaws.com/<pool>/.well-known/jwks.json`.
    pub jwks_url: Option<String>,
    /// Required `iss` (`TANDEM_JWT_ISSUER`).
    pub issuer: Option<String>,
    /// Required `aud` or Cognito `client_id` (`TANDEM_JWT_AUDIENCE`).
    pub audience: Option<String>,
    /// Whether reads need `tandem:read` (`TANDEM_READ_REQUIRES_AUTH`).
    pub read_requires_auth: bool,
    /// Local development mode (`TANDEM_DEV_MODE`, default false): allows [`DEV_HS256_SECRET`].
    pub dev_mode: bool,
    /// How old the JWKS may get before the next request re-fetches it
    /// (`TANDEM_JWKS_REFRESH_SECONDS`, default 300): a key removed from the JWKS is no longer
    /// trusted after that.
    pub jwks_refresh: Duration,
    /// Minimum time between two JWKS fetches caused by unknown key ids, and between retries of
    /// a failed fetch (30 s): a flood of tokens with made-up key ids must not become a flood of
    /// requests to the provider.
    pub jwks_min_refetch: Duration,
    /// How long past a due refresh the last good keys stay trusted while refreshes fail (1 h).
    pub jwks_max_stale: Duration,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            hs256_secret: None,
            jwks_url: None,
            issuer: None,
            audience: None,
            read_requires_auth: false,
            dev_mode: false,
            jwks_refresh: Duration::from_secs(300),
            jwks_min_refetch: Duration::from_secs(30),
            jwks_max_stale: Duration::from_secs(3600),
        }
    }
}

impl AuthSettings {
    pub fn from_env() -> Result<Self, ConfigError> {
        let refresh_seconds = config::parsed_or::<u64>("TANDEM_JWKS_REFRESH_SECONDS", 300)?;
        if refresh_seconds == 0 {
            return Err(ConfigError::Invalid {
                name: "TANDEM_JWKS_REFRESH_SECONDS",
                value: refresh_seconds.to_string(),
                reason: "must be at least 1".into(),
            });
        }
        let settings = Self {
            hs256_secret: config::secret("TANDEM_JWT_HS256_SECRET"),
            jwks_url: config::optional("TANDEM_JWKS_URL"),
            issuer: config::optional("TANDEM_JWT_ISSUER"),
            audience: config::optional("TANDEM_JWT_AUDIENCE"),
            read_requires_auth: config::flag("TANDEM_READ_REQUIRES_AUTH", false)?,
            dev_mode: config::flag("TANDEM_DEV_MODE", false)?,
            jwks_refresh: Duration::from_secs(refresh_seconds),
            ..Self::default()
        };
        settings.check_hs256_secret()?;
        Ok(settings)
    }

    /// Refuses an HS256 secret shorter than [`MIN_HS256_SECRET_BYTES`], and the published
    /// [`DEV_HS256_SECRET`] outside development mode. The secret itself is never echoed.
    pub fn check_hs256_secret(&self) -> Result<(), ConfigError> {
        let Some(secret) = &self.hs256_secret else {
            return Ok(());
        };
        let secret = secret.expose_secret();
        if secret.len() < MIN_HS256_SECRET_BYTES {
            return Err(ConfigError::Invalid {
                name: "TANDEM_JWT_HS256_SECRET",
                value: format!("<{} bytes, not shown>", secret.len()),
                reason: format!("an HS256 secret needs at least {MIN_HS256_SECRET_BYTES} bytes"),
            });
        }
        if secret == DEV_HS256_SECRET && !self.dev_mode {
            return Err(ConfigError::Invalid {
                name: "TANDEM_JWT_HS256_SECRET",
                value: "<the local development secret>".into(),
                reason: "this secret is published and accepted only with TANDEM_DEV_MODE=true"
                    .into(),
            });
        }
        Ok(())
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub subject: String,
    pub scopes: Vec<String>,
}

/// Why a request was not authenticated or not authorised.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("invalid bearer token: {0}")]
    Invalid(String),
    #[error("the token lacks scope {0}")]
    InsufficientScope(&'static str),
    #[error("no authentication method is configured")]
    NotConfigured,
    #[error("the signing keys could not be fetched")]
    KeysUnavailable(#[source] anyhow::Error),
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: Option<String>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    scp: Option<StringOrList>,
    #[serde(default)]
    aud: Option<StringOrList>,
    #[serde(default)]
    client_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StringOrList {
    One(String),
    Many(Vec<String>),
}

impl StringOrList {
    fn items(&self) -> Vec<String> {
        match self {
            Self::One(s) => s.split_whitespace().map(str::to_owned).collect(),
            Self::Many(v) => v.clone(),
        }
    }
}

/// Verification keys by key id.
type KeyMap = HashMap<String, (DecodingKey, Algorithm)>;

/// What the verifier knows of the JWKS.
#[derive(Default)]
struct JwksState {
    keys: KeyMap,
    /// When the keys were last fetched successfully.
    fetched_at: Option<Instant>,
    /// When the last fetch, successful or not, ended.
    attempted_at: Option<Instant>,
    /// Why the last fetch failed; `None` when it succeeded.
    last_error: Option<String>,
    /// Fetches ended so far: a request that waited for another request's fetch sees it changed
    /// and uses that result instead of fetching again.
    attempts: u64,
}

/// What a request does about a key id, given the current state.
enum Lookup {
    Found((DecodingKey, Algorithm)),
    Fetch,
    Refused(AuthError),
}

/// A JWKS, fetched lazily, refreshed when older than `refresh`, re-fetched when a token names
/// an unknown key (at most once per `min_refetch`). One fetch at a time.
struct Jwks {
    url: String,
    http: reqwest::Client,
    state: RwLock<JwksState>,
    /// Held for the duration of a fetch (single flight).
    flight: Mutex<()>,
    refresh: Duration,
    min_refetch: Duration,
    max_stale: Duration,
}

impl Jwks {
    fn lookup(&self, state: &JwksState, kid: &str, may_fetch: bool) -> Lookup {
        let now = Instant::now();
        let age = state.fetched_at.map(|at| now.saturating_duration_since(at));
        let fresh = age.is_some_and(|age| age < self.refresh);
        let usable = age.is_some_and(|age| age < self.refresh.saturating_add(self.max_stale));
        let failed = state.last_error.is_some();
        let throttled = state
            .attempted_at
            .is_some_and(|at| now.saturating_duration_since(at) < self.min_refetch);
        // A due refresh after a successful fetch is limited by `refresh` itself; retries after
        // a failure and fetches for unknown key ids wait `min_refetch`.
        let may_refresh = may_fetch && !(failed && throttled);
        let may_refetch = may_fetch && !throttled;
        if !usable {
            return if may_refresh {
                Lookup::Fetch
            } else {
                Lookup::Refused(self.unavailable(state))
            };
        }
        match state.keys.get(kid) {
            Some(found) if fresh || !may_refresh => Lookup::Found(found.clone()),
            Some(_) => Lookup::Fetch,
            None if may_refetch || (!fresh && may_refresh) => Lookup::Fetch,
            // Whether the provider has rotated in a key we cannot fetch is unknown: 503.
            None if failed => Lookup::Refused(self.unavailable(state)),
            None => Lookup::Refused(AuthError::Invalid(format!("unknown key id {kid}"))),
        }
    }

    fn unavailable(&self, state: &JwksState) -> AuthError {
        AuthError::KeysUnavailable(anyhow::anyhow!(
            "{}",
            state
                .last_error
                .as_deref()
                .unwrap_or("the JWKS has not been fetched successfully recently")
        ))
    }

    async fn key(&self, kid: &str) -> Result<(DecodingKey, Algorithm), AuthError> {
        let seen = {
            let state = self.state.read().await;
            match self.lookup(&state, kid, true) {
                Lookup::Found(found) => return Ok(found),
                Lookup::Refused(error) => return Err(error),
                Lookup::Fetch => state.attempts,
            }
        };
        let _flight = self.flight.lock().await;
        {
            // Another request may have fetched while this one waited: use its result.
            let state = self.state.read().await;
            match self.lookup(&state, kid, state.attempts == seen) {
                Lookup::Found(found) => return Ok(found),
                Lookup::Refused(error) => return Err(error),
                Lookup::Fetch => {}
            }
        }
        let fetched = self.fetch().await;
        let mut state = self.state.write().await;
        let now = Instant::now();
        state.attempts += 1;
        state.attempted_at = Some(now);
        match fetched {
            Ok(keys) => {
                state.keys = keys;
                state.fetched_at = Some(now);
                state.last_error = None;
            }
            Err(error) => {
                let error = format!("{error:#}");
                if state.fetched_at.is_some() {
                    tracing::warn!(%error, "JWKS refresh failed; the last good keys stay trusted for a while");
                }
                state.last_error = Some(error);
            }
        }
        match self.lookup(&state, kid, false) {
            Lookup::Found(found) => Ok(found),
            Lookup::Refused(error) => Err(error),
            Lookup::Fetch => Err(self.unavailable(&state)),
        }
    }

    async fn fetch(&self) -> anyhow::Result<KeyMap> {
        let set: JwkSet = self
            .http
            .get(&self.url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .with_context(|| format!("Failed to fetch the JWKS from {}", self.url))?
            .json()
            .await
            .context("Failed to parse the JWKS")?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let (Some(kid), Ok(key)) = (jwk.common.key_id.clone(), DecodingKey::from_jwk(jwk))
            else {
                continue;
            };
            let algorithm = match &jwk.algorithm {
                jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
                _ => Algorithm::RS256,
            };
            keys.insert(kid, (key, algorithm));
        }
        Ok(keys)
    }
}

enum Keys {
    Hs256(DecodingKey),
    Jwks(Box<Jwks>),
    None,
}

/// Verifies bearer tokens. Cheap to clone.
#[derive(Clone)]
pub struct Authenticator {
    keys: Arc<Keys>,
    issuer: Option<Arc<str>>,
    audience: Option<Arc<str>>,
    pub read_requires_auth: bool,
}

impl Authenticator {
    pub fn new(settings: &AuthSettings) -> anyhow::Result<Self> {
        let keys = match (&settings.jwks_url, &settings.hs256_secret) {
            (Some(url), _) => Keys::Jwks(Box::new(Jwks {
                url: url.clone(),
                http: reqwest::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .context("Failed to build the JWKS HTTP client")?,
                state: RwLock::new(JwksState::default()),
                flight: Mutex::new(()),
                refresh: settings.jwks_refresh,
                min_refetch: settings.jwks_min_refetch,
                max_stale: settings.jwks_max_stale,
            })),
            (None, Some(secret)) => {
                Keys::Hs256(DecodingKey::from_secret(secret.expose_secret().as_bytes()))
            }
            (None, None) => Keys::None,
        };
        Ok(Self {
            keys: Arc::new(keys),
            issuer: settings.issuer.as_deref().map(Arc::from),
            audience: settings.audience.as_deref().map(Arc::from),
            read_requires_auth: settings.read_requires_auth,
        })
    }

    /// Whether any verification method is configured.
    pub fn is_configured(&self) -> bool {
        !matches!(*self.keys, Keys::None)
    }

    /// Verifies an `Authorization` header value and checks the scope.
    pub async fn authorize(
        &self,
        authorization: Option<&str>,
        scope: &'static str,
    ) -> Result<Principal, AuthError> {
        let header = authorization.ok_or(AuthError::Missing)?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| AuthError::Invalid("expected the Bearer scheme".into()))?;
        let principal = self.verify(token).await?;
        if principal.scopes.iter().any(|s| s == scope) {
            Ok(principal)
        } else {
            Err(AuthError::InsufficientScope(scope))
        }
    }

    async fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::Invalid(e.to_string()))?;
        let (key, algorithm) = match &*self.keys {
            Keys::None => return Err(AuthError::NotConfigured),
            Keys::Hs256(key) => (key.clone(), Algorithm::HS256),
            Keys::Jwks(jwks) => {
                let kid = header
                    .kid
                    .as_deref()
                    .ok_or_else(|| AuthError::Invalid("the token has no key id".into()))?;
                jwks.key(kid).await?
            }
        };
        if header.alg != algorithm {
            return Err(AuthError::Invalid(format!(
                "algorithm {:?} is not accepted",
                header.alg
            )));
        }
        let mut validation = Validation::new(algorithm);
        validation.validate_aud = false;
        validation.leeway = CLOCK_LEEWAY_SECONDS;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[&**issuer]);
        }
        let claims = jsonwebtoken::decode::<Claims>(token, &key, &validation)
            .map_err(|e| {
                AuthError::Invalid(match e.kind() {
                    ErrorKind::ExpiredSignature => "the token has expired (exp)".to_owned(),
                    ErrorKind::ImmatureSignature => {
                        "the token is not valid yet (nbf is in the future)".to_owned()
                    }
                    _ => e.to_string(),
                })
            })?
            .claims;
        if let Some(expected) = &self.audience {
            let in_aud = claims
                .aud
                .as_ref()
                .is_some_and(|a| a.items().iter().any(|x| **x == **expected));
            let in_client = claims.client_id.as_deref() == Some(&**expected);
            if !in_aud && !in_client {
                return Err(AuthError::Invalid("audience mismatch".into()));
            }
        }
        let mut scopes: Vec<String> = claims
            .scope
            .as_deref()
            .unwrap_or("")
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        if let Some(scp) = &claims.scp {
            scopes.extend(scp.items());
        }
        Ok(Principal {
            subject: claims.sub.unwrap_or_else(|| "anonymous".to_owned()),
            scopes,
        })
    }
}

#[derive(Serialize)]
struct MintClaims<'a> {
    sub: &'a str,
    scope: String,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
}

/// Mints an HS256 token: the local stack's dev token and the tests' tokens.
pub fn mint_hs256(
    secret: &str,
    subject: &str,
    scopes: &[&str],
    ttl: Duration,
    issuer: Option<&str>,
) -> anyhow::Result<String> {
    let now = time::OffsetDateTime::now_utc()
        .unix_timestamp()
        .max(0)
        .unsigned_abs();
    let claims = MintClaims {
        sub: subject,
        scope: scopes.join(" "),
        iat: now,
        exp: now + ttl.as_secs(),
        iss: issuer,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .context("Failed to sign the token")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_secret(secret: &str, dev_mode: bool) -> AuthSettings {
        AuthSettings {
            hs256_secret: Some(secret.to_owned().into()),
            dev_mode,
            ..AuthSettings::default()
        }
    }

    #[test]
    fn short_hs256_secrets_are_refused_naming_the_variable_not_the_secret() {
        let error = with_secret("tandem-local-dev-secret", true)
            .check_hs256_secret()
            .expect_err("23 bytes is too short")
            .to_string();
        assert!(error.contains("TANDEM_JWT_HS256_SECRET"), "{error}");
        assert!(error.contains("at least 32 bytes"), "{error}");
        assert!(!error.contains("tandem-local-dev-secret"), "{error}");
        let just_enough = "x".repeat(MIN_HS256_SECRET_BYTES);
        with_secret(&just_enough, false)
            .check_hs256_secret()
            .expect("32 bytes is enough");
        assert!(
            with_secret(&just_enough[1..], false)
                .check_hs256_secret()
                .is_err()
        );
    }

    #[test]
    fn the_dev_secret_is_accepted_only_in_dev_mode() {
        assert!(DEV_HS256_SECRET.len() >= MIN_HS256_SECRET_BYTES);
        let error = with_secret(DEV_HS256_SECRET, false)
            .check_hs256_secret()
            .expect_err("the dev secret outside dev mode")
            .to_string();
        assert!(error.contains("TANDEM_JWT_HS256_SECRET"), "{error}");
        assert!(error.contains("TANDEM_DEV_MODE=true"), "{error}");
        assert!(!error.contains(DEV_HS256_SECRET), "{error}");
        with_secret(DEV_HS256_SECRET, true)
            .check_hs256_secret()
            .expect("the dev secret in dev mode");
        AuthSettings::default()
            .check_hs256_secret()
            .expect("no secret at all is fine here");
    }

    fn signed(secret: &str, claims: &serde_json::Value) -> String {
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("sign");
        format!("Bearer {token}")
    }

    #[tokio::test]
    async fn nbf_and_exp_are_checked_with_the_same_leeway() {
        let secret = "s".repeat(MIN_HS256_SECRET_BYTES);
        let auth = Authenticator::new(&with_secret(&secret, false)).expect("authenticator");
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let leeway = i64::try_from(CLOCK_LEEWAY_SECONDS).expect("small");
        let claims = |nbf: Option<i64>, exp: i64| {
            let mut claims = serde_json::json!({"sub": "u", "scope": WRITE_SCOPE, "exp": exp});
            if let Some(nbf) = nbf {
                claims["nbf"] = nbf.into();
            }
            claims
        };
        let verify = |claims: serde_json::Value| {
            let auth = auth.clone();
            let header = signed(&secret, &claims);
            async move { auth.authorize(Some(&header), WRITE_SCOPE).await }
        };
        // Inside the leeway either way: accepted.
        for (nbf, exp) in [
            (None, now + 60),
            (Some(now - 60), now + 60),
            (Some(now + leeway - 10), now + 60),
            (Some(now - 60), now - leeway + 10),
        ] {
            verify(claims(nbf, exp))
                .await
                .unwrap_or_else(|e| panic!("nbf {nbf:?} exp {exp}: {e}"));
        }
        // Beyond it: refused, saying why.
        let early = verify(claims(Some(now + leeway + 10), now + 600)).await;
        match early {
            Err(AuthError::Invalid(why)) => assert!(why.contains("not valid yet"), "{why}"),
            other => panic!("a token before its nbf: {other:?}"),
        }
        let late = verify(claims(None, now - leeway - 10)).await;
        match late {
            Err(AuthError::Invalid(why)) => assert!(why.contains("expired"), "{why}"),
            other => panic!("an expired token: {other:?}"),
        }
    }
}
