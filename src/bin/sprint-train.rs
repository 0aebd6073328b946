//! sprint-train: SANA-Sprint distillation (sCM + LADD) reading only a latent store made by sprint-prep.
//! Flag names and meanings follow train_sana_sprint_diffusers.py; the flags and their defaults live in
//! `sana_sprint::cli::train`.

use sana_sprint::cli::CliArgs;
use std::process::ExitCode;

use sana_sprint::cli::train::TrainArgs;
use sana_sprint::train::trainer;

fn main() -> ExitCode {
    sana_sprint::cli::init_logging();
    let result = TrainArgs::parse_args().options().and_then(|o| {
        sana_sprint::stop::install()?;
        let summary = trainer::run(&o)?;
        if let Some(signal) = summary.stopped_by {
            match summary.checkpoints.last() {
                Some(dir) => sana_sprint::outln!(
                    "stopped by {signal} after global step {}: saved {}; continue with the same command and \
                     --resume_from_checkpoint latest",
                    summary.global_step,
                    dir.display()
                ),
                None if summary.global_step > 0 => sana_sprint::outln!(
                    "stopped by {signal} after global step {}: its checkpoint is in --output_dir; continue \
                     with the same command and --resume_from_checkpoint latest",
                    summary.global_step
                ),
                None => sana_sprint::outln!("stopped by {signal} before the first step: nothing to save"),
            }
            return Ok(());
        }
        let secs = summary.elapsed.as_secs_f64();
        sana_sprint::outln!(
            "trained {} global steps ({} G, {} D updates, {} NaN/Inf skips) over {} batches in {:.1} s",
            summary.global_step,
            summary.generator_updates,
            summary.discriminator_updates,
            summary.nan_skips,
            summary.batches,
            secs
        );
        if let Some(dir) = &summary.resumed_from {
            sana_sprint::outln!("resumed from     {}", dir.display());
        }
        let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.5}"));
        sana_sprint::outln!(
            "last losses      scm {}  adv {}  d {}",
            fmt(summary.last_scm_loss),
            fmt(summary.last_adv_loss),
            fmt(summary.last_d_loss)
        );
        sana_sprint::outln!(
            "loader wait      {:.3} s ({:.2}% of the run)",
            summary.loader_wait.as_secs_f64(),
            100.0 * summary.loader_wait.as_secs_f64() / secs.max(1e-9)
        );
        // per bucket (aspect-ratio stores; one line for a square store): the largest peak is what the run needs
        let largest = summary.buckets.iter().filter_map(|b| b.peak_bytes).max();
        for b in &summary.buckets {
            let peak = b.peak_bytes.map_or("-".into(), |p| {
                let mark = if Some(p) == largest && summary.buckets.len() > 1 {
                    " (the largest)"
                } else {
                    ""
                };
                format!("{:.2} GiB{mark}", p as f64 / 1073741824.0)
            });
            sana_sprint::outln!(
                "latent {:?}      {} step(s), {:.3} s/step, peak {peak}",
                b.latent_shape,
                b.steps,
                b.mean_step_s
            );
        }
        // (on the CPU the trainer restarts the high-water mark at every step: take the largest step's too)
        let step_peaks = summary.buckets.iter().filter_map(|b| b.peak_bytes).max();
        let host_peak = if o.device.is_cuda() {
            sana_sprint::system::peak_rss_bytes()
        } else {
            sana_sprint::system::peak_rss_bytes().max(step_peaks)
        };
        if let Some(peak) = host_peak {
            sana_sprint::outln!("peak memory      {:.0} MiB (host RSS)", peak as f64 / 1048576.0);
        }
        for c in &summary.checkpoints {
            sana_sprint::outln!("checkpoint       {}", c.display());
        }
        for v in &summary.validation_images {
            sana_sprint::outln!("validation       {}", v.display());
        }
        sana_sprint::outln!(
            "student          {} (+ logvar_linear.safetensors, disc_heads.safetensors, metrics.jsonl)",
            summary.export_dir.display()
        );
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "error: {}",
                sana_sprint::store::verify::clean_message(&e.to_string())
            );
            ExitCode::from(2)
        }
    }
}
