//! More coordinators on the cluster's PostgreSQL database (process mode):
//! a standby started beside the cluster's coordinator, which takes over
//! once that one is killed, and what a failover test needs around it
//! (killing the active, pointing a node at the new one).

use std::net::SocketAddr;
use std::process::ExitStatus;
use std::sync::atomic::Ordering;
use std::time::Duration;

use weft_client::Client;

use crate::process::ChildProcess;
use crate::wait::{default_timeout, wait_until};

use super::TestCluster;
use super::members::{Coordinator, CoordinatorFiles, Reach, spawn_coordinator, start_node};

/// How often a standby's log and address file are looked at.
const POLL: Duration = Duration::from_millis(20);

/// Another `weft-coordinator` process on the cluster's database, with its
/// own data and PKI dirs (as on another machine) and its own port.
pub struct StandbyCoordinator {
    child: Option<ChildProcess>,
    addr: SocketAddr,
    addr_file: std::path::PathBuf,
    url: String,
}

impl StandbyCoordinator {
    /// The address it listens on once it takes over (refused until then).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://ADDR`.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    fn child(&self) -> &ChildProcess {
        self.child.as_ref().expect("the standby runs until stopped")
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        self.child().log_text()
    }

    /// Waits until it logged that it waits as a standby.
    pub async fn wait_standby(&self) {
        let seen = wait_until(default_timeout(), async || {
            self.log_text()
                .contains("standby: another coordinator holds the database")
        })
        .await;
        if let Err(e) = seen {
            panic!(
                "{e}: waiting for the standby to say so\n{}",
                self.log_text()
            );
        }
    }

    /// Waits until it serves (it wrote its address): answers the address.
    pub async fn wait_serving(&mut self) -> SocketAddr {
        let child = self.child.as_mut().expect("the standby runs until stopped");
        match weft_cluster::wait_for_addr_file(child, &self.addr_file, default_timeout(), POLL)
            .await
        {
            Ok(addr) => addr,
            Err(e) => panic!(
                "the standby did not take over: {e}\n{}",
                self.child().log_text()
            ),
        }
    }

    /// SIGTERM; answers whether it exited 0 within `deadline`.
    pub async fn stop(mut self, deadline: Duration) -> bool {
        let child = self.child.take().expect("the standby runs until stopped");
        let (status, in_time) = child
            .terminate(deadline)
            .await
            .expect("waiting for the standby to stop");
        in_time && status.success()
    }
}

impl TestCluster {
    /// Process mode on PostgreSQL: starts another coordinator on the same
    /// database, on a free port of its own, with its own data and PKI
    /// dirs; it waits as a standby while the cluster's coordinator holds
    /// the database.
    pub async fn start_standby(&self) -> StandbyCoordinator {
        assert!(
            self.settings.processes && self.settings.database_url.is_some(),
            "start_standby needs TestCluster::builder().processes().postgres(url)"
        );
        let n = self.standbys.fetch_add(1, Ordering::SeqCst);
        let name = format!("coordinator-standby-{n}");
        let files = CoordinatorFiles {
            data_dir: self.dir().join(format!("{name}-data")),
            pki_dir: self.dir().join(format!("{name}-pki")),
            name,
        };
        // A port of its own, known before it listens: taken from the
        // kernel and let go.
        let listen = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free loopback port");
        let http_listen = SocketAddr::from(([127, 0, 0, 1], 0));
        let child = spawn_coordinator(&self.settings, self.dir(), (listen, http_listen), &files);
        let (addr_file, _) = files.addr_files(self.dir());
        let url = format!("https://{listen}");
        if let Some(ca_file) = &self.ca_file {
            // The database's CA: the cluster's.
            crate::trust::register(&url, ca_file.clone());
        }
        StandbyCoordinator {
            child: Some(child),
            addr: listen,
            addr_file,
            url,
        }
    }

    /// Process mode: kills the cluster's coordinator with SIGKILL, as a
    /// crash would, and does not start it again.
    pub async fn kill_coordinator(&self) {
        let old = self
            .coordinator
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match old {
            Some(Coordinator::Process(child)) => {
                child
                    .kill()
                    .await
                    .expect("waiting for a killed child process");
            }
            Some(Coordinator::InProcess(_)) => {
                panic!("kill_coordinator needs TestCluster::builder().processes()")
            }
            None => panic!("the coordinator is not running"),
        }
    }

    /// Process mode: sends `signal` to the cluster's coordinator (SIGSTOP
    /// freezes it as a paused VM would, SIGCONT lets it go on).
    pub fn signal_coordinator(&self, signal: nix::sys::signal::Signal) {
        match &*self.coordinator.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(Coordinator::Process(child)) => child.signal(signal),
            Some(Coordinator::InProcess(_)) => {
                panic!("signal_coordinator needs TestCluster::builder().processes()")
            }
            None => panic!("the coordinator is not running"),
        }
    }

    /// Process mode: waits (up to `timeout`) for the cluster's coordinator
    /// to exit by itself; answers its exit status and log.
    pub async fn wait_coordinator_exit(&self, timeout: Duration) -> (ExitStatus, String) {
        let old = self
            .coordinator
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(Coordinator::Process(mut child)) = old else {
            panic!("wait_coordinator_exit needs a running TestCluster::builder().processes()")
        };
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(status) => (
                status.expect("waiting for the coordinator"),
                child.log_text(),
            ),
            Err(_) => panic!(
                "the coordinator did not exit within {timeout:?}\n{}",
                child.log_text()
            ),
        }
    }

    /// A client of the coordinator at `url`, with the admin token and the
    /// cluster's CA.
    pub async fn client_at(&self, url: &str) -> Client {
        Client::connect_secure(url, self.trust().as_ref(), Some(&self.admin_token()))
            .await
            .unwrap_or_else(|e| panic!("connecting a client to {url}: {e}"))
    }

    /// Stops node `name` (SIGTERM) and starts it again with its state dir
    /// (its identity, the certificate it joined with) dialing `url`.
    pub async fn restart_node_at(&self, name: &str, url: &str) {
        self.stop_node(name).await;
        let state_dir = self.dir().join(format!("{name}-state"));
        let reach = Reach::Joined {
            url,
            state_dir: &state_dir,
        };
        let node = start_node(
            &self.settings,
            reach,
            self.dir(),
            name,
            self.settings.slots,
            Default::default(),
            Default::default(),
        );
        self.lock_nodes().insert(name.to_owned(), node);
    }
}
