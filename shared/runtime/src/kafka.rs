//! Kafka client configuration shared by the relay and the consumer (feature `kafka`).
//!
//! Every librdkafka property can be set through `KAFKA_PROPERTIES`
//! (`key=value,key=value`), so the same binary talks to Amazon MSK (TLS + SASL/SCRAM, the
//! credentials read from the Secrets Manager secret `KAFKA_SASL_SECRET_ID`) and to a local
//! Kafka-protocol broker with its own quirks.

use std::time::Duration;

use anyhow::Context;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::types::RDKafkaErrorCode;
use serde::Deserialize;

use crate::config::{self, ConfigError};

/// Kafka settings, read from the environment.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// `KAFKA_BROKERS`: `host:port[,host:port…]`.
    pub brokers: String,
    /// `KAFKA_TOPIC` (default `tandem.documents`).
    pub topic: String,
    /// `KAFKA_PROPERTIES`: extra librdkafka properties; they override the defaults.
    pub properties: Vec<(String, String)>,
    /// `KAFKA_SASL_SECRET_ID`: a Secrets Manager secret `{"username","password"}`.
    pub sasl_secret_id: Option<String>,
    /// `KAFKA_TOPIC_PARTITIONS` (default 6) and `KAFKA_TOPIC_REPLICATION` (default 3): used
    /// when the topic does not exist yet and is created at start-up.
    pub partitions: i32,
    pub replication: i32,
}

impl KafkaSettings {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            brokers: config::required("KAFKA_BROKERS", "host:port of the Kafka bootstrap brokers")?,
            topic: config::optional("KAFKA_TOPIC").unwrap_or_else(|| "tandem.documents".to_owned()),
            properties: parse_properties(
                config::optional("KAFKA_PROPERTIES")
                    .as_deref()
                    .unwrap_or(""),
            )?,
            sasl_secret_id: config::optional("KAFKA_SASL_SECRET_ID"),
            partitions: config::parsed_or("KAFKA_TOPIC_PARTITIONS", 6)?,
            replication: config::parsed_or("KAFKA_TOPIC_REPLICATION", 3)?,
        })
    }

    /// The settings of a client that only reads the cluster's state (`tandem status`): the
    /// bootstrap brokers and topic as given, `KAFKA_PROPERTIES` and `KAFKA_SASL_SECRET_ID` from
    /// the environment as the services read them (so the same TLS and SASL settings reach MSK).
    pub fn for_brokers(brokers: String, topic: String) -> Result<Self, ConfigError> {
        Ok(Self {
            brokers,
            topic,
            properties: parse_properties(
                config::optional("KAFKA_PROPERTIES")
                    .as_deref()
                    .unwrap_or(""),
            )?,
            sasl_secret_id: config::optional("KAFKA_SASL_SECRET_ID"),
            partitions: 0,
            replication: 0,
        })
    }

    /// A client configuration with `defaults` overridden by `KAFKA_PROPERTIES`, plus the SASL
    /// credentials when a secret is configured.
    pub async fn client_config(&self, defaults: &[(&str, &str)]) -> anyhow::Result<ClientConfig> {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (key, value) in defaults {
            config.set(*key, *value);
        }
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        if let Some(secret_id) = &self.sasl_secret_id {
            let (username, password) = sasl_credentials(secret_id).await?;
            config
                .set("sasl.username", username)
                .set("sasl.password", password);
        }
        Ok(config)
    }

    /// Creates the topic unless it exists, with `max.message.bytes` =
    /// [`tandem_core::limits::KAFKA_MAX_MESSAGE_BYTES`] (an existing topic keeps its settings).
    pub async fn ensure_topic(&self) -> anyhow::Result<()> {
        let config = self.client_config(&[]).await?;
        let admin: AdminClient<DefaultClientContext> = config
            .create()
            .context("Failed to create a Kafka admin client")?;
        let max_message_bytes = tandem_core::limits::KAFKA_MAX_MESSAGE_BYTES.to_string();
        let topic = NewTopic::new(
            &self.topic,
            self.partitions,
            TopicReplication::Fixed(self.replication),
        )
        .set("max.message.bytes", &max_message_bytes);
        let options = AdminOptions::new()
            .operation_timeout(Some(Duration::from_secs(10)))
            .request_timeout(Some(Duration::from_secs(10)));
        let results = tokio::time::timeout(
            Duration::from_secs(15),
            admin.create_topics([&topic], &options),
        )
        .await
        .map_err(|_| anyhow::anyhow!("the broker did not answer CreateTopics within 15 s"))?
        .with_context(|| format!("Failed to create topic {}", self.topic))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => anyhow::bail!("Failed to create topic {name}: {code}"),
            }
        }
        Ok(())
    }
}

fn parse_properties(text: &str) -> Result<Vec<(String, String)>, ConfigError> {
    text.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| ConfigError::Invalid {
                    name: "KAFKA_PROPERTIES",
                    value: text.to_owned(),
                    reason: format!("{pair:?} is not key=value"),
                })
        })
        .collect()
}

#[derive(Deserialize)]
struct SaslSecret {
    username: String,
    password: String,
}

async fn sasl_credentials(secret_id: &str) -> anyhow::Result<(String, String)> {
    let text = crate::secrets::read_string(secret_id, "Kafka credentials").await?;
    let secret: SaslSecret = serde_json::from_str(&text)
        .with_context(|| format!("Secret {secret_id} is not {{\"username\",\"password\"}}"))?;
    Ok((secret.username, secret.password))
}

/// Hands encoded headers ([`tandem_core::event::EventHeaders::encode`]) to the Kafka client,
/// in their order.
pub fn owned_headers(headers: &[(&str, Vec<u8>)]) -> OwnedHeaders {
    headers.iter().fold(
        OwnedHeaders::new_with_capacity(headers.len()),
        |all, (key, value)| {
            all.insert(Header {
                key,
                value: Some(value.as_slice()),
            })
        },
    )
}

#[cfg(test)]
mod tests {
    use super::parse_properties;

    #[test]
    fn properties_parse_and_bad_pairs_are_named() {
        assert_eq!(
            parse_properties(" batch.num.messages=1, linger.ms = 5 ,").expect("valid"),
            vec![
                ("batch.num.messages".into(), "1".into()),
                ("linger.ms".into(), "5".into())
            ]
        );
        assert!(parse_properties("linger.ms").is_err());
        assert!(parse_properties("=1").is_err());
    }
}
