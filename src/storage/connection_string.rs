//! Storage connection strings, as the portal, Azurite and Microsoft's SDKs write them:
//! `DefaultEndpointsProtocol=…;AccountName=…;AccountKey=…;EndpointSuffix=…`, an explicit
//! `BlobEndpoint=…` (Azurite, custom domains), a `SharedAccessSignature=…`, or the shorthand
//! `UseDevelopmentStorage=true` for Azurite on its default port.

use std::fmt;

use azure_core::http::Url;

/// Azurite's (and the old storage emulator's) well-known account: public, documented by
/// Microsoft, and valid only against the emulator.
pub const DEV_ACCOUNT: &str = "devstoreaccount1";
/// The key of [`DEV_ACCOUNT`].
pub const DEV_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
/// Where `UseDevelopmentStorage=true` points: Azurite's default blob port.
pub const DEV_BLOB_ENDPOINT: &str = "http://127.0.0.1:10000/devstoreaccount1";

/// How requests to the account are authorised.
#[derive(Clone, PartialEq, Eq)]
pub enum AccountAuth {
    /// The account key (base64): the daemon signs a short-lived SAS per blob from it.
    Key { account: String, key: String },
    /// A finished SAS token, appended to every request.
    Sas(String),
}

impl fmt::Debug for AccountAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AccountAuth::Key { account, .. } => write!(f, "Key {{ account: {account:?} }}"),
            AccountAuth::Sas(_) => f.write_str("Sas(<redacted>)"),
        }
    }
}

/// A parsed connection string: the blob endpoint and how to sign for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageConnectionString {
    /// The blob endpoint, without a trailing slash (`http://127.0.0.1:10000/devstoreaccount1`).
    pub blob_endpoint: Url,
    pub auth: AccountAuth,
}

/// What is wrong with a connection string; never quotes the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectionStringError {
    #[error("the part {0:?} is not a Key=Value pair")]
    NotAPair(String),
    #[error("it has neither AccountKey nor SharedAccessSignature")]
    NoCredential,
    #[error("AccountKey needs AccountName")]
    NoAccountName,
    #[error("AccountKey is not base64")]
    KeyNotBase64,
    #[error("it names no account and no BlobEndpoint")]
    NoEndpoint,
    #[error("BlobEndpoint {0:?} is not an http(s) URL")]
    BadEndpoint(String),
}

impl StorageConnectionString {
    pub fn parse(text: &str) -> Result<Self, ConnectionStringError> {
        let mut protocol = None;
        let mut account = None;
        let mut key = None;
        let mut sas = None;
        let mut suffix = None;
        let mut endpoint = None;
        let mut development = false;
        for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, value) = part
                .split_once('=')
                .ok_or_else(|| ConnectionStringError::NotAPair(redact_part(part)))?;
            let value = value.trim().to_owned();
            match name.trim().to_ascii_lowercase().as_str() {
                "defaultendpointsprotocol" => protocol = Some(value),
                "accountname" => account = Some(value),
                "accountkey" => key = Some(value),
                "sharedaccesssignature" => sas = Some(value),
                "endpointsuffix" => suffix = Some(value),
                "blobendpoint" => endpoint = Some(value),
                "usedevelopmentstorage" => development = value.eq_ignore_ascii_case("true"),
                // Queue, table and file endpoints, proxies: not used by the daemon.
                _ => {}
            }
        }
        if development {
            account.get_or_insert_with(|| DEV_ACCOUNT.to_owned());
            key.get_or_insert_with(|| DEV_KEY.to_owned());
            endpoint.get_or_insert_with(|| DEV_BLOB_ENDPOINT.to_owned());
        }
        let auth = match (key, sas) {
            (Some(key), _) => {
                use base64::Engine;
                if base64::engine::general_purpose::STANDARD
                    .decode(&key)
                    .is_err()
                {
                    return Err(ConnectionStringError::KeyNotBase64);
                }
                let account = account
                    .clone()
                    .ok_or(ConnectionStringError::NoAccountName)?;
                AccountAuth::Key { account, key }
            }
            (None, Some(sas)) => AccountAuth::Sas(sas.trim_start_matches('?').to_owned()),
            (None, None) => return Err(ConnectionStringError::NoCredential),
        };
        let endpoint = match endpoint {
            Some(e) => e,
            None => {
                let account = account.ok_or(ConnectionStringError::NoEndpoint)?;
                let protocol = protocol.unwrap_or_else(|| "https".to_owned());
                let suffix = suffix.unwrap_or_else(|| "core.windows.net".to_owned());
                format!("{protocol}://{account}.blob.{suffix}")
            }
        };
        let blob_endpoint = Url::parse(endpoint.trim_end_matches('/'))
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
            .ok_or_else(|| ConnectionStringError::BadEndpoint(endpoint.clone()))?;
        Ok(Self {
            blob_endpoint,
            auth,
        })
    }
}

/// A part as it may be shown in an error: cut short, so that a key pasted without its `=`
/// is never shown whole.
fn redact_part(part: &str) -> String {
    if part.len() > 40 {
        format!("{}…", part.chars().take(12).collect::<String>())
    } else {
        part.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn development_storage_is_azurite_on_its_default_port() {
        let cs = StorageConnectionString::parse("UseDevelopmentStorage=true").expect("dev");
        assert_eq!(cs.blob_endpoint.as_str(), DEV_BLOB_ENDPOINT);
        assert_eq!(
            cs.auth,
            AccountAuth::Key {
                account: DEV_ACCOUNT.into(),
                key: DEV_KEY.into()
            }
        );
    }

    #[test]
    fn azurite_and_cloud_forms_parse() {
        let azurite = format!(
            "DefaultEndpointsProtocol=http;AccountName={DEV_ACCOUNT};AccountKey={DEV_KEY};\
             BlobEndpoint=http://127.0.0.1:41234/{DEV_ACCOUNT};"
        );
        let cs = StorageConnectionString::parse(&azurite).expect("azurite");
        assert_eq!(
            cs.blob_endpoint.as_str(),
            "http://127.0.0.1:41234/devstoreaccount1"
        );
        let cloud = "DefaultEndpointsProtocol=https;AccountName=contoso;AccountKey=a2V5;\
                     EndpointSuffix=core.windows.net";
        let cs = StorageConnectionString::parse(cloud).expect("cloud");
        assert_eq!(
            cs.blob_endpoint.as_str(),
            "https://contoso.blob.core.windows.net/"
        );
        let sas = "BlobEndpoint=https://contoso.blob.core.windows.net/;\
                   SharedAccessSignature=?sv=2022-11-02&sig=abc";
        let cs = StorageConnectionString::parse(sas).expect("sas");
        assert_eq!(cs.auth, AccountAuth::Sas("sv=2022-11-02&sig=abc".into()));
        assert!(!format!("{:?}", cs.auth).contains("abc"));
    }

    #[test]
    fn incomplete_strings_say_what_is_missing() {
        let cases = [
            ("AccountName=x", ConnectionStringError::NoCredential),
            ("AccountKey=a2V5", ConnectionStringError::NoAccountName),
            (
                "AccountName=x;AccountKey=not base64!",
                ConnectionStringError::KeyNotBase64,
            ),
            (
                "SharedAccessSignature=sv=1",
                ConnectionStringError::NoEndpoint,
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(
                StorageConnectionString::parse(text).expect_err(text),
                expected
            );
        }
        let err =
            StorageConnectionString::parse("AccountName=x;AccountKey=a2V5;BlobEndpoint=ftp://h")
                .expect_err("ftp");
        assert!(matches!(err, ConnectionStringError::BadEndpoint(_)));
    }
}
