//! Device-synchronised stage timers: the stages of a training step (`sprint-train --profile`, `sprint-bench
//! train-step --profile`) and the blocks of the DC-AE encoder (`sprint-bench dcae --profile`).
//!
//! GPU work is asynchronous: a host timer around a stage measures only the time to queue its kernels. When
//! profiling is on, every [`mark`] therefore synchronises the device first and charges the time since the
//! previous mark to the named stage, so each stage's figure is the time its work took on the device (plus the
//! host time around it). The synchronisations remove the overlap of host and device work, so a profiled step is
//! a little slower than an unprofiled one; compare stages with each other and with the reference's stages,
//! not a profiled step with a plain one.
//!
//! The timers are thread-local: the training loop runs on one thread, and the step maths ([`crate::train::step`]) marks
//! its stages (and the DC-AE encoder its blocks) without carrying a timer through every signature. Without [`start`] on the current thread,
//! [`mark`] does nothing and costs one thread-local lookup.

use std::cell::RefCell;
use std::time::Instant;

use candle_core::Device;

use crate::Result;

/// One stage of a profiled step.
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    pub name: &'static str,
    /// Seconds, summed over every time the stage ran in the step.
    pub secs: f64,
    /// On CUDA: the highest memory held by live tensors while the stage ran (the device memory pool's
    /// high-water mark, restarted at every mark); `None` elsewhere.
    pub peak_bytes: Option<u64>,
}

/// A step's stages, in the order they first ran.
pub type Stages = Vec<Stage>;

struct Timer {
    device: Device,
    last: Instant,
    stages: Stages,
}

thread_local! {
    static TIMER: RefCell<Option<Timer>> = const { RefCell::new(None) };
}

/// Starts timing a step on this thread: waits for the device's queued work, then the clock runs.
pub fn start(device: &Device) -> Result<()> {
    device.synchronize()?;
    crate::device::reset_pool_peaks(device)?;
    TIMER.with(|t| {
        *t.borrow_mut() = Some(Timer {
            device: device.clone(),
            last: Instant::now(),
            stages: Vec::new(),
        })
    });
    Ok(())
}

/// Whether a step is being timed on this thread.
pub fn active() -> bool {
    TIMER.with(|t| t.borrow().is_some())
}

/// Ends the current stage: synchronises the device and adds the seconds since the previous mark (or
/// [`start`]) to `stage` (stages marked more than once in a step add up). No-op when not timing.
pub fn mark(stage: &'static str) -> Result<()> {
    let device = TIMER.with(|t| t.borrow().as_ref().map(|t| t.device.clone()));
    let Some(device) = device else {
        return Ok(());
    };
    device.synchronize()?;
    let now = Instant::now();
    let peak = crate::device::pool_stats(&device)?.map(|p| p.used_high_bytes);
    TIMER.with(|t| {
        if let Some(timer) = t.borrow_mut().as_mut() {
            let secs = now.duration_since(timer.last).as_secs_f64();
            timer.last = now;
            match timer.stages.iter_mut().find(|s| s.name == stage) {
                Some(s) => {
                    s.secs += secs;
                    s.peak_bytes = s.peak_bytes.max(peak);
                }
                None => timer.stages.push(Stage {
                    name: stage,
                    secs,
                    peak_bytes: peak,
                }),
            }
        }
    });
    if peak.is_some() {
        crate::device::reset_pool_peaks(&device)?;
    }
    Ok(())
}

/// Stops timing and returns the step's stages (`None` when not timing).
pub fn finish() -> Option<Stages> {
    TIMER.with(|t| t.borrow_mut().take().map(|t| t.stages))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_add_up_in_first_seen_order_and_marks_are_free_when_off() {
        mark("ignored").unwrap();
        assert!(!active());
        assert_eq!(finish(), None);

        start(&Device::Cpu).unwrap();
        assert!(active());
        std::thread::sleep(std::time::Duration::from_millis(20));
        mark("a").unwrap();
        mark("b").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        mark("a").unwrap();
        let stages = finish().unwrap();
        assert!(!active());
        let names: Vec<_> = stages.iter().map(|s| s.name).collect();
        assert_eq!(names, ["a", "b"]);
        assert!(stages[0].secs >= 0.04, "{stages:?}");
        assert!(stages[1].secs < 0.02, "{stages:?}");
        assert!(stages.iter().all(|s| s.peak_bytes.is_none()));
        mark("after").unwrap();
        assert_eq!(finish(), None);
    }
}
