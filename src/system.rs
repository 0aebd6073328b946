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

/// [`proc_status_bytes`] in MiB.
pub fn proc_status_mib(field: &str) -> Option<f64> {
    proc_status_bytes(field).map(|b| b as f64 / 1048576.0)
}

/// Resets the peak-RSS high-water mark (`VmHWM`) to the current RSS (Linux ≥ 4.0); false where unsupported.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// CPU time (user + system, all threads) this process has used, in seconds (Linux; `/proc/self/stat` counts
/// in clock ticks, 100 per second on Linux).
pub fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // the fields after the parenthesised command name; utime and stime are the 12th and 13th of them
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Bytes available to this user on the filesystem holding `path` (or its nearest existing ancestor).
pub fn free_bytes(path: &std::path::Path) -> Option<u64> {
    let mut probe = Some(path);
    while let Some(p) = probe {
        if p.exists() {
            let st = rustix::fs::statvfs(p).ok()?;
            return Some(st.f_bavail.saturating_mul(st.f_frsize));
        }
        probe = p.parent();
    }
    None
}

/// Total size of the files under `dir` (0 when it does not exist).
pub fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            _ => e.metadata().map_or(0, |m| m.len()),
        })
        .sum()
}

/// "1.2 MiB", "340 KiB", "12 B".
pub fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1073741824.0 {
        format!("{:.1} GiB", b / 1073741824.0)
    } else if b >= 1048576.0 {
        format!("{:.1} MiB", b / 1048576.0)
    } else if b >= 1024.0 {
        format!("{:.0} KiB", b / 1024.0)
    } else {
        format!("{bytes} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_facts_are_read_on_linux() {
        let rss = proc_status_mib("VmRSS:").expect("VmRSS on Linux");
        assert!(rss > 1.0, "{rss} MiB");
        assert!(peak_rss_bytes().unwrap() as f64 / 1048576.0 >= rss - 1.0);
        // a busy loop must show up as CPU time (waits up to 20 s of wall time for 50 ms of CPU on a busy machine)
        let before = cpu_seconds().expect("/proc/self/stat on Linux");
        let (mut x, start) = (0u64, std::time::Instant::now());
        while cpu_seconds().unwrap() < before + 0.05 && start.elapsed().as_secs() < 20 {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        }
        assert!(
            cpu_seconds().unwrap() >= before + 0.05,
            "a busy loop added no CPU time"
        );
    }
}
