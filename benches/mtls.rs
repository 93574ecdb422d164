//! Criterion benchmark of what a client certificate adds to each upstream request: building the
//! pingora peer (the rotation check, at most one `stat` per second, and the certificate's
//! pool key). Run: `cargo bench --bench mtls`.

use std::net::SocketAddr;
use std::path::Path;

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use tokenward::config::Config;
use tokenward::proxy::upstream::UpstreamTarget;

fn target(dir: &Path, with_cert: bool) -> UpstreamTarget {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["tokenward".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(dir.join("c.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("k.pem"), key.serialize_pem()).unwrap();
    let tls = if with_cert {
        format!(
            "tls_client_cert = {{ file = \"{}\" }}\ntls_client_key = {{ file = \"{}\" }}\n",
            dir.join("c.pem").display(),
            dir.join("k.pem").display()
        )
    } else {
        String::new()
    };
    let text = format!(
        "[[routes]]\nname = \"r\"\nlisten = \"127.0.0.1:1\"\nupstream = \"https://10.0.0.7:8443\"\ncredential = \"c\"\n{tls}\
         [credentials.c]\ndialect = \"oauth2\"\ntoken_url = \"https://idp.example.com/t\"\nclient_id = \"i\"\nclient_secret = \"s\"\n"
    );
    let config = Config::parse(Path::new("bench.toml"), &text, false).unwrap();
    UpstreamTarget::new(&config.routes[0]).unwrap()
}

fn mtls(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let addr: SocketAddr = "10.0.0.7:8443".parse().unwrap();
    let plain = target(dir.path(), false);
    let mtls = target(dir.path(), true);
    c.bench_function("upstream_peer_https", |b| {
        b.iter(|| black_box(plain.peer(black_box(addr), None)))
    });
    c.bench_function("upstream_peer_https_client_cert", |b| {
        b.iter(|| black_box(mtls.peer(black_box(addr), None)))
    });
}

criterion_group!(benches, mtls);
criterion_main!(benches);
