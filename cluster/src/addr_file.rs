//! Waiting for a coordinator started with `--addr-file PATH` to write its
//! bound address there: the way to learn a `--listen 127.0.0.1:0` port
//! without guessing or sleeping. Polls the file and the child, nothing else.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::child::ChildProcess;
use crate::error::Error;

/// Polls `path` every `poll` until it holds an address, and answers it.
/// Fails with [`Error::Exited`] as soon as `child` exits, and with
/// [`Error::NoAddress`] after `timeout`.
pub async fn wait_for_addr_file(
    child: &mut ChildProcess,
    path: &Path,
    timeout: Duration,
    poll: Duration,
) -> Result<SocketAddr, Error> {
    let start = Instant::now();
    loop {
        // A half-written file does not parse yet; the next poll reads it whole.
        if let Ok(text) = tokio::fs::read_to_string(path).await
            && let Ok(addr) = text.trim().parse::<SocketAddr>()
        {
            return Ok(addr);
        }
        child.check_alive()?;
        if start.elapsed() >= timeout {
            return Err(Error::NoAddress {
                label: child.label().to_owned(),
                path: path.to_path_buf(),
                waited: start.elapsed(),
            });
        }
        tokio::time::sleep(poll).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::child::Spawn;

    const POLL: Duration = Duration::from_millis(5);

    #[tokio::test]
    async fn the_address_is_read_once_written() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("coordinator.addr");
        let script = format!(
            "sleep 0.1; echo 127.0.0.1:7070 > {}; sleep 30",
            file.display()
        );
        let mut child = Spawn::new("/bin/sh", dir.path(), "writer")
            .args(["-c", &script])
            .spawn()
            .unwrap();
        let addr = wait_for_addr_file(&mut child, &file, Duration::from_secs(20), POLL)
            .await
            .unwrap();
        assert_eq!(addr, "127.0.0.1:7070".parse().unwrap());
    }

    #[tokio::test]
    async fn a_child_that_exits_first_fails_the_wait_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("coordinator.addr");
        let mut child = Spawn::new("/bin/sh", dir.path(), "quitter")
            .args(["-c", "exit 2"])
            .spawn()
            .unwrap();
        let err = wait_for_addr_file(&mut child, &file, Duration::from_secs(20), POLL)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Exited { .. }), "{err}");
    }

    #[tokio::test]
    async fn no_address_in_time_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("coordinator.addr");
        let mut child = Spawn::new("/bin/sleep", dir.path(), "silent")
            .args(["30"])
            .spawn()
            .unwrap();
        let err = wait_for_addr_file(&mut child, &file, Duration::from_millis(50), POLL)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::NoAddress { .. }), "{err}");
        assert!(err.to_string().contains("coordinator.addr"), "{err}");
    }
}
