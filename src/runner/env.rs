//! What a job's interpreter is started with: its environment and its arguments, in one place
//! for both isolation modes (a spawned job, and the warm parent whose children are jobs), so
//! that the allow-list can never differ between them.
//!
//! Nothing of the daemon's own environment is passed on: a job sees `PATH` (its venv first),
//! `HOME` and `TMPDIR` (its private folder), `LANG`, `HYBRID_WORKER`, its ids, the trace
//! context its message carried, and the worker's own `env` from `worker.toml`, last.

use std::path::Path;

use crate::worker::Worker;

/// Folders on every job's `PATH` after its venv's `bin`.
pub(crate) const BASE_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// The environment of a process of `worker` living in `home`, run by the venv interpreter
/// `python`, with `job` (the job's own variables: ids, trace context) before the worker's own
/// `env`.
pub(crate) fn environment(
    worker: &Worker,
    python: &Path,
    home: &Path,
    job: impl IntoIterator<Item = (String, String)>,
) -> Vec<(String, String)> {
    let home = home.to_string_lossy().into_owned();
    let venv_bin = python
        .parent()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut env = vec![
        ("PATH".to_owned(), format!("{venv_bin}:{BASE_PATH}")),
        ("HOME".to_owned(), home.clone()),
        ("TMPDIR".to_owned(), home),
        ("LANG".to_owned(), "C.UTF-8".to_owned()),
        ("HYBRID_WORKER".to_owned(), worker.name.clone()),
    ];
    env.extend(job);
    env.extend(
        worker
            .limits()
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    env
}

/// The interpreter's arguments: isolated mode (`-I`: no `PYTHON*` variables, no user site, not
/// the script's folder on the path), no bytecode written into the read-only worker folder
/// (`-B`), and the runtime's `stub` with the runtime folder, worker folder, module and function.
pub(crate) fn arguments(stub: &str, runtime_dir: &Path, worker: &Worker) -> Vec<String> {
    vec![
        "-I".to_owned(),
        "-B".to_owned(),
        "-c".to_owned(),
        stub.to_owned(),
        runtime_dir.to_string_lossy().into_owned(),
        worker.dir.to_string_lossy().into_owned(),
        worker.module.clone(),
        worker.function.clone(),
    ]
}
