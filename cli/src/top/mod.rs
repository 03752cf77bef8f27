//! `weft top`: a live terminal view of the cluster, its nodes, its queue
//! and its throughput, polled from `ClusterInfo` and `ListNodes`.
//!
//! Here: the checks before the screen is taken (a terminal on stdout, a
//! first poll whose refusal ends the command like any other), the poll
//! loop and the keys. A monitor keeps going when the coordinator goes
//! away: after the start, a failed poll is shown on screen and the next
//! tick tries again (dialling anew if it never connected).
//!
//! Layout:
//! - [`model`]: the state drawn (answers, error, throughput, scroll); no I/O.
//! - [`view`]: drawing that state; a pure function, tested on a `TestBackend`.

mod model;
mod view;

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::Context;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::layout::Rect;
use tokio::sync::mpsc;

use weft_client::{Client, Error, Trust};

use crate::exit::{self, UsageError};
use crate::output::OutputFormat;
use model::{Poll, Top};

/// The shortest `--interval`: each poll is two calls on the coordinator.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// The longest `--interval`.
pub const MAX_INTERVAL: Duration = Duration::from_secs(600);
/// How long one poll may take before it counts as failed (longer if the
/// interval is).
const POLL_DEADLINE: Duration = Duration::from_secs(5);
/// How long one poll may take at `interval`: [`POLL_DEADLINE`], or the
/// interval when longer.
pub fn poll_deadline(interval: Duration) -> Duration {
    POLL_DEADLINE.max(interval)
}

/// How often the screen is drawn again between polls, so ages move on.
const REDRAW: Duration = Duration::from_secs(1);

/// Parses and checks `--interval`.
pub fn parse_interval(text: &str) -> Result<Duration, String> {
    let interval = crate::opts::parse_duration_arg(text)?;
    if !(MIN_INTERVAL..=MAX_INTERVAL).contains(&interval) {
        return Err(format!(
            "{text} is out of range: the interval is from {} to {}",
            humantime::format_duration(MIN_INTERVAL),
            humantime::format_duration(MAX_INTERVAL)
        ));
    }
    Ok(interval)
}

/// `weft top [--interval D]`: runs until q, Esc or Ctrl-C (exit 0).
pub async fn run(
    url: String,
    trust: Option<Trust>,
    token: Option<String>,
    interval: Duration,
    format: OutputFormat,
) -> anyhow::Result<u8> {
    if format == OutputFormat::Json {
        return Err(UsageError(
            "weft top has no JSON form: use `weft info -o json` and `weft nodes -o json`".into(),
        )
        .into());
    }
    if !std::io::stdout().is_terminal() {
        return Err(UsageError(
            "weft top draws a live view and needs a terminal on stdout; for figures a \
             program can read, use `weft info -o json` and `weft nodes -o json`"
                .into(),
        )
        .into());
    }
    let dial = Dial {
        url,
        trust,
        token,
        deadline: poll_deadline(interval),
    };
    // The first poll decides: a token or TLS setup that will never work
    // ends here with the usual error and exit code; a coordinator that is
    // only down is shown on screen and retried.
    let (client, first) = match dial.connect().await {
        Ok(client) => match dial.poll(&client).await {
            Ok(poll) => (Some(client), Ok(poll)),
            Err(err) if is_transient(&err) => (Some(client), Err(err.to_string())),
            Err(err) => return Err(err).context("polling the coordinator"),
        },
        Err(err) if is_transient(&err) => (None, Err(err.to_string())),
        Err(err) => return Err(err.into()),
    };
    let mut top = Top::new(dial.url.clone(), interval);
    top.update(first, Instant::now());

    let (poll_tx, polls) = mpsc::channel(4);
    tokio::spawn(dial.poll_loop(client, interval, poll_tx));
    // Raw mode first, so keys come one at a time.
    let mut terminal = ratatui::try_init().context("setting up the terminal")?;
    let (key_tx, keys) = mpsc::channel(16);
    // crossterm's reader blocks: a thread of its own, ending when the
    // screen loop has gone (its channel closed).
    std::thread::spawn(move || read_events(key_tx));
    let shown = show(&mut terminal, &mut top, polls, keys).await;
    ratatui::try_restore().context("restoring the terminal")?;
    shown?;
    Ok(exit::SUCCESS)
}

