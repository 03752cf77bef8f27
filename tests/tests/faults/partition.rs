//! Partition one node for 3 × the lease while it runs attempts: they
//! finish on the other nodes meanwhile, and after the heal its late
//! results are refused (counted and asserted) and none is accepted.

use crate::isolation::{Isolation, isolate_one_node};
use crate::lab::run_scenario;

#[test]
fn partitioned_node_is_replaced_and_its_late_results_are_refused() {
    run_scenario(
        "partitioned_node_is_replaced_and_its_late_results_are_refused",
        || isolate_one_node(Isolation::Partition, 3),
    );
}
