//! Tests only (and the `test-postgres` feature, for `weft-tests`): one
//! private PostgreSQL server per test process, started on first use, and
//! a fresh database for each test that asks.
//!
//! The server is made with `initdb` and `pg_ctl` in a temp dir, on a free
//! loopback port, with `fsync=off` (nothing here must survive a crash). As
//! root (CI, containers) it runs as the `postgres` OS user through
//! `runuser`, since PostgreSQL refuses to run as root. The binaries come
//! from `WEFT_PG_BIN`, else `pg_config --bindir`, else the newest
//! `/usr/lib/postgresql/*/bin`. Missing binaries fail the test with how to
//! install them; they never skip it.
//!
//! Stopping: a watchdog shell started first holds the read end of a pipe
//! whose write end only this process has. However the process ends (done,
//! panic, killed), the pipe closes, and the watchdog stops the server and
//! removes the temp dir.

use std::io::Write as _;
use std::net::TcpListener;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

use super::PgStore;

/// A running server: the one a test process shares, or one of a test's
/// own ([`Server::private`]), which it may stop and start.
pub struct Server {
    ip: std::net::Ipv4Addr,
    port: u16,
    /// `pg_ctl` run as the server's user, on its data dir.
    pg_ctl: PathBuf,
    /// The network namespace it runs in, if not this process's.
    netns: Option<String>,
    data: PathBuf,
    dir: PathBuf,
    root: bool,
    /// The options it was started with.
    options: String,
    /// The watchdog's pipe: never written, closed only at exit (or when
    /// a test's own server is dropped).
    _watchdog: Mutex<ChildStdin>,
}

static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();
static DATABASES: AtomicU32 = AtomicU32::new(0);
static SERVERS: AtomicU32 = AtomicU32::new(0);

impl Server {
    /// A server of the calling test's own, stopped when dropped. Panics as
    /// [`database`] does without PostgreSQL.
    pub fn private() -> Server {
        let n = SERVERS.fetch_add(1, Ordering::Relaxed);
        start(&format!("own-{n}"), &Listen::LOOPBACK)
            .unwrap_or_else(|why| panic!("no PostgreSQL for the test: {why}"))
    }

    /// A server of the calling test's own inside network namespace
    /// `netns`, listening on `ip:port` and trusting every client that
    /// reaches it (the namespaces of a test lab, which reach nothing
    /// else). Stopped when dropped. Panics as [`database`] does without
    /// PostgreSQL.
    pub fn in_namespace(netns: &str, ip: std::net::Ipv4Addr, port: u16) -> Server {
        let n = SERVERS.fetch_add(1, Ordering::Relaxed);
        let listen = Listen {
            ip,
            port: Some(port),
            netns: Some(netns),
            tls: false,
        };
        start(&format!("{netns}-{n}"), &listen)
            .unwrap_or_else(|why| panic!("no PostgreSQL for the test: {why}"))
    }

    /// A server of the calling test's own on loopback serving TLS (and
    /// plaintext) with a certificate for `localhost` and `127.0.0.1` from a
    /// CA of its own ([`Server::ca_file`]). Stopped when dropped.
    pub fn private_tls() -> Server {
        let n = SERVERS.fetch_add(1, Ordering::Relaxed);
        let listen = Listen {
            tls: true,
            ..Listen::LOOPBACK
        };
        start(&format!("tls-{n}"), &listen)
            .unwrap_or_else(|why| panic!("no PostgreSQL for the test: {why}"))
    }

    /// The CA of a [`Server::private_tls`]'s certificate (PEM).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The URL of its `postgres` database.
    pub fn url(&self) -> String {
        url(self.ip, self.port, "postgres")
    }

    /// `pg_ctl restart` (fast: connections are closed), waiting until it
    /// takes connections again.
    pub fn restart(&self) {
        // With its log to the file: on the pipe `run` reads, the server
        // would hold it open, and `run` would wait for it forever.
        let log = self.log();
        self.ctl(
            &["-l", &log, "-m", "fast", "-w", "restart"],
            "pg_ctl restart",
        );
    }

    /// `pg_ctl stop` (fast), waiting until it is down.
    pub fn stop(&self) {
        self.ctl(&["-m", "fast", "-w", "stop"], "pg_ctl stop");
    }

    /// `pg_ctl start` on the same port, waiting until it is up.
    pub fn start(&self) {
        let log = self.log();
        self.ctl(
            &["-l", &log, "-w", "-t", "60", "-o", &self.options, "start"],
            "pg_ctl start",
        );
    }

    fn log(&self) -> String {
        self.dir.join("server.log").display().to_string()
    }

    fn ctl(&self, args: &[&str], what: &str) {
        let mut command = as_server_user(&self.pg_ctl, self.root, self.netns.as_deref());
        command.arg("-D").arg(&self.data).args(args);
        if let Err(why) = run(command, what) {
            panic!("{why}");
        }
    }
}

