//! parquet shards -> decode (rayon) -> encode (device, batched) -> latent store.
//!
//! A reader thread streams rows that the store does not hold yet, a rayon pool decodes and preprocesses
//! images, and the calling thread encodes batches on the device and commits them to the store. Every queue is
//! bounded, so memory stays flat whatever the number of shards.

pub mod report;
pub mod source;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use crossbeam_channel::bounded;

use crate::device::{default_device, parse_device, MixedPrecision};
use crate::error::{Error, Result};
use crate::hub::{self, HubConfig};
use crate::models::dcae::{DcaeConfig, DcaeEncoder};
use crate::store::compat::fingerprint_folder;
use crate::store::{
    FloatEncoding, LatentRow, ModelInfo, ModelsInfo, OpenMode, PreprocessInfo, StoreConfig,
    StoreDType, StoreWriter, FORMAT_VERSION,
};
use crate::text::{PromptEncoder, COMPLEX_HUMAN_INSTRUCTION};
use report::{BadRow, PrepReport};
use source::{RawRow, Shard};

/// Everything a prep run needs; the `sprint-prep` flags map onto it one to one.
#[derive(Debug, Clone)]
pub struct PrepOptions {
    pub pretrained_model_name_or_path: String,
    pub dataset_name: Option<String>,
    pub file_path: Vec<String>,
    pub output: PathBuf,
    pub resolution: u32,
    pub batch_size: usize,
    pub image_column: String,
    pub caption_column: String,
    pub mixed_precision: MixedPrecision,
    pub device: String,
    pub max_sequence_length: usize,
    pub complex_human_instruction: bool,
    pub latent_dtype: StoreDType,
    pub embed_dtype: StoreDType,
    pub overwrite: bool,
    pub report: Option<PathBuf>,
    pub num_workers: usize,
    pub commit_every: usize,
    pub encoding: FloatEncoding,
    pub progress: bool,
}

impl Default for PrepOptions {
    fn default() -> Self {
        Self {
            pretrained_model_name_or_path: String::new(),
            dataset_name: None,
            file_path: Vec::new(),
            output: PathBuf::new(),
            resolution: 512,
            batch_size: 8,
            image_column: "image".into(),
            caption_column: "llava".into(),
            mixed_precision: MixedPrecision::Bf16,
            device: default_device().into(),
            max_sequence_length: 300,
            complex_human_instruction: true,
            latent_dtype: StoreDType::Float32,
            embed_dtype: StoreDType::Float16,
            overwrite: false,
            report: None,
            num_workers: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            commit_every: 1024,
            encoding: FloatEncoding::default(),
            progress: true,
        }
    }
}

/// The default bad-rows report path: next to the store, `<stem>.report.json`.
pub fn default_report_path(output: &Path) -> PathBuf {
    let stem = output
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "store".into());
    output.with_file_name(format!("{stem}.report.json"))
}

enum Decoded {
    Ok {
        id: String,
        caption: String,
        pixels: Vec<f32>,
    },
    Bad(BadRow),
}

fn decode_row(row: RawRow, resolution: u32) -> Decoded {
    let bad = |reason: &str, detail: String| {
        Decoded::Bad(BadRow {
            id: row.id.clone(),
            reason: reason.to_string(),
            detail,
        })
    };
    let Some(caption) = row.caption.clone() else {
        return bad("null caption", String::new());
    };
    let Some(bytes) = row.image.as_deref() else {
        return bad("null image", String::new());
    };
    if bytes.is_empty() {
        return bad("empty image bytes", String::new());
    }
    match crate::image::decode_rgb(bytes) {
        Ok(img) => Decoded::Ok {
            id: row.id,
            caption,
            pixels: crate::image::preprocess(&img, resolution),
        },
        // The image module's messages start with a short stable category ("corrupt image: …").
        Err(Error::Data { msg, .. }) => {
            let reason = msg
                .split(':')
                .next()
                .unwrap_or("corrupt image")
                .trim()
                .to_string();
            bad(&reason, msg)
        }
        Err(e) => bad("corrupt image", e.to_string()),
    }
}

/// The loaded encoders and the store settings they imply.
pub struct Encoders {
    /// Only the DC-AE encoder is loaded (half the VAE's weights).
    pub vae: DcaeEncoder,
    pub vae_config: DcaeConfig,
    pub text: PromptEncoder,
    pub device: Device,
    pub config: StoreConfig,
}

