//! Reading secrets from AWS Secrets Manager: the database credentials, the Redis AUTH token and
//! the Kafka SASL credentials all come this way. The SDK's default chain (IRSA, the Lambda role,
//! `AWS_ENDPOINT_URL` for a local emulator) supplies the AWS credentials and region.

use anyhow::Context;

/// The `SecretString` of `secret_id`; `what` names it in errors ("Kafka credentials", say).
pub async fn read_string(secret_id: &str, what: &str) -> anyhow::Result<String> {
    let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let output = aws_sdk_secretsmanager::Client::new(&sdk)
        .get_secret_value()
        .secret_id(secret_id)
        .send()
        .await
        .with_context(|| format!("Failed to read {what} {secret_id} from Secrets Manager"))?;
    output
        .secret_string()
        .map(str::to_owned)
        .with_context(|| format!("Secret {secret_id} ({what}) has no SecretString"))
}
