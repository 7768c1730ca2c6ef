//! What a job may name as its `input_blob`, decided before anything is fetched.
//!
//! The daemon reads with its own identity, so a job must never make it fetch an arbitrary URL
//! or read a container the operator did not open to jobs: a reference is either
//! `<container>/<blob name>` or a URL under this account's own blob endpoint, and its
//! container must be one of `storage.input_containers`. Everything else is `PolicyDenied`.

use azure_core::http::Url;
use percent_encoding::percent_decode_str;

/// Longest blob name Azure accepts.
const MAX_BLOB_NAME: usize = 1024;

/// A blob in this account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRef {
    pub container: String,
    /// The blob's name as stored (not URL-encoded); may contain `/`.
    pub name: String,
}

impl BlobRef {
    /// `<container>/<name>`, the form replies and flows use.
    pub fn path(&self) -> String {
        format!("{}/{}", self.container, self.name)
    }

    /// The last part of the name, made safe as a local file name.
    pub fn file_name(&self) -> String {
        safe_file_name(self.name.rsplit('/').next().unwrap_or_default())
    }

    /// The blob's URL under `endpoint`, each name segment percent-encoded.
    pub fn url(&self, endpoint: &Url) -> Url {
        let mut url = endpoint.clone();
        url.set_query(None);
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.pop_if_empty().push(&self.container);
            segments.extend(self.name.split('/'));
        }
        url
    }
}

/// `name` as a local file name: letters, digits and `-_.` kept, anything else `_`, no leading
/// dots (`input` when nothing is left).
pub fn safe_file_name(name: &str) -> String {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    match safe.trim_start_matches('.') {
        "" => "input".to_owned(),
        name => name.to_owned(),
    }
}

/// Why a reference is refused; the message is shown to the flow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// Resolves `reference` against the account at `endpoint`, allowing only `containers`.
pub fn resolve(reference: &str, endpoint: &Url, containers: &[String]) -> Result<BlobRef, Refused> {
    let reference = reference.trim();
    let blob = if reference.contains("://") {
        from_url(reference, endpoint)?
    } else {
        let path = reference.trim_start_matches('/');
        let (container, name) = path.split_once('/').ok_or_else(|| {
            Refused(format!(
                "input_blob {reference:?} must be \"<container>/<blob name>\" or a URL of this \
                 storage account"
            ))
        })?;
        BlobRef {
            container: container.to_owned(),
            name: name.to_owned(),
        }
    };
    if !containers.contains(&blob.container) {
        return Err(Refused(format!(
            "input_blob names container {:?}, which is not one of storage.input_containers ({})",
            blob.container,
            containers.join(", ")
        )));
    }
    check_name(&blob.name)?;
    Ok(blob)
}

/// A URL is accepted only under the account's own endpoint: same scheme, host, port and path
/// prefix, and no query (a SAS or a snapshot selector is not the daemon's to follow).
fn from_url(text: &str, endpoint: &Url) -> Result<BlobRef, Refused> {
    let foreign = || {
        Refused(format!(
            "input_blob {:?} is not a blob of this storage account ({}); the daemon fetches \
             nothing else",
            cut(text),
            endpoint.as_str().trim_end_matches('/')
        ))
    };
    let url = Url::parse(text).map_err(|_| foreign())?;
    if url.scheme() != endpoint.scheme()
        || url.host_str() != endpoint.host_str()
        || url.port_or_known_default() != endpoint.port_or_known_default()
        || !url.username().is_empty()
        || url.password().is_some()
    {
        return Err(foreign());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(Refused(
            "input_blob URLs must not carry a query or fragment (a SAS, snapshot or version): \
             the daemon reads the current blob with its own identity"
                .to_owned(),
        ));
    }
    let base = endpoint.path().trim_end_matches('/');
    let rest = url
        .path()
        .strip_prefix(base)
        .and_then(|r| r.strip_prefix('/'))
        .ok_or_else(foreign)?;
    let (container, name) = rest.split_once('/').ok_or_else(foreign)?;
    let name = percent_decode_str(name)
        .decode_utf8()
        .map_err(|_| Refused("input_blob's blob name is not UTF-8 once decoded".to_owned()))?;
    Ok(BlobRef {
        container: container.to_owned(),
        name: name.into_owned(),
    })
}

