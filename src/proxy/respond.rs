//! The responses tokenward writes itself: JSON bodies that name the route or credential and the
//! reason, never a secret.

use std::time::Duration;

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::Session;

pub async fn json(
    session: &mut Session,
    status: u16,
    body: serde_json::Value,
    retry_after: Option<Duration>,
) -> Result<()> {
    let (header, body) = json_parts(status, body, retry_after)?;
    write(session, header, body).await
}

/// A 401 that passes a Conditional Access claims challenge on to the caller, in the form
/// Entra ID's own APIs use and MSAL reads (`claims` is base64 of the claims JSON).
pub async fn claims_challenge(
    session: &mut Session,
    body: serde_json::Value,
    claims_base64: &str,
) -> Result<()> {
    let (mut header, body) = json_parts(401, body, None)?;
    header.insert_header(
        http::header::WWW_AUTHENTICATE,
        format!("Bearer error=\"insufficient_claims\", claims=\"{claims_base64}\""),
    )?;
    write(session, header, body).await
}

/// Writes a whole answer of tokenward's own.
pub async fn write(session: &mut Session, header: ResponseHeader, body: Bytes) -> Result<()> {
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}

/// The header and body of a JSON answer, for whichever session writes it.
pub fn json_parts(
    status: u16,
    body: serde_json::Value,
    retry_after: Option<Duration>,
) -> Result<(ResponseHeader, Bytes)> {
    let body = Bytes::from(body.to_string());
    let mut header = ResponseHeader::build(status, Some(5))?;
    header.insert_header(http::header::CONTENT_TYPE, "application/json")?;
    header.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    header.insert_header(http::header::CACHE_CONTROL, "no-store")?;
    if let Some(after) = retry_after {
        header.insert_header(
            http::header::RETRY_AFTER,
            after.as_secs().max(1).to_string(),
        )?;
    }
    Ok((header, body))
}
