//! SIGSTOP one node past its lease, then SIGCONT: its attempts finished
//! elsewhere meanwhile, and what it reports on waking is refused, so no
//! task gets a second accepted result.

use crate::isolation::{Isolation, isolate_one_node};
use crate::lab::run_scenario;

#[test]
fn node_stopped_past_its_lease_adds_no_second_result_when_continued() {
    run_scenario(
        "node_stopped_past_its_lease_adds_no_second_result_when_continued",
        || isolate_one_node(Isolation::Stop, 4),
    );
}