fn check_name(name: &str) -> Result<(), Refused> {
    if name.is_empty() || name.len() > MAX_BLOB_NAME {
        return Err(Refused(format!(
            "input_blob's blob name must have 1-{MAX_BLOB_NAME} characters"
        )));
    }
    if name.chars().any(char::is_control)
        || name.split('/').any(|s| s == "." || s == "..")
        || name.ends_with('/')
    {
        return Err(Refused(
            "input_blob's blob name must not contain control characters, '.' or '..' segments, \
             or end with '/'"
                .to_owned(),
        ));
    }
    Ok(())
}

fn cut(text: &str) -> String {
    text.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> Url {
        Url::parse("http://127.0.0.1:10000/devstoreaccount1").expect("url")
    }

    fn allowed() -> Vec<String> {
        vec!["inputs".into(), "uploads".into()]
    }

    #[test]
    fn paths_and_own_urls_resolve() {
        let blob = resolve("inputs/2024/may export.csv", &endpoint(), &allowed()).expect("path");
        assert_eq!(blob.container, "inputs");
        assert_eq!(blob.name, "2024/may export.csv");
        assert_eq!(blob.file_name(), "may_export.csv");
        assert_eq!(
            blob.url(&endpoint()).as_str(),
            "http://127.0.0.1:10000/devstoreaccount1/inputs/2024/may%20export.csv"
        );
        let same = resolve(blob.url(&endpoint()).as_str(), &endpoint(), &allowed()).expect("url");
        assert_eq!(same, blob);
        // The Blob connector's paths start with a slash.
        assert_eq!(
            resolve("/uploads/a.csv", &endpoint(), &allowed())
                .expect("slash")
                .container,
            "uploads"
        );
    }

    #[test]
    fn foreign_containers_accounts_and_urls_are_refused() {
        let cases = [
            (
                "results/job/result.json",
                "not one of storage.input_containers",
            ),
            ("secrets/key.pem", "not one of storage.input_containers"),
            (
                "http://127.0.0.1:10000/otheraccount/inputs/a.csv",
                "not a blob of this",
            ),
            (
                "http://127.0.0.1:10001/devstoreaccount1/inputs/a.csv",
                "not a blob of this",
            ),
            (
                "https://evil.example/devstoreaccount1/inputs/a.csv",
                "not a blob of this",
            ),
            (
                "http://169.254.169.254/metadata/identity",
                "not a blob of this",
            ),
            ("file:///etc/passwd", "not a blob of this"),
            (
                "http://127.0.0.1:10000/devstoreaccount1/inputs/a.csv?sv=x",
                "query",
            ),
            (
                "http://u:p@127.0.0.1:10000/devstoreaccount1/inputs/a.csv",
                "not a blob of this",
            ),
            ("inputs/../results/x", "'..'"),
            ("inputs", "must be"),
            ("inputs/", "1-1024"),
        ];
        for (reference, expected) in cases {
            let err = resolve(reference, &endpoint(), &allowed()).expect_err(reference);
            assert!(err.0.contains(expected), "{reference}: {}", err.0);
        }
    }

    #[test]
    fn file_names_are_safe() {
        let blob = |name: &str| BlobRef {
            container: "inputs".into(),
            name: name.into(),
        };
        assert_eq!(blob("..hidden").file_name(), "hidden");
        assert_eq!(blob("a/..").file_name(), "input");
        assert_eq!(blob("x/ü;rm -rf.csv").file_name(), "__rm_-rf.csv");
    }
}
