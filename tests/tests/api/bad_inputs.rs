use reqwest::Method;
use serde_json::Value;
use tandem_tests::spawn_app;

/// One row per bad request: what is sent and what must come back.
struct Case {
    name: &'static str,
    method: Method,
    path: String,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    /// `None`: no Authorization header; `Some(scopes)`: a valid token with these scopes;
    /// `Some(["garbage"])`: an unverifiable token.
    auth: Option<&'static [&'static str]>,
    status: u16,
}

fn case(
    name: &'static str,
    method: Method,
    path: &str,
    content_type: Option<&'static str>,
    body: &[u8],
    status: u16,
) -> Case {
    Case {
        name,
        method,
        path: path.to_owned(),
        content_type,
        body: body.to_vec(),
        auth: Some(&["tandem:write"]),
        status,
    }
}

#[tokio::test]
async fn every_bad_write_gets_a_problem_json_error_and_writes_nothing() {
    let app = spawn_app().await;
    let json = Some("application/json");
    let merge = Some("application/merge-patch+json");
    let big = format!(r#"{{"x":"{}"}}"#, "a".repeat(256 * 1024));
    let cases = vec![
        case(
            "malformed JSON",
            Method::PUT,
            "/v1/c/a",
            json,
            b"{\"a\":",
            400,
        ),
        case("array body", Method::PUT, "/v1/c/a", json, b"[1,2]", 422),
        case("string body", Method::PUT, "/v1/c/a", json, b"\"x\"", 422),
        case("null body", Method::POST, "/v1/c", json, b"null", 422),
        case("empty body", Method::PUT, "/v1/c/a", json, b"", 400),
        case(
            "NUL in a string",
            Method::PUT,
            "/v1/c/a",
            json,
            br#"{"a":"x\u0000y"}"#,
            422,
        ),
        case(
            "NUL in a key",
            Method::POST,
            "/v1/c",
            json,
            br#"{"k\u0000":1}"#,
            422,
        ),
        case(
            "NUL in a merge patch",
            Method::PATCH,
            "/v1/c/a",
            merge,
            br#"{"z":["\u0000"]}"#,
            422,
        ),
        case(
            "number beyond f64",
            Method::PUT,
            "/v1/c/a",
            json,
            br#"{"n":1e400}"#,
            400,
        ),
        case(
            "uppercase collection",
            Method::PUT,
            "/v1/Orders/a",
            json,
            b"{}",
            400,
        ),
        case(
            "collection starting with a digit",
            Method::PUT,
            "/v1/1c/a",
            json,
            b"{}",
            400,
        ),
        case(
            "collection too long",
            Method::PUT,
            &format!("/v1/{}/a", "c".repeat(65)),
            json,
            b"{}",
            400,
        ),
        case(
            "id with a space",
            Method::PUT,
            "/v1/c/a%20b",
            json,
            b"{}",
            400,
        ),
        case("id with a plus", Method::PUT, "/v1/c/a+b", json, b"{}", 400),
        case(
            "id too long",
            Method::PUT,
            &format!("/v1/c/{}", "i".repeat(129)),
            json,
            b"{}",
            400,
        ),
        case("no content type", Method::PUT, "/v1/c/a", None, b"{}", 415),
        case(
            "text content type",
            Method::PUT,
            "/v1/c/a",
            Some("text/plain"),
            b"{}",
            415,
        ),
        case(
            "merge-patch type on PUT",
            Method::PUT,
            "/v1/c/a",
            merge,
            b"{}",
            415,
        ),
        case(
            "json type on PATCH",
            Method::PATCH,
            "/v1/c/a",
            json,
            b"{}",
            415,
        ),
        case(
            "array merge patch",
            Method::PATCH,
            "/v1/c/a",
            merge,
            b"[]",
            422,
        ),
        case(
            "body over 256 KiB",
            Method::PUT,
            "/v1/c/a",
            json,
            big.as_bytes(),
            413,
        ),
        case(
            "GET on the write API",
            Method::GET,
            "/v1/c/a",
            None,
            b"",
            405,
        ),
        case(
            "PUT on a collection",
            Method::PUT,
            "/v1/c",
            json,
            b"{}",
            405,
        ),
        case("unknown route", Method::PUT, "/v2/c/a", json, b"{}", 404),
        case("nested path", Method::PUT, "/v1/c/a/b", json, b"{}", 404),
        Case {
            auth: None,
            ..case("no token", Method::PUT, "/v1/c/a", json, b"{}", 401)
        },
        Case {
            auth: Some(&["garbage"]),
            ..case("forged token", Method::PUT, "/v1/c/a", json, b"{}", 401)
        },
        Case {
            auth: Some(&["tandem:read"]),
            ..case("read-only token", Method::PUT, "/v1/c/a", json, b"{}", 403)
        },
        Case {
            auth: Some(&[]),
            ..case(
                "token without scopes",
                Method::DELETE,
                "/v1/c/a",
                None,
                b"",
                403,
            )
        },
    ];
    for case in cases {
        let mut request = app.client.request(
            case.method.clone(),
            format!("{}{}", app.write_url, case.path),
        );
        match case.auth {
            None => {}
            Some(["garbage"]) => {
                let forged = tandem_http::auth::mint_hs256(
                    "not-the-secret",
                    "mallory",
                    &["tandem:write"],
                    std::time::Duration::from_secs(60),
                    None,
                )
                .expect("token");
                request = request.bearer_auth(forged);
            }
            Some(scopes) => request = request.bearer_auth(app.token_with(scopes)),
        }
        if let Some(ct) = case.content_type {
            request = request.header("content-type", ct);
        }
        let response = request.body(case.body.clone()).send().await.expect("send");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.expect("body");
        assert_eq!(status, case.status, "{}: {text}", case.name);
        assert_eq!(
            headers["content-type"], "application/problem+json",
            "{}",
            case.name
        );
        let problem: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}: {text}", case.name));
        assert_eq!(problem["status"], case.status, "{}", case.name);
        for field in ["type", "title", "detail"] {
            assert!(
                problem[field].is_string(),
                "{}: no {field} in {text}",
                case.name
            );
        }
        for leak in ["SELECT", "INSERT", "postgres", "panicked", "src/"] {
            assert!(
                !text.contains(leak),
                "{}: leaks {leak:?}: {text}",
                case.name
            );
        }
        if status == 405 {
            assert!(
                headers.contains_key("allow"),
                "{}: 405 without Allow",
                case.name
            );
        }
        if status == 401 {
            assert!(
                headers["www-authenticate"]
                    .to_str()
                    .expect("ascii")
                    .starts_with("Bearer"),
                "{}",
                case.name
            );
        }
    }
    assert_eq!(app.count("documents").await, 0);
    assert_eq!(app.count("outbox").await, 0);
}

