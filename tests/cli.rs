//! Black-box tests of the command line: `check` on every shipped config and on broken ones,
//! `token`, and the `dev` demo.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;

fn tokenward(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("run tokenward")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn shipped_configs() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("toml" | "yaml" | "yml")
            ) {
                out.push(p);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    walk(&root.join("config"), &mut out);
    let compose = root.join("deploy/compose/tokenward.toml");
    if compose.exists() {
        out.push(compose);
    }
    out.sort();
    out
}

/// The tokenward.toml embedded in the Kubernetes ConfigMap, written out so `check` can read it.
fn configmap_config(dir: &Path) -> PathBuf {
    use figment::providers::Format;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let data: std::collections::BTreeMap<String, String> = figment::Figment::from(
        figment::providers::Yaml::file_exact(root.join("deploy/kubernetes/configmap.yaml")),
    )
    .extract_inner("data")
    .expect("deploy/kubernetes/configmap.yaml has a data section");
    let path = dir.join("configmap-tokenward.toml");
    std::fs::write(&path, &data["tokenward.toml"]).unwrap();
    path
}

/// The tokenward.toml of every ConfigMap in a multi-document example of deploy/kubernetes/
/// (workload identity, EKS), each written out so `check` can read it.
fn embedded_configs(dir: &Path, example: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("deploy/kubernetes").join(example)).unwrap();
    let configs: Vec<PathBuf> = text
        .split("\n---\n")
        .filter(|doc| doc.contains("kind: ConfigMap"))
        .filter_map(|doc| doc.split_once("  tokenward.toml: |\n"))
        .enumerate()
        .map(|(i, (_, body))| {
            let config = body
                .lines()
                .map(|l| l.strip_prefix("    ").unwrap_or(l))
                .collect::<Vec<_>>()
                .join("\n");
            let path = dir.join(format!("{example}-{i}-tokenward.toml"));
            std::fs::write(&path, config).unwrap();
            path
        })
        .collect();
    assert!(
        !configs.is_empty(),
        "{example} has a ConfigMap with tokenward.toml"
    );
    configs
}

#[test]
fn check_passes_on_every_shipped_config() {
    let dir = tempfile::tempdir().unwrap();
    let mut configs = shipped_configs();
    configs.push(configmap_config(dir.path()));
    configs.extend(embedded_configs(dir.path(), "workload-identity.yaml"));
    let eks = embedded_configs(dir.path(), "aws-eks.yaml");
    assert_eq!(eks.len(), 2, "IRSA and Pod Identity");
    configs.extend(eks);
    assert!(configs.len() >= 10, "{configs:?}");
    for path in configs {
        let out = tokenward(&[
            "check",
            "--skip-secrets",
            "--config",
            path.to_str().unwrap(),
        ]);
        let (stdout, stderr) = text(&out);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}:\n{stdout}\n{stderr}",
            path.display()
        );
        assert!(stdout.contains(": OK"), "{stdout}");
        assert!(stdout.contains("route "), "{stdout}");
    }
}

fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

const VALID: &str = r#"
[[routes]]
name = "a"
listen = "127.0.0.1:18080"
upstream = "http://127.0.0.1:19000"
credential = "a"
[credentials.a]
dialect = "oauth2"
token_url = "http://127.0.0.1:19001/token"
client_id = "x"
client_secret = "inline-secret-value"
"#;

#[test]
fn check_rejects_bad_configs_naming_file_key_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "typo.toml",
            &VALID.replace("client_id", "clientid"),
            &["credentials.a", "clientid"],
        ),
        (
            "listen.toml",
            &VALID.replace("127.0.0.1:18080", "not-an-address"),
            &["routes[0].listen", "not an IP:port"],
        ),
        (
            "dialect.toml",
            &VALID.replace("\"oauth2\"", "\"oauth3\""),
            &["credentials.a.dialect", "unknown dialect", "oauth2"],
        ),
        (
            "missing.toml",
            &VALID.replace("credential = \"a\"\n[", "credential = \"b\"\n["),
            &["routes[0].credential", "no credential named \"b\""],
        ),
        (
            "scheme.toml",
            &VALID.replace("http://127.0.0.1:19000", "ftp://x"),
            &["routes[0].upstream", "scheme"],
        ),
        ("syntax.toml", "[[routes]\nname=", &["syntax.toml"]),
        (
            "grant.toml",
            &format!("{VALID}grant = \"refresh_token\"\n"),
            &["credentials.a.refresh_token", "bootstrap"],
        ),
        (
            "duration.toml",
            &format!("{VALID}expiry_margin = \"soon\"\n"),
            &["credentials.a.expiry_margin", "duration"],
        ),
    ];
    for (name, body, wants) in cases {
        let path = write(dir.path(), name, body);
        let out = tokenward(&["check", "--config", path.to_str().unwrap()]);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert!(
            stderr.contains(name),
            "{name}: error does not name the file: {stderr}"
        );
        for want in *wants {
            assert!(
                stderr.contains(want),
                "{name}: missing {want:?} in: {stderr}"
            );
        }
        assert!(
            !stderr.contains("inline-secret-value"),
            "{name}: secret in error: {stderr}"
        );
    }
    let out = tokenward(&[
        "check",
        "--config",
        dir.path().join("absent.toml").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).1.contains("absent.toml"));
}

