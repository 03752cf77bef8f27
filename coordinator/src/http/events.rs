//! `GET /api/tasks/{id}/events`: a task's events as Server-Sent Events,
//! history then live, through `TaskService.Watch` (so the same stream
//! places per client, byte budgets and resume from the store).
//!
//! Each event is `id: SEQ`, `event: state|output|progress|finished` and
//! its JSON (`super::json::event`). A browser's `EventSource` reconnects
//! with `Last-Event-ID: SEQ`; the stream then starts at SEQ + 1, so
//! nothing repeats and nothing is missed. `?from_seq=N` starts at N.
//! After `finished` the stream ends (the watch feed ends there); asked
//! again from past the last event of a finished task, it answers 204, which
//! tells a browser's `EventSource` to stop reconnecting.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;

use weft_proto::pb;
use weft_proto::pb::task_service_server::TaskService;

use super::api::query_pairs;
use super::{ApiError, App, PathId, grpc_request, json};

/// A comment line this often keeps proxies and browsers from timing an
/// idle stream out.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The first seq wanted: after `Last-Event-ID`, else `?from_seq`, else 0.
fn from_seq(headers: &HeaderMap, query: Option<&str>) -> Result<u64, ApiError> {
    if let Some(value) = headers.get("last-event-id") {
        let last: u64 = value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "Last-Event-ID: not an event sequence number",
                )
            })?;
        return Ok(last.saturating_add(1));
    }
    match query_pairs(query)
        .into_iter()
        .find(|(key, _)| key == "from_seq")
    {
        Some((_, value)) => value.parse().map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("from_seq: {value:?} is not a sequence number"),
            )
        }),
        None => Ok(0),
    }
}

/// Output bytes turned into text event by event: a character split
/// between two pieces of one attempt's stream (a node reads its pipes in
/// pieces of any size) is held back and sent whole with the next piece,
/// not shown as two replacement characters. A piece held when the stream
/// breaks is lost to the page (it resumes after the event that held it):
/// at most one character.
#[derive(Default)]
struct Utf8Joiner {
    /// The start of a character, per (attempt, stream).
    held: std::collections::HashMap<(u32, i32), Vec<u8>>,
}

impl Utf8Joiner {
    fn text(&mut self, attempt: u32, stream: i32, data: &[u8]) -> String {
        let mut bytes = self.held.remove(&(attempt, stream)).unwrap_or_default();
        bytes.extend_from_slice(data);
        let tail = bytes.split_off(bytes.len() - json::incomplete_tail(&bytes));
        if !tail.is_empty() {
            self.held.insert((attempt, stream), tail);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// One task event as an SSE event.
fn sse_event(event: &pb::TaskEvent, joiner: &mut Utf8Joiner) -> Event {
    let (name, data) = match &event.body {
        Some(pb::task_event::Body::Output(output)) => {
            let text = joiner.text(event.attempt, output.stream, &output.data);
            ("output", json::output_event(event, output, text))
        }
        _ => json::event(event),
    };
    Event::default()
        .id(event.seq.to_string())
        .event(name)
        .data(data.to_string())
}

/// The handler.
pub(super) async fn events(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    PathId(id): PathId,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let caller = app.caller(&headers)?;
    let from_seq = from_seq(&headers, query.as_deref())?;
    // A browser's EventSource reconnects after every end of a stream; 204
    // is what makes it stop, so a finished task whose last event the
    // browser has answers that instead of an empty stream.
    let task = app
        .tasks
        .get(grpc_request(
            &caller,
            pb::GetRequest {
                task_id: id.clone(),
            },
        ))
        .await?
        .into_inner()
        .task
        .unwrap_or_default();
    let done = weft_proto::TaskState::try_from(task.state).is_ok_and(|s| s.is_final());
    if done && from_seq >= task.next_seq {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let request = pb::WatchRequest {
        task_id: id,
        from_seq,
    };
    let feed = app
        .tasks
        .watch(grpc_request(&caller, request))
        .await?
        .into_inner();
    // An error ends the stream with an `error` event saying why (the
    // browser reconnects from the last id it had).
    let mut joiner = Utf8Joiner::default();
    let events = feed
        .map(move |item| match item {
            Ok(event) => sse_event(&event, &mut joiner),
            Err(status) => Event::default()
                .event("error")
                .data(serde_json::json!({ "error": status.message() }).to_string()),
        })
        .map(Ok::<_, Infallible>)
        .take_until(app.cancel.clone().cancelled_owned());
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_character_split_between_two_pieces_of_output_is_sent_whole() {
        let mut joiner = Utf8Joiner::default();
        let euro = "€".as_bytes();
        assert_eq!(joiner.text(1, 1, &[b'a', euro[0], euro[1]]), "a");
        // Another stream and another attempt keep their own.
        assert_eq!(joiner.text(1, 2, b"err"), "err");
        assert_eq!(joiner.text(2, 1, "é".as_bytes()), "é");
        assert_eq!(joiner.text(1, 1, &[euro[2], b'b']), "€b");
        // A four-byte character over three pieces.
        let crab = "🦀".as_bytes();
        assert_eq!(joiner.text(1, 1, &crab[..1]), "");
        assert_eq!(joiner.text(1, 1, &crab[1..3]), "");
        assert_eq!(joiner.text(1, 1, &crab[3..]), "🦀");
        // Bytes that are not UTF-8 are shown replaced, not held.
        assert_eq!(joiner.text(1, 1, &[0xFF, b'x', 0x80]), "\u{FFFD}x\u{FFFD}");
    }

    #[test]
    fn last_event_id_resumes_after_it_and_wins_over_the_query() {
        let mut headers = HeaderMap::new();
        assert_eq!(from_seq(&headers, None).unwrap(), 0);
        assert_eq!(from_seq(&headers, Some("from_seq=7")).unwrap(), 7);
        headers.insert("last-event-id", "41".parse().unwrap());
        assert_eq!(from_seq(&headers, Some("from_seq=7")).unwrap(), 42);
        headers.insert("last-event-id", "x".parse().unwrap());
        assert!(from_seq(&headers, None).is_err());
        assert!(from_seq(&HeaderMap::new(), Some("from_seq=-1")).is_err());
    }
}
