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
        let summary = trainer::run(&o)?;
        let secs = summary.elapsed.as_secs_f64();
        println!(
            "trained {} global steps ({} G, {} D updates, {} NaN/Inf skips) over {} batches in {:.1} s",
            summary.global_step,
            summary.generator_updates,
            summary.discriminator_updates,
            summary.nan_skips,
            summary.batches,
            secs
        );
        if let Some(dir) = &summary.resumed_from {
            println!("resumed from     {}", dir.display());
        }
        let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.5}"));
        println!(
            "last losses      scm {}  adv {}  d {}",
            fmt(summary.last_scm_loss),
            fmt(summary.last_adv_loss),
            fmt(summary.last_d_loss)
        );
        println!(
            "loader wait      {:.3} s ({:.2}% of the run)",
            summary.loader_wait.as_secs_f64(),
            100.0 * summary.loader_wait.as_secs_f64() / secs.max(1e-9)
        );
        if let Some(peak) = sana_sprint::system::peak_rss_bytes() {
            println!("peak memory      {:.0} MiB (host RSS)", peak as f64 / 1048576.0);
        }
        for c in &summary.checkpoints {
            println!("checkpoint       {}", c.display());
        }
        for v in &summary.validation_images {
            println!("validation       {}", v.display());
        }
        println!(
            "student          {} (+ logvar_linear.safetensors, disc_heads.safetensors, metrics.jsonl)",
            summary.export_dir.display()
        );
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
