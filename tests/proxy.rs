//! Black-box tests of the proxy path: injection, header replacement, Host spoofing, errors,
//! real TLS with HTTP/2 to the upstream, and graceful drain.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn injects_the_token_and_replaces_the_clients_authorization() {
    let provider = FakeProvider::start(300, false, None).await;
    let upstream = FakeUpstream::start().await;
    let tw = Tokenward::start(
        &format!("http://{}/base", upstream.addr()),
        &oauth2_keys(&provider, "scope = \"read\""),
    );
    tw.wait_ready().await;

    let client = reqwest::Client::new();
    let r = client
        .post(tw.url("/items?x=1"))
        .header("Authorization", "Bearer client-supplied-junk")
        .header("authorization", "Basic second-copy")
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    let auth = seen[0].all("authorization");
    let issued = provider.issued();
    assert_eq!(
        auth,
        vec![format!("Bearer {}", issued[0])],
        "exactly one Authorization, the provider's token"
    );
    assert_eq!(seen[0].all("host"), vec![upstream.addr().to_string()]);
    assert_eq!(seen[0].path, "/base/items?x=1");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["body_bytes"], 7);
    assert_eq!(provider.successful_calls(), 1);

    let mut secrets = issued;
    secrets.push(CLIENT_SECRET.into());
    tw.assert_no_leaks(&secrets).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn host_spoofing_and_absolute_uris_cannot_send_the_token_elsewhere() {
    let provider = FakeProvider::start(300, false, None).await;
    let upstream = FakeUpstream::start().await;
    let elsewhere = FakeUpstream::start().await;
    let tw = Tokenward::start(
        &format!("http://{}", upstream.addr()),
        &oauth2_keys(&provider, ""),
    );
    tw.wait_ready().await;

    // A spoofed Host header.
    let r = reqwest::Client::new()
        .get(tw.url("/a"))
        .header("Host", elsewhere.addr().to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // An absolute-form request target naming another host, sent raw.
    let proxy = tw.proxy;
    let target = elsewhere.addr();
    let response = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(proxy).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "GET http://{target}/steal HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    })
    .await
    .unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    assert!(
        elsewhere.seen().is_empty(),
        "the other host received {:?}",
        elsewhere.seen()
    );
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(s.all("host"), vec![upstream.addr().to_string()]);
    }
    assert_eq!(seen[1].path, "/steal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreachable_upstream_gives_a_json_502() {
    let provider = FakeProvider::start(300, false, None).await;
    let dead = free_port();
    let tw = Tokenward::start(&format!("http://{dead}"), &oauth2_keys(&provider, ""));
    tw.wait_ready().await;
    let r = reqwest::get(tw.url("/x")).await.unwrap();
    assert_eq!(r.status(), 502);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "upstream_unavailable");
    assert_eq!(body["route"], "api");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_requests_in_flight() {
    let (_provider, _upstream, mut tw) = oauth2_setup(300, "").await;
    tw.wait_ready().await;
    let slow = tokio::spawn(reqwest::get(tw.url("/slow/1500")));
    tokio::time::sleep(Duration::from_millis(300)).await;
    tw.signal("TERM");
    let r = slow.await.unwrap().unwrap();
    assert_eq!(r.status(), 200, "the request in flight completes");
    let code = tokio::task::block_in_place(|| tw.wait_exit(Duration::from_secs(5)));
    assert_eq!(code, Some(0));
    assert!(
        reqwest::get(tw.url("/after")).await.is_err(),
        "no longer accepting"
    );
}

mod tls {
    use super::*;
    use std::sync::Arc;

    /// An https upstream with its own CA, serving HTTP/1.1 and HTTP/2 by ALPN.
    async fn tls_upstream(
        dir: &std::path::Path,
    ) -> (std::net::SocketAddr, FakeUpstream, std::path::PathBuf) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "tokenward test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf_params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key).unwrap();
        let ca_path = dir.join("ca.pem");
        std::fs::write(&ca_path, ca.pem()).unwrap();

        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut server_config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls_pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap(),
            )
            .unwrap();
        server_config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let upstream = FakeUpstream::default();
        let router = upstream.router();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let router = router.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper_util::service::TowerToHyperService::new(router);
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
                });
            }
        });
        (addr, upstream, ca_path)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn https_upstream_gets_verified_tls_sni_and_http2() {
        let provider = FakeProvider::start(300, false, None).await;
        let certs = tempfile::tempdir().unwrap();
        let (addr, upstream, ca_path) = tls_upstream(certs.path()).await;

        let dir = tempfile::tempdir().unwrap();
        let (proxy, admin) = (free_port(), free_port());
        let body = config(
            proxy,
            admin,
            &format!("https://localhost:{}", addr.port()),
            &dir.path().join("state"),
            &oauth2_keys(&provider, ""),
        )
        .replace(
            "credential = \"api\"\n[credentials",
            &format!(
                "credential = \"api\"\nca_file = \"{}\"\n[credentials",
                ca_path.display()
            ),
        );
        let path = dir.path().join("tokenward.toml");
        std::fs::write(&path, body).unwrap();
        let tw = Tokenward::start_with(dir, path, proxy, admin);
        tw.wait_ready().await;

        let r = reqwest::get(tw.url("/secure")).await.unwrap();
        assert_eq!(r.status(), 200, "{}", tw.logs());
        let seen = upstream.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].version, "HTTP/2.0");
        assert_eq!(
            seen[0].all("authorization"),
            vec![format!("Bearer {}", provider.issued()[0])]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn https_upstream_with_an_untrusted_certificate_is_refused() {
        let provider = FakeProvider::start(300, false, None).await;
        let certs = tempfile::tempdir().unwrap();
        let (addr, upstream, _ca_path) = tls_upstream(certs.path()).await;
        // No ca_file: the system roots do not trust the test CA.
        let tw = Tokenward::start(
            &format!("https://localhost:{}", addr.port()),
            &oauth2_keys(&provider, ""),
        );
        tw.wait_ready().await;
        let r = reqwest::get(tw.url("/secure")).await.unwrap();
        assert_eq!(r.status(), 502);
        assert!(
            upstream.seen().is_empty(),
            "no request reached an unverified upstream"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rejected_token_is_replaced_once_and_the_request_replayed() {
    let (provider, upstream, tw) = oauth2_setup(300, "min_refresh_interval = \"1s\"").await;
    tw.wait_ready().await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The upstream revokes the first token long before its expiry.
    upstream.revoke(format!("Bearer {}", provider.issued()[0]));

    let client = reqwest::Client::new();
    let posts: Vec<_> = (0..20)
        .map(|i| {
            let c = client.clone();
            let url = tw.url(&format!("/orders/{i}"));
            tokio::spawn(
                async move { c.post(url).body(format!("order-{i}")).send().await.unwrap() },
            )
        })
        .collect();
    for (i, p) in posts.into_iter().enumerate() {
        let r = p.await.unwrap();
        assert_eq!(
            r.status(),
            200,
            "request {i} was not replayed; logs:\n{}",
            tw.logs()
        );
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(
            body["body_bytes"],
            format!("order-{i}").len(),
            "the replay carried the body"
        );
    }
    assert_eq!(
        provider.successful_calls(),
        2,
        "20 rejections caused one new token: {:?}",
        provider.calls()
    );
    let fresh = format!("Bearer {}", provider.issued()[1]);
    assert_eq!(
        upstream.seen().last().unwrap().all("authorization"),
        vec![fresh.as_str()]
    );

    // A body beyond the replay buffer cannot be sent twice: the 401 passes through, and the
    // token is still renewed for the next request.
    upstream.revoke(fresh);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let big = vec![b'x'; 200 * 1024];
    let r = client
        .post(tw.url("/upload"))
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        client.get(tw.url("/next")).send().await.unwrap().status(),
        200
    );
    assert_eq!(provider.successful_calls(), 3);
}

/// An upstream that rejects every token: the first rejection drops the token and one new one is
/// obtained; that one, rejected again within `min_refresh_interval`, is kept and the 401 passed
/// on, so the upstream cannot make tokenward hammer the provider.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upstream_that_rejects_every_token_cannot_make_tokenward_spin() {
    let (provider, upstream, tw) = oauth2_setup(300, "min_refresh_interval = \"2s\"").await;
    tw.wait_ready().await;
    upstream.reject_every_token();
    for _ in 0..30 {
        assert_eq!(reqwest::get(tw.url("/x")).await.unwrap().status(), 401);
    }
    assert_eq!(
        provider.call_count(),
        2,
        "one new token for the first rejection, none after: {:?}\n{}",
        provider.calls(),
        tw.logs()
    );
    let metrics = tw.get_text("/metrics").await;
    let kept = metric(
        &metrics,
        "tokenward_token_rejections_kept_total{credential=\"api\"}",
    );
    assert!(kept >= 30.0, "each later rejection is counted: {kept}");
    assert!(
        tw.logs()
            .contains("keeping it and passing the rejection on")
    );
}

/// A provider that revokes a token seconds after issuing it (key rotation, sessions revoked by
/// an admin): the first 401 drops even a young token, and the request is replayed with a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_young_token_revoked_by_the_provider_is_replaced_at_once() {
    let (provider, upstream, tw) = oauth2_setup(300, "").await;
    tw.wait_ready().await;
    let client = reqwest::Client::new();
    assert_eq!(client.get(tw.url("/a")).send().await.unwrap().status(), 200);
    // Revoked while younger than the default 5 s min_refresh_interval.
    upstream.revoke(format!("Bearer {}", provider.issued()[0]));
    for i in 0..20 {
        let r = client.get(tw.url(&format!("/b{i}"))).send().await.unwrap();
        assert_eq!(r.status(), 200, "request {i} after the revocation");
    }
    assert_eq!(provider.successful_calls(), 2, "{:?}", provider.calls());
    let fresh = format!("Bearer {}", provider.issued()[1]);
    assert_eq!(
        upstream.seen().last().unwrap().all("authorization"),
        vec![fresh.as_str()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn websocket_upgrades_pass_with_the_token() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let provider = FakeProvider::start(300, false, None).await;
    let (addr, heads) = upgrade_echo_upstream().await;
    let tw = Tokenward::start(&format!("http://{addr}"), &oauth2_keys(&provider, ""));
    tw.wait_ready().await;
    let mut s = tokio::net::TcpStream::connect(tw.proxy).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: app\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
    for msg in [&b"hello"[..], b"frames both ways"] {
        s.write_all(msg).await.unwrap();
        let mut got = Vec::new();
        while got.len() < msg.len() {
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "upgraded stream closed");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, msg);
    }
    let head = heads.lock().unwrap()[0].clone();
    assert!(
        head.contains(&format!("authorization: bearer {}", provider.issued()[0])),
        "{head}"
    );
    assert!(head.contains("upgrade: websocket"), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_bodies_stream_both_ways() {
    let (_provider, _upstream, tw) = oauth2_setup(300, "").await;
    tw.wait_ready().await;
    let client = reqwest::Client::new();
    let upload = vec![7u8; 12 << 20];
    let r = client
        .put(tw.url("/upload"))
        .body(upload)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["body_bytes"], 12 << 20);
    let r = client.get(tw.url("/bytes/9000000")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().len(), 9_000_000);
}
