//! How tokenward reaches providers (a credential's own forward proxy and CA bundle, never the
//! environment's proxy variables), its client certificate for mutual TLS, and the start-up
//! warnings for plaintext HTTP off loopback.

use std::net::IpAddr;
use std::path::PathBuf;

use url::Url;

use super::{Collector, Config};
use crate::mtls::{ClientCertSource, Part};
use crate::secret::SecretSource;

/// How one credential's provider client connects: its `proxy` and `ca_file` keys.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProviderTransport {
    /// The only proxy the provider client uses. `None` is a direct connection whatever
    /// `HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY` or `NO_PROXY` say: an environment inherited from
    /// a shell or a container image must not decide where a client secret is sent.
    pub proxy: Option<Url>,
    /// PEM CAs for the token endpoint, replacing the built-in roots.
    pub ca_file: Option<PathBuf>,
    /// The certificate presented to the token endpoint (RFC 8705 `tls_client_auth`).
    pub client_cert: Option<ClientCertSource>,
}

/// Validates a credential's `proxy` and `ca_file`, reporting problems under `key`.
pub(super) fn validate(
    c: &mut Collector,
    key: &str,
    proxy: Option<String>,
    ca_file: Option<String>,
) -> ProviderTransport {
    let proxy = proxy.and_then(|raw| match parse_proxy(&raw) {
        Ok(url) => Some(url),
        Err(reason) => {
            c.push(format!("{key}.proxy"), reason);
            None
        }
    });
    let ca_file = ca_file.map(PathBuf::from);
    if let Some(ca) = &ca_file {
        if let Err(reason) = crate::ca_bundle::load(ca) {
            c.push(format!("{key}.ca_file"), reason);
        }
    }
    ProviderTransport {
        proxy,
        ca_file,
        client_cert: None,
    }
}

/// `tls_client_cert` and `tls_client_key` under `key` (a credential or a route): both or
/// neither. A pair written inline is checked now; one read from a file or the environment is
/// checked by `check` and at start, like other secrets.
pub(super) fn client_cert(
    c: &mut Collector,
    key: &str,
    cert: Option<SecretSource>,
    private_key: Option<SecretSource>,
) -> Option<ClientCertSource> {
    let (cert_key, key_key) = (
        format!("{key}.tls_client_cert"),
        format!("{key}.tls_client_key"),
    );
    let (cert, private_key) = match (cert, private_key) {
        (None, None) => return None,
        (Some(cert), Some(private_key)) => (cert, private_key),
        (Some(_), None) => {
            c.push(
                key_key,
                "is required with tls_client_cert (the certificate's PEM private key)",
            );
            return None;
        }
        (None, Some(_)) => {
            c.push(
                cert_key,
                "is required with tls_client_key (the PEM certificate chain)",
            );
            return None;
        }
    };
    let source = ClientCertSource {
        cert,
        key: private_key,
        cert_key,
        key_key,
    };
    if let (SecretSource::Literal(cert), SecretSource::Literal(private_key)) =
        (&source.cert, &source.key)
    {
        if let Err((part, reason)) =
            crate::mtls::parse_identity(cert.expose(), private_key.expose())
        {
            let at = match part {
                Part::Cert => &source.cert_key,
                Part::Key => &source.key_key,
            };
            c.push(at.clone(), reason);
            return None;
        }
    }
    Some(source)
}

