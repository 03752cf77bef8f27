//! Drawing `weft top`: a pure function of the [`Top`] state and `now`
//! onto a ratatui [`Frame`] (tested on a `TestBackend`). No I/O, no
//! polling, no keys here.
//!
//! From the top: the cluster (coordinator, version, uptime, nodes, slots,
//! the last error), tasks per state beside the throughput sparkline, the
//! node table (scrolled by [`Top::scroll`]), a line of keys.

use std::time::Instant;

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Paragraph, RenderDirection, Row, Sparkline, Table};

use weft_proto::{NodeInfo, NodeState, TaskState};

use super::model::{CURRENT_WINDOW, Top};
use crate::output::{printable, short_duration};

/// The screen's parts.
struct Areas {
    cluster: Rect,
    tasks: Rect,
    throughput: Rect,
    nodes: Rect,
    keys: Rect,
}

fn areas(area: Rect) -> Areas {
    let [cluster, middle, nodes, keys] = Layout::vertical([
        Constraint::Length(4),
        // The states in two columns (not final, final), and the borders.
        Constraint::Length(FINAL_STATES.len() as u16 + 2),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(area);
    let [tasks, throughput] =
        Layout::horizontal([Constraint::Length(46), Constraint::Min(10)]).areas(middle);
    Areas {
        cluster,
        tasks,
        throughput,
        nodes,
        keys,
    }
}

/// How many node rows fit on a screen of `area` (what a page scrolls).
pub fn node_page(area: Rect) -> usize {
    // The borders and the header row.
    usize::from(areas(area).nodes.height.saturating_sub(3)).max(1)
}

/// Draws the whole screen.
pub fn render(frame: &mut Frame, top: &Top, now: Instant) {
    let areas = areas(frame.area());
    cluster(frame, areas.cluster, top, now);
    tasks(frame, areas.tasks, top);
    throughput(frame, areas.throughput, top);
    nodes(frame, areas.nodes, top);
    let keys = format!(
        " q quit · ↑/↓ j/k scroll · PgUp/PgDn · polling every {}",
        humantime::format_duration(top.interval)
    );
    frame.render_widget(
        Paragraph::new(keys).style(Style::new().add_modifier(Modifier::DIM)),
        areas.keys,
    );
}

fn cluster(frame: &mut Frame, area: Rect, top: &Top, now: Instant) {
    let figures = match &top.info {
        Some(info) => {
            let used: u32 = top
                .nodes
                .iter()
                .map(|n| n.slots_used)
                .fold(0, u32::saturating_add);
            Line::from(vec![
                Span::styled(
                    format!("weft {}", info.version),
                    Style::new().add_modifier(Modifier::BOLD),
                ),
                Span::raw(format!(
                    " · up {} · {} node{} connected · slots: {used} used, {} free of {}",
                    short_duration(info.uptime),
                    info.nodes,
                    if info.nodes == 1 { "" } else { "s" },
                    info.slots_free,
                    info.slots,
                )),
            ])
        }
        None => Line::raw("waiting for the coordinator's first answer"),
    };
    let since = top
        .updated
        .map(|at| short_duration(now.saturating_duration_since(at)));
    let status = match (&top.error, since) {
        (Some(error), since) => Line::from(vec![
            Span::styled(
                format!("error: {error}"),
                Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
            ),
            Span::raw(format!(
                " · retrying every {}{}",
                humantime::format_duration(top.interval),
                since.map_or(String::new(), |s| format!(" · last answer {s} ago")),
            )),
        ]),
        (None, Some(since)) => Line::styled(
            format!("updated {since} ago"),
            Style::new().add_modifier(Modifier::DIM),
        ),
        (None, None) => Line::styled("connecting", Style::new().add_modifier(Modifier::DIM)),
    };
    let block = Block::bordered().title(format!(" weft top · {} ", top.coordinator));
    frame.render_widget(Paragraph::new(vec![figures, status]).block(block), area);
}

fn state_style(state: TaskState) -> Style {
    match state {
        TaskState::Pending | TaskState::Queued => Style::new().fg(Color::Yellow),
        TaskState::UpstreamFailed => Style::new().fg(Color::Red),
        TaskState::Skipped => Style::new().add_modifier(Modifier::DIM),
        TaskState::Assigned | TaskState::Running => Style::new().fg(Color::Cyan),
        TaskState::Succeeded => Style::new().fg(Color::Green),
        TaskState::Failed | TaskState::TimedOut => Style::new().fg(Color::Red),
        TaskState::Cancelled => Style::new().fg(Color::Magenta),
    }
}

/// The states a task is not done in, in the order of its life.
const LIVE_STATES: [TaskState; 4] = [
    TaskState::Pending,
    TaskState::Queued,
    TaskState::Assigned,
    TaskState::Running,
];

/// The final states.
const FINAL_STATES: [TaskState; 6] = [
    TaskState::Succeeded,
    TaskState::Failed,
    TaskState::Cancelled,
    TaskState::TimedOut,
    TaskState::UpstreamFailed,
    TaskState::Skipped,
];

fn tasks(frame: &mut Frame, area: Rect, top: &Top) {
    let count = |state: TaskState| top.info.as_ref().map_or(0, |info| info.count(state));
    let cells = |state: Option<&TaskState>| match state {
        Some(state) => vec![
            Cell::from(state.as_str()).style(state_style(*state)),
            Cell::from(count(*state).to_string()).style(state_style(*state)),
        ],
        None => vec![Cell::from(""), Cell::from("")],
    };
    let rows = (0..FINAL_STATES.len()).map(|i| {
        let mut row = cells(LIVE_STATES.get(i));
        row.extend(cells(FINAL_STATES.get(i)));
        Row::new(row)
    });
    let widths = [
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(15),
        Constraint::Min(1),
    ];
    let table = Table::new(rows, widths).block(Block::bordered().title(" tasks "));
    frame.render_widget(table, area);
}

fn throughput(frame: &mut Frame, area: Rect, top: &Top) {
    let current = match top.throughput.current() {
        Some(rate) => format!(
            " throughput: {} tasks/s (last {}) ",
            rate_text(rate),
            humantime::format_duration(CURRENT_WINDOW)
        ),
        None => " throughput: measuring ".to_owned(),
    };
    let block = Block::bordered().title(current);
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let [chart, legend] =
        Layout::vertical([Constraint::Min(1), Constraint::Length(1)]).areas(inner);
    let rates = top.throughput.rates();
    // As many polls as fit, the newest at the right edge.
    let shown = &rates[rates.len().saturating_sub(usize::from(chart.width))..];
    // Hundredths of a task per second, so slow clusters still show bars.
    let bars: Vec<u64> = shown
        .iter()
        .rev()
        .map(|r| (r * 100.0).round() as u64)
        .collect();
    frame.render_widget(
        Sparkline::default()
            .data(bars)
            .direction(RenderDirection::RightToLeft)
            .style(Style::new().fg(Color::Green)),
        chart,
    );
    let peak = shown.iter().copied().fold(0.0, f64::max);
    let finished = top.info.as_ref().map_or(0, |info| info.tasks_finished);
    let span = top.interval * u32::try_from(shown.len()).unwrap_or(u32::MAX);
    let text = format!(
        "finished since the coordinator started: {finished} · peak {}/s over the last {}",
        rate_text(peak),
        short_duration(span.min(top.throughput.span()))
    );
    frame.render_widget(
        Paragraph::new(text).style(Style::new().add_modifier(Modifier::DIM)),
        legend,
    );
}

/// A rate with one decimal (or none from 100 up).
fn rate_text(rate: f64) -> String {
    if rate >= 100.0 {
        format!("{rate:.0}")
    } else {
        format!("{rate:.1}")
    }
}

fn nodes(frame: &mut Frame, area: Rect, top: &Top) {
    let page = usize::from(area.height.saturating_sub(3)).max(1);
    let total = top.nodes.len();
    let first = top.scroll.min(total.saturating_sub(page));
    let shown = &top.nodes[first..total.min(first + page)];
    let title = match total {
        0 => " nodes: none connected ".to_owned(),
        _ if shown.len() == total => format!(" nodes: {total} "),
        _ => format!(
            " nodes: {total} (showing {}-{}, scroll with ↑/↓) ",
            first + 1,
            first + shown.len()
        ),
    };
    let header = Row::new([
        "NAME",
        "STATE",
        "USED/SLOTS",
        "FREE",
        "RUNNING",
        "HEARTBEAT",
        "LABELS",
        "HANDLERS",
    ])
    .style(Style::new().add_modifier(Modifier::BOLD));
    let name_width = top
        .nodes
        .iter()
        .map(|n| printable(&n.name).chars().count())
        .max()
        .unwrap_or(0)
        .clamp(4, 32) as u16;
    let widths = [
        Constraint::Length(name_width),
        Constraint::Length(8),
        Constraint::Length(10),
        Constraint::Length(4),
        Constraint::Length(7),
        Constraint::Length(9),
        Constraint::Fill(1),
        Constraint::Fill(1),
    ];
    let table = Table::new(shown.iter().map(node_row), widths)
        .header(header)
        .block(Block::bordered().title(title));
    frame.render_widget(table, area);
}

fn node_row(node: &NodeInfo) -> Row<'static> {
    let labels = node
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut handlers: Vec<&str> = node.handlers.iter().map(String::as_str).collect();
    handlers.sort_unstable();
    let state = match node.state {
        NodeState::Ready => Style::new().fg(Color::Green),
        NodeState::Draining => Style::new().fg(Color::Yellow),
    };
    Row::new(vec![
        // Names and labels are shown escaped: they must not write
        // terminal escapes into the admin's screen.
        ratatui::widgets::Cell::from(printable(&node.name).into_owned()),
        ratatui::widgets::Cell::from(node.state.to_string()).style(state),
        format!("{}/{}", node.slots_used, node.slots).into(),
        node.slots_free.to_string().into(),
        node.running.len().to_string().into(),
        short_duration(node.last_heartbeat_age).into(),
        or_dash(printable(&labels).into_owned()).into(),
        or_dash(printable(&handlers.join(",")).into_owned()).into(),
    ])
}

fn or_dash(text: String) -> String {
    if text.is_empty() { "-".into() } else { text }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    use weft_client::ClusterInfo;
    use weft_proto::{Attempt, NodeId, TaskId};

    use super::*;
    use crate::top::model::Poll;

    fn node(name: &str, state: NodeState, used: u32, running: usize) -> NodeInfo {
        NodeInfo {
            resources: Default::default(),
            resources_free: Default::default(),
            id: NodeId::new(),
            name: name.into(),
            labels: BTreeMap::from([("zone".to_owned(), "a".to_owned())]),
            slots: 4,
            slots_used: used,
            slots_free: 4 - used,
            running: (0..running).map(|_| (TaskId::new(), Attempt(1))).collect(),
            last_heartbeat_age: Duration::from_millis(300),
            state,
            handlers: vec!["sleep".into(), "echo".into()],
            finished: 0,
        }
    }

    fn info(finished: u64, uptime: Duration) -> ClusterInfo {
        ClusterInfo {
            version: "9.9.9".into(),
            nodes: 2,
            slots: 8,
            slots_free: 5,
            tasks: vec![
                (TaskState::Queued, 17),
                (TaskState::Running, 3),
                (TaskState::Succeeded, 4242),
                (TaskState::Failed, 6),
            ],
            uptime,
            stale_events_refused: 0,
            nodes_lost: 0,
            revoked_node_refusals: 0,
            foreign_events_refused: 0,
            attempts_not_started: 0,
            reclaimed_attempts: 0,
            tasks_finished: finished,
        }
    }

    fn screen(top: &Top, width: u16, height: u16) -> String {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal
            .draw(|frame| render(frame, top, top.updated.unwrap_or_else(Instant::now)))
            .unwrap();
        let buffer = terminal.backend().buffer();
        (0..height)
            .map(|y| {
                (0..width)
                    .map(|x| buffer[(x, y)].symbol())
                    .collect::<String>()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// A cluster polled every second for 20 s, finishing 25 tasks a second.
    fn polled(nodes: Vec<NodeInfo>) -> Top {
        let mut top = Top::new("https://10.0.0.1:7070".into(), Duration::from_secs(1));
        let t0 = Instant::now();
        for s in 0..=20u64 {
            let poll = Poll {
                info: info(1000 + 25 * s, Duration::from_secs(600 + s)),
                nodes: nodes.clone(),
            };
            top.update(Ok(poll), t0 + Duration::from_secs(s));
        }
        top
    }

    #[test]
    fn the_screen_shows_the_cluster_nodes_counts_and_rate() {
        let top = polled(vec![
            node("rust-10", NodeState::Ready, 1, 1),
            node("rust-2", NodeState::Draining, 2, 2),
        ]);
        let text = screen(&top, 120, 30);
        for needle in [
            "https://10.0.0.1:7070",
            "weft 9.9.9",
            "up 10m20s",
            "2 nodes connected",
            "slots: 3 used, 5 free of 8",
            "queued    17",
            "running   3",
            "succeeded       4242",
            "failed          6",
            "timed_out       0",
            "upstream_failed 0",
            "pending   0",
            "throughput: 25.0 tasks/s",
            "finished since the coordinator started: 1500",
            "nodes: 2",
            "draining",
            "ready",
            "1/4",
            "2/4",
            "zone=a",
            "echo,sleep",
            "300ms",
            "q quit",
        ] {
            assert!(text.contains(needle), "{needle:?} not on screen:\n{text}");
        }
        // Natural order: rust-2 above rust-10.
        let (two, ten) = (text.find("rust-2 ").unwrap(), text.find("rust-10").unwrap());
        assert!(two < ten, "{text}");
        // The sparkline drew bars.
        assert!(text.contains('█'), "{text}");
    }

    #[test]
    fn a_failed_poll_keeps_the_last_figures_and_shows_the_error() {
        let mut top = polled(vec![node("rust-1", NodeState::Ready, 0, 0)]);
        let later = top.updated.unwrap() + Duration::from_secs(3);
        top.update(
            Err("cannot reach coordinator at https://10.0.0.1:7070: connection refused".into()),
            later,
        );
        let mut terminal = Terminal::new(TestBackend::new(140, 30)).unwrap();
        terminal.draw(|frame| render(frame, &top, later)).unwrap();
        let text = format!("{:?}", terminal.backend().buffer());
        assert!(text.contains("error: cannot reach coordinator"), "{text}");
        assert!(text.contains("retrying every 1s"), "{text}");
        assert!(text.contains("last answer 3.0s ago"), "{text}");
        assert!(text.contains("rust-1"), "{text}");
        assert!(text.contains("succeeded       4242"), "{text}");
    }

    #[test]
    fn before_the_first_answer_it_says_so() {
        let top = Top::new("https://10.0.0.1:7070".into(), Duration::from_secs(2));
        let text = screen(&top, 100, 24);
        assert!(text.contains("waiting for the coordinator's first answer"));
        assert!(text.contains("throughput: measuring"));
        assert!(text.contains("nodes: none connected"));
        assert!(text.contains("polling every 2s"));
    }

    #[test]
    fn many_nodes_scroll_a_page_at_a_time_and_stop_at_the_last() {
        let nodes: Vec<_> = (1..=40)
            .map(|i| node(&format!("n{i}"), NodeState::Ready, 0, 0))
            .collect();
        let mut top = polled(nodes);
        let (width, height) = (100, 24);
        let page = node_page(Rect::new(0, 0, width, height));
        // 24 rows less the cluster (4), tasks (8: six final states beside
        // the four others, and borders), keys (1), the table's borders and
        // header (3).
        assert_eq!(page, 8);
        let text = screen(&top, width, height);
        assert!(text.contains("nodes: 40 (showing 1-8"), "{text}");
        assert!(text.contains("n8 ") && !text.contains("n9 "), "{text}");
        top.scroll_by(1, page);
        let text = screen(&top, width, height);
        assert!(text.contains("showing 2-9") && text.contains("n9 ") && !text.contains("n1 "));
        top.scroll_by(1000, page);
        assert_eq!(top.scroll, 32);
        let text = screen(&top, width, height);
        assert!(
            text.contains("showing 33-40") && text.contains("n40"),
            "{text}"
        );
        top.scroll_by(-1000, page);
        assert_eq!(top.scroll, 0);
        top.scroll_to_end(false, page);
        assert_eq!(top.scroll, 32);
    }

    #[test]
    fn control_characters_in_node_names_are_shown_escaped() {
        let top = polled(vec![node("n\x1b]0;pwn\x07", NodeState::Ready, 0, 0)]);
        let text = screen(&top, 120, 30);
        assert!(!text.contains('\x1b'), "{text}");
        assert!(text.contains("n\\u{1b}]0;pwn\\u{7}"), "{text}");
    }
}
