//! Claim-check storage: job inputs and results too large for a Service Bus message travel
//! through Blob Storage, and the message carries a reference.
//!
//! The daemon does every transfer itself, with its own identity, so that a job never needs
//! network access or a storage credential: before a job starts, the blob its `input_blob`
//! names is streamed into the job's private folder (size-capped, sha256 computed); after a
//! job succeeds, an output over the worker's `max_result_kb` and every file the handler wrote
//! into its output folder are uploaded under `<results container>/<job id>/`, before the reply
//! is sent. The contract (names, reply fields, error kinds) is `docs/storage.md`.
//!
//! One concern per file: [`settings`] (the `[storage]` section), [`connection_string`],
//! [`sas`] (signing with an account key, which the SDK does not do), [`reference`] (what a job
//! may name), [`transfer`] (streamed download and upload), [`results`] (what a job leaves
//! behind and how the reply lists it).

pub mod connection_string;
pub mod reference;
pub mod results;
pub mod sas;
pub mod settings;
pub mod transfer;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use azure_core::credentials::TokenCredential;
use azure_core::http::{ClientOptions, ExponentialRetryOptions, RetryOptions, Url};
use azure_storage_blob::{BlobClient, BlobClientOptions};

use crate::job::{ErrorKind, JobError};
use connection_string::{AccountAuth, StorageConnectionString};
pub use reference::BlobRef;
pub use results::{ResultBlobs, StoredBlob};
pub use settings::StorageSettings;

/// How long a signed SAS is valid: enough for one transfer of the largest input.
const SAS_LIFETIME: Duration = Duration::from_secs(3600);
/// How long the SDK keeps retrying one request before the daemon gives the job back to the
/// broker (it is delivered again, so an outage costs time, never the job).
const RETRY_PATIENCE: Duration = Duration::from_secs(20);

/// A failed storage step, classified by whose fault it is.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The job names something it may not (`PolicyDenied`).
    #[error("{0}")]
    Refused(String),
    /// The job's input does not exist (`InvalidInput`).
    #[error("input_blob {path:?} does not exist")]
    NotFound { path: String },
    /// The job's input is over the cap (`InvalidInput`).
    #[error("input_blob {path:?} has {bytes} bytes, over storage.max_input_mb = {cap_mb} MiB")]
    TooLarge {
        path: String,
        bytes: u64,
        cap_mb: u64,
    },
    /// The service could not be reached or refused the daemon: not the job's fault, so the
    /// job is given back to the broker and runs again later.
    #[error("blob storage is unavailable ({path}): {reason}")]
    Unavailable { path: String, reason: String },
    /// The daemon's own disk failed: as with an outage, the job runs again later.
    #[error("local file {path}: {source}")]
    Local {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

impl StorageError {
    /// The job's failure, or `None` when the fault is the daemon's (the job must run again,
    /// without using up an attempt).
    pub fn job_error(&self) -> Option<JobError> {
        match self {
            StorageError::Refused(why) => Some(JobError::new(ErrorKind::PolicyDenied, why)),
            StorageError::NotFound { .. } | StorageError::TooLarge { .. } => {
                Some(JobError::new(ErrorKind::InvalidInput, self.to_string()))
            }
            StorageError::Unavailable { .. } | StorageError::Local { .. } => None,
        }
    }
}

enum Auth {
    Key { account: String, key: String },
    Sas(String),
    Entra(Arc<dyn TokenCredential>),
}

/// The configured account: where blobs are, how to reach them, and what jobs may name.
pub struct Storage {
    endpoint: Url,
    auth: Auth,
    input_containers: Vec<String>,
    results_container: String,
    max_input_bytes: u64,
    max_input_mb: u64,
    max_result_bytes: u64,
    options: BlobClientOptions,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let auth = match &self.auth {
            Auth::Key { account, .. } => format!("account key of {account}"),
            Auth::Sas(_) => "SAS".to_owned(),
            Auth::Entra(_) => "Entra ID".to_owned(),
        };
        f.debug_struct("Storage")
            .field("endpoint", &self.endpoint.as_str())
            .field("auth", &auth)
            .field("input_containers", &self.input_containers)
            .field("results_container", &self.results_container)
            .finish_non_exhaustive()
    }
}

