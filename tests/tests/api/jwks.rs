//! Production authentication: ES256 tokens verified against a JWKS served over real HTTP, the
//! way Cognito publishes its keys, with issuer and audience checks, key rotation, `nbf`, and how
//! often the JWKS is fetched (single flight, unknown key ids, periodic refresh, failures).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tandem_http::auth::{
    AuthError, AuthSettings, Authenticator, CLOCK_LEEWAY_SECONDS, WRITE_SCOPE,
};

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
    let hs = tandem_http::auth::mint_hs256(
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

/// A JWKS endpoint over real HTTP that counts the requests it gets, can be made to fail (500)
/// and answers after `delay`.
struct JwksServer {
    url: String,
    published: Arc<Mutex<Vec<Value>>>,
    fetches: Arc<AtomicUsize>,
    failing: Arc<AtomicBool>,
}

impl JwksServer {
    async fn start(keys: &[&SigningKey], delay: Duration) -> Self {
        let published = Arc::new(Mutex::new(
            keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>(),
        ));
        let fetches = Arc::new(AtomicUsize::new(0));
        let failing = Arc::new(AtomicBool::new(false));
        let (served, counted, fails) = (published.clone(), fetches.clone(), failing.clone());
        let router = axum::Router::new().route(
            "/.well-known/jwks.json",
            get(move || {
                counted.fetch_add(1, Ordering::SeqCst);
                let keys = served.lock().expect("lock").clone();
                let fail = fails.load(Ordering::SeqCst);
                async move {
                    tokio::time::sleep(delay).await;
                    if fail {
                        Err(axum::http::StatusCode::INTERNAL_SERVER_ERROR)
                    } else {
                        Ok(axum::Json(json!({ "keys": keys })))
                    }
                }
            }),
        );
        let base = tandem_tests::serve(router).await;
        Self {
            url: format!("{base}/.well-known/jwks.json"),
            published,
            fetches,
            failing,
        }
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    fn publish(&self, keys: &[&SigningKey]) {
        *self.published.lock().expect("lock") = keys.iter().map(|k| k.jwk.clone()).collect();
    }

    fn authenticator(&self, settings: AuthSettings) -> Authenticator {
        Authenticator::new(&AuthSettings {
            jwks_url: Some(self.url.clone()),
            issuer: Some("https://issuer.example".into()),
            audience: Some("tandem-client".into()),
            ..settings
        })
        .expect("authenticator")
    }
}

fn bearer(key: &SigningKey, claims: Value) -> String {
    format!("Bearer {}", token(key, claims))
}

/// The Write API over real HTTP, verifying tokens with `auth`.
async fn write_api(auth: Authenticator) -> (tandem_tests::TestApp, String) {
    let app = tandem_tests::spawn_app().await;
    let mut state = app.write_state.clone();
    state.auth = auth;
    let base = tandem_tests::serve(tandem_write::router(state)).await;
    (app, base)
}

async fn put(app: &tandem_tests::TestApp, base: &str, id: &str, bearer: &str) -> (u16, Value) {
    let response = app
        .client
        .put(format!("{base}/v1/c/{id}"))
        .header("authorization", bearer)
        .json(&json!({}))
        .send()
        .await
        .expect("send");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_token_before_its_nbf_is_a_401_saying_so_within_the_exp_leeway() {
    let key = signing_key("k1");
    let jwks = JwksServer::start(&[&key], Duration::ZERO).await;
    let (app, base) = write_api(jwks.authenticator(AuthSettings::default())).await;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let leeway = i64::try_from(CLOCK_LEEWAY_SECONDS).expect("small");
    let with = |nbf: i64, exp: i64| {
        let mut claims = claims("tandem:write", "tandem-client");
        claims["nbf"] = json!(nbf);
        claims["exp"] = json!(exp);
        bearer(&key, claims)
    };

    // Clock skew up to the leeway is tolerated on nbf as on exp.
    let (status, body) = put(&app, &base, "a", &with(now - 60, now + 300)).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = put(&app, &base, "b", &with(now + leeway - 10, now + 300)).await;
    assert_eq!(status, 201, "nbf inside the leeway: {body}");
    let (status, body) = put(&app, &base, "c", &with(now - 60, now - leeway + 10)).await;
    assert_eq!(status, 201, "exp inside the leeway: {body}");

    // Beyond it: 401 with a detail that says why.
    let (status, body) = put(&app, &base, "d", &with(now + leeway + 30, now + 600)).await;
    assert_eq!(status, 401, "{body}");
    let detail = body["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("not valid yet"), "{body}");
    let (status, body) = put(&app, &base, "e", &with(now - 60, now - leeway - 30)).await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("expired"),
        "{body}"
    );
}

#[tokio::test]
async fn concurrent_requests_needing_the_jwks_share_one_fetch() {
    let key = signing_key("k1");
    // A slow provider, so every request below arrives while the fetch is under way.
    let jwks = JwksServer::start(&[&key], Duration::from_millis(300)).await;
    // No rate limit on re-fetches: only the single flight keeps the count down.
    let auth = jwks.authenticator(AuthSettings {
        jwks_min_refetch: Duration::ZERO,
        ..AuthSettings::default()
    });
    let strangers: Vec<SigningKey> = (0..25)
        .map(|i| signing_key(&format!("ghost-{i}")))
        .collect();

    // Cold start: 25 known and 25 unknown key ids at once, one fetch.
    let mut headers: Vec<String> = strangers
        .iter()
        .map(|k| bearer(k, claims("tandem:write", "tandem-client")))
        .collect();
    headers.extend((0..25).map(|_| bearer(&key, claims("tandem:write", "tandem-client"))));
    let results = futures_util::future::join_all(
        headers
            .iter()
            .map(|h| auth.authorize(Some(h.as_str()), WRITE_SCOPE)),
    )
    .await;
    assert_eq!(jwks.fetches(), 1, "one fetch for 50 concurrent requests");
    for (i, result) in results.iter().enumerate() {
        if i < 25 {
            assert!(matches!(result, Err(AuthError::Invalid(_))), "{result:?}");
        } else {
            assert!(result.is_ok(), "{result:?}");
        }
    }

    // Warm: 50 concurrent tokens naming unknown key ids cause one re-fetch between them.
    let results = futures_util::future::join_all(
        headers[..25]
            .iter()
            .chain(headers[..25].iter())
            .map(|h| auth.authorize(Some(h.as_str()), WRITE_SCOPE)),
    )
    .await;
    assert_eq!(jwks.fetches(), 2, "one re-fetch for 50 unknown key ids");
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Err(AuthError::Invalid(_))))
    );
}

