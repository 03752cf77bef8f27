//! An OTLP/gRPC trace receiver that counts what it gets, for measuring
//! what trace export costs (`weft bench` against a coordinator started with
//! `--otlp-endpoint`). Runs until interrupted, printing the span count
//! every 5 s.
//!
//! `cargo run -p weft-tests --example otlp_sink` prints the URL to give
//! `--otlp-endpoint` (or `OTEL_EXPORTER_OTLP_ENDPOINT`).

use std::time::Duration;

use weft_tests::otlp::OtlpReceiver;

#[tokio::main]
async fn main() {
    let receiver = OtlpReceiver::start().await;
    println!("{}", receiver.url());
    let mut last = usize::MAX;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        let count = receiver.count();
        if count != last {
            eprintln!("spans received: {count}");
            last = count;
        }
    }
    eprintln!("spans received: {}", receiver.count());
}
