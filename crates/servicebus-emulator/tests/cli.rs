//! `servicebus-emulator` as a process: prints the connection string first, keeps data in
//! `--data`, and exits 0 on SIGTERM after closing connections.

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