#[test]
fn check_reads_secrets_unless_told_not_to() {
    let dir = tempfile::tempdir().unwrap();
    let body = VALID.replace(
        "\"inline-secret-value\"",
        "{ file = \"/nonexistent/tokenward/secret\" }",
    );
    let path = write(dir.path(), "secret.toml", &body);
    let out = tokenward(&["check", "--config", path.to_str().unwrap()]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("credentials.a.client_secret")
            && stderr.contains("/nonexistent/tokenward/secret"),
        "{stderr}"
    );
    let out = tokenward(&[
        "check",
        "--skip-secrets",
        "--config",
        path.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0));
}

const CUSTOM: &str = r#"
[[routes]]
name = "a"
listen = "127.0.0.1:18080"
upstream = "http://127.0.0.1:19000"
credential = "a"
[credentials.a]
dialect = "custom"
secrets = { password = { file = "PASSWORD_FILE" }, api_key = { env = "TOKENWARD_CLI_TEST_ABSENT_API_KEY" } }
[credentials.a.login]
url = "http://127.0.0.1:19001/login"
json = { user = "me", password = "{secret.password}", key = "{secret.api_key}", at = { number = "{now_ms}" } }
[credentials.a.login.response]
access_token = "/token"
"#;

#[test]
fn check_names_each_secret_of_a_custom_credential_by_its_own_name() {
    let dir = tempfile::tempdir().unwrap();
    let pw = write(dir.path(), "pw", "custom-password-value");
    let path = write(
        dir.path(),
        "custom.toml",
        &CUSTOM.replace("PASSWORD_FILE", pw.to_str().unwrap()),
    );
    let out = tokenward(&["check", "--config", path.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    assert!(
        stdout.contains("secret secrets.password: ") && stdout.contains("(readable)"),
        "{stdout}"
    );
    assert!(
        stderr.contains("`credentials.a.secrets.api_key`")
            && stderr.contains("TOKENWARD_CLI_TEST_ABSENT_API_KEY"),
        "{stderr}"
    );
    let out = tokenward(&[
        "check",
        "--skip-secrets",
        "--config",
        path.to_str().unwrap(),
    ]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    for name in ["password", "api_key"] {
        assert!(
            stdout.contains(&format!("secret secrets.{name}: ")),
            "{name}: {stdout}"
        );
    }
    assert!(!stdout.contains("custom-password-value"), "{stdout}");
}

#[test]
fn check_rejects_typed_json_values_that_cannot_be_their_type() {
    let dir = tempfile::tempdir().unwrap();
    let body = CUSTOM
        .replace("PASSWORD_FILE", "/nonexistent")
        .replace(
            "at = { number = \"{now_ms}\" }",
            "at = { number = \"soon\" }, on = { bool = \"{now_s}\" }, n = { number = 5 }, o = { object = \"x\" }",
        );
    let path = write(dir.path(), "typed.toml", &body);
    let out = tokenward(&[
        "check",
        "--skip-secrets",
        "--config",
        path.to_str().unwrap(),
    ]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    for (key, reason) in [
        ("credentials.a.login.json.at", "number"),
        ("credentials.a.login.json.on", "boolean"),
        ("credentials.a.login.json.n", "template"),
        ("credentials.a.login.json.o", "table"),
    ] {
        let line = stderr
            .lines()
            .find(|l| l.contains(&format!("`{key}`")))
            .unwrap_or_else(|| panic!("no error for {key}: {stderr}"));
        assert!(
            line.contains("typed.toml") && line.contains(reason),
            "{line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_command_prints_expiry_and_only_shows_the_token_when_asked() {
    let provider = FakeProvider::start(600, true, None).await;
    let dir = tempfile::tempdir().unwrap();
    let body = config(
        free_port(),
        free_port(),
        "http://127.0.0.1:1",
        &dir.path().join("state"),
        &oauth2_keys(&provider, ""),
    );
    let path = write(dir.path(), "t.toml", &body);
    let p = path.to_str().unwrap().to_string();
    let out = tokio::task::spawn_blocking(move || tokenward(&["token", "api", "--config", &p]))
        .await
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("expires") && stdout.contains("via login"),
        "{stdout}"
    );
    for secret in provider.issued() {
        assert!(
            !stdout.contains(&secret) && !stderr.contains(&secret),
            "token printed without --show"
        );
    }
    // The rotated refresh token it received was persisted, like `run` would.
    let state = std::fs::read_to_string(dir.path().join("state/api.json")).unwrap();
    assert!(state.contains(provider.valid_refresh().unwrap().as_str()));

    let p = path.to_str().unwrap().to_string();
    let out =
        tokio::task::spawn_blocking(move || tokenward(&["token", "api", "--config", &p, "--show"]))
            .await
            .unwrap();
    let (stdout, _) = text(&out);
    let last = stdout.lines().last().unwrap();
    assert!(
        provider.issued().iter().any(|t| t == last),
        "--show prints the token last: {stdout}"
    );

    let p = path.to_str().unwrap().to_string();
    let out = tokio::task::spawn_blocking(move || tokenward(&["token", "nope", "--config", &p]))
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).1.contains("no credential named \"nope\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_injects_and_then_refreshes_a_token() {
    let (proxy, admin, echo, provider) = (free_port(), free_port(), free_port(), free_port());
    let mut child = Command::new(bin())
        .args(["dev", "--token-lifetime", "4s"])
        .args([
            "--proxy-listen",
            &proxy.to_string(),
            "--admin-listen",
            &admin.to_string(),
        ])
        .args([
            "--echo-listen",
            &echo.to_string(),
            "--provider-listen",
            &provider.to_string(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let started = Instant::now();
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 2 && started.elapsed() < Duration::from_secs(15) {
        if let Ok(r) = client.get(format!("http://{proxy}/hello")).send().await {
            if r.status() == 200 {
                let body: serde_json::Value = r.json().await.unwrap();
                let auth = body["headers"]["authorization"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                assert!(auth.starts_with("Bearer ey"), "{body}");
                seen.insert(auth);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        seen.len(),
        2,
        "dev mode should show a token and its refresh within seconds"
    );
}

#[test]
fn check_names_the_redis_store_validates_its_key_and_warns_when_unreachable() {
    let server = common::redis::RedisServer::start_with(&["--requirepass", "redis-pw-71c3"]);
    let dir = tempfile::tempdir().unwrap();
    let key = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    let key_file = write(dir.path(), "store-key", &format!("{key}\n"));
    let config = |url: &str, key_source: &str| {
        format!("{VALID}\n[state]\nredis = \"{url}\"\nencryption_key = {key_source}\n")
    };
    let good_url = format!("redis://:redis-pw-71c3@127.0.0.1:{}/0", server.port());
    let key_source = format!("{{ file = \"{}\" }}", key_file.display());
    let path = write(dir.path(), "redis.toml", &config(&good_url, &key_source));
    let out = tokenward(&["check", "--config", path.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let at = format!("redis at 127.0.0.1:{}/0", server.port());
    assert!(
        stdout.contains(&format!("state     {at} (shared by replicas)")),
        "{stdout}"
    );
    assert!(stdout.contains("readable, 32 bytes"), "{stdout}");
    assert!(stdout.contains("reachable (PING"), "{stdout}");
    assert!(!stderr.contains("warning"), "{stderr}");
    for leak in ["redis-pw-71c3", key] {
        assert!(!stdout.contains(leak) && !stderr.contains(leak), "{leak}");
    }

    // A wrong password and a stopped server are warnings, not errors: replicas start without
    // Redis. The reason never quotes the password.
    let wrong = write(
        dir.path(),
        "wrong.toml",
        &config(
            &good_url.replace("redis-pw-71c3", "wrong-pw-0a9e"),
            &key_source,
        ),
    );
    let out = tokenward(&["check", "--config", wrong.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("warning: `state.redis`") && stderr.contains("unreachable"),
        "{stderr}"
    );
    assert!(!stdout.contains("wrong-pw-0a9e") && !stderr.contains("wrong-pw-0a9e"));
    drop(server);
    let started = Instant::now();
    let out = tokenward(&["check", "--config", path.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stderr.contains("unreachable"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(10));

    // --skip-secrets reads no key and does not connect.
    let out = tokenward(&[
        "check",
        "--skip-secrets",
        "--config",
        path.to_str().unwrap(),
    ]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("not read: --skip-secrets"), "{stdout}");
    assert!(!stderr.contains("unreachable"), "{stderr}");

    // A key file holding the wrong number of bytes is an error naming the key, not the value.
    let short = "00112233445566778899aabbccddeeff";
    std::fs::write(&key_file, short).unwrap();
    let out = tokenward(&["check", "--config", path.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("redis.toml") && stderr.contains("`state.encryption_key`"),
        "{stderr}"
    );
    assert!(!stderr.contains(short), "{stderr}");

    // Without a key, or with another scheme: config errors naming the key.
    let path = write(
        dir.path(),
        "nokey.toml",
        &format!("{VALID}\n[state]\nredis = \"{good_url}\"\n"),
    );
    let out = tokenward(&["check", "--config", path.to_str().unwrap()]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("state.encryption_key"), "{stderr}");
    assert!(!stderr.contains("redis-pw-71c3"), "{stderr}");
    let path = write(
        dir.path(),
        "scheme.toml",
        &config(&good_url.replace("redis://", "https://"), &key_source),
    );
    let out = tokenward(&["check", "--config", path.to_str().unwrap()]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("state.redis") && stderr.contains("scheme"),
        "{stderr}"
    );
    assert!(!stderr.contains("redis-pw-71c3"), "{stderr}");
}

#[test]
fn check_reads_the_redis_password_secret_and_never_prints_it() {
    let server = common::redis::RedisServer::start_with(&["--requirepass", "redis-pw-9d2f"]);
    let dir = tempfile::tempdir().unwrap();
    let key = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    let pw_file = write(dir.path(), "redis-pw", "redis-pw-9d2f\n");
    let config = |password: &str| {
        format!(
            "{VALID}\n[state]\nredis = \"redis://127.0.0.1:{}/0\"\nencryption_key = \"{key}\"\n\
             redis_password = {password}\n",
            server.port()
        )
    };
    let file_pw = format!("{{ file = \"{}\" }}", pw_file.display());
    let path = write(dir.path(), "redis.toml", &config(&file_pw));
    let out = tokenward(&["check", "--config", path.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("redis password:"), "{stdout}");
    // PING answered only because the password from the file authenticated.
    assert!(stdout.contains("reachable (PING"), "{stdout}");
    assert!(!stderr.contains("warning"), "{stderr}");
    let literal = write(dir.path(), "literal.toml", &config("\"redis-pw-9d2f\""));
    for args in [
        vec!["check", "--config", path.to_str().unwrap()],
        vec!["check", "--config", literal.to_str().unwrap()],
        vec![
            "check",
            "--skip-secrets",
            "--config",
            literal.to_str().unwrap(),
        ],
    ] {
        let out = tokenward(&args);
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stdout}\n{stderr}");
        assert!(
            !stdout.contains("redis-pw-9d2f") && !stderr.contains("redis-pw-9d2f"),
            "{args:?}: {stdout}\n{stderr}"
        );
    }

    // An unreadable password is a config error naming the key, not a mere warning.
    std::fs::remove_file(&pw_file).unwrap();
    let out = tokenward(&["check", "--config", path.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("redis.toml") && stderr.contains("`state.redis_password`"),
        "{stderr}"
    );

    // A password in the URL too is an error naming the key, quoting neither.
    let both = write(
        dir.path(),
        "both.toml",
        &config("\"redis-pw-9d2f\"").replace("redis://127", "redis://:redis-pw-9d2f@127"),
    );
    let out = tokenward(&["check", "--config", both.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(stderr.contains("state.redis_password"), "{stderr}");
    assert!(!stdout.contains("redis-pw-9d2f") && !stderr.contains("redis-pw-9d2f"));
}

#[test]
fn check_names_the_file_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "files.toml",
        &format!("{VALID}\n[state]\ndir = \"/var/lib/tokenward\"\n"),
    );
    let out = tokenward(&["check", "--config", path.to_str().unwrap()]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stdout.contains("state     files in /var/lib/tokenward"),
        "{stdout}"
    );
}
