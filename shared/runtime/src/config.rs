//! Typed configuration, read once at start-up from the environment.
//!
//! Every binary builds its settings from these helpers so that a bad or missing variable is
//! reported with its name and what was expected, before any request is served. Every variable a
//! binary reads is listed in `README.md`; `scripts/env_contract.py` extracts them from these
//! helpers' call sites, and the deployment checks hold the manifests and the Lambda definitions
//! to exactly that set.

use std::str::FromStr;
use std::time::Duration;

use secrecy::SecretString;

/// A configuration problem, always naming the variable at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("environment variable {name} is required: {hint}")]
    Missing {
        name: &'static str,
        hint: &'static str,
    },
    #[error("environment variable {name}={value:?} is invalid: {reason}")]
    Invalid {
        name: &'static str,
        value: String,
        reason: String,
    },
}

/// Variables renamed so that every name says what it belongs to (`DATABASE_`, `REDIS_`,
/// `KAFKA_` for a dependency's client; `RELAY_`, `CONSUMER_` for one worker; `TANDEM_` for the
/// service's own behaviour) and its unit: `(new name, old name)`. The old name still works
/// in this release, with a warning; it stops working in the next one (README, "Renamed
/// settings"). `scripts/env_contract.py` reads this table.
pub const RENAMED: &[(&str, &str)] = &[
    ("REDIS_TTL_SECONDS", "CACHE_TTL_SECONDS"),
    ("RELAY_OUTBOX_RETENTION_HOURS", "OUTBOX_RETENTION_HOURS"),
];

/// Reads an optional variable; an empty value counts as unset. A variable that was renamed is
/// also read under its old name ([`RENAMED`]) when the new one is unset.
pub fn optional(name: &'static str) -> Option<String> {
    let read = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    read(name).or_else(|| {
        let (_, old) = RENAMED.iter().find(|(new, _)| *new == name)?;
        let value = read(old)?;
        tracing::warn!(
            old = *old,
            new = name,
            "a setting is configured under its old name; rename it, the old name stops working in the next release"
        );
        Some(value)
    })
}

/// Reads a required variable.
pub fn required(name: &'static str, hint: &'static str) -> Result<String, ConfigError> {
    optional(name).ok_or(ConfigError::Missing { name, hint })
}

/// Reads an optional variable and parses it.
pub fn parsed<T>(name: &'static str) -> Result<Option<T>, ConfigError>
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    optional(name)
        .map(|value| {
            value.trim().parse::<T>().map_err(|e| ConfigError::Invalid {
                name,
                reason: e.to_string(),
                value,
            })
        })
        .transpose()
}

/// Reads an optional variable and parses it, falling back to `default`.
pub fn parsed_or<T>(name: &'static str, default: T) -> Result<T, ConfigError>
where
    T: FromStr,
    T::Err: std::fmt::Display,
{
    Ok(parsed(name)?.unwrap_or(default))
}

/// Reads a boolean flag (`true/false/1/0/yes/no`).
pub fn flag(name: &'static str, default: bool) -> Result<bool, ConfigError> {
    match optional(name) {
        None => Ok(default),
        Some(value) => match value.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            _ => Err(ConfigError::Invalid {
                name,
                value,
                reason: "expected true or false".into(),
            }),
        },
    }
}

/// Reads a duration given in milliseconds.
pub fn millis_or(name: &'static str, default: Duration) -> Result<Duration, ConfigError> {
    Ok(parsed::<u64>(name)?
        .map(Duration::from_millis)
        .unwrap_or(default))
}

/// Reads a secret: never logged, never printed by `Debug`.
pub fn secret(name: &'static str) -> Option<SecretString> {
    optional(name).map(SecretString::from)
}

/// Settings every HTTP service shares.
#[derive(Debug, Clone)]
pub struct ServiceSettings {
    /// The region name reported in `X-Tandem-Region` and in events (`TANDEM_REGION`).
    pub region: String,
    /// TCP port of the plain HTTP server (`PORT`); unused under Lambda.
    pub port: u16,
    /// Address to bind (`BIND_ADDRESS`), `0.0.0.0` in containers, `127.0.0.1` locally.
    pub bind_address: std::net::IpAddr,
    /// A request still running after this long is answered 503 and its work dropped
    /// (`TANDEM_REQUEST_TIMEOUT_MS`, default 10000).
    pub request_timeout: Duration,
}

impl ServiceSettings {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            region: optional("TANDEM_REGION").unwrap_or_else(|| "region1".to_owned()),
            port: parsed_or("PORT", 8080)?,
            bind_address: parsed_or("BIND_ADDRESS", std::net::IpAddr::from([0, 0, 0, 0]))?,
            request_timeout: millis_or("TANDEM_REQUEST_TIMEOUT_MS", Duration::from_secs(10))?,
        })
    }
}
