//! Shared Access Signature tokens (§2): parsing, verification and signing.
//!
//! Both SDKs sign `urlencode(audience) + "\n" + se` with the UTF-8 bytes of the key, so the
//! broker verifies the raw `sr` value exactly as received instead of re-encoding it.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use percent_encoding::percent_decode_str;
use sha2::Sha256;
use thiserror::Error;

/// The rule name of the official emulator's connection string.
pub const DEFAULT_KEY_NAME: &str = "RootManageSharedAccessKey";
/// The key of the official emulator's connection string.
pub const DEFAULT_KEY: &str = "SAS_KEY_VALUE";

/// A named key clients sign tokens with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SasRule {
    /// `SharedAccessKeyName`.
    pub name: String,
    /// `SharedAccessKey`, used as raw UTF-8 bytes.
    pub key: String,
}

impl Default for SasRule {
    fn default() -> Self {
        SasRule {
            name: DEFAULT_KEY_NAME.into(),
            key: DEFAULT_KEY.into(),
        }
    }
}

/// Why a token was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SasError {
    /// Not of the form `SharedAccessSignature k=v&...` with sr, sig, se, skn.
    #[error("malformed SAS token: {0}")]
    Malformed(&'static str),
    /// `skn` names no configured rule.
    #[error("unknown key name {0}")]
    UnknownKey(String),
    /// The signature does not match.
    #[error("invalid signature")]
    BadSignature,
    /// `se` is in the past.
    #[error("token expired")]
    Expired,
}

/// A verified token's facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SasClaims {
    /// The decoded `sr` (audience URI).
    pub audience: String,
    /// Expiry, Unix seconds.
    pub expires_s: i64,
}

/// Verifies `token` against `rules` at time `now_s` (Unix seconds).
pub fn verify(token: &str, rules: &[SasRule], now_s: i64) -> Result<SasClaims, SasError> {
    let fields = token
        .trim()
        .strip_prefix("SharedAccessSignature ")
        .ok_or(SasError::Malformed("missing SharedAccessSignature prefix"))?;
    let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
    for pair in fields.split('&') {
        match pair.split_once('=') {
            Some(("sr", v)) => sr = Some(v),
            Some(("sig", v)) => sig = Some(v),
            Some(("se", v)) => se = Some(v),
            Some(("skn", v)) => skn = Some(v),
            _ => {}
        }
    }
    let sr = sr.ok_or(SasError::Malformed("no sr"))?;
    let sig = sig.ok_or(SasError::Malformed("no sig"))?;
    let se_text = se.ok_or(SasError::Malformed("no se"))?;
    let skn = skn.ok_or(SasError::Malformed("no skn"))?;
    let expires_s: i64 = se_text
        .parse()
        .map_err(|_| SasError::Malformed("se is not a number"))?;
    let rule = rules
        .iter()
        .find(|r| r.name == skn)
        .ok_or_else(|| SasError::UnknownKey(skn.to_string()))?;
    let sig_text = decode(sig)?;
    let sig_bytes = STANDARD
        .decode(sig_text.as_bytes())
        .map_err(|_| SasError::BadSignature)?;
    let mut mac =
        Hmac::<Sha256>::new_from_slice(rule.key.as_bytes()).map_err(|_| SasError::BadSignature)?;
    mac.update(format!("{sr}\n{se_text}").as_bytes());
    mac.verify_slice(&sig_bytes)
        .map_err(|_| SasError::BadSignature)?;
    if expires_s <= now_s {
        return Err(SasError::Expired);
    }
    Ok(SasClaims {
        audience: decode(sr)?,
        expires_s,
    })
}

fn decode(s: &str) -> Result<String, SasError> {
    let s = s.replace('+', " ");
    percent_decode_str(&s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| SasError::Malformed("bad percent-encoding"))
}

/// Signs a token the way the SDKs do (the daemon's own client signs with the same function,
/// [`crate::signing::token`]);
/// used by tests and by in-process clients.
pub fn sign(audience: &str, rule: &SasRule, expires_s: i64) -> String {
    crate::signing::token(
        audience,
        &rule.name,
        &rule.key,
        u64::try_from(expires_s).unwrap_or(0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_token_verifies() {
        let rule = SasRule::default();
        let token = sign("sb://localhost:5672/jobs", &rule, 2000);
        let claims = verify(&token, std::slice::from_ref(&rule), 1000);
        assert_eq!(
            claims,
            Ok(SasClaims {
                audience: "sb://localhost:5672/jobs".into(),
                expires_s: 2000
            })
        );
        assert_eq!(
            verify(&token, std::slice::from_ref(&rule), 3000),
            Err(SasError::Expired)
        );
        let wrong = SasRule {
            key: "nope".into(),
            ..SasRule::default()
        };
        assert_eq!(verify(&token, &[wrong], 1000), Err(SasError::BadSignature));
    }
}
