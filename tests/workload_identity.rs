//! Workload identity without long-lived secrets: client assertions and JWT bearer grants read
//! from a (projected, rotating) file, and Google service-account keys signing their own
//! assertion. The real binary against fakes that verify every assertion and accept only the
//! current one (tests/common/assertion.rs).

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::assertion::*;
use common::*;

/// Short lifetimes refresh often; the margins keep a 3 s token servable.
const FAST: &str = "refresh_at = 0.5\nmin_refresh_interval = \"1s\"\nexpiry_margin = \"1s\"\n";

fn client_assertion_keys(idp: &FakeAssertionIdp, file: &Path, extra: &str) -> String {
    format!(
        "dialect = \"oauth2\"\ntoken_url = \"{}\"\nclient_auth = \"client_assertion\"\nclient_id = \"{}\"\nclient_assertion = {{ file = \"{}\" }}\n{extra}\n",
        idp.token_url(),
        idp.client_id(),
        file.display()
    )
}

fn jwt_bearer_keys(idp: &FakeAssertionIdp, file: &Path, extra: &str) -> String {
    format!(
        "dialect = \"oauth2\"\ngrant = \"jwt_bearer\"\ntoken_url = \"{}\"\nassertion = {{ file = \"{}\" }}\nscope = \"{}\"\n{extra}\n",
        idp.token_url(),
        file.display(),
        idp.scope()
    )
}

fn google_keys(key_file: &Path, extra: &str) -> String {
    format!(
        "dialect = \"google-service-account\"\nkey_file = {{ file = \"{}\" }}\nscope = \"{GCS_SCOPE}\"\n{extra}\n",
        key_file.display()
    )
}

const GCS_SCOPE: &str = "https://www.googleapis.com/auth/devstorage.read_only";

/// GETs `path` through tokenward; the status and the Authorization the upstream saw.
async fn through(client: &reqwest::Client, tw: &Tokenward, path: &str) -> (u16, Option<String>) {
    let r = client.get(tw.url(path)).send().await.unwrap();
    let status = r.status().as_u16();
    let body: serde_json::Value = r.json().await.unwrap_or_default();
    (
        status,
        body["headers"]["authorization"].as_str().map(String::from),
    )
}

fn refreshes(text: &str, outcome: &str) -> f64 {
    metric(
        text,
        &format!("tokenward_token_refreshes_total{{credential=\"api\",outcome=\"{outcome}\"}}"),
    )
}