/// Loads the VAE and the prompt encoder and computes the store settings (incl. the negative embedding).
pub fn load_encoders(opts: &PrepOptions, hubc: &HubConfig) -> Result<Encoders> {
    let src = hub::resolve_model(
        &opts.pretrained_model_name_or_path,
        &["vae", "text_encoder", "tokenizer"],
        hubc,
    )?;
    let device = parse_device(&opts.device)?;
    let vae_dir = src.root.join("vae");
    let vae_config = DcaeConfig::from_file(&vae_dir.join("config.json"))?;
    let vae = DcaeEncoder::load(&vae_dir, DType::F32, &device)?;
    let f = vae_config.spatial_compression() as u32;
    if opts.resolution == 0 || !opts.resolution.is_multiple_of(f) {
        return Err(Error::Arg(format!(
            "--resolution {} must be a positive multiple of the VAE's spatial compression {f}",
            opts.resolution
        )));
    }
    let text = PromptEncoder::load(&src.root, opts.mixed_precision.dtype(), &device)?;
    let (neg, neg_mask) = text.encode(&[String::new()], None, opts.max_sequence_length)?;
    let neg_len = neg_mask
        .sum_all()?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()? as usize;
    let d = neg.dim(2)?;
    let neg_rows: Vec<f32> = neg
        .narrow(1, 0, neg_len)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let fp = |sub: &str, configs: &[&str]| -> Result<ModelInfo> {
        Ok(ModelInfo {
            origin: format!("{}/{sub}", src.origin),
            fingerprint: fingerprint_folder(&src.root.join(sub), configs)?,
        })
    };
    let r = opts.resolution as usize;
    let config = StoreConfig {
        format_version: FORMAT_VERSION,
        resolution: opts.resolution,
        max_sequence_length: opts.max_sequence_length,
        complex_human_instruction: opts
            .complex_human_instruction
            .then(|| COMPLEX_HUMAN_INSTRUCTION.iter().map(|s| s.to_string()).collect()),
        vae_scaling_factor: vae_config.scaling_factor,
        text_hidden_size: d,
        latent_dtype: opts.latent_dtype,
        embed_dtype: opts.embed_dtype,
        negative_prompt_len: neg_len,
        negative_prompt_embeds_f32le_b64: StoreConfig::encode_negative(&neg_rows),
        models: ModelsInfo {
            vae: fp("vae", &["config.json"])?,
            text_encoder: fp("text_encoder", &["config.json"])?,
            tokenizer: fp("tokenizer", &["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"])?,
        },
        preprocess: PreprocessInfo {
            resize: "shorter side to resolution, bilinear with antialias (PIL BILINEAR, as torchvision Resize on PIL images)".into(),
            crop: "center crop resolution x resolution (torchvision CenterCrop)".into(),
            normalize: "RGB (PIL convert) / 255 * 2 - 1".into(),
            mixed_precision: opts.mixed_precision.name().into(),
        },
        latent_shape: [vae_config.latent_channels, r / f as usize, r / f as usize],
        writer: format!("sana-sprint {}", env!("CARGO_PKG_VERSION")),
    };
    Ok(Encoders {
        vae,
        vae_config,
        text,
        device,
        config,
    })
}

/// Encodes one batch of decoded samples into store rows.
pub fn encode_batch(
    enc: &Encoders,
    opts: &PrepOptions,
    batch: Vec<(String, String, Vec<f32>)>,
) -> Result<Vec<LatentRow>> {
    let r = opts.resolution as usize;
    let b = batch.len();
    let mut pixels = Vec::with_capacity(b * 3 * r * r);
    for (_, _, p) in &batch {
        pixels.extend_from_slice(p);
    }
    let x = Tensor::from_vec(pixels, (b, 3, r, r), &enc.device)?;
    let latent = enc.vae.forward(&x)?.to_dtype(DType::F32)?;
    let (c, h, w) = (latent.dim(1)?, latent.dim(2)?, latent.dim(3)?);
    let latent: Vec<f32> = latent.flatten_all()?.to_vec1()?;
    let captions: Vec<String> = batch.iter().map(|(_, c, _)| c.clone()).collect();
    let instruction = opts
        .complex_human_instruction
        .then_some(&COMPLEX_HUMAN_INSTRUCTION[..]);
    let (emb, mask) = enc
        .text
        .encode(&captions, instruction, opts.max_sequence_length)?;
    let d = emb.dim(2)?;
    let lens: Vec<f32> = mask.to_dtype(DType::F32)?.sum(1)?.to_vec1()?;
    let emb: Vec<f32> = emb.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let per_latent = c * h * w;
    let per_emb = opts.max_sequence_length * d;
    Ok(batch
        .into_iter()
        .enumerate()
        .map(|(i, (id, caption, _))| {
            let len = lens[i] as usize;
            LatentRow {
                id,
                caption,
                latent: latent[i * per_latent..(i + 1) * per_latent].to_vec(),
                latent_shape: [c as i32, h as i32, w as i32],
                prompt_embeds: emb[i * per_emb..i * per_emb + len * d].to_vec(),
                prompt_len: len as i32,
            }
        })
        .collect())
}

fn progress_bar(total: u64, enabled: bool) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(total);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} rows  {per_sec}  ETA {eta}  {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb
}

/// Test hook: abort the process (as a kill would) after this many commits.
fn kill_after_commits() -> Option<usize> {
    std::env::var("SPRINT_PREP_KILL_AFTER_COMMITS")
        .ok()?
        .parse()
        .ok()
}