/// Why the configured account cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StorageSetupError {
    #[error(transparent)]
    Settings(#[from] settings::StorageSettingsError),
    #[error("storage.connection_string: {0}")]
    ConnectionString(#[from] connection_string::ConnectionStringError),
    #[error("storage.account_url {0:?} is not a URL")]
    AccountUrl(String),
    #[error("the Entra ID credential for storage.account_url: {0}")]
    Credential(String),
}

impl Storage {
    /// The configured account, or `None` when `[storage]` is not set. `credential` builds the
    /// daemon's Entra ID credential; it is called only for `storage.account_url`.
    pub fn from_settings(
        settings: &StorageSettings,
        credential: impl FnOnce() -> Result<Arc<dyn TokenCredential>, String>,
    ) -> Result<Option<Storage>, StorageSetupError> {
        if !settings.is_configured() {
            return Ok(None);
        }
        settings.validate()?;
        let (endpoint, auth) = if settings.connection_string.trim().is_empty() {
            let url = settings.account_url.trim();
            let endpoint =
                Url::parse(url).map_err(|_| StorageSetupError::AccountUrl(url.to_owned()))?;
            (
                endpoint,
                Auth::Entra(credential().map_err(StorageSetupError::Credential)?),
            )
        } else {
            let cs = StorageConnectionString::parse(settings.connection_string.trim())?;
            let auth = match cs.auth {
                AccountAuth::Key { account, key } => Auth::Key { account, key },
                AccountAuth::Sas(token) => Auth::Sas(token),
            };
            (cs.blob_endpoint, auth)
        };
        let options = BlobClientOptions {
            client_options: ClientOptions {
                retry: RetryOptions::exponential(ExponentialRetryOptions {
                    max_total_elapsed: azure_core::time::Duration::seconds(
                        RETRY_PATIENCE.as_secs() as i64,
                    ),
                    max_retries: 6,
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        Ok(Some(Storage {
            endpoint,
            auth,
            input_containers: settings.input_containers.clone(),
            results_container: settings.results_container.clone(),
            max_input_bytes: settings.max_input_mb.saturating_mul(1024 * 1024),
            max_input_mb: settings.max_input_mb,
            max_result_bytes: settings.max_result_mb.saturating_mul(1024 * 1024),
            options,
        }))
    }

    /// The blob a job's `input_blob` names, if the job may name it.
    pub fn resolve_input(&self, reference: &str) -> Result<BlobRef, StorageError> {
        reference::resolve(reference, &self.endpoint, &self.input_containers)
            .map_err(|e| StorageError::Refused(e.0))
    }

    /// Where a job's result or artifact named `file` goes: `<results>/<job id>/<file>`.
    pub fn result_blob(&self, job_id: &str, file: &str) -> BlobRef {
        BlobRef {
            container: self.results_container.clone(),
            name: format!("{}/{file}", results::safe_segment(job_id)),
        }
    }

    /// The first input container, where `submit --upload` puts files.
    pub fn upload_container(&self) -> &str {
        self.input_containers
            .first()
            .map_or("inputs", String::as_str)
    }

    /// The largest handler output the daemon takes to upload, in bytes.
    pub fn max_result_bytes(&self) -> u64 {
        self.max_result_bytes
    }

    /// The blob's plain URL (no SAS): what replies carry.
    pub fn url(&self, blob: &BlobRef) -> Url {
        blob.url(&self.endpoint)
    }

    /// Creates `container` unless it exists: the results container when the daemon starts,
    /// the input container for `submit --upload`.
    pub async fn ensure_container(&self, container: &str) -> Result<(), StorageError> {
        let path = container.to_owned();
        let mut url = self.endpoint.clone();
        url.set_query(None);
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.pop_if_empty().push(container);
        }
        let credential = match &self.auth {
            Auth::Key { account, key } => {
                let token =
                    sas::create_container_sas(account, key, SystemTime::now(), SAS_LIFETIME);
                url.set_query(Some(&token));
                None
            }
            Auth::Sas(token) => {
                url.set_query(Some(token));
                None
            }
            Auth::Entra(credential) => Some(credential.clone()),
        };
        let unavailable = |e: azure_core::Error| StorageError::Unavailable {
            path: path.clone(),
            reason: crate::job::one_line(&e.to_string(), 300),
        };
        let client = azure_storage_blob::BlobContainerClient::new(
            url,
            credential,
            Some(azure_storage_blob::BlobContainerClientOptions {
                client_options: self.options.client_options.clone(),
                ..Default::default()
            }),
        )
        .map_err(unavailable)?;
        match client.create(None).await {
            Ok(_) => Ok(()),
            Err(e) if e.http_status() == Some(azure_core::http::StatusCode::Conflict) => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Puts the SAS on `url` (signed for `permission` on this blob when the daemon holds the
    /// key), or returns the Entra ID credential the client adds itself.
    fn authorise(
        &self,
        url: &mut Url,
        blob: &BlobRef,
        permission: sas::Permission,
    ) -> Option<Arc<dyn TokenCredential>> {
        match &self.auth {
            Auth::Key { account, key } => {
                let token = sas::service_sas(
                    account,
                    key,
                    &blob.container,
                    &blob.name,
                    permission,
                    SystemTime::now(),
                    SAS_LIFETIME,
                );
                url.set_query(Some(&token));
                None
            }
            Auth::Sas(token) => {
                url.set_query(Some(token));
                None
            }
            Auth::Entra(credential) => Some(credential.clone()),
        }
    }

    /// A client for one blob, authorised for `permission` only when signing with a key.
    fn client(
        &self,
        blob: &BlobRef,
        permission: sas::Permission,
    ) -> Result<BlobClient, StorageError> {
        let mut url = self.url(blob);
        let credential = self.authorise(&mut url, blob, permission);
        BlobClient::new(url, credential, Some(self.options.clone())).map_err(|e| {
            StorageError::Unavailable {
                path: blob.path(),
                reason: e.to_string(),
            }
        })
    }
}