/// Parses `proxy = "http://host:port"`. The raw value is never echoed: a mistyped URL could
/// hold a password.
pub fn parse_proxy(raw: &str) -> Result<Url, String> {
    let url = Url::parse(raw).map_err(|e| format!("not a URL ({e}); write http://host:port"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "scheme {:?} is not http or https (write http://host:port)",
            url.scheme()
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("a proxy that needs credentials is not supported".into());
    }
    if url.host().is_none() {
        return Err("the proxy URL has no host".into());
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(
            "the proxy URL takes no path, query or fragment: write http://host:port".into(),
        );
    }
    Ok(url)
}

/// Whether `host` (a name, an IP literal, or a bracketed IPv6 literal) is this machine.
pub fn is_loopback_host(host: &str) -> bool {
    let host = host
        .trim_matches(['[', ']'])
        .trim_end_matches('.')
        .to_ascii_lowercase();
    match host.parse::<IpAddr>() {
        Ok(ip) => ip.to_canonical().is_loopback(),
        // RFC 6761: `localhost` and names under it always resolve to loopback.
        Err(_) => host == "localhost" || host.ends_with(".localhost"),
    }
}

/// The origin of a plain `http://` URL whose host is not loopback, else `None`. A URL that does
/// not parse (a `custom` template with a placeholder in the host) but says `http://` counts as
/// off loopback: tokenward cannot tell, so it warns.
fn plaintext_off_loopback(raw: &str) -> Option<String> {
    let scheme_end = raw.find("://")?;
    if !raw[..scheme_end].eq_ignore_ascii_case("http") {
        return None;
    }
    match Url::parse(raw) {
        Ok(url) => {
            let host = url.host_str()?;
            if is_loopback_host(host) {
                return None;
            }
            Some(url.origin().ascii_serialization())
        }
        Err(_) => {
            let rest = &raw[scheme_end + 3..];
            let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
            Some(format!("http://{authority}"))
        }
    }
}

/// One line per token endpoint or upstream reached by plain HTTP on a host that is not loopback:
/// secrets, passwords and tokens would cross a network unencrypted. For `run` and `check`.
pub fn plaintext_warnings(config: &Config) -> Vec<String> {
    let mut out = Vec::new();
    for c in &config.credentials {
        let mut seen = Vec::new();
        for endpoint in c.dialect.endpoints() {
            if let Some(origin) = plaintext_off_loopback(&endpoint) {
                if !seen.contains(&origin) {
                    out.push(format!(
                        "credential {:?}: token endpoint {origin} is plain http:// on a host that is not loopback: its secrets and tokens cross the network unencrypted; use https://",
                        c.name
                    ));
                    seen.push(origin);
                }
            }
        }
    }
    for r in &config.routes {
        if !r.upstream.tls && !is_loopback_host(&r.upstream.host) {
            out.push(format!(
                "route {:?}: upstream http://{} is plain http:// on a host that is not loopback: every request carries the token unencrypted; use https://",
                r.name, r.upstream.authority
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for h in [
            "127.0.0.1",
            "127.8.9.10",
            "[::1]",
            "::1",
            "localhost",
            "LOCALHOST.",
            "api.localhost",
            "::ffff:127.0.0.1",
        ] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in [
            "10.0.0.1",
            "0.0.0.0",
            "example.com",
            "localhost.example.com",
            "[fe80::1]",
        ] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }

    #[test]
    fn plaintext_endpoints() {
        assert_eq!(
            plaintext_off_loopback("https://idp.example.com/token"),
            None
        );
        assert_eq!(plaintext_off_loopback("http://127.0.0.1:9/token"), None);
        assert_eq!(plaintext_off_loopback("http://localhost:9/token"), None);
        assert_eq!(
            plaintext_off_loopback("http://idp.example.com:8080/token?client_secret=x"),
            Some("http://idp.example.com:8080".into())
        );
        assert_eq!(
            plaintext_off_loopback("HTTP://{secret.host}/login"),
            Some("http://{secret.host}".into())
        );
    }

    fn mtls_config(credential: &str, route: &str) -> Result<Config, super::super::ConfigErrors> {
        let text = format!(
            "[[routes]]\nname = \"r\"\nlisten = \"127.0.0.1:1\"\nupstream = \"https://api.example.com\"\ncredential = \"c\"\n{route}\n\
             [credentials.c]\ndialect = \"oauth2\"\ntoken_url = \"https://idp.example.com/t\"\nclient_id = \"i\"\n{credential}\n"
        );
        Config::parse(std::path::Path::new("t.toml"), &text, false)
    }

    fn errors(result: Result<Config, super::super::ConfigErrors>) -> Vec<(String, String)> {
        let e = result.expect_err("must be refused");
        e.0.into_iter().map(|e| (e.key, e.reason)).collect()
    }

    fn pem_pair() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["tw".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn tls_client_auth_keys_are_validated_and_named() {
        let files =
            "tls_client_cert = { file = \"/c.pem\" }\ntls_client_key = { file = \"/k.pem\" }";
        for auth in ["tls_client_auth", "self_signed_tls_client_auth"] {
            let cfg = mtls_config(&format!("client_auth = \"{auth}\"\n{files}"), "").unwrap();
            let cert = cfg.credentials[0].transport.client_cert.as_ref().unwrap();
            assert_eq!(cert.cert_key, "credentials.c.tls_client_cert");
            assert!(cfg.credentials[0].dialect.describe().contains(auth));
            let e = errors(mtls_config(&format!("client_auth = \"{auth}\""), ""));
            assert_eq!(e[0].0, "credentials.c.tls_client_cert", "{e:?}");
            assert!(e[0].1.contains("required"), "{e:?}");
        }
        let e = errors(mtls_config(
            "client_auth = \"tls_client_auth\"\ntls_client_cert = { file = \"/c.pem\" }",
            "",
        ));
        assert_eq!(e[0].0, "credentials.c.tls_client_key", "{e:?}");
        let e = errors(mtls_config(
            &format!("client_secret = \"s3cret-value\"\n{files}"),
            "",
        ));
        let keys: Vec<_> = e.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "credentials.c.tls_client_cert",
                "credentials.c.tls_client_key"
            ],
            "{e:?}"
        );
        assert!(e[0].1.contains("only with client_auth"), "{e:?}");
        let e = errors(mtls_config(
            &format!(
                "client_auth = \"tls_client_auth\"\nclient_secret = \"s3cret-value\"\n{files}"
            ),
            "",
        ));
        assert_eq!(e[0].0, "credentials.c.client_secret", "{e:?}");
    }

    #[test]
    fn inline_pairs_are_parsed_at_load_without_echoing_them() {
        let (cert, key) = pem_pair();
        let (_, other_key) = pem_pair();
        let inline = |cert: &str, key: &str| {
            format!(
                "client_auth = \"tls_client_auth\"\ntls_client_cert = '''{cert}'''\ntls_client_key = '''{key}'''"
            )
        };
        assert!(mtls_config(&inline(&cert, &key), "").is_ok());
        let e = errors(mtls_config(&inline(&cert, &other_key), ""));
        assert_eq!(e[0].0, "credentials.c.tls_client_key", "{e:?}");
        assert!(e[0].1.contains("does not match"), "{e:?}");
        let e = errors(mtls_config(&inline("not a certificate", &key), ""));
        assert_eq!(e[0].0, "credentials.c.tls_client_cert", "{e:?}");
        let e = errors(mtls_config(&inline(&cert, &cert), ""));
        assert_eq!(e[0].0, "credentials.c.tls_client_key", "{e:?}");
        let body = key.lines().nth(1).unwrap();
        assert!(!format!("{e:?}").contains(body));
    }

    #[test]
    fn route_client_certificates_need_both_keys_and_an_https_upstream() {
        let secret = "client_secret = \"s\"";
        let files =
            "tls_client_cert = { file = \"/c.pem\" }\ntls_client_key = { env = \"TW_KEY\" }";
        let cfg = mtls_config(secret, files).unwrap();
        assert_eq!(
            cfg.routes[0].client_cert.as_ref().unwrap().key_key,
            "routes[0].tls_client_key"
        );
        let e = errors(mtls_config(
            secret,
            "tls_client_key = { file = \"/k.pem\" }",
        ));
        assert_eq!(e[0].0, "routes[0].tls_client_cert", "{e:?}");
        let text = format!(
            "[[routes]]\nname = \"r\"\nlisten = \"127.0.0.1:1\"\nupstream = \"http://api.example.com\"\ncredential = \"c\"\n{files}\n\
             [credentials.c]\ndialect = \"oauth2\"\ntoken_url = \"https://idp.example.com/t\"\nclient_id = \"i\"\n{secret}\n"
        );
        let e = errors(Config::parse(std::path::Path::new("t.toml"), &text, false));
        assert_eq!(e[0].0, "routes[0].tls_client_cert", "{e:?}");
        assert!(e[0].1.contains("https"), "{e:?}");
    }

    #[test]
    fn proxy_urls() {
        assert_eq!(
            parse_proxy("http://proxy.corp:3128").unwrap().as_str(),
            "http://proxy.corp:3128/"
        );
        assert!(parse_proxy("https://proxy.corp").is_ok());
        let e = parse_proxy("http://user:hunter2@proxy:3128").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
        assert!(parse_proxy("socks5://proxy:1080").is_err());
        assert!(parse_proxy("http://proxy:3128/path").is_err());
        let e = parse_proxy("hunter2-not-a-url").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
    }
}
