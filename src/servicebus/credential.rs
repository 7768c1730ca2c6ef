//! Where CBS tokens come from: a SAS key (signed here, per entity), a finished SAS token, or
//! Entra ID through `azure_identity` (workload identity on AKS, managed identity, developer
//! tools). Every token carries its expiry so the client can put a fresh one before it runs out.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use azure_core::credentials::TokenCredential;

use servicebus_emulator::signing as sas;

/// The Entra ID scope of Service Bus (the double slash is what Microsoft's SDKs send).
pub const SERVICE_BUS_SCOPE: &str = "https://servicebus.azure.net//.default";

/// A token for the `$cbs` node.
#[derive(Clone)]
pub struct CbsToken {
    pub value: String,
    /// `servicebus.windows.net:sastoken` or `jwt`.
    pub token_type: &'static str,
    pub expires_at: SystemTime,
}

impl fmt::Debug for CbsToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CbsToken")
            .field("token_type", &self.token_type)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("getting a Service Bus token failed: {0}")]
pub struct CredentialError(pub String);

/// A source of tokens.
#[derive(Clone)]
pub enum Credential {
    SasKey {
        name: String,
        key: String,
        /// How long each signed token is valid.
        lifetime: Duration,
    },
    SasToken(String),
    Entra(Arc<dyn TokenCredential>),
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::SasKey { name, lifetime, .. } => {
                write!(f, "SasKey {{ name: {name:?}, lifetime: {lifetime:?} }}")
            }
            Credential::SasToken(_) => f.write_str("SasToken(<redacted>)"),
            Credential::Entra(c) => write!(f, "Entra({c:?})"),
        }
    }
}

impl Credential {
    /// A token for `audience` (`sb://<host>/<entity>`).
    pub async fn token(&self, audience: &str) -> Result<CbsToken, CredentialError> {
        match self {
            Credential::SasKey {
                name,
                key,
                lifetime,
            } => {
                let expires_at = SystemTime::now() + *lifetime;
                let se = expires_at
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs();
                Ok(CbsToken {
                    value: sas::token(audience, name, key, se),
                    token_type: "servicebus.windows.net:sastoken",
                    expires_at,
                })
            }
            Credential::SasToken(token) => {
                let expires_at = sas::token_expiry(token)
                    .map(|se| UNIX_EPOCH + Duration::from_secs(se))
                    .ok_or_else(|| {
                        CredentialError("the SharedAccessSignature has no se= expiry".into())
                    })?;
                if expires_at <= SystemTime::now() {
                    return Err(CredentialError(
                        "the SharedAccessSignature in the connection string has expired".into(),
                    ));
                }
                Ok(CbsToken {
                    value: token.clone(),
                    token_type: "servicebus.windows.net:sastoken",
                    expires_at,
                })
            }
            Credential::Entra(credential) => {
                let token = credential
                    .get_token(&[SERVICE_BUS_SCOPE], None)
                    .await
                    .map_err(|e| CredentialError(e.to_string()))?;
                let expires_at = UNIX_EPOCH
                    + Duration::from_secs(
                        u64::try_from(token.expires_on.unix_timestamp()).unwrap_or(0),
                    );
                Ok(CbsToken {
                    value: token.token.secret().to_owned(),
                    token_type: "jwt",
                    expires_at,
                })
            }
        }
    }
}

/// Which Entra ID credential to use for `servicebus.namespace`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntraSource {
    /// Workload identity when AKS injected its token file, else managed identity.
    Auto,
    /// AKS workload identity (`AZURE_FEDERATED_TOKEN_FILE`, `AZURE_CLIENT_ID`, `AZURE_TENANT_ID`).
    Workload,
    /// The VM's or pod's managed identity (IMDS).
    Managed,
    /// A developer's `az login` / `azd auth login`.
    Developer,
}

/// Builds the Entra ID credential that `source` names.
pub fn entra_credential(source: EntraSource) -> Result<Arc<dyn TokenCredential>, CredentialError> {
    use azure_identity::{
        DeveloperToolsCredential, ManagedIdentityCredential, WorkloadIdentityCredential,
    };
    let wrap = |e: azure_core::Error| CredentialError(e.to_string());
    let source = match source {
        EntraSource::Auto if std::env::var_os("AZURE_FEDERATED_TOKEN_FILE").is_some() => {
            EntraSource::Workload
        }
        EntraSource::Auto => EntraSource::Managed,
        other => other,
    };
    Ok(match source {
        EntraSource::Workload => WorkloadIdentityCredential::new(None).map_err(wrap)?,
        EntraSource::Managed | EntraSource::Auto => {
            ManagedIdentityCredential::new(None).map_err(wrap)?
        }
        EntraSource::Developer => DeveloperToolsCredential::new(None).map_err(wrap)?,
    })
}