/// Draws and redraws until a key or signal says to quit.
async fn show(
    terminal: &mut ratatui::DefaultTerminal,
    top: &mut Top,
    mut polls: mpsc::Receiver<Result<Poll, String>>,
    mut keys: mpsc::Receiver<std::io::Result<Event>>,
) -> anyhow::Result<()> {
    let mut redraw = tokio::time::interval(REDRAW);
    redraw.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("listening for SIGTERM")?;
    loop {
        terminal
            .draw(|frame| view::render(frame, top, Instant::now()))
            .context("drawing")?;
        let size = terminal.size().context("reading the terminal's size")?;
        let page = view::node_page(Rect::new(0, 0, size.width, size.height));
        tokio::select! {
            Some(poll) = polls.recv() => top.update(poll, Instant::now()),
            key = keys.recv() => match key {
                Some(Ok(Event::Key(key))) => match Action::of(key) {
                    Some(Action::Quit) => return Ok(()),
                    Some(Action::Scroll(rows)) => top.scroll_by(rows, page),
                    Some(Action::Page(pages)) => top.scroll_by(pages * page as isize, page),
                    Some(Action::End(first)) => top.scroll_to_end(first, page),
                    None => {}
                },
                // A resize, a mouse event: drawn again at the loop's top.
                Some(Ok(_)) => {}
                Some(Err(err)) => return Err(err).context("reading the keyboard"),
                None => return Ok(()),
            },
            _ = redraw.tick() => {}
            // Raw mode turns Ctrl-C into a key; these are a `kill`.
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = terminate.recv() => return Ok(()),
        }
    }
}

/// What a key does.
#[derive(Debug, PartialEq)]
enum Action {
    Quit,
    /// By this many rows.
    Scroll(isize),
    /// By this many pages.
    Page(isize),
    /// To the first row (`true`) or the last page.
    End(bool),
}

impl Action {
    fn of(key: KeyEvent) -> Option<Action> {
        if key.kind == KeyEventKind::Release {
            return None;
        }
        Some(match key.code {
            KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => Action::Quit,
            KeyCode::Char('q') | KeyCode::Esc => Action::Quit,
            KeyCode::Up | KeyCode::Char('k') => Action::Scroll(-1),
            KeyCode::Down | KeyCode::Char('j') => Action::Scroll(1),
            KeyCode::PageUp => Action::Page(-1),
            KeyCode::PageDown | KeyCode::Char(' ') => Action::Page(1),
            KeyCode::Home | KeyCode::Char('g') => Action::End(true),
            KeyCode::End | KeyCode::Char('G') => Action::End(false),
            _ => return None,
        })
    }
}

/// Forwards terminal events until the receiver is gone.
fn read_events(events: mpsc::Sender<std::io::Result<Event>>) {
    loop {
        match event::poll(Duration::from_millis(250)) {
            Ok(true) => {
                let event = event::read();
                let failed = event.is_err();
                if events.blocking_send(event).is_err() || failed {
                    return;
                }
            }
            Ok(false) if events.is_closed() => return,
            Ok(false) => {}
            Err(err) => {
                let _ = events.blocking_send(Err(err));
                return;
            }
        }
    }
}

/// Where and how to reach the coordinator.
struct Dial {
    url: String,
    trust: Option<Trust>,
    token: Option<String>,
    /// How long a connect or a poll may take.
    deadline: Duration,
}

impl Dial {
    async fn connect(&self) -> Result<Client, Error> {
        Client::connect_secure(&self.url, self.trust.as_ref(), self.token.as_deref()).await
    }

    /// `ClusterInfo` and `ListNodes`, both or neither.
    async fn poll(&self, client: &Client) -> Result<Poll, Error> {
        let both = async { tokio::try_join!(client.cluster_info(), client.nodes()) };
        match tokio::time::timeout(self.deadline, both).await {
            Ok(Ok((info, nodes))) => Ok(Poll { info, nodes }),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(Error::DeadlineExceeded(format!(
                "no answer from the coordinator within {}",
                humantime::format_duration(self.deadline)
            ))),
        }
    }

