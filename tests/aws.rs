//! The `aws-sigv4` dialect, black-box: the binary in front of moto's server (a real, independent
//! SigV4 verifier with IAM authentication on), with credentials from config keys, the
//! environment, sts:AssumeRole at moto, and small loopback fakes of the container credentials
//! endpoint, IMDSv2 and STS AssumeRoleWithWebIdentity that enforce their protocols.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{any, get, put};
use common::moto::{Keys, Moto};
use common::*;
use serde_json::Value;

fn static_keys(moto: &Moto, keys: &Keys, extra: &str) -> String {
    let session = keys
        .session_token
        .as_ref()
        .map(|t| format!("session_token = \"{t}\"\n"))
        .unwrap_or_default();
    format!(
        "dialect = \"aws-sigv4\"\nregion = \"us-east-1\"\nservice = \"s3\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n{session}{extra}\n# moto at {}\n",
        keys.access_key_id,
        keys.secret_access_key,
        moto.url()
    )
}

fn random_bytes(n: usize) -> Vec<u8> {
    use rand::RngCore;
    let mut b = vec![0u8; n];
    rand::rng().fill_bytes(&mut b);
    b
}

async fn status_of(r: reqwest::RequestBuilder) -> u16 {
    r.send().await.unwrap().status().as_u16()
}

/// Creates `bucket` through tokenward.
async fn make_bucket(tw: &Tokenward, bucket: &str) {
    let client = reqwest::Client::new();
    let r = client
        .put(tw.url(&format!("/{bucket}")))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body = r.text().await.unwrap();
    assert_eq!(status, 200, "create bucket: {body}\nlogs:\n{}", tw.logs());
}

/// What the recording front saw of one request on its way to moto.
#[derive(Clone, Debug)]
struct Recorded {
    method: String,
    headers: Vec<(String, String)>,
    body_sha256: String,
}

