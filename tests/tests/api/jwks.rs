//! Production authentication: ES256 tokens verified against a JWKS served over real HTTP, the
//! way Cognito publishes its keys, with issuer and audience checks and key rotation.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tandem_shared::auth::{AuthError, AuthSettings, Authenticator, WRITE_SCOPE};

/// A P-256 signing key and its public JWK.
struct SigningKey {
    kid: String,
    encoding: EncodingKey,
    jwk: Value,
}

fn signing_key(kid: &str) -> SigningKey {
    let pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
            .expect("keygen");
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).expect("key");
    // Uncompressed point: 0x04 || x (32 bytes) || y (32 bytes).
    let point = pair.public_key().as_ref().to_vec();
    SigningKey {
        kid: kid.to_owned(),
        encoding: EncodingKey::from_ec_der(pkcs8.as_ref()),
        jwk: json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        }),
    }
}

fn token(key: &SigningKey, claims: Value) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(key.kid.clone());
    jsonwebtoken::encode(&header, &claims, &key.encoding).expect("sign")
}

fn claims(scope: &str, aud: &str) -> Value {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    json!({"sub": "cognito-user", "iss": "https://issuer.example", "client_id": aud, "scope": scope, "iat": now, "exp": now + 300})
}

#[tokio::test]
async fn es256_tokens_verify_against_a_rotating_jwks() {
    let first = signing_key("k1");
    let published = Arc::new(Mutex::new(vec![first.jwk.clone()]));
    let served = published.clone();
    let router = axum::Router::new().route(
        "/.well-known/jwks.json",
        get(move || {
            let keys = served.lock().expect("lock").clone();
            async move { axum::Json(json!({ "keys": keys })) }
        }),
    );
    let base = tandem_tests::serve(router).await;
    let auth = Authenticator::new(&AuthSettings {
        jwks_url: Some(format!("{base}/.well-known/jwks.json")),
        issuer: Some("https://issuer.example".into()),
        audience: Some("tandem-client".into()),
        jwks_min_refetch: Duration::ZERO,
        ..AuthSettings::default()
    })
    .expect("authenticator");
    let bearer = |t: String| format!("Bearer {t}");

    let principal = auth
        .authorize(
            Some(&bearer(token(
                &first,
                claims("tandem:write", "tandem-client"),
            ))),
            WRITE_SCOPE,
        )
        .await
        .expect("valid token");
    assert_eq!(principal.subject, "cognito-user");

    let wrong_scope = auth
        .authorize(
            Some(&bearer(token(
                &first,
                claims("tandem:read", "tandem-client"),
            ))),
            WRITE_SCOPE,
        )
        .await;
    assert!(matches!(wrong_scope, Err(AuthError::InsufficientScope(_))));
    let wrong_audience = auth
        .authorize(
            Some(&bearer(token(&first, claims("tandem:write", "other")))),
            WRITE_SCOPE,
        )
        .await;
    assert!(matches!(wrong_audience, Err(AuthError::Invalid(_))));
    let mut foreign_issuer = claims("tandem:write", "tandem-client");
    foreign_issuer["iss"] = json!("https://evil.example");
    assert!(matches!(
        auth.authorize(Some(&bearer(token(&first, foreign_issuer))), WRITE_SCOPE)
            .await,
        Err(AuthError::Invalid(_))
    ));
    let mut expired = claims("tandem:write", "tandem-client");
    expired["exp"] = json!(time::OffsetDateTime::now_utc().unix_timestamp() - 3600);
    assert!(matches!(
        auth.authorize(Some(&bearer(token(&first, expired))), WRITE_SCOPE)
            .await,
        Err(AuthError::Invalid(_))
    ));

    // A key the JWKS does not publish is refused; an HS256 token is refused (algorithm pinned).
    let stranger = signing_key("k-unknown");
    assert!(
        auth.authorize(
            Some(&bearer(token(
                &stranger,
                claims("tandem:write", "tandem-client")
            ))),
            WRITE_SCOPE
        )
        .await
        .is_err()
    );
    let hs = tandem_shared::auth::mint_hs256(
        "secret",
        "x",
        &["tandem:write"],
        Duration::from_secs(60),
        None,
    )
    .expect("hs");
    assert!(
        auth.authorize(Some(&bearer(hs)), WRITE_SCOPE)
            .await
            .is_err()
    );

    // Rotation: the provider publishes a new key; a token naming it makes the verifier
    // re-fetch the JWKS (rate-limited; the limit is zero in this test) and then verifies.
    let second = signing_key("k2");
    published.lock().expect("lock").push(second.jwk.clone());
    let principal = auth
        .authorize(
            Some(&bearer(token(
                &second,
                claims("tandem:write", "tandem-client"),
            ))),
            WRITE_SCOPE,
        )
        .await
        .expect("a token signed with the rotated-in key verifies");
    assert_eq!(principal.subject, "cognito-user");
}

#[tokio::test]
async fn an_unreachable_jwks_is_a_503_not_a_401() {
    let app = tandem_tests::spawn_app().await;
    let auth = Authenticator::new(&AuthSettings {
        jwks_url: Some(format!(
            "http://127.0.0.1:{}/jwks.json",
            tandem_tests::free_port()
        )),
        ..AuthSettings::default()
    })
    .expect("authenticator");
    let key = signing_key("k1");
    let mut state = app.write_state.clone();
    state.auth = auth;
    let base = tandem_tests::serve(tandem_write::router(state)).await;
    let response = app
        .client
        .put(format!("{base}/v1/c/a"))
        .bearer_auth(token(&key, claims("tandem:write", "x")))
        .json(&json!({}))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
}
