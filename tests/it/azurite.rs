//! Azurite, Microsoft's Blob Storage emulator (npm `azurite`, pinned in tests/azurite), for the
//! claim-check tests: started on a free port of 127.0.0.1 with its data in a temp folder (so a
//! restart on the same port finds its blobs), stopped when dropped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hybrid_worker::storage::connection_string::{DEV_ACCOUNT, DEV_KEY};

/// The pinned Azurite's blob server, installed by `npm ci` in tests/azurite (tests/run.sh
/// does it). Without it the storage tests fail, unless HYBRID_TEST_REQUIRE_AZURITE=0 makes
/// them skip.
pub fn binary() -> Option<PathBuf> {
    let bin =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/azurite/node_modules/.bin/azurite-blob");
    if bin.exists() {
        return Some(bin);
    }
    assert!(
        std::env::var("HYBRID_TEST_REQUIRE_AZURITE").as_deref() == Ok("0"),
        "Azurite is not installed: run `npm ci` in tests/azurite (or set \
         HYBRID_TEST_REQUIRE_AZURITE=0 to skip the storage tests)"
    );
    eprintln!("Azurite is not installed; skipping (HYBRID_TEST_REQUIRE_AZURITE=0)");
    None
}

pub struct Azurite {
    bin: PathBuf,
    data: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

impl Azurite {
    /// Starts Azurite on a free port, or `None` when it is not installed (and may be skipped).
    pub fn start() -> Option<Azurite> {
        let bin = binary()?;
        let data = tempfile::tempdir().expect("azurite data folder");
        let mut azurite = Azurite {
            bin,
            data,
            port: 0,
            child: None,
        };
        azurite.launch(0);
        Some(azurite)
    }

    fn launch(&mut self, port: u16) {
        let mut child = Command::new(&self.bin)
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .args(["--skipApiVersionCheck", "--disableTelemetry", "--loose"])
            .arg("--location")
            .arg(self.data.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start azurite");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let give_up = Instant::now() + Duration::from_secs(60);
        let mut seen = String::new();
        while Instant::now() < give_up {
            let Some(Ok(line)) = lines.next() else { break };
            if let Some(addr) = line.split("listens on http://").nth(1) {
                let port = addr.trim().rsplit(':').next().and_then(|p| p.parse().ok());
                self.port = port.expect("azurite's port");
                // Keep reading its output so that it never blocks on a full pipe.
                std::thread::spawn(move || for _ in lines {});
                self.child = Some(child);
                return;
            }
            seen.push_str(&line);
            seen.push('\n');
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("azurite did not start: {seen}");
    }

    /// Stops it (an outage), keeping its data: SIGTERM lets it save its blob index, SIGKILL
    /// follows if it does not exit within 10 s.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let give_up = Instant::now() + Duration::from_secs(10);
            while Instant::now() < give_up {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, with the same data.
    pub fn restart(&mut self) {
        self.stop();
        let port = self.port;
        self.launch(port);
    }

    /// The account-key connection string of the emulator's well-known account.
    pub fn connection_string(&self) -> String {
        format!(
            "DefaultEndpointsProtocol=http;AccountName={DEV_ACCOUNT};AccountKey={DEV_KEY};\
             BlobEndpoint=http://127.0.0.1:{}/{DEV_ACCOUNT};",
            self.port
        )
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        self.stop();
    }
}