impl Recorded {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A recording front between tokenward and moto: it passes each request on unchanged (Host
/// included) and keeps its head and the SHA-256 of its body, so the tests check what moto does
/// not (the body against `X-Amz-Content-Sha256`, every `x-amz-*` field signed, the date).
async fn recording_front(moto: &Moto) -> (String, Arc<Mutex<Vec<Recorded>>>) {
    type FrontState = (String, Arc<Mutex<Vec<Recorded>>>, reqwest::Client);
    async fn handler(
        State((moto, seen, client)): State<FrontState>,
        req: axum::extract::Request,
    ) -> axum::response::Response {
        use sha2::Digest;
        let method = req.method().clone();
        let target = req
            .uri()
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default();
        let headers = req.headers().clone();
        let body = axum::body::to_bytes(req.into_body(), 64 << 20)
            .await
            .unwrap();
        seen.lock().unwrap().push(Recorded {
            method: method.to_string(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_string()))
                .collect(),
            body_sha256: sha2::Sha256::digest(&body)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
        });
        let mut forward = client.request(method, format!("{moto}{target}"));
        for (k, v) in &headers {
            if !matches!(
                k.as_str(),
                "content-length" | "transfer-encoding" | "connection"
            ) {
                forward = forward.header(k, v);
            }
        }
        let answer = forward.body(body).send().await.unwrap();
        let mut out = axum::response::Response::builder().status(answer.status().as_u16());
        for (k, v) in answer.headers() {
            // Content-Length stays: a HEAD's names the object's size, not the empty body's.
            if !matches!(k.as_str(), "transfer-encoding" | "connection") {
                out = out.header(k, v);
            }
        }
        out.body(axum::body::Body::from(answer.bytes().await.unwrap()))
            .unwrap()
    }
    let seen = Arc::new(Mutex::new(Vec::new()));
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let addr = serve(Router::new().fallback(any(handler)).with_state((
        moto.url(),
        seen.clone(),
        client,
    )))
    .await;
    (format!("http://{addr}"), seen)
}

/// The checks moto leaves out, on one recorded request.
fn check_what_moto_does_not(r: &Recorded, access_key_id: &str) {
    let authorization = r.header("authorization").unwrap();
    assert!(
        authorization.starts_with(&format!("AWS4-HMAC-SHA256 Credential={access_key_id}/")),
        "{authorization}"
    );
    let signed: Vec<&str> = authorization
        .split("SignedHeaders=")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .split(';')
        .collect();
    for (name, _) in &r.headers {
        if name.starts_with("x-amz-") || name == "host" {
            assert!(
                signed.contains(&name.as_str()),
                "{name} is not signed: {signed:?}"
            );
        }
    }
    assert_eq!(
        r.header("x-amz-content-sha256"),
        Some(r.body_sha256.as_str()),
        "the signed payload hash is the body's"
    );
    let date = time::PrimitiveDateTime::parse(
        r.header("x-amz-date").unwrap(),
        time::macros::format_description!("[year][month][day]T[hour][minute][second]Z"),
    )
    .unwrap()
    .assume_utc();
    let skew = (time::OffsetDateTime::now_utc() - date).abs();
    assert!(
        skew < time::Duration::seconds(60),
        "X-Amz-Date is {skew} off"
    );
}

async fn tokens(tw: &Tokenward) -> Value {
    tw.get_json("/tokens/api").await
}

#[tokio::test]
async fn static_keys_sign_put_get_list_head_delete_and_replace_the_clients_authorization() {
    let moto = Moto::start().await;
    let keys = moto.user.clone();
    let (front, recorded) = recording_front(&moto).await;
    let tw = Tokenward::start(
        &front,
        &static_keys(&moto, &keys, "max_body_bytes = 1048576"),
    );
    tw.wait_ready().await;
    make_bucket(&tw, "bucket-one").await;
    let client = reqwest::Client::new();

    // A body over pingora's 64 KiB retry buffer, binary, with a bogus Authorization.
    let body = random_bytes(300 * 1024);
    let r = client
        .put(tw.url("/bucket-one/dir%20with%20space/d%C3%A9j%C3%A0.bin"))
        .header("authorization", "Bearer not-aws-at-all")
        .header("content-type", "application/octet-stream")
        .header("x-amz-meta-origin", "test")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    let status = r.status();
    assert_eq!(status, 200, "PUT: {}", r.text().await.unwrap());
    let got = client
        .get(tw.url("/bucket-one/dir%20with%20space/d%C3%A9j%C3%A0.bin"))
        .header(
            "authorization",
            "AWS4-HMAC-SHA256 Credential=AKIABOGUS/x, Signature=00",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.headers()["x-amz-meta-origin"], "test");
    assert!(
        got.bytes().await.unwrap() == body,
        "the body round-trips byte for byte"
    );
    let put = recorded
        .lock()
        .unwrap()
        .iter()
        .find(|r| r.method == "PUT" && r.header("x-amz-meta-origin").is_some())
        .cloned()
        .unwrap();
    check_what_moto_does_not(&put, &keys.access_key_id);
    // Another key outside the prefix, then a listing by a prefix with a space and non-ASCII.
    let r = client
        .put(tw.url("/bucket-one/other(1)+x"))
        .header("content-type", "application/octet-stream")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let list = client
        .get(tw.url("/bucket-one?list-type=2&prefix=dir%20with%20space%2Fd%C3%A9j"))
        .send()
        .await
        .unwrap();
    assert_eq!(list.status(), 200);
    let list = list.text().await.unwrap();
    assert!(
        list.contains("<Key>dir with space/déjà.bin</Key>") && !list.contains("other"),
        "{list}"
    );
    // A field that cannot be signed (not visible ASCII) is the client's 400, not a 500.
    let r = client
        .get(tw.url("/bucket-one?list-type=2"))
        .header(
            "x-amz-meta-utf",
            reqwest::header::HeaderValue::from_bytes("café".as_bytes()).unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // The same listing as forms and `urlencode` spell it (`+` for a space, raw `/` and `=`,
    // parameters in any order): the query goes upstream as it is signed.
    for query in [
        "prefix=dir+with+space%2Fd%C3%A9j&list-type=2",
        "list-type=2&delimiter=/&prefix=dir+with",
        "list-type=2&prefix=dir+with&start-after=a=b",
    ] {
        let r = client
            .get(tw.url(&format!("/bucket-one?{query}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{query}: {}", r.text().await.unwrap());
    }
    let head = client
        .head(tw.url("/bucket-one/dir%20with%20space/d%C3%A9j%C3%A0.bin"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], (300 * 1024).to_string());
    let deleted = client
        .delete(tw.url("/bucket-one/dir%20with%20space/d%C3%A9j%C3%A0.bin"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    assert_eq!(
        status_of(client.get(tw.url("/bucket-one/dir%20with%20space/d%C3%A9j%C3%A0.bin"))).await,
        404
    );

    // A signed body over the bound is refused before anything goes upstream.
    let before = moto.log().lines().count();
    let r = client
        .put(tw.url("/bucket-one/big"))
        .header("content-type", "application/octet-stream")
        .body(vec![7u8; 1024 * 1024 + 1])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let refusal: Value = r.json().await.unwrap();
    assert_eq!(refusal["error"], "body_too_large");
    assert_eq!(refusal["limit_bytes"], 1024 * 1024);
    assert_eq!(moto.log().lines().count(), before, "nothing reached moto");
    for r in recorded.lock().unwrap().iter() {
        check_what_moto_does_not(r, &keys.access_key_id);
    }

    let status = tokens(&tw).await;
    assert_eq!(status["source"], "config");
    assert_eq!(status["dialect"], "aws-sigv4");
    assert!(status["token"]["expires_at"].is_string());
    let state_dir = tw.dir.path().join("state");
    let persisted: Vec<_> = std::fs::read_dir(&state_dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    for name in &persisted {
        let text = std::fs::read_to_string(state_dir.join(name)).unwrap_or_default();
        assert!(
            !text.contains(&keys.secret_access_key),
            "the secret reached the state dir"
        );
    }
    tw.assert_no_leaks(std::slice::from_ref(&keys.secret_access_key))
        .await;
}

#[tokio::test]
async fn unsigned_payload_streams_a_20_mib_put_with_environment_credentials() {
    let moto = Moto::start().await;
    let keys = moto.user.clone();
    let tw = Tokenward::start_in_env(
        &moto.url(),
        "dialect = \"aws-sigv4\"\nregion = \"us-east-1\"\nservice = \"s3\"\npayload = \"unsigned\"\nmax_body_bytes = 1048576\n",
        &[
            ("AWS_ACCESS_KEY_ID", &keys.access_key_id),
            ("AWS_SECRET_ACCESS_KEY", &keys.secret_access_key),
        ],
    );
    tw.wait_ready().await;
    assert_eq!(tokens(&tw).await["source"], "environment");
    make_bucket(&tw, "big").await;
    // 20 MiB, twenty times the signed-payload bound: it streams, it is not buffered whole.
    let body = random_bytes(20 * 1024 * 1024);
    let client = reqwest::Client::new();
    let r = client
        .put(tw.url("/big/twenty"))
        .header("content-type", "application/octet-stream")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    let status = r.status();
    assert_eq!(status, 200, "{}", r.text().await.unwrap());
    let got = client.get(tw.url("/big/twenty")).send().await.unwrap();
    assert_eq!(got.status(), 200);
    assert!(got.bytes().await.unwrap() == body);
    tw.assert_no_leaks(std::slice::from_ref(&keys.secret_access_key))
        .await;
}

#[tokio::test]
async fn a_wrong_secret_gets_motos_signature_does_not_match_and_leaks_nothing() {
    let moto = Moto::start().await;
    let wrong = Keys {
        secret_access_key: "wJalrXUtnFEMIwrongSECRETexampleKEY0000000".into(),
        ..moto.user.clone()
    };
    let tw = Tokenward::start(&moto.url(), &static_keys(&moto, &wrong, ""));
    tw.wait_ready().await;
    let r = reqwest::Client::new()
        .put(tw.url("/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let body = r.text().await.unwrap();
    assert!(body.contains("SignatureDoesNotMatch"), "{body}");
    // The code is in S3's body only: the credentials are dropped for the next request, and
    // `/tokens` names the refusal by its code.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = tokens(&tw).await;
        if status["last_upstream_rejection"]["code"] == "SignatureDoesNotMatch"
            && status["token"]["generation"].as_u64() >= Some(2)
        {
            break;
        }
        assert!(Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tw.assert_no_leaks(std::slice::from_ref(&wrong.secret_access_key))
        .await;
}

#[tokio::test]
async fn assume_role_at_motos_sts_on_top_of_static_keys() {
    let moto = Moto::start().await;
    let keys = moto.user.clone();
    let extra = format!(
        "role_arn = \"{}\"\nsts_endpoint = \"{}\"",
        moto.role_arn,
        moto.url()
    );
    let tw = Tokenward::start(&moto.url(), &static_keys(&moto, &keys, &extra));
    tw.wait_ready().await;
    let status = tokens(&tw).await;
    assert_eq!(status["source"], "config+assume-role");
    // moto verified the AssumeRole signature, and now verifies requests signed with the
    // temporary credentials and their session token.
    make_bucket(&tw, "assumed").await;
    let client = reqwest::Client::new();
    let r = client
        .put(tw.url("/assumed/k"))
        .header("content-type", "application/octet-stream")
        .body("v")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        client
            .get(tw.url("/assumed/k"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "v"
    );
    assert!(
        moto.log().contains("POST / HTTP/1.1\" 200"),
        "AssumeRole at moto"
    );
    tw.assert_no_leaks(std::slice::from_ref(&keys.secret_access_key))
        .await;
}

/// One credentials answer of a fake: which of the two temporary sets, and when.
#[derive(Clone)]
struct Served {
    at: Instant,
    index: usize,
    expires: Instant,
}

#[derive(Clone)]
struct FakeCreds {
    temporary: Vec<Keys>,
    lifetime: Duration,
    served: Arc<Mutex<Vec<Served>>>,
    refused: Arc<Mutex<Vec<String>>>,
    /// What the fake demands (an authorization token, a web identity token).
    expected: Arc<Mutex<String>>,
}

impl FakeCreds {
    fn new(moto: &Moto, lifetime: Duration, expected: &str) -> Self {
        Self::serving(moto.temporary.clone(), lifetime, expected)
    }

    fn serving(temporary: Vec<Keys>, lifetime: Duration, expected: &str) -> Self {
        FakeCreds {
            temporary,
            lifetime,
            served: Arc::default(),
            refused: Arc::default(),
            expected: Arc::new(Mutex::new(expected.to_string())),
        }
    }

    /// The next set (alternating) and its expiration as RFC 3339.
    fn next(&self) -> (Keys, String) {
        let mut served = self.served.lock().unwrap();
        let index = served.len() % self.temporary.len();
        let now = Instant::now();
        served.push(Served {
            at: now,
            index,
            expires: now + self.lifetime,
        });
        let expiration = time::OffsetDateTime::from(SystemTime::now() + self.lifetime)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        (self.temporary[index].clone(), expiration)
    }

    fn json(&self) -> axum::response::Response {
        let (keys, expiration) = self.next();
        axum::Json(serde_json::json!({
            "Code": "Success",
            "AccessKeyId": keys.access_key_id,
            "SecretAccessKey": keys.secret_access_key,
            "Token": keys.session_token,
            "Expiration": expiration,
        }))
        .into_response()
    }

    fn refuse(&self, status: StatusCode, why: &str) -> axum::response::Response {
        self.refused.lock().unwrap().push(why.to_string());
        (status, why.to_string()).into_response()
    }

    fn served(&self) -> Vec<Served> {
        self.served.lock().unwrap().clone()
    }

    fn secrets(&self) -> Vec<String> {
        self.temporary
            .iter()
            .flat_map(|k| {
                [
                    k.secret_access_key.clone(),
                    k.session_token.clone().unwrap(),
                ]
            })
            .collect()
    }
}

async fn serve(router: Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    addr
}

/// The ECS / EKS Pod Identity endpoint: `Authorization` must be the token file's content.
async fn container_endpoint(fake: FakeCreds) -> std::net::SocketAddr {
    async fn handler(
        State(fake): State<FakeCreds>,
        headers: HeaderMap,
    ) -> axum::response::Response {
        let expected = fake.expected.lock().unwrap().clone();
        match headers.get("authorization").and_then(|v| v.to_str().ok()) {
            Some(v) if v == expected => fake.json(),
            _ => fake.refuse(
                StatusCode::UNAUTHORIZED,
                "authorization token missing or wrong",
            ),
        }
    }
    serve(Router::new().route("/creds", get(handler)).with_state(fake)).await
}

/// IMDSv2: a session token from a PUT that names its TTL, then GETs that present it.
async fn imds_endpoint(fake: FakeCreds) -> std::net::SocketAddr {
    const SESSION: &str = "imds-session-token-5f2e";
    async fn token(State(fake): State<FakeCreds>, headers: HeaderMap) -> axum::response::Response {
        let ttl = headers
            .get("x-aws-ec2-metadata-token-ttl-seconds")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok());
        match ttl {
            Some(1..=21600) => SESSION.into_response(),
            _ => fake.refuse(
                StatusCode::BAD_REQUEST,
                "token PUT without a valid TTL header",
            ),
        }
    }
    fn authorized(headers: &HeaderMap) -> bool {
        headers
            .get("x-aws-ec2-metadata-token")
            .is_some_and(|v| v == SESSION)
    }
    async fn roles(State(fake): State<FakeCreds>, headers: HeaderMap) -> axum::response::Response {
        if !authorized(&headers) {
            return fake.refuse(
                StatusCode::UNAUTHORIZED,
                "role listing without the session token",
            );
        }
        "app-role\n".into_response()
    }
    async fn role(State(fake): State<FakeCreds>, headers: HeaderMap) -> axum::response::Response {
        if !authorized(&headers) {
            return fake.refuse(
                StatusCode::UNAUTHORIZED,
                "credentials without the session token",
            );
        }
        fake.json()
    }
    serve(
        Router::new()
            .route("/latest/api/token", put(token))
            .route("/latest/meta-data/iam/security-credentials/", get(roles))
            .route(
                "/latest/meta-data/iam/security-credentials/app-role",
                get(role),
            )
            .with_state(fake),
    )
    .await
}

/// STS AssumeRoleWithWebIdentity, unsigned as AWS wants it: the form must carry the token file's
/// current content. (moto's own answers 500 to it once authentication is on.)
async fn web_identity_sts(fake: FakeCreds, role_arn: String) -> std::net::SocketAddr {
    async fn handler(
        State((fake, role_arn)): State<(FakeCreds, String)>,
        headers: HeaderMap,
        body: String,
    ) -> axum::response::Response {
        if headers.contains_key("authorization") {
            return fake.refuse(
                StatusCode::BAD_REQUEST,
                "AssumeRoleWithWebIdentity is unsigned",
            );
        }
        let form: std::collections::HashMap<String, String> =
            form_urlencoded::parse(body.as_bytes())
                .into_owned()
                .collect();
        let expected = fake.expected.lock().unwrap().clone();
        let field = |k: &str| form.get(k).map(String::as_str);
        if field("Action") != Some("AssumeRoleWithWebIdentity")
            || field("RoleArn") != Some(role_arn.as_str())
            || field("RoleSessionName").is_none_or(str::is_empty)
        {
            return fake.refuse(
                StatusCode::BAD_REQUEST,
                "malformed AssumeRoleWithWebIdentity",
            );
        }
        if field("WebIdentityToken") != Some(expected.as_str()) {
            return fake.refuse(
                StatusCode::BAD_REQUEST,
                "web identity token is not the file's current one",
            );
        }
        let (keys, expiration) = fake.next();
        format!(
            "<AssumeRoleWithWebIdentityResponse><AssumeRoleWithWebIdentityResult><Credentials><AccessKeyId>{}</AccessKeyId><SecretAccessKey>{}</SecretAccessKey><SessionToken>{}</SessionToken><Expiration>{expiration}</Expiration></Credentials></AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>",
            keys.access_key_id,
            keys.secret_access_key,
            keys.session_token.unwrap()
        )
        .into_response()
    }
    serve(
        Router::new()
            .route("/", any(handler))
            .with_state((fake, role_arn)),
    )
    .await
}

/// GETs `path` through tokenward at ~10 requests a second for `run`; returns the failures.
async fn load(tw: &Tokenward, path: &str, run: Duration) -> (usize, Vec<String>) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + run;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let (mut sent, mut failed) = (0, Vec::new());
    while Instant::now() < deadline && sent < 200 {
        tick.tick().await;
        sent += 1;
        match client.get(tw.url(path)).send().await {
            Ok(r) if r.status() == 200 => {}
            Ok(r) => failed.push(format!(
                "{}: {}",
                r.status(),
                r.text().await.unwrap_or_default()
            )),
            Err(e) => failed.push(e.to_string()),
        }
    }
    (sent, failed)
}

/// Every answer after the first came before the previous credentials expired.
fn renewed_before_expiry(served: &[Served]) {
    for pair in served.windows(2) {
        assert!(
            pair[1].at < pair[0].expires,
            "credentials were renewed only after they expired"
        );
    }
}

/// Temporary credentials as the engine's token, under load: short expirations from the fake,
/// rotating between two keys; every request succeeds and renewal comes before expiry.
async fn rotate_under_load(moto: &Moto, tw: &Tokenward, fake: &FakeCreds) {
    tw.wait_ready().await;
    make_bucket(tw, "rotation").await;
    let client = reqwest::Client::new();
    let r = client
        .put(tw.url("/rotation/k"))
        .header("content-type", "application/octet-stream")
        .body("v")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (sent, failed) = load(tw, "/rotation/k", Duration::from_secs(9)).await;
    assert!(
        failed.is_empty(),
        "{} of {sent} failed: {failed:?}",
        failed.len()
    );
    let served = fake.served();
    assert!(
        served.len() >= 3,
        "renewed at least twice in 9 s of 4 s credentials: {}",
        served.len()
    );
    assert!(
        served.iter().any(|s| s.index == 1),
        "the second key was served"
    );
    renewed_before_expiry(&served);
    assert!(
        fake.refused.lock().unwrap().is_empty(),
        "{:?}",
        fake.refused.lock().unwrap()
    );
    let _ = moto;
}

const SHORT: &str = "expiry_margin = \"1s\"\nmin_refresh_interval = \"1s\"\n";

#[tokio::test]
async fn container_credentials_rotate_before_expiry_under_load_and_single_flight() {
    let moto = Moto::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("eks-pod-identity-token");
    std::fs::write(&token_file, "pod-identity-token-abc\n").unwrap();
    let fake = FakeCreds::new(&moto, Duration::from_secs(4), "pod-identity-token-abc");
    let addr = container_endpoint(fake.clone()).await;
    let tw = Tokenward::start_in_env(
        &moto.url(),
        &format!("dialect = \"aws-sigv4\"\nregion = \"us-east-1\"\nservice = \"s3\"\n{SHORT}"),
        &[
            (
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                &format!("http://{addr}/creds"),
            ),
            (
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                token_file.to_str().unwrap(),
            ),
        ],
    );
    rotate_under_load(&moto, &tw, &fake).await;
    let status = tokens(&tw).await;
    assert_eq!(status["source"], "container");

    // Dropped credentials and 20 requests at once: one call to the endpoint.
    let before = fake.served().len();
    let r = reqwest::Client::new()
        .post(tw.admin_url("/tokens/api/invalidate"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let client = reqwest::Client::new();
    let all = futures_join(
        (0..20)
            .map(|_| {
                let c = client.clone();
                let url = tw.url("/rotation/k");
                tokio::spawn(async move { c.get(url).send().await.map(|r| r.status().as_u16()) })
            })
            .collect(),
    )
    .await;
    assert!(all.iter().all(|s| *s == 200), "{all:?}");
    assert_eq!(
        fake.served().len(),
        before + 1,
        "one flight for 20 requests"
    );
    let mut secrets = fake.secrets();
    secrets.push("pod-identity-token-abc".into());
    tw.assert_no_leaks(&secrets).await;
}

async fn futures_join(handles: Vec<tokio::task::JoinHandle<reqwest::Result<u16>>>) -> Vec<u16> {
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap().unwrap_or(0));
    }
    out
}

#[tokio::test]
async fn imds_v2_credentials_rotate_before_expiry_under_load() {
    let moto = Moto::start().await;
    let fake = FakeCreds::new(&moto, Duration::from_secs(4), "");
    let addr = imds_endpoint(fake.clone()).await;
    let tw = Tokenward::start_in_env(
        &moto.url(),
        &format!("dialect = \"aws-sigv4\"\nregion = \"us-east-1\"\nservice = \"s3\"\n{SHORT}"),
        &[(
            "AWS_EC2_METADATA_SERVICE_ENDPOINT",
            &format!("http://{addr}"),
        )],
    );
    rotate_under_load(&moto, &tw, &fake).await;
    assert_eq!(tokens(&tw).await["source"], "imds");
    tw.assert_no_leaks(&fake.secrets()).await;
}

#[tokio::test]
async fn web_identity_rereads_its_token_file_at_every_sts_call() {
    let moto = Moto::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "web-identity-jwt-one").unwrap();
    let fake = FakeCreds::new(&moto, Duration::from_secs(3600), "web-identity-jwt-one");
    let addr = web_identity_sts(fake.clone(), moto.role_arn.clone()).await;
    let tw = Tokenward::start_in_env(
        &moto.url(),
        &format!(
            "dialect = \"aws-sigv4\"\nregion = \"us-east-1\"\nservice = \"s3\"\nsts_endpoint = \"http://{addr}/\"\n{SHORT}"
        ),
        &[
            ("AWS_WEB_IDENTITY_TOKEN_FILE", token_file.to_str().unwrap()),
            ("AWS_ROLE_ARN", &moto.role_arn),
        ],
    );
    tw.wait_ready().await;
    assert_eq!(tokens(&tw).await["source"], "web-identity");
    make_bucket(&tw, "irsa").await;
    // The kubelet rotates the projected token: the next STS call presents the new one.
    std::fs::write(&token_file, "web-identity-jwt-two").unwrap();
    *fake.expected.lock().unwrap() = "web-identity-jwt-two".into();
    let r = reqwest::Client::new()
        .post(tw.admin_url("/tokens/api/refresh"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(fake.served().len(), 2);
    assert!(
        fake.refused.lock().unwrap().is_empty(),
        "{:?}",
        fake.refused.lock().unwrap()
    );
    assert_eq!(
        status_of(reqwest::Client::new().get(tw.url("/irsa?list-type=2"))).await,
        200
    );
    let mut secrets = fake.secrets();
    secrets.push("web-identity-jwt-two".into());
    tw.assert_no_leaks(&secrets).await;
}

/// An AWS JSON-protocol upstream (API Gateway, Lambda) that refuses one access key with 403
/// `x-amzn-ErrorType: ExpiredTokenException` and echoes the body's length to any other.
async fn refusing_upstream(refused_key: String) -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
    type UpState = (String, Arc<Mutex<Vec<String>>>);
    async fn handler(
        State((refused, seen)): State<UpState>,
        headers: HeaderMap,
        body: axum::body::Bytes,
    ) -> axum::response::Response {
        let auth = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let key = auth
            .split("Credential=")
            .nth(1)
            .and_then(|c| c.split('/').next())
            .unwrap_or_default()
            .to_string();
        seen.lock().unwrap().push(key.clone());
        if key == refused {
            return (
                StatusCode::FORBIDDEN,
                [(
                    "x-amzn-errortype",
                    "ExpiredTokenException:http://internal.amazon.com/",
                )],
                r#"{"message":"The security token included in the request is expired"}"#,
            )
                .into_response();
        }
        format!("{} bytes", body.len()).into_response()
    }
    let seen = Arc::new(Mutex::new(Vec::new()));
    let addr = serve(
        Router::new()
            .fallback(any(handler))
            .with_state((refused_key, seen.clone())),
    )
    .await;
    (addr, seen)
}

#[tokio::test]
async fn an_expired_token_answer_drops_the_credentials_and_replays_once_with_new_ones() {
    let keys = |n: usize| Keys {
        access_key_id: format!("ASIAFAKEKEY000000{n}"),
        secret_access_key: format!("fake-secret-{n}-{}", rand_hex()),
        session_token: Some(format!("fake-session-{n}-{}", rand_hex())),
    };
    let fake = FakeCreds::serving(
        vec![keys(0), keys(1)],
        Duration::from_secs(3600),
        "t0k3n-file",
    );
    let creds = container_endpoint(fake.clone()).await;
    let (upstream, seen) = refusing_upstream(fake.temporary[0].access_key_id.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "t0k3n-file").unwrap();
    let tw = Tokenward::start_in_env(
        &format!("http://{upstream}"),
        &format!(
            "dialect = \"aws-sigv4\"\nregion = \"eu-west-1\"\nservice = \"execute-api\"\n{SHORT}"
        ),
        &[
            (
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                &format!("http://{creds}/creds"),
            ),
            (
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                token_file.to_str().unwrap(),
            ),
        ],
    );
    tw.wait_ready().await;
    let r = reqwest::Client::new()
        .post(tw.url("/prod/orders"))
        .body(vec![b'x'; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.text().await.unwrap(),
        "1000 bytes",
        "the replay carries the whole body"
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            fake.temporary[0].access_key_id.clone(),
            fake.temporary[1].access_key_id.clone()
        ],
        "refused once, replayed once with the new key"
    );
    assert_eq!(fake.served().len(), 2);
    let status = tokens(&tw).await;
    assert_eq!(
        status["last_upstream_rejection"]["code"],
        "ExpiredTokenException"
    );
    tw.assert_no_leaks(&fake.secrets()).await;
}