    /// Polls every `interval` (the first right after the start's), dialling
    /// again while there is no connection or the coordinator polled is
    /// unavailable (so a failover to another of several addresses is
    /// followed), until `out` is closed.
    async fn poll_loop(
        self,
        mut client: Option<Client>,
        interval: Duration,
        out: mpsc::Sender<Result<Poll, String>>,
    ) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = out.closed() => return,
            }
            if client.is_none() {
                match self.connect().await {
                    Ok(connected) => client = Some(connected),
                    Err(err) => {
                        if out.send(Err(err.to_string())).await.is_err() {
                            return;
                        }
                        continue;
                    }
                }
            }
            let Some(connected) = &client else { continue };
            let poll = self.poll(connected).await;
            if let Err(Error::Unavailable(_)) = &poll {
                // The coordinator went away: with several addresses,
                // another may serve now. Dial through them again (from the
                // next one) before the next poll; a channel only ever
                // dials its own address.
                let redialed = tokio::time::timeout(self.deadline, connected.redial()).await;
                client = redialed.ok().and_then(Result::ok);
            }
            if out.send(poll.map_err(|err| err.to_string())).await.is_err() {
                return;
            }
        }
    }
}

/// Whether a failure at the start is worth retrying on screen: the
/// coordinator is down or slow. A refused token, a TLS setup that does not
/// match the coordinator, a bad address will fail the same way every time.
fn is_transient(err: &Error) -> bool {
    match err {
        Error::Unavailable(message) => {
            // A certificate check or a TLS/plaintext mismatch is reported
            // as "cannot reach" too; its message says what to pass. Only
            // the cause after "cannot reach coordinator at URL: " is
            // read: a host may be called "tls".
            let cause = message
                .split_once(": ")
                .map_or(message.as_str(), |(_, c)| c);
            let message = cause.to_ascii_lowercase();
            !["certificate", "tls", "ca.pem", "plaintext"]
                .iter()
                .any(|needle| message.contains(needle))
        }
        // The rest as the client library classifies them.
        other => other.is_retryable(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_is_checked() {
        assert_eq!(parse_interval("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_interval("250ms"), Ok(Duration::from_millis(250)));
        for bad in ["0s", "10ms", "1h", "soon"] {
            assert!(parse_interval(bad).is_err(), "{bad}");
        }
        assert!(parse_interval("0s").unwrap_err().contains("100ms to 10m"));
    }

    #[test]
    fn keys_quit_and_scroll() {
        let key = |code| KeyEvent::new(code, KeyModifiers::NONE);
        for quit in [KeyCode::Char('q'), KeyCode::Esc] {
            assert_eq!(Action::of(key(quit)), Some(Action::Quit));
        }
        let ctrl_c = KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL);
        assert_eq!(Action::of(ctrl_c), Some(Action::Quit));
        assert_eq!(Action::of(key(KeyCode::Char('c'))), None);
        assert_eq!(Action::of(key(KeyCode::Down)), Some(Action::Scroll(1)));
        assert_eq!(
            Action::of(key(KeyCode::Char('k'))),
            Some(Action::Scroll(-1))
        );
        assert_eq!(Action::of(key(KeyCode::PageDown)), Some(Action::Page(1)));
    }

    #[test]
    fn only_a_coordinator_that_is_down_is_retried_at_the_start() {
        let down = Error::Unavailable(
            "cannot reach coordinator at https://127.0.0.1:7070: connection refused".into(),
        );
        assert!(is_transient(&down));
        let wrong_ca = Error::Unavailable(
            "cannot reach coordinator at https://127.0.0.1:7070: the coordinator's certificate \
             is not signed by the CA in /x/ca.pem: pass the cluster's ca.pem"
                .into(),
        );
        assert!(!is_transient(&wrong_ca));
        let no_token = Error::Other {
            code: tonic::Code::Unauthenticated,
            message: "no token".into(),
        };
        assert!(!is_transient(&no_token));
        assert!(!is_transient(&Error::Tls("no CA".into())));
        let tls_host = Error::Unavailable(
            "cannot reach coordinator at https://tls.example:7070: connection refused".into(),
        );
        assert!(is_transient(&tls_host));
    }
}
