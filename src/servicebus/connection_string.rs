//! Service Bus connection strings: `Endpoint=sb://…;SharedAccessKeyName=…;SharedAccessKey=…`,
//! or with `SharedAccessSignature=…`, and `UseDevelopmentEmulator=true` for an emulator.

use std::fmt;

/// A connection string that cannot be used, naming the part that is wrong (never the secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the Service Bus connection string is invalid: {0}")]
pub struct ConnectionStringError(pub String);

/// How the connection string authenticates.
#[derive(Clone, PartialEq, Eq)]
pub enum SasAuth {
    /// A rule name and its key: tokens are signed here, per entity.
    Key { name: String, key: String },
    /// A finished token (`SharedAccessSignature sr=…&sig=…&se=…&skn=…`), used as is.
    Signature(String),
}

impl fmt::Debug for SasAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SasAuth::Key { name, .. } => write!(f, "Key {{ name: {name:?}, key: <redacted> }}"),
            SasAuth::Signature(_) => f.write_str("Signature(<redacted>)"),
        }
    }
}

/// A parsed connection string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionString {
    /// The namespace's host name, without scheme or port.
    pub host: String,
    /// The port given in the endpoint, if any.
    pub port: Option<u16>,
    pub auth: SasAuth,
    pub entity_path: Option<String>,
    /// `UseDevelopmentEmulator=true`: plain AMQP on 5672 (or the endpoint's port), no TLS.
    pub emulator: bool,
}

impl ConnectionString {
    /// Parses `Key=Value;…` pairs (split at the first `=`, keys case-insensitive).
    pub fn parse(text: &str) -> Result<ConnectionString, ConnectionStringError> {
        let err = |m: &str| ConnectionStringError(m.to_owned());
        let mut endpoint = None;
        let mut key_name = None;
        let mut key = None;
        let mut signature = None;
        let mut entity_path = None;
        let mut emulator = false;
        for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| err("each part must be Key=Value"))?;
            match k.trim().to_ascii_lowercase().as_str() {
                "endpoint" | "hostname" => endpoint = Some(v.trim().to_owned()),
                "sharedaccesskeyname" => key_name = Some(v.to_owned()),
                "sharedaccesskey" => key = Some(v.to_owned()),
                "sharedaccesssignature" => signature = Some(v.to_owned()),
                "entitypath" => entity_path = Some(v.trim().to_owned()).filter(|p| !p.is_empty()),
                "usedevelopmentemulator" => emulator = v.trim() == "true",
                _ => {}
            }
        }
        let endpoint = endpoint.ok_or_else(|| err("Endpoint=sb://<namespace>/ is missing"))?;
        let rest = endpoint
            .split_once("://")
            .map(|(_, rest)| rest)
            .ok_or_else(|| err("Endpoint needs a scheme, as in sb://<namespace>/"))?;
        let authority = rest.split('/').next().unwrap_or("");
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) => {
                let port = port
                    .parse::<u16>()
                    .map_err(|_| err("the Endpoint's port is not a number"))?;
                (host.to_owned(), Some(port))
            }
            None => (authority.to_owned(), None),
        };
        if host.is_empty() {
            return Err(err("the Endpoint has no host name"));
        }
        let auth = match (key_name, key, signature) {
            (Some(name), Some(key), None) if !name.is_empty() && !key.is_empty() => {
                SasAuth::Key { name, key }
            }
            (_, None, Some(sig)) if sig.starts_with("SharedAccessSignature ") => {
                SasAuth::Signature(sig)
            }
            (_, Some(_), Some(_)) => {
                return Err(err(
                    "give SharedAccessKey or SharedAccessSignature, not both",
                ));
            }
            (_, None, Some(_)) => {
                return Err(err(
                    "SharedAccessSignature must start with \"SharedAccessSignature \"",
                ));
            }
            _ => {
                return Err(err(
                    "SharedAccessKeyName and SharedAccessKey must come as a pair (or give SharedAccessSignature)",
                ));
            }
        };
        Ok(ConnectionString {
            host,
            port,
            auth,
            entity_path,
            emulator,
        })
    }

    /// The AMQP address to connect to: plain AMQP to an emulator, TLS on 5671 to Azure.
    pub fn amqp_url(&self) -> String {
        if self.emulator {
            format!("amqp://{}:{}", self.host, self.port.unwrap_or(5672))
        } else {
            format!("amqps://{}:5671", self.host)
        }
    }

    /// The authority used in token audiences: `host:port` for an emulator (as Microsoft's
    /// Python SDK does), the bare host for Azure.
    pub fn audience_authority(&self) -> String {
        match (self.emulator, self.port) {
            (true, Some(port)) => format!("{}:{port}", self.host),
            _ => self.host.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_official_emulator_string_parses() {
        let cs = ConnectionString::parse(
            "Endpoint=sb://localhost;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;",
        )
        .expect("valid");
        assert_eq!(cs.host, "localhost");
        assert!(cs.emulator);
        assert_eq!(cs.amqp_url(), "amqp://localhost:5672");
        assert_eq!(
            cs.auth,
            SasAuth::Key {
                name: "RootManageSharedAccessKey".into(),
                key: "SAS_KEY_VALUE".into()
            }
        );
    }

    #[test]
    fn azure_strings_use_tls_and_ignore_unknown_keys() {
        let cs = ConnectionString::parse(
            "Endpoint=sb://contoso.servicebus.windows.net/;SharedAccessKeyName=send;SharedAccessKey=abc=;EntityPath=jobs;Other=1",
        )
        .expect("valid");
        assert_eq!(cs.amqp_url(), "amqps://contoso.servicebus.windows.net:5671");
        assert_eq!(cs.entity_path.as_deref(), Some("jobs"));
        assert_eq!(cs.audience_authority(), "contoso.servicebus.windows.net");
        let SasAuth::Key { key, .. } = &cs.auth else {
            panic!("key")
        };
        assert_eq!(key, "abc=", "split at the first '=' only");
        assert!(!format!("{cs:?}").contains("abc="), "Debug redacts the key");
    }

    #[test]
    fn bad_strings_say_what_is_wrong() {
        for (text, expected) in [
            ("SharedAccessKeyName=a;SharedAccessKey=b", "Endpoint"),
            (
                "Endpoint=localhost;SharedAccessKeyName=a;SharedAccessKey=b",
                "scheme",
            ),
            (
                "Endpoint=sb://h:x;SharedAccessKeyName=a;SharedAccessKey=b",
                "port",
            ),
            ("Endpoint=sb://h;SharedAccessKeyName=a", "pair"),
            ("Endpoint=sb://h;SharedAccessSignature=abc", "must start"),
            ("garbage", "Key=Value"),
        ] {
            let e = ConnectionString::parse(text).expect_err(text).to_string();
            assert!(e.contains(expected), "{text}: {e}");
        }
    }

    #[test]
    fn emulator_ports_and_signatures() {
        let cs = ConnectionString::parse(
            "Endpoint=sb://127.0.0.1:40001;SharedAccessSignature=SharedAccessSignature sr=x&sig=y&se=1&skn=k;UseDevelopmentEmulator=true",
        )
        .expect("valid");
        assert_eq!(cs.amqp_url(), "amqp://127.0.0.1:40001");
        assert_eq!(cs.audience_authority(), "127.0.0.1:40001");
        assert!(matches!(cs.auth, SasAuth::Signature(_)));
    }
}
