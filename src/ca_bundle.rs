//! CA bundles: the PEM files operators name with `ca_file` (a route's upstream, a credential's
//! token endpoint), read and checked once for every TLS client that trusts them.

use std::path::Path;

/// Reads a PEM bundle, checking that every certificate parses (pingora panics on bad DER).
pub fn load(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let ders: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read CA bundle {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("CA bundle {} is not valid PEM: {e}", path.display()))?;
    if ders.is_empty() {
        return Err(format!("CA bundle {} holds no certificate", path.display()));
    }
    let mut roots = rustls::RootCertStore::empty();
    for der in &ders {
        roots.add(der.clone()).map_err(|e| {
            format!(
                "CA bundle {} holds an unusable certificate: {e}",
                path.display()
            )
        })?;
    }
    Ok(ders.into_iter().map(|d| d.to_vec()).collect())
}
