//! Criterion benchmarks of AWS Signature Version 4 per request (`aws-sigv4`): the headers of an
//! S3 GET with an unsigned payload, and of a PUT whose 64 KiB body is hashed and signed. Run:
//! `cargo bench --bench aws_sigv4`.

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use tokenward::dialect::Dialect;
use tokenward::dialect::SignInput;
use tokenward::dialect::aws_sigv4::AwsSigV4;
use tokenward::dialect::aws_sigv4::chain::Credentials;
use tokenward::secret::Secret;

fn dialect(payload: &str) -> AwsSigV4 {
    let mut keys = figment::value::Dict::new();
    for (k, v) in [
        ("region", "eu-west-1"),
        ("service", "s3"),
        ("payload", payload),
        ("access_key_id", "AKIDEXAMPLE"),
        (
            "secret_access_key",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        ),
    ] {
        keys.insert(k.into(), v.into());
    }
    match AwsSigV4::from_keys(keys) {
        Ok(d) => d,
        Err(e) => panic!("bench config: {e:?}"),
    }
}

fn aws_sigv4(c: &mut Criterion) {
    // Temporary credentials: the session token is signed and sent too, the costlier case.
    let token = Credentials {
        access_key_id: "ASIAEXAMPLE".into(),
        secret_access_key: Secret::new("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"),
        session_token: Some(Secret::new("IQoJb3JpZ2luX2VjEXAMPLE".repeat(30))),
        expiration: None,
    }
    .encode();
    let mut headers = http::HeaderMap::new();
    headers.insert(
        "host",
        "my-bucket.s3.eu-west-1.amazonaws.com".parse().unwrap(),
    );
    headers.insert("content-type", "application/octet-stream".parse().unwrap());
    headers.insert("user-agent", "app/1.0".parse().unwrap());
    headers.insert("x-amz-meta-origin", "orders".parse().unwrap());
    let unsigned = dialect("unsigned").request_signer().unwrap();
    c.bench_function("aws_sigv4_s3_get_unsigned_payload", |b| {
        b.iter(|| {
            let input = SignInput {
                method: "GET",
                path: "/reports/2026/12/summary%20final.csv",
                query: Some("versionId=3HL4kqtJlcpXroDTDmJ"),
                headers: &headers,
                body: &[],
            };
            black_box(unsigned.sign(&token, &input).unwrap())
        })
    });
    let signed = dialect("signed").request_signer().unwrap();
    let body = vec![0x5au8; 64 * 1024];
    c.bench_function("aws_sigv4_put_64kib_signed_payload", |b| {
        b.iter(|| {
            let input = SignInput {
                method: "PUT",
                path: "/reports/upload.bin",
                query: None,
                headers: &headers,
                body: &body,
            };
            black_box(signed.sign(&token, &input).unwrap())
        })
    });
}

criterion_group!(benches, aws_sigv4);
criterion_main!(benches);
