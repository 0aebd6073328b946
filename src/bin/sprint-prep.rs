//! sprint-prep: parquet shards of image/caption pairs -> a Lance latent store (DC-AE latents + Gemma-2 prompt
//! embeddings, exactly as diffusers' training script computes them).

use sana_sprint::cli::CliArgs;
use std::path::Path;
use std::process::ExitCode;

use sana_sprint::cli::prep::PrepArgs;
use sana_sprint::hub::HubConfig;
use sana_sprint::prep;
use sana_sprint::store;

fn inspect(path: &Path, report: Option<&Path>) -> sana_sprint::Result<()> {
    let st = store::LatentStore::open(path)?;
    let s = store::describe(&st)?;
    let c = st.config();
    let get = |k: &str| {
        s.get(k)
            .map(|v| v.to_string())
            .unwrap_or_else(|| "-".into())
    };
    sana_sprint::outln!("store            {}", path.display());
    sana_sprint::outln!("rows             {}", get("rows"));
    sana_sprint::outln!(
        "lance            version {}, {} fragment(s), {} bytes on disk",
        get("lance_version"),
        get("fragments"),
        get("disk_bytes")
    );
    sana_sprint::outln!(
        "bytes/sample     {} (raw f16: {}, ratio {})",
        get("bytes_per_sample"),
        get("raw_f16_bytes_per_sample"),
        get("ratio_to_raw_f16")
    );
    sana_sprint::outln!(
        "resolution       {} -> latent {:?} ({}), vae_scaling_factor {}",
        c.resolution,
        c.latent_shape,
        c.latent_dtype.name(),
        c.vae_scaling_factor
    );
    if let Some(m) = &c.multi_scale {
        let hist = store::inspect::bucket_histogram(&st)?;
        sana_sprint::outln!(
            "buckets          the {} px aspect-ratio table ({}), {} of {} bucket(s) used:",
            m.table,
            m.filter,
            hist.len(),
            m.buckets.len()
        );
        let rows: usize = hist.iter().map(|(_, n)| n).sum();
        for (shape, n) in &hist {
            let bucket = m.buckets.iter().find(|b| {
                b.latent_shape == [shape[0] as usize, shape[1] as usize, shape[2] as usize]
            });
            let name = bucket.map_or_else(
                || "not in the table".to_string(),
                |b| format!("{}x{} (h/w {})", b.height, b.width, b.key),
            );
            sana_sprint::outln!(
                "    {name:<24} latent {shape:?}: {n} row(s) ({:.1}%)",
                100.0 * *n as f64 / rows.max(1) as f64
            );
        }
    }
    sana_sprint::outln!(
        "prompts          max_sequence_length {}, D {}, {} (mean prompt_len {}), instruction: {}",
        c.max_sequence_length,
        c.text_hidden_size,
        c.embed_dtype.name(),
        get("mean_prompt_len"),
        c.complex_human_instruction
            .as_ref()
            .map(|l| format!("{} lines", l.len()))
            .unwrap_or_else(|| "none".into())
    );
    sana_sprint::outln!("negative prompt  {} token(s)", c.negative_prompt_len);
    sana_sprint::outln!(
        "preprocess       mixed_precision {}; {}; {}",
        c.preprocess.mixed_precision,
        c.preprocess.resize,
        c.preprocess.crop
    );
    for (name, m) in [
        ("vae", &c.models.vae),
        ("text_encoder", &c.models.text_encoder),
        ("tokenizer", &c.models.tokenizer),
    ] {
        sana_sprint::outln!("{name:<16} {} {}", m.fingerprint, m.origin);
    }
    sana_sprint::outln!(
        "format_version   {}, written by {}",
        c.format_version,
        c.writer
    );
    let dups = store::maintain::duplicate_ids(path)?;
    if dups.is_empty() {
        sana_sprint::outln!("duplicate ids    none");
    } else {
        let extra: usize = dups.iter().map(|(_, n)| n - 1).sum();
        sana_sprint::outln!(
            "duplicate ids    {} id(s) stored more than once ({extra} extra row(s)), e.g. {}; \
             `sprint-prep --dedupe {}` removes them",
            dups.len(),
            dups.iter()
                .take(3)
                .map(|(id, n)| format!("{id} ×{n}"))
                .collect::<Vec<_>>()
                .join(", "),
            path.display()
        );
    }
    print_parts(path)?;
    let report_path = report
        .map(Path::to_path_buf)
        .unwrap_or_else(|| prep::default_report_path(path));
    match prep::report::PrepReport::read(&report_path) {
        Ok(r) => {
            sana_sprint::outln!("last run         {}", r.describe_status());
            sana_sprint::outln!(
                "bad rows         {} in the last run {:?} ({})",
                r.bad_rows.len(),
                r.bad_rows_by_reason,
                report_path.display()
            );
            for b in &r.bad_rows {
                sana_sprint::outln!(
                    "    {}: {}{}",
                    b.id,
                    b.reason,
                    if b.detail.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", b.detail)
                    }
                );
            }
        }
        Err(_) => sana_sprint::outln!(
            "bad rows         no run report at {}",
            report_path.display()
        ),
    }
    Ok(())
}