/// Ends, from a connection of its own, the session holding the
/// coordinator lock on the database at `url` (only there: the server is
/// shared by the tests running at once) (an operator's
/// `pg_terminate_backend`, or a session the server gave up on): how many
/// sessions it ended. Blocks.
pub fn end_the_active_session(url: &str) -> usize {
    with_client(url, async |client| {
        let rows = client
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_locks
                 WHERE locktype = 'advisory' AND granted AND objsubid = 1
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                   AND ((classid::bigint << 32) | objid::bigint) = $1",
                &[&super::COORDINATOR_LOCK],
            )
            .await
            .unwrap_or_else(|e| panic!("ending the active session: {e}"));
        rows.iter().filter(|row| row.get::<_, bool>(0)).count()
    })
}

/// Runs `query` with a client connected to `url`, on a runtime of its
/// own. Blocks; panics when the server cannot be reached.
fn with_client<T>(url: &str, query: impl AsyncFnOnce(tokio_postgres::Client) -> T) -> T {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a test runtime starts");
    rt.block_on(async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
        tokio::spawn(connection);
        query(client).await
    })
}

/// Runs `sql` (statements, no rows) on the database at `url`. Blocks.
pub fn execute(url: &str, sql: &str) {
    with_client(url, async |client| {
        client
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("running {sql}: {e}"));
    });
}

/// The value a new session on the database at `url` reads for `setting`.
/// Blocks.
pub fn show(url: &str, setting: &str) -> String {
    with_client(url, async |client| {
        let row = client
            .query_one(&format!("SHOW {setting}"), &[])
            .await
            .unwrap_or_else(|e| panic!("showing {setting}: {e}"));
        row.get::<_, String>(0)
    })
}

/// How many sessions coordinators hold on the database at `url` (an
/// active one holds two, a standby one). Blocks.
pub fn coordinator_sessions(url: &str) -> usize {
    with_client(url, async |client| {
        let row = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE application_name = 'weft-coordinator' AND datname = current_database()",
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("counting sessions: {e}"));
        usize::try_from(row.get::<_, i64>(0)).unwrap_or(0)
    })
}

/// What to do when no server can be had.
const INSTALL: &str = "the PostgreSQL tests need the server binaries (initdb, pg_ctl): install them \
     (`apt-get install postgresql`), or set WEFT_PG_BIN to the directory holding them";

/// The URL of a new, empty database on the test server, started on the
/// first call. Panics, saying how to install PostgreSQL, when its binaries
/// are missing. Blocks: async code calls it through `spawn_blocking`.
pub fn database() -> String {
    let server = match SERVER.get_or_init(|| start("shared", &Listen::LOOPBACK)) {
        Ok(server) => server,
        Err(why) => panic!("no PostgreSQL for the tests: {why}"),
    };
    let name = format!("weft_test_{}", DATABASES.fetch_add(1, Ordering::Relaxed));
    with_client(&server.url(), async |client| {
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("CREATE DATABASE");
    });
    url(server.ip, server.port, &name)
}

/// A store on a new, empty database.
pub fn store() -> PgStore {
    PgStore::open(&database()).expect("the PostgreSQL store opens")
}

fn url(ip: std::net::Ipv4Addr, port: u16, database: &str) -> String {
    format!("postgresql://postgres@{ip}:{port}/{database}")
}

/// Where a server listens.
struct Listen<'a> {
    ip: std::net::Ipv4Addr,
    /// None: a free one, the kernel's pick.
    port: Option<u16>,
    /// The network namespace to run it in (`ip netns exec`).
    netns: Option<&'a str>,
    /// Serve TLS with a certificate for `localhost` and `127.0.0.1` from
    /// a CA of its own ([`Server::ca_file`]).
    tls: bool,
}

impl Listen<'_> {
    const LOOPBACK: Listen<'static> = Listen {
        ip: std::net::Ipv4Addr::LOCALHOST,
        port: None,
        netns: None,
        tls: false,
    };
}

/// Writes a CA and a server certificate for `localhost` and `127.0.0.1`
/// signed by it into `dir`, the key readable by the server's user only;
/// answers the server's options that turn TLS on.
fn write_tls_files(dir: &Path, root: bool) -> Result<String, String> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let fail = |e: rcgen::Error| format!("making the test server's certificates: {e}");
    let ca_key = KeyPair::generate().map_err(fail)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(fail)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).map_err(fail)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().map_err(fail)?;
    let params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .map_err(fail)?;
    let cert = params.signed_by(&key, &issuer).map_err(fail)?;
    let write = |name: &str, text: String| -> Result<PathBuf, String> {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
        Ok(path)
    };
    write("ca.pem", ca.pem())?;
    let cert_file = write("server.crt", cert.pem())?;
    let key_file = write("server.key", key.serialize_pem())?;
    std::fs::set_permissions(
        &key_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .map_err(|e| format!("chmod {}: {e}", key_file.display()))?;
    if root {
        let user = nix::unistd::User::from_name("postgres")
            .ok()
            .flatten()
            .ok_or_else(|| format!("no `postgres` user; {INSTALL}"))?;
        for file in [&cert_file, &key_file] {
            std::os::unix::fs::chown(file, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
                .map_err(|e| format!("giving {} to postgres: {e}", file.display()))?;
        }
    }
    Ok(format!(
        " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
        cert_file.display(),
        key_file.display()
    ))
}

/// Where the server binaries are.
fn bin_dir() -> Result<PathBuf, String> {
    let has_initdb = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os("WEFT_PG_BIN") {
        let dir = PathBuf::from(dir);
        return match has_initdb(&dir) {
            true => Ok(dir),
            false => Err(format!(
                "WEFT_PG_BIN={} holds no initdb and pg_ctl; {INSTALL}",
                dir.display()
            )),
        };
    }
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    if let Some(dir) = from_pg_config.filter(|dir| has_initdb(dir)) {
        return Ok(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, dir)| has_initdb(dir))
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, dir)| dir)
        .ok_or_else(|| INSTALL.to_owned())
}

