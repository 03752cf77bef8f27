//! A real browser for the dashboard's tests: headless Chromium driven by
//! chromedriver over WebDriver (`fantoccini`), trusting exactly one TLS
//! certificate. Test-only bookkeeping, like the rest of this crate.
//!
//! [`Browser::launch`] finds `chromedriver` and `chromium` on `PATH`
//! (`WEFT_CHROMEDRIVER` / `WEFT_CHROMIUM` name others), starts chromedriver
//! on a free loopback port and opens one session. Without them a test
//! skips, saying why, unless `WEFT_REQUIRE_BROWSER=1` (CI), which makes it
//! fail instead.
//!
//! Trust: Chromium gets `--ignore-certificate-errors-spki-list` with the
//! SHA-256 of the cluster's serving certificate's public key (read from a
//! TLS handshake that first verified it against the cluster CA), so it
//! accepts that one key and still refuses any other certificate, rather
//! than `acceptInsecureCerts`, which would accept anything.
//!
//! Chromedriver runs in a process group of its own and the group is killed
//! on drop, so a failed test leaves no Chromium behind.
//!
//! [`CuttableRelay`] sits between the browser and the dashboard and drops
//! every open connection on demand, for a test of what a page does when
//! the network drops.
//!
//! Every wait polls the page with the harness deadline
//! ([`default_timeout`]); nothing sleeps for a fixed time.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine as _;
use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use weft_proto::CoordinatorAddr;
use weft_proto::tls::{TlsConnector, Trust};

use crate::wait::{default_timeout, wait_for};

/// The viewport the screenshots are taken at (a laptop's).
pub const VIEWPORT: (u32, u32) = (1280, 800);

/// True when `WEFT_REQUIRE_BROWSER=1`: a missing browser fails the test.
pub fn browser_required() -> bool {
    std::env::var("WEFT_REQUIRE_BROWSER").is_ok_and(|v| v == "1")
}

/// Where screenshots go: `$WEFT_ARTIFACTS_DIR`, else
/// `target/artifacts/dashboard/` in the workspace (or under
/// `$CARGO_TARGET_DIR`).
pub fn artifacts_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("WEFT_ARTIFACTS_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("artifacts").join("dashboard")
}

/// `name` as found on `PATH`, if it is there.
fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// chromedriver and the Chromium binary, or why they cannot be used.
fn find_tools() -> Result<(PathBuf, PathBuf), String> {
    let pick = |var: &str, names: &[&str], package: &str| -> Result<PathBuf, String> {
        match std::env::var_os(var).filter(|v| !v.is_empty()) {
            Some(path) => Some(PathBuf::from(&path))
                .filter(|p| p.is_file())
                .ok_or_else(|| format!("{var}={} is not a file", path.to_string_lossy())),
            None => names.iter().find_map(|n| on_path(n)).ok_or_else(|| {
                format!(
                    "no {} on PATH (Debian: apt-get install {package}; or set {var})",
                    names[0]
                )
            }),
        }
    };
    let driver = pick("WEFT_CHROMEDRIVER", &["chromedriver"], "chromium-driver")?;
    let chromium = pick(
        "WEFT_CHROMIUM",
        &["chromium", "chromium-browser", "google-chrome"],
        "chromium",
    )?;
    Ok((driver, chromium))
}

/// The base64 SHA-256 of the public key (SPKI) of the certificate served at
/// `url` (`https://HOST:PORT`), after verifying it against the CA in
/// `ca_file`: the value Chromium's `--ignore-certificate-errors-spki-list`
/// takes.
pub async fn serving_spki_sha256(url: &str, ca_file: &Path) -> String {
    let addr = CoordinatorAddr::parse(url).unwrap_or_else(|e| panic!("parsing {url}: {e}"));
    let connector = TlsConnector::new(&addr, &Trust::CaFile(ca_file.to_owned()))
        .unwrap_or_else(|e| panic!("TLS settings for {url}: {e}"));
    let stream = connector
        .connect()
        .await
        .unwrap_or_else(|e| panic!("TLS handshake with {url}: {e}"));
    let (_, session) = stream.get_ref();
    let leaf = session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .unwrap_or_else(|| panic!("{url} sent no certificate"));
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .unwrap_or_else(|e| panic!("parsing the certificate of {url}: {e}"));
    let digest = Sha256::digest(cert.tbs_certificate.subject_pki.raw);
    base64::engine::general_purpose::STANDARD.encode(digest)
}