/// Runs a whole prep job and returns its report (also written as JSON).
pub fn run(opts: &PrepOptions, hubc: &HubConfig) -> Result<PrepReport> {
    let started = Instant::now();
    if opts.batch_size == 0 || opts.commit_every == 0 {
        return Err(Error::Arg(
            "--batch_size and --commit_every must be at least 1".into(),
        ));
    }
    let files = hub::resolve_data_files(opts.dataset_name.as_deref(), &opts.file_path, hubc)?;
    if files.is_empty() {
        return Err(Error::Arg("no input files: pass --file_path".into()));
    }
    let shards = source::validate_shards(&files, &opts.image_column, &opts.caption_column)?;
    let enc = load_encoders(opts, hubc)?;
    let mode = if opts.overwrite {
        OpenMode::Overwrite
    } else {
        OpenMode::CreateOrAppend
    };
    let mut writer = StoreWriter::open(&opts.output, enc.config.clone(), mode, opts.encoding)?;

    let total_rows: usize = shards.iter().map(|s| s.num_rows).sum();
    let pending: Vec<String> = shards
        .iter()
        .flat_map(|s| (0..s.num_rows).map(move |i| s.id(i)))
        .filter(|id| !writer.contains(id))
        .collect();
    let already = total_rows - pending.len();
    let pending: Arc<std::collections::HashSet<String>> = Arc::new(pending.into_iter().collect());
    let pb = progress_bar(pending.len() as u64, opts.progress);

    let mut report = PrepReport::new(opts, &shards, total_rows, already);
    let cap = opts.batch_size * 4;
    let (raw_tx, raw_rx) = bounded::<RawRow>(cap);
    let (dec_tx, dec_rx) = bounded::<Decoded>(cap);

    let result: Result<()> = std::thread::scope(|scope| {
        let reader_shards: Vec<Shard> = shards.clone();
        let keep_set = pending.clone();
        let (image_column, caption_column) =
            (opts.image_column.clone(), opts.caption_column.clone());
        let reader = scope.spawn(move || -> Result<()> {
            for shard in &reader_shards {
                let mut send = |row: RawRow| raw_tx.send(row).is_ok();
                let cont = source::read_rows(
                    shard,
                    &image_column,
                    &caption_column,
                    &|id| keep_set.contains(id),
                    &mut send,
                )?;
                if !cont {
                    break;
                }
            }
            Ok(())
        });
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(opts.num_workers.max(1))
            .thread_name(|i| format!("decode-{i}"))
            .build()
            .map_err(|e| Error::Arg(format!("cannot start the decode pool: {e}")))?;
        let resolution = opts.resolution;
        let decoders = scope.spawn(move || {
            pool.scope(|s| {
                for _ in 0..pool.current_num_threads() {
                    let (rx, tx) = (raw_rx.clone(), dec_tx.clone());
                    s.spawn(move |_| {
                        for row in rx.iter() {
                            if tx.send(decode_row(row, resolution)).is_err() {
                                break;
                            }
                        }
                    });
                }
                drop(dec_tx);
            });
        });

        let kill_after = kill_after_commits();
        let mut commits = 0usize;
        let mut batch: Vec<(String, String, Vec<f32>)> = Vec::with_capacity(opts.batch_size);
        let mut flush = |batch: &mut Vec<(String, String, Vec<f32>)>,
                         writer: &mut StoreWriter,
                         report: &mut PrepReport,
                         force_commit: bool|
         -> Result<()> {
            if !batch.is_empty() {
                let n = batch.len();
                for row in encode_batch(&enc, opts, std::mem::take(batch))? {
                    writer.push(row);
                }
                report.rows_encoded += n;
                pb.inc(n as u64);
            }
            if writer.pending_len() >= opts.commit_every
                || (force_commit && writer.pending_len() > 0)
            {
                report.rows_written += writer.commit()?;
                commits += 1;
                if kill_after == Some(commits) {
                    std::process::abort();
                }
            }
            Ok(())
        };
        let mut outcome = Ok(());
        for item in dec_rx.iter() {
            match item {
                Decoded::Ok {
                    id,
                    caption,
                    pixels,
                } => {
                    batch.push((id, caption, pixels));
                    if batch.len() == opts.batch_size {
                        if let Err(e) = flush(&mut batch, &mut writer, &mut report, false) {
                            outcome = Err(e);
                            break;
                        }
                    }
                }
                Decoded::Bad(bad) => {
                    pb.inc(1);
                    report.add_bad(bad);
                    pb.set_message(format!("skipped {}", report.bad_rows.len()));
                }
            }
        }
        drop(dec_rx);
        if outcome.is_ok() {
            outcome = flush(&mut batch, &mut writer, &mut report, true);
        }
        decoders
            .join()
            .map_err(|_| Error::Arg("a decode worker panicked".into()))?;
        reader
            .join()
            .map_err(|_| Error::Arg("the parquet reader panicked".into()))??;
        outcome
    });
    pb.finish_and_clear();
    report.finish(started.elapsed().as_secs_f64());
    let report_path = opts
        .report
        .clone()
        .unwrap_or_else(|| default_report_path(&opts.output));
    report.write(&report_path)?;
    result?;
    Ok(report)
}
