//! Claim-check storage against Azurite: transfers, caps, policy and outages (the storage
//! module alone), then whole jobs through the engine with a real executor.

use std::sync::Arc;

use hybrid_worker::storage::{BlobRef, Storage, StorageError, StorageSettings};
use sha2::Digest;

use crate::azurite::Azurite;

pub fn settings(connection_string: &str) -> StorageSettings {
    StorageSettings {
        connection_string: connection_string.to_owned(),
        account_url: String::new(),
        input_containers: vec!["inputs".into()],
        results_container: "results".into(),
        max_input_mb: 8,
        max_result_mb: 4,
    }
}

pub async fn storage(azurite: &Azurite) -> Arc<Storage> {
    let storage = Storage::from_settings(&settings(&azurite.connection_string()), || {
        Err("no Entra ID in tests".into())
    })
    .expect("settings")
    .expect("configured");
    for container in ["inputs", "results"] {
        storage
            .ensure_container(container)
            .await
            .expect("container");
    }
    Arc::new(storage)
}

fn blob(container: &str, name: &str) -> BlobRef {
    BlobRef {
        container: container.into(),
        name: name.into(),
    }
}

/// Bytes that do not repeat in short cycles, so a misplaced range would be noticed.
pub fn data(len: usize) -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

#[tokio::test]
async fn a_blob_round_trips_streamed_with_its_sha256() {
    let Some(azurite) = Azurite::start() else {
        return;
    };
    let storage = storage(&azurite).await;
    let bytes = data(6 * 1024 * 1024 + 123);
    let input = blob("inputs", "dir/big input.bin");
    let written = storage
        .upload_bytes(&input, bytes.clone(), "application/octet-stream")
        .await
        .expect("upload");
    let expected = hex::encode(sha2::Sha256::digest(&bytes));
    assert_eq!(
        (written.bytes, &written.sha256),
        (bytes.len() as u64, &expected)
    );
    let dir = tempfile::tempdir().expect("tmp");
    let dest = dir.path().join("input.bin");
    let fetched = storage.download(&input, &dest).await.expect("download");
    assert_eq!(fetched.sha256, expected);
    assert_eq!(fetched.bytes, bytes.len() as u64);
    assert_eq!(std::fs::read(&dest).expect("file"), bytes);
    // Read-only for the job.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&dest).expect("meta").permissions().mode();
    assert_eq!(mode & 0o777, 0o444);

    // A file goes up streamed too, and overwriting is allowed (a redelivered job).
    let again = storage
        .upload_file(
            &blob("results", "job-1/copy.bin"),
            &dest,
            "application/octet-stream",
        )
        .await
        .expect("file upload");
    assert_eq!(again.sha256, expected);
    storage
        .upload_file(
            &blob("results", "job-1/copy.bin"),
            &dest,
            "application/octet-stream",
        )
        .await
        .expect("overwrite");
}

#[tokio::test]
async fn missing_and_oversize_inputs_are_the_jobs_fault_and_an_outage_is_not() {
    let Some(mut azurite) = Azurite::start() else {
        return;
    };
    let storage = storage(&azurite).await;
    let dir = tempfile::tempdir().expect("tmp");

    let err = storage
        .download(&blob("inputs", "nope.csv"), &dir.path().join("a"))
        .await
        .expect_err("missing");
    assert!(matches!(err, StorageError::NotFound { .. }), "{err}");
    let job = err.job_error().expect("the job's fault");
    assert_eq!(job.kind, hybrid_worker::job::ErrorKind::InvalidInput);
    assert!(job.message.contains("inputs/nope.csv"), "{}", job.message);

    let big = blob("inputs", "big.bin");
    storage
        .upload_bytes(&big, vec![7u8; 9 * 1024 * 1024], "application/octet-stream")
        .await
        .expect("upload");
    let err = storage
        .download(&big, &dir.path().join("b"))
        .await
        .expect_err("over the cap");
    assert!(matches!(err, StorageError::TooLarge { .. }), "{err}");
    assert!(
        err.to_string().contains("storage.max_input_mb = 8"),
        "{err}"
    );
    assert!(!dir.path().join("b").exists(), "nothing is left behind");

    azurite.stop();
    let started = std::time::Instant::now();
    let err = storage
        .download(&blob("inputs", "any.csv"), &dir.path().join("c"))
        .await
        .expect_err("outage");
    assert!(matches!(err, StorageError::Unavailable { .. }), "{err}");
    assert!(
        err.job_error().is_none(),
        "an outage is not the job's fault"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
}
