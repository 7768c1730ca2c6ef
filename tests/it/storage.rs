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

    // A missing results container is the deployment's fault: the job is postponed, not failed.
    let err = storage
        .upload_bytes(
            &blob("nosuchcontainer", "job/result.json"),
            b"{}".to_vec(),
            "application/json",
        )
        .await
        .expect_err("no container");
    assert!(matches!(err, StorageError::Unavailable { .. }), "{err}");
    assert!(err.to_string().contains("does not exist"), "{err}");

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

// ---- whole jobs: engine, real worker processes, Azurite ----

use std::time::Duration;

use hybrid_worker::broker::memory::{Event, MemoryBroker};
use hybrid_worker::worker::Isolation;
use serde_json::{Value, json};

use crate::helpers::*;

/// Runs `jobs` through an engine whose executor has `storage`, until each has a reply.
async fn run_jobs(
    storage: Option<Arc<Storage>>,
    mode: Isolation,
    temp: &std::path::Path,
    jobs: &[(&str, Value)],
    limit: Duration,
) -> (Arc<MemoryBroker>, std::collections::BTreeMap<String, Value>) {
    let executor =
        process_executor_in(&["csv-normalize", "diagnostics"], temp, mode).with_storage(storage);
    let broker = Arc::new(MemoryBroker::new(JOBS, Duration::from_secs(30), 10));
    for (id, body) in jobs {
        broker.push(job_message(id, body));
    }
    let run = start(broker.clone(), Arc::new(executor), options(2));
    wait_for(limit, "every reply", || {
        broker.messages(RESULTS).len() == jobs.len()
    })
    .await;
    wait_for(Duration::from_secs(10), "settlement", || {
        broker.locked_count() == 0
    })
    .await;
    run.stop().await;
    let bodies = replies(&broker, RESULTS)
        .into_iter()
        .map(|(id, (_, body))| (id, body))
        .collect();
    (broker, bodies)
}

/// A CSV export with messy headers, padded values, blank lines and repeated rows.
fn messy_csv(rows: usize) -> String {
    let mut text = String::from(" Customer ID ,Signup Date,Amount (EUR)\n");
    for i in 0..rows {
        let id = i % (rows - rows / 10).max(1);
        text.push_str(&format!(
            "{id}, 2024-03-{:02} ,{}.5\n",
            id % 28 + 1,
            id % 1000
        ));
        if i % 97 == 0 {
            text.push_str(",,\n");
        }
    }
    text
}

/// Downloads a blob a reply lists and checks its size and sha256 against the reply.
async fn fetch_listed(storage: &Storage, listed: &Value) -> Vec<u8> {
    let path = listed["path"].as_str().expect("path");
    let (container, name) = path.split_once('/').expect("container/name");
    let dir = tempfile::tempdir().expect("tmp");
    let dest = dir.path().join("blob");
    let fetched = storage
        .download(&blob(container, name), &dest)
        .await
        .expect("listed blob");
    assert_eq!(fetched.sha256, listed["sha256"].as_str().expect("sha256"));
    assert_eq!(fetched.bytes, listed["bytes"].as_u64().expect("bytes"));
    assert!(
        listed["url"]
            .as_str()
            .expect("url")
            .ends_with(&path.replace(' ', "%20"))
    );
    std::fs::read(&dest).expect("downloaded")
}

