//! Helpers shared by the node's socket and process tests.

/// True when `pid` no longer runs: gone, or a zombie nobody reaped yet
/// (its parent died and init is slow or absent).
pub fn process_is_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}