#[tokio::test]
async fn unknown_key_ids_do_not_refetch_within_the_min_interval() {
    let known = signing_key("k1");
    let jwks = JwksServer::start(&[&known], Duration::ZERO).await;
    let min_refetch = Duration::from_millis(1500);
    let auth = jwks.authenticator(AuthSettings {
        jwks_min_refetch: min_refetch,
        ..AuthSettings::default()
    });
    let verify = |key: &SigningKey| {
        let header = bearer(key, claims("tandem:write", "tandem-client"));
        let auth = auth.clone();
        async move { auth.authorize(Some(&header), WRITE_SCOPE).await }
    };

    assert!(matches!(
        verify(&signing_key("ghost-0")).await,
        Err(AuthError::Invalid(_))
    ));
    assert_eq!(jwks.fetches(), 1, "the first request fetches");
    for i in 1..20 {
        assert!(matches!(
            verify(&signing_key(&format!("ghost-{i}"))).await,
            Err(AuthError::Invalid(_))
        ));
    }
    // Even a key the provider has since published waits for the interval.
    let rotated = signing_key("k2");
    jwks.publish(&[&known, &rotated]);
    assert!(matches!(verify(&rotated).await, Err(AuthError::Invalid(_))));
    verify(&known).await.expect("known key");
    assert_eq!(jwks.fetches(), 1, "no re-fetch within the interval");

    tokio::time::sleep(min_refetch + Duration::from_millis(200)).await;
    verify(&rotated)
        .await
        .expect("after the interval the rotated-in key is fetched");
    assert_eq!(jwks.fetches(), 2);
    assert!(verify(&signing_key("ghost-x")).await.is_err());
    assert_eq!(jwks.fetches(), 2);
}

#[tokio::test]
async fn a_key_removed_from_the_jwks_is_refused_after_the_next_refresh() {
    let a = signing_key("key-a");
    let b = signing_key("key-b");
    let jwks = JwksServer::start(&[&a, &b], Duration::ZERO).await;
    let refresh = Duration::from_secs(2);
    let (app, base) = write_api(jwks.authenticator(AuthSettings {
        jwks_refresh: refresh,
        ..AuthSettings::default()
    }))
    .await;
    let token_a = bearer(&a, claims("tandem:write", "tandem-client"));

    let (status, body) = put(&app, &base, "doc", &token_a).await;
    assert_eq!(status, 201, "{body}");
    jwks.publish(&[&b]);
    // Until the refresh is due, the cached keys are used.
    let (status, body) = put(&app, &base, "doc", &token_a).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(jwks.fetches(), 1);

    tokio::time::sleep(refresh + Duration::from_millis(200)).await;
    let (status, body) = put(&app, &base, "doc", &token_a).await;
    assert_eq!(status, 401, "key A is gone after the refresh: {body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("unknown key id key-a"),
        "{body}"
    );
    assert_eq!(jwks.fetches(), 2);
    let (status, body) = put(
        &app,
        &base,
        "doc",
        &bearer(&b, claims("tandem:write", "tandem-client")),
    )
    .await;
    assert_eq!(status, 200, "key B is still published: {body}");
    assert_eq!(jwks.fetches(), 2);
}

#[tokio::test]
async fn a_failed_refresh_keeps_the_last_good_keys_for_a_bounded_time() {
    let key = signing_key("k1");
    let jwks = JwksServer::start(&[&key], Duration::ZERO).await;
    let refresh = Duration::from_secs(1);
    let min_refetch = Duration::from_secs(1);
    let max_stale = Duration::from_secs(3);
    let auth = jwks.authenticator(AuthSettings {
        jwks_refresh: refresh,
        jwks_min_refetch: min_refetch,
        jwks_max_stale: max_stale,
        ..AuthSettings::default()
    });
    let header = bearer(&key, claims("tandem:write", "tandem-client"));
    let verify = || auth.authorize(Some(&header), WRITE_SCOPE);

    verify().await.expect("first fetch");
    assert_eq!(jwks.fetches(), 1);
    jwks.failing.store(true, Ordering::SeqCst);
    tokio::time::sleep(refresh + Duration::from_millis(200)).await;
    verify()
        .await
        .expect("the refresh failed: the last good keys are kept");
    assert_eq!(jwks.fetches(), 2);
    verify().await.expect("still kept");
    assert_eq!(
        jwks.fetches(),
        2,
        "a failed refresh is retried after min_refetch"
    );

    // Past refresh + max_stale since the last good fetch, the keys are no longer trusted.
    tokio::time::sleep(max_stale).await;
    assert!(matches!(verify().await, Err(AuthError::KeysUnavailable(_))));
    assert_eq!(jwks.fetches(), 3);

    jwks.failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(min_refetch + Duration::from_millis(200)).await;
    verify().await.expect("the provider is back");
    assert_eq!(jwks.fetches(), 4);
}
