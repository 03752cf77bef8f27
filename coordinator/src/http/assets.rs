//! The dashboard's pages: every file of `coordinator/assets/`, embedded in
//! the binary at build time (`build.rs`), and the security headers every
//! answer carries (a strict CSP: no inline script or style, nothing from
//! another origin).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::{ApiError, PathId};

include!(concat!(env!("OUT_DIR"), "/assets.rs"));

/// The Content-Security-Policy of every answer.
const CSP: &str = "default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The content type of a file, by its extension.
fn content_type(name: &str) -> &'static str {
    match name.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("json") => "application/json",
        Some("txt") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

fn file(name: &str) -> Option<&'static [u8]> {
    ASSETS
        .iter()
        .find(|(file, _)| *file == name)
        .map(|(_, bytes)| *bytes)
}

fn serve(name: &str) -> Response {
    match file(name) {
        Some(bytes) => (
            [
                (header::CONTENT_TYPE, content_type(name)),
                // Embedded in this binary: no-cache makes the browser ask
                // (cheaply) so an upgraded coordinator's pages show at once.
                (header::CACHE_CONTROL, "no-cache"),
            ],
            bytes,
        )
            .into_response(),
        None => {
            ApiError::new(StatusCode::NOT_FOUND, format!("no asset named {name:?}")).into_response()
        }
    }
}

/// `GET /`: the single page (login included: no token needed).
pub(super) async fn index() -> Response {
    serve("index.html")
}

/// `GET /assets/{file}`.
pub(super) async fn asset(PathId(name): PathId) -> Response {
    serve(&name)
}

/// Adds the security headers to every answer.
pub(super) async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pages_are_embedded() {
        for name in ["index.html", "app.js", "app.css", "favicon.svg"] {
            assert!(file(name).is_some_and(|b| !b.is_empty()), "{name}");
        }
        assert!(file("../Cargo.toml").is_none());
        assert_eq!(content_type("app.js"), "text/javascript; charset=utf-8");
    }
}
