//! `servicebus-emulator` as a process: prints the connection string first, keeps data in
//! `--data`, exits 0 on SIGTERM after closing connections, and exits 2 on a bad `Config.json`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[test]
fn prints_connection_string_and_stops_on_sigterm() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_servicebus-emulator"))
        .args(["--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let line = line.trim();
    assert!(line.starts_with("Endpoint=sb://127.0.0.1:"), "{line}");
    assert!(line.ends_with(
        ";SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;"
    ));
    let port: u16 = line["Endpoint=sb://127.0.0.1:".len()..]
        .split(';')
        .next()
        .ok_or("no port")?
        .parse()?;
    assert_ne!(port, 0, "the real port is printed");
    assert!(dir.path().join("emulator.sqlite3").exists());
    let pid = i32::try_from(child.id())?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let status = child.wait()?;
    assert!(status.success(), "exit status {status}");
    Ok(())
}

#[test]
fn a_bad_config_json_is_a_usage_error_naming_the_file() -> TestResult {
    let dir = tempfile::tempdir()?;
    let entities = dir.path().join("Config.json");
    std::fs::write(&entities, "{\"UserConfig\": 42}")?;
    let output = Command::new(env!("CARGO_BIN_EXE_servicebus-emulator"))
        .args(["--listen", "127.0.0.1:0", "--in-memory", "--entities"])
        .arg(&entities)
        .output()?;
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(
        output.stdout.is_empty(),
        "no connection string for a refused start"
    );
    let stderr = String::from_utf8(output.stderr)?;
    assert!(stderr.contains("Config.json"), "{stderr}");
    Ok(())
}