/// A command running `program` as the server's user (`postgres` through
/// `runuser` when this process is root), inside `netns` if given.
fn as_server_user(program: &Path, root: bool, netns: Option<&str>) -> Command {
    let mut words: Vec<&std::ffi::OsStr> = Vec::new();
    if let Some(netns) = netns {
        words.extend(["ip", "netns", "exec", netns].map(std::ffi::OsStr::new));
    }
    if root {
        words.extend(["runuser", "-u", "postgres", "--"].map(std::ffi::OsStr::new));
    }
    words.push(program.as_os_str());
    let mut command = Command::new(words[0]);
    command.args(&words[1..]);
    command
}

/// Runs `command`, failing with its output.
fn run(mut command: Command, what: &str) -> Result<(), String> {
    let out = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: cannot run it: {e}"))?;
    match out.status.success() {
        true => Ok(()),
        false => Err(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

fn start(name: &str, listen: &Listen) -> Result<Server, String> {
    let bin = bin_dir()?;
    let root = nix::unistd::geteuid().is_root();
    let dir = std::env::temp_dir().join(format!("weft-pg-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("making {}: {e}", dir.display()))?;
    if root {
        let user = nix::unistd::User::from_name("postgres")
            .ok()
            .flatten()
            .ok_or_else(|| {
                format!("running as root, but there is no `postgres` user; {INSTALL}")
            })?;
        std::os::unix::fs::chown(&dir, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
            .map_err(|e| format!("giving {} to postgres: {e}", dir.display()))?;
    }
    let data = dir.join("data");
    let pg_ctl = bin.join("pg_ctl");
    // First the watchdog, so a failure from here on still cleans up.
    let watchdog = Command::new("sh")
        .arg("-c")
        .arg(
            r#"cat >/dev/null
               if [ -n "$AS_ROOT" ]; then runuser -u postgres -- "$PG_CTL" -D "$DATA" -m immediate -w stop
               else "$PG_CTL" -D "$DATA" -m immediate -w stop; fi
               rm -rf "$DIR""#,
        )
        .env("AS_ROOT", if root { "1" } else { "" })
        .env("PG_CTL", &pg_ctl)
        .env("DATA", &data)
        .env("DIR", &dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("starting the watchdog: {e}"))?;
    let mut stdin = watchdog.stdin.expect("stdin was piped");
    let _ = stdin.flush();
    let mut initdb = as_server_user(&bin.join("initdb"), root, None);
    initdb
        .arg("-D")
        .arg(&data)
        .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"]);
    run(initdb, "initdb")?;
    if !listen.ip.is_loopback() {
        let hba = data.join("pg_hba.conf");
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&hba)
            .map_err(|e| format!("opening {}: {e}", hba.display()))?;
        writeln!(file, "host all all 0.0.0.0/0 trust")
            .map_err(|e| format!("writing {}: {e}", hba.display()))?;
    }
    // A free port: the kernel's pick, released just before the server
    // takes it (tried again if another process took it meanwhile).
    let mut last = String::new();
    for _ in 0..3 {
        let port = match listen.port {
            Some(port) => port,
            None => TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| format!("finding a free port: {e}"))?
                .port(),
        };
        let mut options = format!(
            "-c listen_addresses={} -p {port} -k {} -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c max_connections=300",
            listen.ip,
            dir.display()
        );
        if listen.tls {
            options.push_str(&write_tls_files(&dir, root)?);
        }
        let mut start = as_server_user(&pg_ctl, root, listen.netns);
        start
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.join("server.log"))
            .args(["-w", "-t", "60", "-o", &options, "start"]);
        match run(start, "pg_ctl start") {
            Ok(()) => {
                return Ok(Server {
                    ip: listen.ip,
                    port,
                    pg_ctl,
                    netns: listen.netns.map(str::to_owned),
                    data,
                    dir,
                    root,
                    options,
                    _watchdog: Mutex::new(stdin),
                });
            }
            Err(why) => {
                let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
                last = format!("{why}\n{log}");
            }
        }
    }
    Err(last)
}
