//! Bearer-token authentication: JWTs signed RS256/ES256 by an identity provider publishing a
//! JWKS (Amazon Cognito in production), or HS256 with a shared secret (local development).
//!
//! Scopes come from the OAuth `scope` claim (space-separated, as Cognito issues them) or a
//! `scp` claim (string or array). Writes need `tandem:write`; reads need `tandem:read` only when
//! `TANDEM_READ_REQUIRES_AUTH=true`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use tokio::sync::RwLock;

use crate::config::{self, ConfigError};

pub const WRITE_SCOPE: &str = "tandem:write";
pub const READ_SCOPE: &str = "tandem:read";

/// Authentication settings, read from the environment.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// HS256 shared secret (`TANDEM_JWT_HS256_SECRET`), for local development.
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
    /// Minimum time between two JWKS fetches caused by unknown key ids (30 s): a flood of
    /// tokens with made-up key ids must not become a flood of requests to the provider.
    pub jwks_min_refetch: Duration,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            hs256_secret: None,
            jwks_url: None,
            issuer: None,
            audience: None,
            read_requires_auth: false,
            jwks_min_refetch: Duration::from_secs(30),
        }
    }
}

impl AuthSettings {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            hs256_secret: config::secret("TANDEM_JWT_HS256_SECRET"),
            jwks_url: config::optional("TANDEM_JWKS_URL"),
            issuer: config::optional("TANDEM_JWT_ISSUER"),
            audience: config::optional("TANDEM_JWT_AUDIENCE"),
            read_requires_auth: config::flag("TANDEM_READ_REQUIRES_AUTH", false)?,
            ..Self::default()
        })
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

/// A JWKS, fetched lazily and re-fetched when a token names an unknown key.
struct Jwks {
    url: String,
    http: reqwest::Client,
    /// The keys and when they were last fetched.
    keys: RwLock<(KeyMap, Option<Instant>)>,
    min_refetch: Duration,
}

impl Jwks {
    async fn key(&self, kid: &str) -> Result<(DecodingKey, Algorithm), AuthError> {
        {
            let guard = self.keys.read().await;
            if let Some(found) = guard.0.get(kid) {
                return Ok(found.clone());
            }
            if guard.1.is_some_and(|at| at.elapsed() < self.min_refetch) {
                return Err(AuthError::Invalid(format!("unknown key id {kid}")));
            }
        }
        let fetched = self.fetch().await.map_err(AuthError::KeysUnavailable)?;
        let mut guard = self.keys.write().await;
        *guard = (fetched, Some(Instant::now()));
        guard
            .0
            .get(kid)
            .cloned()
            .ok_or_else(|| AuthError::Invalid(format!("unknown key id {kid}")))
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
    Jwks(Jwks),
    None,
}

/// Verifies bearer tokens. Cheap to clone.
#[derive(Clone)]
pub struct Authenticator {
    keys: Arc<Keys>,
    issuer: Option<String>,
    audience: Option<String>,
    pub read_requires_auth: bool,
}

impl Authenticator {
    pub fn new(settings: &AuthSettings) -> anyhow::Result<Self> {
        let keys = match (&settings.jwks_url, &settings.hs256_secret) {
            (Some(url), _) => Keys::Jwks(Jwks {
                url: url.clone(),
                http: reqwest::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .context("Failed to build the JWKS HTTP client")?,
                keys: RwLock::new((HashMap::new(), None)),
                min_refetch: settings.jwks_min_refetch,
            }),
            (None, Some(secret)) => {
                Keys::Hs256(DecodingKey::from_secret(secret.expose_secret().as_bytes()))
            }
            (None, None) => Keys::None,
        };
        Ok(Self {
            keys: Arc::new(keys),
            issuer: settings.issuer.clone(),
            audience: settings.audience.clone(),
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
        validation.leeway = 30;
        validation.set_required_spec_claims(&["exp"]);
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
        }
        let claims = jsonwebtoken::decode::<Claims>(token, &key, &validation)
            .map_err(|e| AuthError::Invalid(e.to_string()))?
            .claims;
        if let Some(expected) = &self.audience {
            let in_aud = claims
                .aud
                .as_ref()
                .is_some_and(|a| a.items().iter().any(|x| x == expected));
            let in_client = claims.client_id.as_deref() == Some(expected.as_str());
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