/// A headless Chromium session. See the module docs.
pub struct Browser {
    client: Client,
    driver: Child,
    artifacts: PathBuf,
    prefix: String,
}

impl Browser {
    /// Starts chromedriver and a session trusting the key `spki` (see
    /// [`serving_spki_sha256`]; `None` for a plaintext cluster).
    /// Screenshots are named `PREFIX-NAME.png`. `None` when there is no
    /// browser (the test then returns early, having said why), unless
    /// `WEFT_REQUIRE_BROWSER=1`, when that fails the test.
    pub async fn launch(spki: Option<&str>, prefix: &str) -> Option<Browser> {
        let (driver_bin, chromium) = match find_tools() {
            Ok(tools) => tools,
            Err(why) if browser_required() => {
                panic!("WEFT_REQUIRE_BROWSER=1 but the browser tests cannot run: {why}")
            }
            Err(why) => {
                eprintln!(
                    "skipping the browser test: {why} (WEFT_REQUIRE_BROWSER=1 makes this a failure)"
                );
                return None;
            }
        };
        let (driver, port) = start_driver(&driver_bin).await;
        let mut args = vec![
            "--headless=new".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--disable-extensions".to_owned(),
            "--no-first-run".to_owned(),
            "--lang=en-US".to_owned(),
            format!("--window-size={},{}", VIEWPORT.0, VIEWPORT.1),
        ];
        // Chromium refuses to start as root with its sandbox on (CI runs
        // as root in a container).
        if nix::unistd::geteuid().is_root() {
            args.push("--no-sandbox".to_owned());
        }
        if let Some(spki) = spki {
            args.push(format!("--ignore-certificate-errors-spki-list={spki}"));
        }
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium.to_string_lossy(),
                "args": args,
            },
        });
        let Value::Object(capabilities) = capabilities else {
            unreachable!("a JSON object literal")
        };
        let webdriver = format!("http://127.0.0.1:{port}");
        let client = ClientBuilder::new(HttpConnector::new())
            .capabilities(capabilities)
            .connect(&webdriver)
            .await
            .unwrap_or_else(|e| {
                panic!("starting Chromium through chromedriver at {webdriver}: {e}")
            });
        let artifacts = artifacts_dir();
        std::fs::create_dir_all(&artifacts)
            .unwrap_or_else(|e| panic!("creating {}: {e}", artifacts.display()));
        let browser = Browser {
            client,
            driver,
            artifacts,
            prefix: prefix.to_owned(),
        };
        browser.resize(VIEWPORT.0, VIEWPORT.1).await;
        Some(browser)
    }

    /// The WebDriver client, for what the helpers below do not cover.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Opens `url` and waits until the document has loaded.
    pub async fn goto(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("opening {url}: {e}"));
    }

    /// Makes the viewport (not the window) `width` × `height` CSS pixels.
    pub async fn resize(&self, width: u32, height: u32) {
        let mut size = (width, height);
        // The window has some chrome even headless: grow it by the
        // difference until the viewport is the asked size.
        for _ in 0..3 {
            self.client
                .set_window_size(size.0, size.1)
                .await
                .unwrap_or_else(|e| panic!("resizing the window: {e}"));
            let inner = self
                .script("return [window.innerWidth, window.innerHeight];", vec![])
                .await;
            let inner_w = inner[0].as_u64().unwrap_or(u64::from(width)) as u32;
            let inner_h = inner[1].as_u64().unwrap_or(u64::from(height)) as u32;
            if (inner_w, inner_h) == (width, height) {
                return;
            }
            size = (
                size.0 + width.saturating_sub(inner_w),
                size.1 + height.saturating_sub(inner_h),
            );
        }
    }

    /// Runs `script` in the page (WebDriver "execute script": `return`
    /// gives the value; a returned promise is awaited).
    pub async fn script(&self, script: &str, args: Vec<Value>) -> Value {
        self.client
            .execute(script, args)
            .await
            .unwrap_or_else(|e| panic!("running a script in the page: {e}\n{script}"))
    }

    /// Waits until `script` returns something truthy; returns it. `what`
    /// says what is awaited, for the failure message.
    pub async fn wait_until(&self, what: &str, script: &str) -> Value {
        let found = wait_for(default_timeout(), || async {
            let value = self.client.execute(script, vec![]).await.ok()?;
            truthy(&value).then_some(value)
        })
        .await;
        match found {
            Ok(value) => value,
            Err(e) => {
                let page = self.describe().await;
                let shot = self.screenshot("failure").await;
                panic!(
                    "{e}: waiting for {what}\nscreenshot: {}\n{page}",
                    shot.display()
                )
            }
        }
    }

    /// Waits until an element matches `css`; returns it.
    pub async fn wait_for(&self, css: &str) -> Element {
        let found = wait_for(default_timeout(), || async {
            self.client.find(Locator::Css(css)).await.ok()
        })
        .await;
        match found {
            Ok(element) => element,
            Err(e) => {
                let page = self.describe().await;
                let shot = self.screenshot("failure").await;
                panic!(
                    "{e}: waiting for `{css}`\nscreenshot: {}\n{page}",
                    shot.display()
                )
            }
        }
    }

    /// Waits until the text of the element matching `css` contains
    /// `needle`; returns the whole text.
    pub async fn wait_text(&self, css: &str, needle: &str) -> String {
        let script = format!(
            "const e = document.querySelector({}); return e && e.textContent.includes({}) ? e.textContent : null;",
            json!(css),
            json!(needle)
        );
        let value = self
            .wait_until(&format!("`{css}` to contain {needle:?}"), &script)
            .await;
        value.as_str().unwrap_or_default().to_owned()
    }

    /// The text content of the element matching `css` (empty if none).
    pub async fn text(&self, css: &str) -> String {
        let script = format!(
            "const e = document.querySelector({}); return e ? e.textContent : '';",
            json!(css)
        );
        self.script(&script, vec![])
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// How many elements match `css` now.
    pub async fn count(&self, css: &str) -> usize {
        let script = format!("return document.querySelectorAll({}).length;", json!(css));
        self.script(&script, vec![]).await.as_u64().unwrap_or(0) as usize
    }

    /// Waits for the element matching `css` and clicks it (finding it
    /// again if the page replaced it in between).
    pub async fn click(&self, css: &str) {
        let clicked = wait_for(default_timeout(), || async {
            let element = self.client.find(Locator::Css(css)).await.ok()?;
            element.click().await.ok()
        })
        .await;
        if let Err(e) = clicked {
            let page = self.describe().await;
            let shot = self.screenshot("failure").await;
            panic!(
                "{e}: clicking `{css}`\nscreenshot: {}\n{page}",
                shot.display()
            )
        }
    }

    /// Waits for the input matching `css`, clears it and types `text`.
    pub async fn fill(&self, css: &str, text: &str) {
        let element = self.wait_for(css).await;
        element
            .clear()
            .await
            .unwrap_or_else(|e| panic!("clearing `{css}`: {e}"));
        element
            .send_keys(text)
            .await
            .unwrap_or_else(|e| panic!("typing into `{css}`: {e}"));
    }

    /// Waits for the `<select>` matching `css` and picks `value`.
    pub async fn select(&self, css: &str, value: &str) {
        let element = self.wait_for(css).await;
        element
            .select_by_value(value)
            .await
            .unwrap_or_else(|e| panic!("choosing {value:?} in `{css}`: {e}"));
    }

    /// Saves a PNG of the viewport as `PREFIX-NAME.png` in the artifacts
    /// dir; returns its path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let path = self.artifacts.join(format!("{}-{name}.png", self.prefix));
        match self.client.screenshot().await {
            Ok(png) => {
                if let Err(e) = std::fs::write(&path, png) {
                    eprintln!("could not save {}: {e}", path.display());
                }
            }
            Err(e) => eprintln!("could not take screenshot {name}: {e}"),
        }
        path
    }

    /// The page's URL and the start of its text, for failure messages.
    async fn describe(&self) -> String {
        let url = self
            .client
            .current_url()
            .await
            .map(|u| u.to_string())
            .unwrap_or_default();
        let text = self
            .client
            .execute(
                "return document.body ? document.body.innerText : '';",
                vec![],
            )
            .await
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let text: String = text.chars().take(2000).collect();
        format!("page {url}:\n{text}")
    }

    /// Ends the session (Chromium quits) and stops chromedriver.
    pub async fn close(mut self) {
        let client = self.client.clone();
        let _ = tokio::time::timeout(Duration::from_secs(10), client.close()).await;
        kill_group(&self.driver);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.driver.wait()).await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // A failed test: take Chromium down with chromedriver.
        kill_group(&self.driver);
    }
}