/// Forces a refresh, waiting out the admin rate limit (one per `min_refresh_interval`).
async fn force_refresh(tw: &Tokenward) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = reqwest::Client::new()
            .post(tw.admin_url("/tokens/api/refresh"))
            .send()
            .await
            .unwrap();
        if r.status() != 429 || Instant::now() > deadline {
            return r.status().as_u16();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn check(config: &Path, env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(bin())
        .args(["check", "--config"])
        .arg(config)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_assertion_file_authenticates_client_credentials_and_refresh_grants() {
    let idp = FakeAssertionIdp::start(AssertionMode::ClientAssertion, 300).await;
    let upstream = FakeUpstream::start().await;
    let files = tempfile::tempdir().unwrap();
    let file = files.path().join("azure-identity-token");
    let a0 = idp.issue_accepted(600);
    write_atomically(&file, &a0);
    let http = reqwest::Client::new();

    // client_credentials: client_id, client_assertion_type and the file's JWT, nothing else.
    let tw = Tokenward::start(
        &format!("http://{}", upstream.addr()),
        &client_assertion_keys(&idp, &file, "grant = \"client_credentials\""),
    );
    tw.wait_ready().await;
    let (status, auth) = through(&http, &tw, "/cc").await;
    assert_eq!(status, 200);
    assert!(auth.unwrap().starts_with("Bearer wi-at-"));
    let calls = idp.calls();
    assert!(
        !calls.is_empty()
            && calls.iter().all(|c| c.status == 200
                && c.assertion == a0
                && c.grant_type == "client_credentials"),
        "{calls:?}"
    );

    // refresh_token: the same client authentication on every refresh, rotation kept.
    let bootstrap = format!("wi-bootstrap-{}", rand_hex());
    idp.add_refresh_token(&bootstrap);
    let tw2 = Tokenward::start(
        &format!("http://{}", upstream.addr()),
        &client_assertion_keys(
            &idp,
            &file,
            &format!("grant = \"refresh_token\"\nrefresh_token = \"{bootstrap}\""),
        ),
    );
    tw2.wait_ready().await;
    assert_eq!(through(&http, &tw2, "/rt").await.0, 200);
    assert_eq!(force_refresh(&tw2).await, 200);
    let refreshes: Vec<_> = idp
        .calls()
        .into_iter()
        .filter(|c| c.grant_type == "refresh_token")
        .collect();
    assert!(
        refreshes.len() >= 2
            && refreshes
                .iter()
                .all(|c| c.status == 200 && c.assertion == a0),
        "{refreshes:?}"
    );

    // The fake enforces it: an assertion it does not accept is refused and, read at each use,
    // the file's next content is used without a restart (the file change forces a refresh).
    let bad_file = files.path().join("not-yet-federated");
    let unaccepted = idp.issue_unaccepted();
    write_atomically(&bad_file, &unaccepted);
    let tw3 = Tokenward::start(
        &format!("http://{}", upstream.addr()),
        &client_assertion_keys(&idp, &bad_file, "grant = \"client_credentials\""),
    );
    tw3.wait_healthy().await;
    wait_for("the refusal", Duration::from_secs(10), || {
        idp.calls()
            .iter()
            .any(|c| c.assertion == unaccepted && c.status == 401)
    })
    .await;
    let (status, _) = through(&http, &tw3, "/bad").await;
    assert_eq!(status, 503);
    let state = tw3.get_json("/tokens/api").await;
    assert!(
        state["last_error"]
            .as_str()
            .unwrap_or_default()
            .contains("invalid_client"),
        "{state}"
    );
    let a1 = idp.issue_accepted(600);
    write_atomically(&bad_file, &a1);
    tw3.wait_ready().await;
    assert_eq!(through(&http, &tw3, "/good").await.0, 200);

    let mut secrets = vec![a0, a1, unaccepted, bootstrap];
    secrets.extend(idp.issued());
    for t in [&tw, &tw2, &tw3] {
        t.assert_no_leaks(&secrets).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_assertion_file_names_the_key_and_path_then_is_picked_up_when_it_appears() {
    let idp = FakeAssertionIdp::start(AssertionMode::ClientAssertion, 300).await;
    let upstream = FakeUpstream::start().await;
    let files = tempfile::tempdir().unwrap();
    let file = files.path().join("tokens").join("azure-identity-token");
    let keys = client_assertion_keys(&idp, &file, "");

    // `check` names file, key and path.
    let config = files.path().join("check.toml");
    std::fs::write(
        &config,
        common::config(
            free_port(),
            free_port(),
            "http://127.0.0.1:9",
            files.path(),
            &keys,
        ),
    )
    .unwrap();
    let (code, out) = check(&config, &[]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("`credentials.api.client_assertion`")
            && out.contains(&file.display().to_string()),
        "{out}"
    );

    // `run` says the same in /tokens, calls nobody, and uses the file once the kubelet writes it.
    let tw = Tokenward::start(&format!("http://{}", upstream.addr()), &keys);
    tw.wait_healthy().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let state = loop {
        let s = tw.get_json("/tokens/api").await;
        if s["last_error"].is_string() || Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let error = state["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("`client_assertion`") && error.contains(&file.display().to_string()),
        "{state}"
    );
    assert!(idp.calls().is_empty());
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    let a0 = idp.issue_accepted(600);
    write_atomically(&file, &a0);
    tw.wait_ready().await;
    assert_eq!(through(&reqwest::Client::new(), &tw, "/x").await.0, 200);
    let mut secrets = vec![a0];
    secrets.extend(idp.issued());
    tw.assert_no_leaks(&secrets).await;
}

/// The kubelet rotates the file while a token request is in flight: the fake, on receiving the
/// old assertion, swaps the file, revokes the old one and refuses the request. tokenward must
/// read the file again and retry once, so no refusal is ever fatal. (Without the retry, the
/// first answer is a fatal `invalid_client`/`invalid_grant`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refusal_right_after_a_rotation_is_retried_once_with_the_new_file() {
    for mode in [AssertionMode::ClientAssertion, AssertionMode::JwtBearer] {
        let idp = FakeAssertionIdp::start(mode, 300).await;
        let upstream = FakeUpstream::start().await;
        let files = tempfile::tempdir().unwrap();
        let file = files.path().join("token");
        let (old, new) = (idp.issue_accepted(600), idp.issue_unaccepted());
        write_atomically(&file, &old);
        idp.rotate_on_receipt(&old, &new, &file);
        let keys = match mode {
            AssertionMode::ClientAssertion => client_assertion_keys(&idp, &file, ""),
            AssertionMode::JwtBearer => jwt_bearer_keys(&idp, &file, ""),
        };
        let tw = Tokenward::start(&format!("http://{}", upstream.addr()), &keys);
        tw.wait_ready().await;
        let calls = idp.calls();
        let refused = if mode == AssertionMode::ClientAssertion {
            401
        } else {
            400
        };
        assert_eq!(calls[0].assertion, old, "{mode:?}");
        assert_eq!(calls[0].status, refused, "{mode:?}");
        assert_eq!(calls[1].assertion, new, "{mode:?}");
        assert_eq!(calls[1].status, 200, "{mode:?}: {calls:?}");
        let m = tw.get_text("/metrics").await;
        assert_eq!(
            refreshes(&m, "fatal_error"),
            0.0,
            "{mode:?}:\n{}",
            tw.logs()
        );
        assert!(refreshes(&m, "success") >= 1.0);
        assert!(
            tw.logs().contains("retrying once with the new one"),
            "{}",
            tw.logs()
        );
        assert_eq!(through(&reqwest::Client::new(), &tw, "/x").await.0, 200);
        let mut secrets = vec![old, new];
        secrets.extend(idp.issued());
        tw.assert_no_leaks(&secrets).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn assertion_rotated_under_load() {
    // 3 s tokens refreshed at half-life; assertions that expire in 20 s. Each rotation happens
    // while a token request is in flight (the fake takes 300 ms to judge one) and revokes the
    // previous assertion as soon as the new file is in place, so that request is refused and
    // must be retried with the new file; without that retry each rotation is a fatal error.
    let idp = FakeAssertionIdp::start(AssertionMode::ClientAssertion, 3).await;
    idp.set_delay(Duration::from_millis(300));
    let upstream = FakeUpstream::start().await;
    let files = tempfile::tempdir().unwrap();
    let file = files.path().join("azure-identity-token");
    let first = idp.issue_accepted(20);
    write_atomically(&file, &first);
    let tw = Tokenward::start(
        &format!("http://{}", upstream.addr()),
        &client_assertion_keys(&idp, &file, FAST),
    );
    tw.wait_ready().await;

    let done = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let http = reqwest::Client::new();
    let mut workers = Vec::new();
    for w in 0..4 {
        let (done, ok, failed, http) = (done.clone(), ok.clone(), failed.clone(), http.clone());
        let url = tw.url(&format!("/load/{w}"));
        workers.push(tokio::spawn(async move {
            // Bounded: at most 2000 requests per worker, stopped when the rotations end.
            for _ in 0..2000 {
                if done.load(Ordering::SeqCst) {
                    break;
                }
                match http.get(&url).timeout(Duration::from_secs(10)).send().await {
                    Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::SeqCst),
                    _ => failed.fetch_add(1, Ordering::SeqCst),
                };
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }
    let mut rotated = vec![first];
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        wait_for("a token request in flight", Duration::from_secs(10), || {
            idp.in_flight() > 0
        })
        .await;
        let next = idp.issue_accepted(20);
        write_atomically(&file, &next);
        idp.accept_only(&next);
        // Rotations are far apart in real life (the kubelet renews at 80 % of an hour): the
        // next one waits until this one has been used, so it never lands on the retry itself.
        wait_for(
            "a grant with the new assertion",
            Duration::from_secs(10),
            || idp.accepted_assertions().contains(&next),
        )
        .await;
        rotated.push(next);
    }
    // One more token lifetime on the last assertion.
    tokio::time::sleep(Duration::from_secs(3)).await;
    done.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    let short = |a: &str| a[a.len() - 6..].to_string();
    assert_eq!(
        failed,
        0,
        "{ok} ok, {failed} failed; rotations {:?}; calls {:?}",
        rotated.iter().map(|a| short(a)).collect::<Vec<_>>(),
        idp.calls()
            .iter()
            .map(|c| (c.status, c.reason.clone(), short(&c.assertion)))
            .collect::<Vec<_>>()
    );
    assert!(ok >= 200, "only {ok} requests in the run");
    let accepted = idp.accepted_assertions();
    assert!(
        accepted.contains(rotated.last().unwrap()),
        "the newest assertion was never used"
    );
    assert_eq!(accepted.len(), rotated.len(), "every assertion is used");
    // Each rotation caught a request in flight, refused and retried.
    let refused = idp.calls().iter().filter(|c| c.status == 401).count();
    assert!(refused >= 6, "{:?}", idp.calls());
    let m = tw.get_text("/metrics").await;
    assert_eq!(refreshes(&m, "fatal_error"), 0.0, "{}", tw.logs());
    assert!(refreshes(&m, "success") >= 6.0, "{m}");
    let mut secrets = rotated;
    secrets.extend(idp.issued());
    tw.assert_no_leaks(&secrets).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jwt_bearer_grant_reads_the_assertion_file_at_each_use() {
    let idp = FakeAssertionIdp::start(AssertionMode::JwtBearer, 300).await;
    let upstream = FakeUpstream::start().await;
    let files = tempfile::tempdir().unwrap();
    let file = files.path().join("partner-assertion");
    let a0 = idp.issue_accepted(600);
    write_atomically(&file, &a0);
    let tw = Tokenward::start(
        &format!("http://{}", upstream.addr()),
        &jwt_bearer_keys(&idp, &file, "min_refresh_interval = \"1s\""),
    );
    tw.wait_ready().await;
    let http = reqwest::Client::new();
    let (status, first) = through(&http, &tw, "/a").await;
    assert_eq!(status, 200);
    assert_eq!(idp.calls()[0].grant_type, JWT_BEARER_GRANT);

    let a1 = idp.issue_accepted(600);
    write_atomically(&file, &a1);
    idp.accept_only(&a1);
    wait_for(
        "a grant with the new assertion",
        Duration::from_secs(10),
        || idp.accepted_assertions().contains(&a1),
    )
    .await;
    // A refresh forced now reads the file again; nothing holds the old assertion.
    assert_eq!(force_refresh(&tw).await, 200);
    let (status, second) = through(&http, &tw, "/b").await;
    assert_eq!(status, 200);
    assert_ne!(first, second);
    assert!(
        idp.calls().iter().all(|c| c.status == 200),
        "{:?}",
        idp.calls()
    );
    let mut secrets = vec![a0, a1];
    secrets.extend(idp.issued());
    tw.assert_no_leaks(&secrets).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn google_service_account_assertion_is_verified_by_the_token_endpoint() {
    let subject = "admin@shop.example";
    let (sa0, sa1) = (ServiceAccount::new(0), ServiceAccount::new(1));
    let google = FakeGoogle::start(&sa0, GCS_SCOPE, Some(subject), 3600).await;
    let upstream = FakeUpstream::start().await;
    let files = tempfile::tempdir().unwrap();
    let key_file = files.path().join("key.json");
    write_atomically(&key_file, &sa0.key_json(&google.token_uri()));
    let tw = Tokenward::start(
        &format!("http://{}", upstream.addr()),
        &google_keys(
            &key_file,
            &format!("subject = \"{subject}\"\nmin_refresh_interval = \"1s\""),
        ),
    );
    tw.wait_ready().await;
    let http = reqwest::Client::new();
    let (status, auth) = through(&http, &tw, "/storage/v1/b").await;
    assert_eq!(status, 200);
    assert!(auth.unwrap().starts_with("Bearer ya29.fake-"));
    let call = &google.calls()[0];
    assert_eq!(call.status, 200, "{}", call.reason);
    assert_eq!(call.kid.as_deref(), Some(sa0.private_key_id.as_str()));
    assert_eq!(call.claims["iss"], sa0.client_email.as_str());
    assert_eq!(call.claims["sub"], subject);
    assert_eq!(call.claims["aud"], google.token_uri().as_str());

    // The fake enforces the signature: once Google knows only the new key, a token signed with
    // the old one is refused (fatal, and not retried while the key file is unchanged) ...
    google.trust_only(&sa1);
    assert_ne!(force_refresh(&tw).await, 200);
    let refused = google
        .calls()
        .into_iter()
        .filter(|c| c.status != 200)
        .count();
    assert_eq!(refused, 1, "{:?}", google.calls());
    assert!(google.calls().last().unwrap().reason.contains("kid"));
    // ... and the rotated key file is picked up without a restart.
    write_atomically(&key_file, &sa1.key_json(&google.token_uri()));
    wait_for(
        "a token signed with the new key",
        Duration::from_secs(10),
        || {
            google
                .calls()
                .iter()
                .any(|c| c.status == 200 && c.kid.as_deref() == Some(sa1.private_key_id.as_str()))
        },
    )
    .await;
    tw.wait_ready().await;
    assert_eq!(through(&http, &tw, "/after-rotation").await.0, 200);

    // token_url overrides the key's token_uri, and the assertion's aud follows it.
    let key_file2 = files.path().join("key-google-uri.json");
    write_atomically(
        &key_file2,
        &sa1.key_json("https://oauth2.googleapis.com/token"),
    );
    let tw2 = Tokenward::start(
        &format!("http://{}", upstream.addr()),
        &google_keys(
            &key_file2,
            &format!(
                "subject = \"{subject}\"\ntoken_url = \"{}\"",
                google.token_uri()
            ),
        ),
    );
    tw2.wait_ready().await;
    assert_eq!(through(&http, &tw2, "/override").await.0, 200);

    let mut secrets: Vec<String> = google.calls().into_iter().map(|c| c.assertion).collect();
    secrets.extend(google.issued());
    secrets.extend(sa0.pem_lines());
    secrets.extend(sa1.pem_lines());
    for t in [&tw, &tw2] {
        t.assert_no_leaks(&secrets).await;
    }
}

#[test]
fn check_validates_the_google_key_and_never_prints_it() {
    let dir = tempfile::tempdir().unwrap();
    let sa = ServiceAccount::new(0);
    let key_file = dir.path().join("key.json");
    let config = dir.path().join("tokenward.toml");
    std::fs::write(
        &config,
        common::config(
            free_port(),
            free_port(),
            "https://storage.googleapis.com",
            dir.path(),
            &google_keys(&key_file, ""),
        )
        .replace("[credentials.api]", "[credentials.gcs]")
        .replace("credential = \"api\"", "credential = \"gcs\""),
    )
    .unwrap();
    let good = sa.key_json("https://oauth2.googleapis.com/token");
    let leaks = |out: &str| {
        for line in sa.pem_lines() {
            assert!(!out.contains(&line), "the private key leaked:\n{out}");
        }
    };
    std::fs::write(&key_file, &good).unwrap();
    let (code, out) = check(&config, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&sa.client_email) && out.contains(&sa.private_key_id),
        "{out}"
    );
    leaks(&out);

    // A PEM whose DER is broken (its outer SEQUENCE header overwritten).
    let first = &sa.pem_lines()[0];
    let corrupt_pem = sa
        .private_key_pem
        .replace(first.as_str(), &format!("MAAA{}", &first[4..]));
    let bad_keys = [
        (
            good.replace("\"service_account\"", "\"authorized_user\""),
            "field `type`",
        ),
        (
            good.replace("\"private_key\"", "\"private_kee\""),
            "field `private_key` is missing",
        ),
        (
            good.replace("\"client_email\"", "\"email\""),
            "field `client_email` is missing",
        ),
        (
            good.replace(
                &serde_json::to_string(&sa.private_key_pem).unwrap(),
                &serde_json::to_string(&corrupt_pem).unwrap(),
            ),
            "field `private_key`",
        ),
        (good[..good.len() / 2].to_string(), "invalid JSON"),
    ];
    for (json, want) in bad_keys {
        std::fs::write(&key_file, &json).unwrap();
        let (code, out) = check(&config, &[]);
        assert_eq!(code, 2, "{want}: {out}");
        assert!(
            out.contains("`credentials.gcs.key_file`") && out.contains(want),
            "{want}: {out}"
        );
        leaks(&out);
    }

    // describe() — and so the chain identity — follows the key's identity.
    let other = ServiceAccount::new(1);
    std::fs::write(
        &key_file,
        other.key_json("https://oauth2.googleapis.com/token"),
    )
    .unwrap();
    let (code, out) = check(&config, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&other.private_key_id) && !out.contains(&sa.private_key_id),
        "{out}"
    );

    // The shipped examples pass `check` with their secrets read, pointed at test files.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::write(&key_file, &good).unwrap();
    let key = key_file.display().to_string();
    let (code, out) = check(
        &root.join("config/google-service-account.toml"),
        &[("TOKENWARD_CREDENTIALS__GCS__KEY_FILE__FILE", key.as_str())],
    );
    assert_eq!(code, 0, "{out}");
    leaks(&out);
    let token = dir.path().join("azure-identity-token");
    std::fs::write(&token, "eyJhbGciOiJSUzI1NiJ9.e30.c2ln").unwrap();
    let token = token.display().to_string();
    let (code, out) = check(
        &root.join("config/workload-identity-entra.toml"),
        &[(
            "TOKENWARD_CREDENTIALS__GRAPH__CLIENT_ASSERTION__FILE",
            token.as_str(),
        )],
    );
    assert_eq!(code, 0, "{out}");
}