#[tokio::test]
async fn bad_reads_and_idempotency_keys_get_problem_json_errors() {
    let app = spawn_app().await;
    let cases: Vec<(&str, String, u16)> = vec![
        ("limit zero", "/v1/c?limit=0".into(), 400),
        ("limit too big", "/v1/c?limit=1001".into(), 400),
        ("limit not a number", "/v1/c?limit=ten".into(), 400),
        ("bad cursor", "/v1/c?after=!!!".into(), 400),
        ("unknown parameter", "/v1/c?limt=5".into(), 400),
        ("bad collection", "/v1/C".into(), 400),
        ("bad id", "/v1/c/a%2Fb".into(), 400),
        ("absent document", "/v1/c/nothing".into(), 404),
        ("unknown route", "/nope".into(), 404),
    ];
    for (name, path, status) in cases {
        let response = app.get(&path).await;
        assert_eq!(response.status().as_u16(), status, "{name}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json",
            "{name}"
        );
    }
    let post = app
        .client
        .post(format!("{}/v1/c", app.read_url))
        .json(&serde_json::json!({}))
        .send()
        .await
        .expect("send");
    assert_eq!(post.status(), 405);
    assert!(
        post.headers()["allow"]
            .to_str()
            .expect("ascii")
            .contains("GET")
    );

    let long_key = "k".repeat(256);
    for key in [long_key.as_str(), ""] {
        let response = app
            .write(Method::POST, "/v1/c")
            .header("idempotency-key", key)
            .json(&serde_json::json!({}))
            .send()
            .await
            .expect("send");
        assert_eq!(response.status(), 400, "key of {} chars", key.len());
    }
}

#[tokio::test]
async fn reads_can_be_configured_to_require_the_read_scope() {
    let app = tandem_tests::spawn_app_with(tandem_tests::TestAppOptions {
        read_requires_auth: true,
        ..Default::default()
    })
    .await;
    app.put("c", "a", &serde_json::json!({})).await;
    assert_eq!(app.get("/v1/c/a").await.status(), 401);
    let with = |scopes: &[&str]| {
        app.client
            .get(format!("{}/v1/c/a", app.read_url))
            .bearer_auth(app.token_with(scopes))
            .send()
    };
    assert_eq!(with(&["tandem:write"]).await.expect("send").status(), 403);
    assert_eq!(with(&["tandem:read"]).await.expect("send").status(), 200);
    // Operations endpoints stay open for probes.
    assert_eq!(
        app.client
            .get(format!("{}/healthz", app.read_url))
            .send()
            .await
            .expect("send")
            .status(),
        200
    );
}