/// Kills chromedriver's process group: chromedriver, Chromium and its
/// helpers.
fn kill_group(driver: &Child) {
    if let Some(pid) = driver.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// How many ports [`start_driver`] tries before giving up.
const DRIVER_TRIES: usize = 5;

/// Starts chromedriver on a free loopback port in a process group of its
/// own. Its own `--port=0` is not used: it then binds IPv4 and IPv6
/// separately and exits when the second family has the port taken
/// ("IPv4 port not available"). So a port that was just free is picked
/// here, and another one tried if chromedriver still cannot have it.
async fn start_driver(binary: &Path) -> (Child, u16) {
    let mut failures = Vec::new();
    for _ in 0..DRIVER_TRIES {
        let port = std::net::TcpListener::bind(("127.0.0.1", 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("finding a free port for chromedriver: {e}"));
        match try_driver(binary, port).await {
            Ok(child) => return (child, port),
            Err(output) => failures.push(format!("port {port}:\n{output}")),
        }
    }
    panic!(
        "chromedriver did not start in {DRIVER_TRIES} tries:\n{}",
        failures.join("\n")
    )
}

/// Runs chromedriver on `port` until it says it is listening; its output
/// if it exits first.
async fn try_driver(binary: &Path, port: u16) -> Result<Child, String> {
    let mut child = Command::new(binary)
        .arg(format!("--port={port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
    let stdout = child.stdout.take().expect("stdout was piped");
    let mut lines = BufReader::new(stdout).lines();
    let listening = async {
        let mut seen = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            // "ChromeDriver was started successfully on port 41233."
            if line.contains("started successfully") {
                return Ok(());
            }
            seen.push(line);
        }
        Err(seen.join("\n"))
    };
    match tokio::time::timeout(default_timeout(), listening).await {
        Ok(Ok(())) => {}
        Ok(Err(output)) => {
            kill_group(&child);
            let _ = child.wait().await;
            return Err(output);
        }
        Err(_) => panic!(
            "chromedriver did not say it was listening within {:?}",
            default_timeout()
        ),
    }
    // Keep draining its stdout so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(child)
}

/// A TCP relay in front of the dashboard that can cut every connection it
/// carries, as a network drop would: the browser then reconnects (through
/// it again), and a page following a stream must resume where it was.
/// The bytes are relayed as they are, so TLS stays between the browser and
/// the coordinator (the pinned key is the coordinator's).
pub struct CuttableRelay {
    addr: std::net::SocketAddr,
    cut: tokio::sync::watch::Sender<u64>,
    accepted: Arc<AtomicUsize>,
    accept_loop: tokio::task::JoinHandle<()>,
}

impl CuttableRelay {
    /// Listens on a free loopback port and relays each connection to
    /// `target`.
    pub async fn start(target: std::net::SocketAddr) -> CuttableRelay {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap_or_else(|e| panic!("binding the relay: {e}"));
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let accepted = Arc::new(AtomicUsize::new(0));
        let accept_loop = tokio::spawn({
            let cut = cut.clone();
            let accepted = Arc::clone(&accepted);
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let mut cuts = cut.subscribe();
                    cuts.borrow_and_update();
                    tokio::spawn(async move {
                        let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                            _ = cuts.changed() => {}
                        }
                    });
                }
            }
        });
        CuttableRelay {
            addr,
            cut,
            accepted,
            accept_loop,
        }
    }

    /// The relay's address.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Drops every connection open now (new ones are relayed as before).
    pub fn cut(&self) {
        self.cut.send_modify(|generation| *generation += 1);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for CuttableRelay {
    fn drop(&mut self) {
        self.accept_loop.abort();
        self.cut();
    }
}

/// JavaScript's truthiness, for [`Browser::wait_until`].
fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(_) | Value::Object(_) => true,
    }
}
