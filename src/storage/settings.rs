//! The `[storage]` section: where claim-check blobs live and what jobs may name. Checked at
//! start like every other section, so a typo in a container name is an error there, not a
//! refused job later.

use serde::{Deserialize, Serialize};

use super::connection_string::StorageConnectionString;

/// The `[storage]` section as loaded (`HYBRID__STORAGE__…`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSettings {
    /// A storage connection string (account key, SAS, or `UseDevelopmentStorage=true`).
    /// Secret: redacted by `config show`.
    pub connection_string: String,
    /// The account's blob endpoint (`https://<account>.blob.core.windows.net`), reached with
    /// the daemon's Entra ID credential (`servicebus.credential`).
    pub account_url: String,
    /// The containers a job's `input_blob` may name.
    pub input_containers: Vec<String>,
    /// Where results and artifacts go, under `<job id>/`.
    pub results_container: String,
    /// Largest input blob a job may name, in MiB.
    pub max_input_mb: u64,
    /// Largest handler output the daemon takes to upload as `result.json`, in MiB.
    pub max_result_mb: u64,
}

/// Why the `[storage]` section cannot be used: the key, and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration key `{key}` = {value:?} is invalid: {reason}")]
pub struct StorageSettingsError {
    pub key: &'static str,
    pub value: String,
    pub reason: String,
}

fn invalid(key: &'static str, value: impl ToString, reason: &str) -> StorageSettingsError {
    StorageSettingsError {
        key,
        value: value.to_string(),
        reason: reason.to_owned(),
    }
}

impl StorageSettings {
    /// Whether claim-check storage is configured at all.
    pub fn is_configured(&self) -> bool {
        !self.connection_string.trim().is_empty() || !self.account_url.trim().is_empty()
    }

    /// Checks every key; an unconfigured section is valid (and unused).
    pub fn validate(&self) -> Result<(), StorageSettingsError> {
        let cs = self.connection_string.trim();
        let url = self.account_url.trim();
        if !cs.is_empty() && !url.is_empty() {
            return Err(invalid(
                "storage.account_url",
                url,
                "set either storage.connection_string or storage.account_url, not both",
            ));
        }
        if !cs.is_empty()
            && let Err(e) = StorageConnectionString::parse(cs)
        {
            return Err(invalid(
                "storage.connection_string",
                "<redacted>",
                &e.to_string(),
            ));
        }
        if !url.is_empty() {
            match azure_core::http::Url::parse(url) {
                Ok(u) if u.scheme() == "https" && u.host_str().is_some() && u.query().is_none() => {
                }
                _ => {
                    return Err(invalid(
                        "storage.account_url",
                        url,
                        "must be an https URL such as https://contoso.blob.core.windows.net",
                    ));
                }
            }
        }
        if self.input_containers.is_empty() {
            return Err(invalid(
                "storage.input_containers",
                "[]",
                "must name at least one container",
            ));
        }
        for name in &self.input_containers {
            if !is_container_name(name) {
                return Err(invalid(
                    "storage.input_containers",
                    name,
                    "each entry must be a container name: 3-63 lowercase letters, digits and \
                     single '-', starting and ending with a letter or digit",
                ));
            }
        }
        if !is_container_name(&self.results_container) {
            return Err(invalid(
                "storage.results_container",
                &self.results_container,
                "must be a container name: 3-63 lowercase letters, digits and single '-', \
                 starting and ending with a letter or digit",
            ));
        }
        if self.input_containers.contains(&self.results_container) {
            return Err(invalid(
                "storage.results_container",
                &self.results_container,
                "must not be one of storage.input_containers: a job could then name another \
                 job's results as its input",
            ));
        }
        if !(1..=102_400).contains(&self.max_input_mb) {
            return Err(invalid(
                "storage.max_input_mb",
                self.max_input_mb,
                "must be between 1 and 102400",
            ));
        }
        if !(1..=1024).contains(&self.max_result_mb) {
            return Err(invalid(
                "storage.max_result_mb",
                self.max_result_mb,
                "must be between 1 and 1024",
            ));
        }
        Ok(())
    }
}

/// Azure's container naming rule.
pub fn is_container_name(name: &str) -> bool {
    let b = name.as_bytes();
    (3..=63).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && !name.contains("--")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> StorageSettings {
        StorageSettings {
            connection_string: String::new(),
            account_url: String::new(),
            input_containers: vec!["inputs".into()],
            results_container: "results".into(),
            max_input_mb: 100,
            max_result_mb: 32,
        }
    }

    #[test]
    fn container_names_follow_azure_rules() {
        for ok in ["inputs", "abc", "a-b-c", "x1y"] {
            assert!(is_container_name(ok), "{ok}");
        }
        for bad in [
            "ab",
            "Inputs",
            "-abc",
            "abc-",
            "a--b",
            "in/puts",
            &"a".repeat(64),
        ] {
            assert!(!is_container_name(bad), "{bad}");
        }
    }

    #[test]
    fn bad_values_name_their_key() {
        let mut s = settings();
        assert!(!s.is_configured());
        s.validate().expect("the unconfigured default is valid");
        s.account_url = "http://acct.blob.core.windows.net".into();
        assert_eq!(s.validate().expect_err("http").key, "storage.account_url");
        s.account_url = "https://acct.blob.core.windows.net".into();
        s.connection_string = "UseDevelopmentStorage=true".into();
        assert_eq!(s.validate().expect_err("both").key, "storage.account_url");
        s.account_url.clear();
        s.validate().expect("development storage");
        s.results_container = "inputs".into();
        assert_eq!(
            s.validate().expect_err("same").key,
            "storage.results_container"
        );
        s.results_container = "results".into();
        s.input_containers = vec!["Bad".into()];
        assert_eq!(
            s.validate().expect_err("name").key,
            "storage.input_containers"
        );
        s.input_containers = vec!["inputs".into()];
        s.max_input_mb = 0;
        assert_eq!(s.validate().expect_err("cap").key, "storage.max_input_mb");
        s.max_input_mb = 100;
        s.connection_string = "AccountName=x".into();
        let err = s.validate().expect_err("no key");
        assert_eq!(err.key, "storage.connection_string");
        assert!(!err.to_string().contains("AccountName=x"), "{err}");
    }
}
