//! [`Machine`]: what the OS says about the machine a run happened on
//! (CPUs, memory, kernel), for the report's header. Reads `/proc`, never
//! writes.

/// The machine a run happened on.
#[derive(Debug, Clone)]
pub struct Machine {
    /// Logical CPUs.
    pub cpus: usize,
    /// `model name` from `/proc/cpuinfo`.
    pub cpu_model: Option<String>,
    /// Total memory, GiB.
    pub mem_gib: Option<f64>,
    /// Kernel release (`/proc/sys/kernel/osrelease`).
    pub kernel: Option<String>,
    /// `std::env::consts::OS`-`ARCH`.
    pub os: String,
}

impl Machine {
    /// Reads what the OS tells about this machine.
    pub fn detect() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned());
        let mem_gib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                let line = m.lines().find(|l| l.starts_with("MemTotal:"))?.to_owned();
                line.split_whitespace().nth(1)?.parse::<f64>().ok()
            })
            .map(|kib| kib / (1024.0 * 1024.0));
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .ok()
            .map(|k| k.trim().to_owned());
        Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            mem_gib,
            kernel,
            os: format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH),
        }
    }
}
