//! Entra ID (JWT) tokens on `$cbs`, accepted only when the emulator is configured to.
//!
//! The emulator has no Entra ID signing keys, so it cannot verify a JWT's signature. With
//! the switch on it checks what it can: the token is a well-formed JWT whose audience is
//! Service Bus and which has not expired. That lets a client configured for Entra ID run
//! against the emulator unchanged; it is not a security boundary.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use thiserror::Error;

/// Audiences Service Bus accepts (§2: the SDK scope is `https://servicebus.azure.net//.default`).
const AUDIENCES: [&str; 2] = [
    "https://servicebus.azure.net",
    "https://servicebus.azure.net/",
];

/// Why a JWT was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum JwtError {
    /// Not three base64url parts with a JSON payload.
    #[error("malformed JWT")]
    Malformed,
    /// The audience is not Service Bus.
    #[error("JWT audience is not Service Bus")]
    Audience,
    /// `exp` is missing or in the past.
    #[error("JWT expired")]
    Expired,
}

#[derive(Deserialize)]
struct Claims {
    aud: Audience,
    exp: Option<i64>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

/// Checks the JWT's audience and expiry; returns the expiry (Unix seconds).
pub fn check(token: &str, now_s: i64) -> Result<i64, JwtError> {
    let mut parts = token.split('.');
    let (Some(_header), Some(payload), Some(_sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| JwtError::Malformed)?;
    let claims: Claims = serde_json::from_slice(&bytes).map_err(|_| JwtError::Malformed)?;
    let ok = match &claims.aud {
        Audience::One(a) => AUDIENCES.contains(&a.as_str()),
        Audience::Many(list) => list.iter().any(|a| AUDIENCES.contains(&a.as_str())),
    };
    if !ok {
        return Err(JwtError::Audience);
    }
    match claims.exp {
        Some(exp) if exp > now_s => Ok(exp),
        _ => Err(JwtError::Expired),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(payload: &str) -> String {
        format!("e30.{}.sig", URL_SAFE_NO_PAD.encode(payload))
    }

    #[test]
    fn audience_and_expiry_are_checked() {
        let good = token(r#"{"aud":"https://servicebus.azure.net","exp":2000}"#);
        assert_eq!(check(&good, 1000), Ok(2000));
        assert_eq!(check(&good, 3000), Err(JwtError::Expired));
        let other = token(r#"{"aud":"https://vault.azure.net","exp":2000}"#);
        assert_eq!(check(&other, 1000), Err(JwtError::Audience));
        assert_eq!(check("nope", 1000), Err(JwtError::Malformed));
    }
}
