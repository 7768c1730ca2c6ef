//! Service SAS tokens for one blob, signed from the account key.
//!
//! The storage SDK takes Entra ID credentials or finished SAS URLs but does not sign with a
//! shared key, so for an account-key connection string the daemon signs, per blob and per
//! operation, a token that grants only what that operation needs (read one input; create and
//! write one result) for a few minutes. The string-to-sign is the documented one for service
//! SAS version 2020-12-06 and later.

use std::time::{Duration, SystemTime};

use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use servicebus_emulator::signing::url_encode;

/// The SAS version signed: supported by every current service and by Azurite.
pub const SAS_VERSION: &str = "2022-11-02";
/// How far back a token's start is set, for clocks that run slightly behind the service's.
const CLOCK_SKEW: Duration = Duration::from_secs(300);

/// What a token allows on its blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// `r`: read the blob and its properties.
    Read,
    /// `cw`: create or overwrite the blob.
    Write,
}

impl Permission {
    fn letters(self) -> &'static str {
        match self {
            Permission::Read => "r",
            Permission::Write => "cw",
        }
    }
}

/// A service SAS query string (without `?`) for one blob, valid from a little before `now`
/// until `now + lifetime`. `key` is the account key as base64, checked when the connection
/// string was parsed.
pub fn service_sas(
    account: &str,
    key: &str,
    container: &str,
    blob: &str,
    permission: Permission,
    now: SystemTime,
    lifetime: Duration,
) -> String {
    let (start, expiry) = window(now, lifetime);
    let sp = permission.letters();
    let resource = format!("/blob/{account}/{container}/{blob}");
    let sr = "b";
    let string_to_sign = [
        sp,
        &start,
        &expiry,
        &resource,
        "", // signedIdentifier
        "", // signedIP
        "", // signedProtocol
        SAS_VERSION,
        sr, // signedResource: a blob
        "", // signedSnapshotTime
        "", // signedEncryptionScope
        "", // rscc
        "", // rscd
        "", // rsce
        "", // rscl
        "", // rsct
    ]
    .join("\n");
    let sig = sign(key, &string_to_sign);
    format!(
        "sv={SAS_VERSION}&st={}&se={}&sr={sr}&sp={sp}&sig={}",
        url_encode(&start),
        url_encode(&expiry),
        url_encode(&sig)
    )
}

/// An account SAS (without `?`) that allows only creating containers, which a service SAS
/// cannot (the results container at start, the input container for `submit --upload`).
pub fn create_container_sas(
    account: &str,
    key: &str,
    now: SystemTime,
    lifetime: Duration,
) -> String {
    let (start, expiry) = window(now, lifetime);
    // accountname, sp, ss, srt, st, se, sip, spr, sv, ses, and a final newline.
    let string_to_sign = format!("{account}\nc\nb\nc\n{start}\n{expiry}\n\n\n{SAS_VERSION}\n\n");
    format!(
        "sv={SAS_VERSION}&ss=b&srt=c&sp=c&st={}&se={}&sig={}",
        url_encode(&start),
        url_encode(&expiry),
        url_encode(&sign(key, &string_to_sign))
    )
}

/// The token's start (a little in the past) and expiry, as the service writes times.
fn window(now: SystemTime, lifetime: Duration) -> (String, String) {
    (
        humantime::format_rfc3339_seconds(now - CLOCK_SKEW).to_string(),
        humantime::format_rfc3339_seconds(now + lifetime).to_string(),
    )
}

/// The base64 HMAC-SHA256 of `text` with the base64-decoded account key. A key that does not
/// decode signs with no bytes, which the service rejects; parsing refuses such keys first.
fn sign(key_b64: &str, text: &str) -> String {
    let engine = &base64::engine::general_purpose::STANDARD;
    let key = engine.decode(key_b64).unwrap_or_default();
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&key)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(text.as_bytes());
    engine.encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The signature of a known string-to-sign, computed independently with Python's
    /// `hmac.new(base64.b64decode(key), msg, hashlib.sha256)`.
    #[test]
    fn signs_the_documented_string_with_the_decoded_key() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let token = service_sas(
            "devstoreaccount1",
            super::super::connection_string::DEV_KEY,
            "inputs",
            "a/b.csv",
            Permission::Read,
            now,
            Duration::from_secs(600),
        );
        assert!(
            token.starts_with(
                "sv=2022-11-02&st=2027-01-15T07%3A55%3A00Z&se=2027-01-15T08%3A10%3A00Z&sr=b&sp=r&sig="
            ),
            "{token}"
        );
        let sig = token.rsplit("sig=").next().unwrap_or_default();
        assert_eq!(sig, EXPECTED_SIG);
    }

    const EXPECTED_SIG: &str = "uoE3VwVoxKcUe9fk7GqqJcnwpR7pQpRAjg25ciuvpCg%3D";
}
