//! The decode memory budget: images are decoded by every worker at once, and a near-limit image (a 13000²
//! PNG of 20 KB) takes half a gigabyte once decoded. Each decode first reserves its estimated memory (from
//! the header: pixels × [`BYTES_PER_PIXEL`]) out of `--decode_memory_mib`, waiting while other decodes hold
//! it, so the decoded pixels in flight stay within the budget whatever the worker count. An image larger than
//! the whole budget waits until it can hold all of it, then decodes alone.

use std::sync::{Condvar, Mutex};

/// Decoding cost per pixel: the decoder's output (up to 8 bytes for 16-bit RGBA) and the 8-bit RGB image
/// converted from it, whose lifetimes overlap.
pub const BYTES_PER_PIXEL: u64 = 8;

/// A counting budget of bytes, shared by the decode workers.
pub struct DecodeBudget {
    total: u64,
    used: Mutex<u64>,
    freed: Condvar,
}

/// Bytes held by one decode; given back when dropped.
pub struct Reservation<'a> {
    budget: &'a DecodeBudget,
    bytes: u64,
}

impl DecodeBudget {
    pub fn new(total_bytes: u64) -> Self {
        Self {
            total: total_bytes.max(1),
            used: Mutex::new(0),
            freed: Condvar::new(),
        }
    }

    /// Waits until `bytes` (at most the whole budget) are free and holds them.
    pub fn reserve(&self, bytes: u64) -> Reservation<'_> {
        let bytes = bytes.min(self.total);
        let mut used = self.used.lock().expect("budget lock");
        while *used + bytes > self.total {
            used = self.freed.wait(used).expect("budget lock");
        }
        *used += bytes;
        Reservation {
            budget: self,
            bytes,
        }
    }

    /// Bytes held now.
    pub fn in_use(&self) -> u64 {
        *self.used.lock().expect("budget lock")
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        *self.budget.used.lock().expect("budget lock") -= self.bytes;
        self.budget.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    #[test]
    fn reservations_never_exceed_the_budget() {
        let budget = Arc::new(DecodeBudget::new(100));
        let peak = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let (budget, peak) = (budget.clone(), peak.clone());
                std::thread::spawn(move || {
                    for j in 0..50u64 {
                        // some requests are larger than the whole budget: they run alone
                        let r = budget.reserve([30, 60, 250][(i + j as usize) % 3]);
                        peak.fetch_max(budget.in_use(), Ordering::SeqCst);
                        std::thread::yield_now();
                        drop(r);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let peak = peak.load(Ordering::SeqCst);
        assert!((60..=100).contains(&peak), "peak {peak}");
        assert_eq!(budget.in_use(), 0);
    }
}