/// The parts of the workers that wrote the store (their leases): done, running (live or expired), with rows
/// done of rows to do, so that an operator sees which workers are behind or dead.
fn print_parts(path: &Path) -> sana_sprint::Result<()> {
    let leases = prep::parts::list_leases(path)?;
    if leases.is_empty() {
        sana_sprint::outln!("parts            no worker leases (written by a single run of an older version, or none yet)");
        return Ok(());
    }
    let done = leases
        .iter()
        .filter(|l| l.state == prep::parts::LeaseState::Done)
        .count();
    sana_sprint::outln!(
        "parts            {} leased, {done} done, {} running",
        leases.len(),
        leases.len() - done
    );
    let mut by_worker: std::collections::BTreeMap<&str, (usize, usize, usize, usize)> =
        Default::default();
    for l in &leases {
        let e = by_worker.entry(&l.worker).or_default();
        e.0 += 1;
        e.1 += usize::from(l.state == prep::parts::LeaseState::Done);
        e.2 += l.rows_done;
        e.3 += l.rows_todo;
    }
    for (w, (parts, done, rows_done, rows_todo)) in by_worker {
        sana_sprint::outln!("    {w}: {done}/{parts} part(s) done, {rows_done}/{rows_todo} row(s)");
    }
    for l in leases
        .iter()
        .filter(|l| l.state == prep::parts::LeaseState::Running)
    {
        sana_sprint::outln!(
            "    {} {}: {}/{} row(s) — {}",
            if l.abandoned() {
                "STALE (lease expired or its process is gone; the next run takes it over)"
            } else {
                "running"
            },
            l.part,
            l.rows_done,
            l.rows_todo,
            l.describe()
        );
    }
    Ok(())
}

/// `--verify STORE`: every row read and checked; the summary printed; an error when anything is bad.
fn verify(path: &Path, progress: bool) -> sana_sprint::Result<()> {
    let report = store::verify::verify(path, progress)?;
    for line in report.summary() {
        sana_sprint::outln!("{line}");
    }
    if report.is_ok() {
        return Ok(());
    }
    Err(sana_sprint::Error::store(
        path,
        format!(
            "verification failed: {} of {} row(s) bad, {} damaged data file(s){} (listed above)",
            report.rows_bad,
            report.rows_checked,
            report.damaged_files(),
            if report.lost_manifest() {
                ", a lost manifest"
            } else {
                ""
            }
        ),
    ))
}

fn main() -> ExitCode {
    sana_sprint::cli::init_logging();
    let args = PrepArgs::parse_args();
    let result = if let Some(store) = args.inspect.clone() {
        inspect(&store, args.report.as_deref())
    } else if let Some(path) = args.dedupe.clone() {
        store::maintain::dedupe(&path).map(|r| {
            if r.rows_removed == 0 {
                sana_sprint::outln!("{}: no id is stored twice; nothing to do", path.display());
            } else {
                sana_sprint::outln!(
                    "{}: removed {} extra row(s) of {} duplicated id(s): {} -> {} rows (Lance version {} -> {})",
                    path.display(),
                    r.rows_removed,
                    r.duplicate_ids,
                    r.rows_before,
                    r.rows_after,
                    r.version_before,
                    r.version_after
                );
            }
        })
    } else if let Some(path) = args.verify.clone() {
        verify(&path, !args.no_progress)
    } else if let Some(path) = args.compact.clone() {
        store::maintain::compact(&path).map(|r| {
            sana_sprint::outln!(
                "{}: {} rows; fragments {} -> {}; bytes {} -> {} (Lance version {} -> {})",
                path.display(),
                r.rows,
                r.fragments_before,
                r.fragments_after,
                r.bytes_before,
                r.bytes_after,
                r.version_before,
                r.version_after
            );
        })
    } else {
        let opts = args.options();
        if let Some(parent) = opts
            .output
            .parent()
            .filter(|p| !p.as_os_str().is_empty() && !store::location::is_remote(&opts.output))
        {
            if let Err(e) = std::fs::create_dir_all(parent) {
                eprintln!("error: cannot create {}: {e}", parent.display());
                return ExitCode::from(2);
            }
        }
        sana_sprint::stop::install()
            .and_then(|()| prep::run(&opts, &HubConfig::from_env()))
            .map(|report| {
                let worker = prep::parts::Worker::resolve(opts.worker_index, opts.worker_count)
                    .map_or(prep::parts::Worker::SINGLE, |(w, _)| w);
                let path = opts
                    .report
                    .clone()
                    .unwrap_or_else(|| prep::worker_report_path(&opts.output, worker));
                sana_sprint::outln!("{}", report.summary(&path));
            })
    };
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