async fn a_csv_blob_goes_through_csv_normalize_into_artifacts(mode: Isolation) {
    let Some(azurite) = Azurite::start() else {
        return;
    };
    let storage = storage(&azurite).await;
    let csv = messy_csv(20_000);
    storage
        .upload_bytes(
            &blob("inputs", "exports/may.csv"),
            csv.clone().into_bytes(),
            "text/csv",
        )
        .await
        .expect("upload");
    let temp = tempfile::tempdir().expect("tmp");
    let body = json!({
        "worker": "csv-normalize",
        "input": {"key": ["customer_id"]},
        "input_blob": "inputs/exports/may.csv",
    });
    let (broker, replies) = run_jobs(
        Some(storage.clone()),
        mode,
        temp.path(),
        &[("csv-blob", body)],
        Duration::from_secs(120),
    )
    .await;
    let reply = &replies["csv-blob"];
    assert_eq!(reply["status"], "succeeded", "{reply}");
    let summary = &reply["output"]["summary"];
    let artifacts = reply["artifacts"].as_array().expect("artifacts");
    let names: Vec<&str> = artifacts
        .iter()
        .filter_map(|a| a["name"].as_str())
        .collect();
    assert_eq!(names, ["normalized.csv", "report.json"]);
    assert_eq!(artifacts[0]["path"], "results/csv-blob/normalized.csv");
    assert_eq!(artifacts[0]["content_type"], "text/csv");
    let normalized = String::from_utf8(fetch_listed(&storage, &artifacts[0]).await).expect("utf-8");
    let mut lines = normalized.lines();
    assert_eq!(lines.next(), Some("customer_id,signup_date,amount_eur"));
    assert_eq!(lines.next(), Some("0,2024-03-01,0.5"));
    assert_eq!(
        normalized.lines().count() as u64 - 1,
        summary["rows_out"].as_u64().expect("rows_out")
    );
    let report: Value =
        serde_json::from_slice(&fetch_listed(&storage, &artifacts[1]).await).expect("report");
    assert_eq!(report["rows_out"], summary["rows_out"]);
    assert!(summary["duplicates_removed"].as_u64().expect("dups") > 0);
    assert!(broker.dead_letters().is_empty());
    // The staging folders are gone with the job.
    let left: Vec<_> = std::fs::read_dir(temp.path())
        .expect("temp")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("hybrid-claim-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

async fn an_output_over_max_result_kb_comes_back_as_output_blob(mode: Isolation) {
    let Some(azurite) = Azurite::start() else {
        return;
    };
    let storage = storage(&azurite).await;
    let temp = tempfile::tempdir().expect("tmp");
    let big = json!({"worker": "diagnostics", "input": {"action": "result", "kb": 400}});
    let small = json!({"worker": "diagnostics", "input": {"action": "result", "kb": 1}});
    let (_, replies) = run_jobs(
        Some(storage.clone()),
        mode,
        temp.path(),
        &[("big", big), ("small", small)],
        Duration::from_secs(60),
    )
    .await;
    let reply = &replies["big"];
    assert_eq!(reply["status"], "succeeded", "{reply}");
    assert_eq!(reply["output"], Value::Null);
    let listed = &reply["output_blob"];
    assert_eq!(listed["path"], "results/big/result.json");
    assert_eq!(listed["content_type"], "application/json");
    let output: Value =
        serde_json::from_slice(&fetch_listed(&storage, listed).await).expect("json");
    assert_eq!(output.as_str().map(str::len), Some(400 * 1024));
    // Under the limit, the output stays in the reply and nothing is stored.
    let small = &replies["small"];
    assert_eq!(small["output"].as_str().map(str::len), Some(1024));
    assert!(
        small.get("output_blob").is_none() && small.get("artifacts").is_none(),
        "{small}"
    );
}

crate::in_both_modes!(
    a_csv_blob_goes_through_csv_normalize_into_artifacts,
    an_output_over_max_result_kb_comes_back_as_output_blob,
);

#[tokio::test]
async fn foreign_references_are_refused_before_anything_is_fetched() {
    // An account where nothing listens: a fetch would end in an outage (postponed), never in
    // PolicyDenied, so a PolicyDenied reply proves that nothing was fetched.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let cs = format!(
        "AccountName=devstoreaccount1;AccountKey={};BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1",
        hybrid_worker::storage::connection_string::DEV_KEY
    );
    let storage = Storage::from_settings(&settings(&cs), || Err("none".into()))
        .expect("settings")
        .expect("configured");
    let refs = [
        ("results", "results/other-job/result.json".to_owned()),
        ("container", "secrets/key.pem".to_owned()),
        (
            "account",
            format!("http://127.0.0.1:{port}/otheraccount/inputs/a.csv"),
        ),
        (
            "host",
            "https://attacker.example/devstoreaccount1/inputs/a.csv".to_owned(),
        ),
        (
            "imds",
            "http://169.254.169.254/metadata/identity/oauth2/token".to_owned(),
        ),
        (
            "sas",
            format!("http://127.0.0.1:{port}/devstoreaccount1/inputs/a.csv?sig=x"),
        ),
    ];
    let jobs: Vec<(&str, Value)> = refs
        .iter()
        .map(|(id, r)| (*id, json!({"worker": "csv-normalize", "input_blob": r})))
        .collect();
    let temp = tempfile::tempdir().expect("tmp");
    let (broker, replies) = run_jobs(
        Some(Arc::new(storage)),
        Isolation::Spawn,
        temp.path(),
        &jobs,
        Duration::from_secs(30),
    )
    .await;
    for (id, _) in &refs {
        let error = &replies[*id]["error"];
        assert_eq!(error["kind"], "PolicyDenied", "{id}: {error}");
        assert_eq!(error["retryable"], false, "{id}");
    }
    assert_eq!(broker.dead_letters().len(), refs.len());

    // Without storage, input_blob names the setting that is missing.
    let (_, replies) = run_jobs(
        None,
        Isolation::Spawn,
        temp.path(),
        &[(
            "none",
            json!({"worker": "csv-normalize", "input_blob": "inputs/a.csv"}),
        )],
        Duration::from_secs(30),
    )
    .await;
    let error = &replies["none"]["error"];
    assert_eq!(error["kind"], "PolicyDenied");
    assert!(
        error["message"]
            .as_str()
            .expect("message")
            .contains("storage.connection_string"),
        "{error}"
    );
}

#[tokio::test]
async fn missing_input_blob_fails_the_job_as_invalid_input() {
    let Some(azurite) = Azurite::start() else {
        return;
    };
    let storage = storage(&azurite).await;
    let temp = tempfile::tempdir().expect("tmp");
    let (broker, replies) = run_jobs(
        Some(storage),
        Isolation::Spawn,
        temp.path(),
        &[(
            "missing",
            json!({"worker": "csv-normalize", "input_blob": "inputs/none.csv"}),
        )],
        Duration::from_secs(60),
    )
    .await;
    let error = &replies["missing"]["error"];
    assert_eq!(error["kind"], "InvalidInput", "{error}");
    assert!(
        error["message"]
            .as_str()
            .expect("message")
            .contains("inputs/none.csv")
    );
    assert_eq!(broker.dead_letters().len(), 1);
}

#[tokio::test]
async fn a_storage_outage_postpones_the_job_and_loses_nothing() {
    let Some(mut azurite) = Azurite::start() else {
        return;
    };
    let storage = storage(&azurite).await;
    storage
        .upload_bytes(
            &blob("inputs", "a.csv"),
            b"id,name\n1,Ada\n".to_vec(),
            "text/csv",
        )
        .await
        .expect("upload");
    azurite.stop();
    let temp = tempfile::tempdir().expect("tmp");
    let executor = process_executor_in(
        &["csv-normalize", "diagnostics"],
        temp.path(),
        Isolation::Spawn,
    )
    .with_storage(Some(storage.clone()));
    let broker = Arc::new(MemoryBroker::new(JOBS, Duration::from_secs(30), 10));
    // One job cannot fetch its input, the other cannot store its output.
    broker.push(job_message(
        "input-outage",
        &json!({"worker": "csv-normalize", "input_blob": "inputs/a.csv"}),
    ));
    broker.push(job_message(
        "upload-outage",
        &json!({"worker": "diagnostics", "input": {"action": "result", "kb": 400}}),
    ));
    let run = start(broker.clone(), Arc::new(executor), options(2));
    wait_for(Duration::from_secs(90), "both jobs given back", || {
        broker
            .events()
            .iter()
            .filter(|e| matches!(e, Event::Abandoned(_)))
            .count()
            >= 2
    })
    .await;
    assert!(
        broker.messages(RESULTS).is_empty(),
        "no reply while storage is down"
    );
    assert!(broker.dead_letters().is_empty(), "not the jobs' fault");
    azurite.restart();
    wait_for(Duration::from_secs(120), "the replies", || {
        broker.messages(RESULTS).len() == 2
    })
    .await;
    run.stop().await;
    let replies = replies(&broker, RESULTS);
    for id in ["input-outage", "upload-outage"] {
        let reply = &replies[id].1;
        assert_eq!(reply["status"], "succeeded", "{reply}");
        assert_eq!(reply["attempt"], 1, "an outage uses up no attempt");
    }
    assert_eq!(
        replies["upload-outage"].1["output_blob"]["path"],
        "results/upload-outage/result.json"
    );
    assert!(broker.dead_letters().is_empty());
}
