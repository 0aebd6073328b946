//! Facts about this process that the summaries and the memory benches report.

/// Peak resident memory of this process in bytes (Linux), for the summary.
pub fn peak_rss_bytes() -> Option<u64> {
    proc_status_bytes("VmHWM:")
}

/// A memory field of `/proc/self/status` (`VmRSS:`, `VmHWM:`, …) in bytes (Linux only).
pub fn proc_status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
