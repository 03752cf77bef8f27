//! The memory a restart needs with many queued tasks, measured (ignored by
//! default: it builds a store of a million tasks). Run each way in its own
//! process, on the same store:
//!
//! ```text
//! WEFT_RECOVERY_DIR=/tmp/rec WEFT_RECOVERY_PATH=collect cargo test -p weft-coordinator \
//!     --lib recovery_memory -- --ignored --nocapture
//! WEFT_RECOVERY_DIR=/tmp/rec WEFT_RECOVERY_PATH=stream  cargo test ... (same)
//! ```
//!
//! `collect` is what a start did before (every live record read into one
//! `Vec`, then restored); `stream` is what it does now (`load_each`, one
//! record at a time). Prints the peak resident memory of each.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use weft_proto::{TaskId, TaskSpec, TaskState};

use super::*;
use crate::CoordinatorConfig;
use crate::scheduler::{Now, Scheduler};

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
#[ignore = "builds a store of a million tasks; run by hand (see the module docs)"]
fn restart_memory_with_many_queued_tasks() {
    let Some(dir) = std::env::var_os("WEFT_RECOVERY_DIR").map(PathBuf::from) else {
        println!("skipping: set WEFT_RECOVERY_DIR");
        return;
    };
    let n: usize = std::env::var("WEFT_RECOVERY_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let path = std::env::var("WEFT_RECOVERY_PATH").unwrap_or_else(|_| "stream".into());
    let built = dir.join(format!("built-{n}"));
    if !built.exists() {
        let store = RedbStore::open(&dir).unwrap();
        let started = Instant::now();
        for chunk in 0..n.div_ceil(10_000) {
            let records: Vec<Record> = (chunk * 10_000..((chunk + 1) * 10_000).min(n))
                .map(|i| {
                    Record::Task(TaskRecord::for_test(
                        TaskId::new(),
                        Arc::new(TaskSpec::call("sha256", format!("task {i}"))),
                        TaskState::Queued,
                        SystemTime::now(),
                    ))
                })
                .collect();
            store.commit(&records).unwrap();
        }
        std::fs::write(&built, b"").unwrap();
        println!("built {n} queued tasks in {:?}", started.elapsed());
    }
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let before = status_kib("VmRSS:");
    let now = Now {
        instant: Instant::now(),
        wall: SystemTime::now(),
    };
    let config = CoordinatorConfig::default();
    let mut scheduler = Scheduler::new((&config).into());
    let started = Instant::now();
    let store = RedbStore::open(&dir).unwrap();
    match path.as_str() {
        "collect" => {
            let loaded = store.load(UNIX_EPOCH).unwrap();
            scheduler.restore(loaded, now);
        }
        _ => {
            let loaded = store
                .load_each(UNIX_EPOCH, &mut |record, secret| {
                    scheduler.restore_task(record, secret, now);
                })
                .unwrap();
            scheduler.restore_summary(loaded.final_counts, loaded.recently_final, now);
        }
    }
    let took = started.elapsed();
    let after = status_kib("VmRSS:");
    let peak = status_kib("VmHWM:");
    println!(
        "recovery-figures: path={path} tasks={} took={took:?} rss_before={}MiB rss_after={}MiB peak={}MiB",
        scheduler.live_tasks(),
        before / 1024,
        after / 1024,
        peak / 1024
    );
    assert_eq!(scheduler.live_tasks(), n);
}
