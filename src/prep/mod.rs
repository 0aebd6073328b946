//! parquet shards -> decode (rayon) -> encode (device, batched) -> latent store.
//!
//! A reader thread streams rows that the store does not hold yet, a rayon pool decodes and preprocesses
//! images, and the calling thread encodes batches on the device and commits them to the store. Every queue is
//! bounded, so memory stays flat whatever the number of shards.

pub mod budget; // the decode memory budget shared by the workers
pub mod parts; // many workers on one store: parts, leases, shard identities
pub mod report;
pub mod source;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use crossbeam_channel::bounded;

use crate::buckets::BucketTable;
use crate::device::{default_device, parse_device, MixedPrecision};
use crate::error::{Error, Result};
use crate::hub::{self, HubConfig};
use crate::models::dcae::{DcaeConfig, DcaeEncoder};
use crate::store::compat::fingerprint_folder;
use crate::store::{BucketInfo, MultiScaleInfo, FORMAT_VERSION_MULTI_SCALE};
use crate::store::{
    FloatEncoding, LatentRow, ModelInfo, ModelsInfo, OpenMode, PreprocessInfo, StoreConfig,
    StoreDType, StoreWriter, FORMAT_VERSION,
};
use crate::text::{PromptEncoder, COMPLEX_HUMAN_INSTRUCTION};
use report::{BadRow, BadShard, PrepReport};
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
    /// This worker among several (`--worker_index`/`--worker_count`); `None`: from the torchrun/Slurm
    /// variables, or a single worker.
    pub worker_index: Option<usize>,
    pub worker_count: Option<usize>,
    /// Rows per part (the unit of work and of leases).
    pub part_rows: usize,
    /// Seconds a lease lasts without renewal (renewed every third of it).
    pub lease_seconds: f64,
    /// Store the rows of a file whose name is known with other content under `<name>@<hash8>#<row>`.
    pub distinct_shard_ids: bool,
    /// Aspect-ratio buckets: each image to the nearest bucket of the `resolution` table (512, 1024, 2048).
    pub multi_scale: bool,
    /// Validation prompts to encode into the store's metadata (sprint-train then needs no text encoder).
    pub validation_prompts: Vec<String>,
    /// Refuse unreadable input files (before anything is written) and fail on a corrupt page, instead of
    /// skipping them and listing them in the report.
    pub strict: bool,
    /// Images whose header declares more pixels are bad rows (`image too large`) before any decoding: PIL's
    /// decompression-bomb limit by default.
    pub max_image_pixels: u64,
    /// Bytes of decoded images the workers may hold at once ([`budget`]).
    pub decode_memory_mib: u64,
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
            worker_index: None,
            worker_count: None,
            part_rows: 1024,
            lease_seconds: 60.0,
            distinct_shard_ids: false,
            multi_scale: false,
            validation_prompts: Vec::new(),
            strict: false,
            max_image_pixels: crate::image::DEFAULT_MAX_IMAGE_PIXELS,
            decode_memory_mib: 1024,
        }
    }
}

/// The default bad-rows report path: next to the store, `<stem>.report.json`.
pub fn default_report_path(output: &Path) -> PathBuf {
    worker_report_path(output, parts::Worker::SINGLE)
}

/// The report path of one worker: `<stem>.report.json` for a single worker, else
/// `<stem>.worker-<i>-of-<n>.report.json` (workers never share a report file).
pub fn worker_report_path(output: &Path, worker: parts::Worker) -> PathBuf {
    let stem = output
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "store".into());
    if worker.count == 1 {
        output.with_file_name(format!("{stem}.report.json"))
    } else {
        output.with_file_name(format!(
            "{stem}.worker-{}-of-{}.report.json",
            worker.index, worker.count
        ))
    }
}

/// The pixel size `(height, width)` a decoded image was transformed to: the square, or its bucket.
type PixelSize = (u32, u32);
/// Decoded rows waiting for the device, by pixel size: (id, caption, CHW pixels).
type OpenBatches = BTreeMap<PixelSize, Vec<(String, String, Vec<f32>)>>;

enum Decoded {
    Ok {
        id: String,
        caption: String,
        pixels: Vec<f32>,
        size: PixelSize,
    },
    Bad(BadRow),
}

/// How images become tensors: the square transform at a resolution, or the multi-scale one into a table's
/// nearest bucket.
#[derive(Debug, Clone)]
pub enum Transform {
    Square(u32),
    Buckets(BucketTable),
}

impl Transform {
    fn of(opts: &PrepOptions) -> Result<Transform> {
        Ok(if opts.multi_scale {
            Transform::Buckets(BucketTable::for_resolution(opts.resolution)?)
        } else {
            Transform::Square(opts.resolution)
        })
    }

    /// The CHW f32 tensor of an RGB image and its pixel size.
    pub fn apply(&self, img: &image::RgbImage) -> (Vec<f32>, PixelSize) {
        match self {
            Transform::Square(r) => (crate::image::preprocess(img, *r), (*r, *r)),
            Transform::Buckets(table) => {
                let (_, b) = table.nearest(img.height(), img.width());
                let mut out = vec![0f32; 3 * (b.height * b.width) as usize];
                crate::image::preprocess_bucket_into(
                    img,
                    (b.height, b.width),
                    table.filter(),
                    &mut out,
                );
                (out, (b.height, b.width))
            }
        }
    }
}

fn decode_row(
    row: RawRow,
    transform: &Transform,
    budget: &budget::DecodeBudget,
    max_pixels: u64,
) -> Decoded {
    let bad = |reason: &str, detail: String| {
        Decoded::Bad(BadRow {
            id: row.id.clone(),
            reason: reason.to_string(),
            detail,
        })
    };
    let Some(caption) = row.caption.as_deref() else {
        return bad("null caption", String::new());
    };
    // an empty caption is kept: the reference tokenizes "" like any prompt
    let caption = match std::str::from_utf8(caption) {
        Ok(c) => c.to_string(),
        Err(e) => {
            return bad(
                "invalid caption",
                format!(
                    "not UTF-8: invalid byte 0x{:02x} at byte {} of {}",
                    caption[e.valid_up_to()],
                    e.valid_up_to(),
                    caption.len()
                ),
            )
        }
    };
    let Some(bytes) = row.image.as_deref() else {
        return bad("null image", String::new());
    };
    if bytes.is_empty() {
        return bad("empty image bytes", String::new());
    }
    // the decoded pixels are held within the budget (an unreadable header costs nothing: it fails at once)
    // (nor does an image over the pixel limit: it is refused from its header)
    let cost = crate::image::declared_pixels(bytes)
        .map(|(w, h)| u64::from(w) * u64::from(h))
        .map_or(0, |px| {
            if px > max_pixels {
                0
            } else {
                px * budget::BYTES_PER_PIXEL
            }
        });
    let held = budget.reserve(cost);
    let decoded = crate::image::decode_rgb_limited(bytes, max_pixels);
    match decoded {
        Ok(img) => {
            let (pixels, size) = transform.apply(&img);
            drop(img);
            drop(held);
            Decoded::Ok {
                id: row.id,
                caption,
                pixels,
                size,
            }
        }
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
    if let Some(v) = neg_rows.iter().find(|v| !v.is_finite()) {
        return Err(Error::model(
            src.root.join("text_encoder"),
            format!(
                "the text encoder's embedding of the empty prompt (the negative prompt the store keeps) holds \
                 {v}: NaN/Inf outputs mean damaged weights or a faulty device; nothing was written"
            ),
        ));
    }
    let fp = |sub: &str, configs: &[&str]| -> Result<ModelInfo> {
        Ok(ModelInfo {
            origin: format!("{}/{sub}", src.origin),
            fingerprint: fingerprint_folder(&src.root.join(sub), configs)?,
        })
    };
    let r = opts.resolution as usize;
    let c = vae_config.latent_channels;
    let multi_scale = match Transform::of(opts)? {
        Transform::Square(_) => None,
        Transform::Buckets(table) => Some(MultiScaleInfo {
            table: table.resolution(),
            filter: table.filter().name().into(),
            buckets: table
                .entries()
                .map(|(key, b)| {
                    if b.height % f != 0 || b.width % f != 0 {
                        return Err(Error::Arg(format!(
                            "the bucket {b} is not a multiple of the VAE's spatial compression {f}"
                        )));
                    }
                    Ok(BucketInfo {
                        key: key.into(),
                        height: b.height,
                        width: b.width,
                        latent_shape: [c, (b.height / f) as usize, (b.width / f) as usize],
                    })
                })
                .collect::<Result<_>>()?,
        }),
    };
    let preprocess = match &multi_scale {
        None => PreprocessInfo {
            resize: "shorter side to resolution, bilinear with antialias (PIL BILINEAR, as torchvision Resize on PIL images)".into(),
            crop: "center crop resolution x resolution (torchvision CenterCrop)".into(),
            normalize: "RGB (PIL convert) / 255 * 2 - 1".into(),
            mixed_precision: opts.mixed_precision.name().into(),
        },
        Some(m) => PreprocessInfo {
            resize: format!(
                "nearest aspect-ratio bucket of the {} table (first key minimising |key - h/w|), resized to cover \
                 it with {} with antialias (PIL {}, as torchvision Resize on PIL images; NVlabs Sana multi-scale)",
                m.table,
                m.filter,
                m.filter.to_uppercase()
            ),
            crop: "center crop to the bucket (torchvision CenterCrop((h, w)))".into(),
            normalize: "RGB (PIL convert) / 255 * 2 - 1".into(),
            mixed_precision: opts.mixed_precision.name().into(),
        },
    };
    let config = StoreConfig {
        format_version: if multi_scale.is_some() {
            FORMAT_VERSION_MULTI_SCALE
        } else {
            FORMAT_VERSION
        },
        resolution: opts.resolution,
        max_sequence_length: opts.max_sequence_length,
        complex_human_instruction: opts.complex_human_instruction.then(|| {
            COMPLEX_HUMAN_INSTRUCTION
                .iter()
                .map(|s| s.to_string())
                .collect()
        }),
        vae_scaling_factor: vae_config.scaling_factor,
        text_hidden_size: d,
        latent_dtype: opts.latent_dtype,
        embed_dtype: opts.embed_dtype,
        negative_prompt_len: neg_len,
        negative_prompt_embeds_f32le_b64: StoreConfig::encode_negative(&neg_rows),
        models: ModelsInfo {
            vae: fp("vae", &["config.json"])?,
            text_encoder: fp("text_encoder", &["config.json"])?,
            tokenizer: fp(
                "tokenizer",
                &[
                    "tokenizer.json",
                    "tokenizer_config.json",
                    "special_tokens_map.json",
                ],
            )?,
        },
        preprocess,
        latent_shape: [c, r / f as usize, r / f as usize],
        writer: format!("sana-sprint {}", env!("CARGO_PKG_VERSION")),
        multi_scale,
        validation_prompts: Vec::new(),
        validation_max_sequence_length: None,
    };
    let mut config = config;
    if !opts.validation_prompts.is_empty() {
        // as sprint-train's validation encodes them (crate::train::validation::encode_prompts), in this run's
        // text dtype
        let max_len = crate::train::validation::MAX_SEQUENCE_LENGTH;
        let (emb, mask) = text.encode(
            &opts.validation_prompts,
            Some(&COMPLEX_HUMAN_INSTRUCTION[..]),
            max_len,
        )?;
        let lens: Vec<f32> = mask.to_dtype(DType::F32)?.sum(1)?.to_vec1()?;
        for (i, prompt) in opts.validation_prompts.iter().enumerate() {
            let len = lens[i] as usize;
            let rows: Vec<f32> = emb
                .get(i)?
                .narrow(0, 0, len)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            if rows.iter().any(|v| !v.is_finite()) {
                return Err(Error::model(
                    src.root.join("text_encoder"),
                    format!(
                        "the text encoder's embedding of the validation prompt {prompt:?} holds NaN/Inf values \
                         (damaged weights or a faulty device); nothing was written"
                    ),
                ));
            }
            config.validation_prompts.push(crate::store::StoredPrompt {
                prompt: prompt.clone(),
                len,
                embeds_f32le_b64: StoreConfig::encode_negative(&rows),
            });
        }
        config.validation_max_sequence_length = Some(max_len);
    }
    Ok(Encoders {
        vae,
        vae_config,
        text,
        device,
        config,
    })
}

/// Encodes one batch of decoded samples of one pixel size `(height, width)` into store rows.
pub fn encode_batch(
    enc: &Encoders,
    opts: &PrepOptions,
    batch: Vec<(String, String, Vec<f32>)>,
    (height, width): PixelSize,
) -> Result<Vec<LatentRow>> {
    let (h, w) = (height as usize, width as usize);
    let b = batch.len();
    let mut pixels = Vec::with_capacity(b * 3 * h * w);
    for (_, _, p) in &batch {
        pixels.extend_from_slice(p);
    }
    let x = Tensor::from_vec(pixels, (b, 3, h, w), &enc.device)?;
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

/// Why an encoded row must not be stored, or `None` for a good row: NaN/Inf in its latent or its prompt
/// embedding (a faulty device, a bf16 overflow, damaged weights), or a finite value that the store's float16
/// column would turn into Inf. Checked before each row goes to the writer.
pub fn non_finite(row: &LatentRow, config: &StoreConfig) -> Option<BadRow> {
    let check = |values: &[f32], dtype: StoreDType| -> Option<String> {
        let stored_bad = |v: f32| match dtype {
            StoreDType::Float32 => !v.is_finite(),
            StoreDType::Float16 => !half::f16::from_f32(v).is_finite(),
        };
        let (mut n, mut first) = (0usize, None);
        for (i, &v) in values.iter().enumerate() {
            if stored_bad(v) {
                n += 1;
                first.get_or_insert((i, v));
            }
        }
        let (i, v) = first?;
        Some(if v.is_finite() {
            format!(
                "{n} of {} values beyond float16 storage (value {i} is {v}); store them as float32",
                values.len()
            )
        } else {
            format!(
                "{n} of {} values are NaN or Inf (value {i} is {v})",
                values.len()
            )
        })
    };
    let (reason, detail) = if let Some(d) = check(&row.latent, config.latent_dtype) {
        ("non-finite latent", d)
    } else if let Some(d) = check(&row.prompt_embeds, config.embed_dtype) {
        ("non-finite prompt embedding", d)
    } else {
        return None;
    };
    Some(BadRow {
        id: row.id.clone(),
        reason: reason.into(),
        detail,
    })
}

/// Test hook: abort the process (as a kill would) after this many commits.
fn kill_after_commits() -> Option<usize> {
    std::env::var("SPRINT_PREP_KILL_AFTER_COMMITS")
        .ok()?
        .parse()
        .ok()
}

/// The part key of a row id (`<shard name>#<row>`), given each shard's row count and the part size.
fn part_key_of(id: &str, rows_of: &HashMap<String, usize>, part_rows: usize) -> Option<String> {
    let (name, row) = id.rsplit_once('#')?;
    let row: usize = row.parse().ok()?;
    let rows = *rows_of.get(name)?;
    let start = row / part_rows * part_rows;
    let end = (start + part_rows).min(rows) - 1;
    Some(format!("{name}#{start}-{end}"))
}

/// Progress of one of this worker's parts: rows still to settle (committed or skipped as bad).
#[derive(Debug, Default)]
struct PartTodo {
    todo: usize,
    settled: usize,
    /// The reader has sent every row of the part.
    sent: bool,
}

/// Runs a whole prep job and returns its report (also written as JSON).
pub fn run(opts: &PrepOptions, hubc: &HubConfig) -> Result<PrepReport> {
    let started = Instant::now();
    if opts.batch_size == 0 || opts.commit_every == 0 || opts.part_rows == 0 {
        return Err(Error::Arg(
            "--batch_size, --commit_every and --part_rows must be at least 1".into(),
        ));
    }
    if !(opts.lease_seconds.is_finite() && opts.lease_seconds > 0.0) {
        return Err(Error::Arg("--lease_seconds must be positive".into()));
    }
    let (worker, local_rank) = parts::Worker::resolve(opts.worker_index, opts.worker_count)?;
    if worker.count > 1 && opts.overwrite {
        return Err(Error::Arg(format!(
            "--overwrite with {} workers would let every worker replace the store: overwrite (or delete) it once \
             with a single process, then start the workers",
            worker.count
        )));
    }
    if let Some(remote) = crate::store::location::remote(&opts.output)? {
        // leases, the creation marker and Lance's own commits rely on conditional writes
        if !remote.conditional_writes()? {
            let why = format!(
                "the object store at {} does not honour conditional writes (If-None-Match / If-Match)",
                remote.uri()
            );
            if worker.count > 1 {
                return Err(Error::store(
                    &opts.output,
                    format!(
                        "{why}: concurrent workers could store rows twice there. Use an endpoint that does \
                         ({}) or run a single worker",
                        crate::store::location::conditional_write_services(remote.scheme())
                    ),
                ));
            }
            tracing::warn!("{why}: do not run two sprint-prep processes on this store at once");
        }
    }
    let mut opts = opts.clone();
    if worker.count > 1 && opts.device == "cuda" {
        // one GPU per worker, as torchrun/Slurm place them
        opts.device = format!("cuda:{local_rank}");
    }
    let opts = &opts;
    let files = hub::resolve_data_files(opts.dataset_name.as_deref(), &opts.file_path, hubc)?;
    if files.is_empty() {
        return Err(Error::Arg("no input files: pass --file_path".into()));
    }
    let inputs = source::validate_shards(&files, &opts.image_column, &opts.caption_column)?;
    check_inputs(&inputs, files.len(), opts.strict)?;
    // a file without rows has nothing to do (and no identity to record: its name stays free for a real one)
    let (shards, empty): (Vec<Shard>, Vec<Shard>) =
        inputs.shards.into_iter().partition(|s| s.num_rows > 0);
    let enc = load_encoders(opts, hubc)?;
    let mode = if opts.overwrite {
        OpenMode::Overwrite
    } else {
        OpenMode::CreateOrAppend
    };
    let mut writer = StoreWriter::open(&opts.output, enc.config.clone(), mode, opts.encoding)?;
    if opts.overwrite {
        // the leases and shard identities of the replaced contents mean nothing now
        crate::store::location::remove_dir(&opts.output, parts::SPRINT_DIR)?;
    }
    let shards = parts::check_shard_identities(&opts.output, &shards, opts.distinct_shard_ids)?;
    let all_parts = parts::plan_parts(&shards, opts.part_rows);
    let mine = parts::parts_of(&all_parts, worker);
    let rows_of: HashMap<String, usize> = shards
        .iter()
        .map(|s| (s.name.clone(), s.num_rows))
        .collect();

    let total_rows: usize = shards.iter().map(|s| s.num_rows).sum();
    let pending: Vec<String> = mine
        .iter()
        .flat_map(|p| {
            let shard = &shards[p.shard];
            (p.start..p.start + p.len).map(move |r| shard.id(r))
        })
        .filter(|id| !writer.contains(id))
        .collect();
    let mine_rows: usize = mine.iter().map(|p| p.len).sum();
    let already = mine_rows - pending.len();
    let pending: Arc<HashSet<String>> = Arc::new(pending.into_iter().collect());
    let pb = crate::cli::rows_bar(pending.len() as u64, opts.progress, "rows");
    if worker.count > 1 {
        pb.set_prefix(format!("worker {}/{}", worker.index + 1, worker.count));
    }
    let say = {
        let pb = pb.clone();
        let progress = opts.progress;
        move |msg: String| {
            if progress {
                pb.println(&msg);
            } else {
                eprintln!("{msg}");
            }
        }
    };

    let leases = Arc::new(parts::Leases::new(
        &opts.output,
        worker,
        Duration::from_secs_f64(opts.lease_seconds),
    )?);
    leases.start_heartbeat();
    let todo: Arc<Mutex<HashMap<String, PartTodo>>> = Arc::default();

    let mut report = PrepReport::new(opts, &shards, total_rows, already);
    report.files = files.iter().map(|p| p.display().to_string()).collect();
    for s in &empty {
        say(format!("{} holds no rows", s.path.display()));
        report.empty_shards.push(s.path.display().to_string());
    }
    for b in inputs.bad {
        say(format!(
            "skipping {}: {} (its rows are encoded by a rerun once it is fixed; --strict refuses it)",
            b.path, b.error
        ));
        report.add_bad_shard(b);
    }
    report.worker = format!("{}/{}", worker.index + 1, worker.count);
    report.parts_total = all_parts.len();
    report.parts_of_worker = mine.len();
    let report_path = opts
        .report
        .clone()
        .unwrap_or_else(|| worker_report_path(&opts.output, worker));
    // written now, saying `running`: a killed run leaves a report that says it did not finish
    report.write(&report_path)?;
    let cap = opts.batch_size * 4;
    let (raw_tx, raw_rx) = bounded::<RawRow>(cap);
    let (dec_tx, dec_rx) = bounded::<Decoded>(cap);

    let transform = Transform::of(opts)?;
    // rows of shards with a corrupt page, found by the reader: (shard path, the rows not read)
    let unreadable: Arc<Mutex<Vec<(String, source::Unreadable)>>> = Arc::default();
    let mut stopped_by: Option<&'static str> = None;
    let decode_budget = budget::DecodeBudget::new(opts.decode_memory_mib.saturating_mul(1 << 20));
    let result: Result<usize> = std::thread::scope(|scope| {
        let reader_shards: Vec<Shard> = shards.clone();
        let keep_set = pending.clone();
        let (image_column, caption_column) =
            (opts.image_column.clone(), opts.caption_column.clone());
        let (leases_r, todo_r, say_r) = (leases.clone(), todo.clone(), say.clone());
        let (unreadable_r, pb_r, strict) = (unreadable.clone(), pb.clone(), opts.strict);
        let store_path = opts.output.clone();
        let mine = &mine;
        let reader = scope.spawn(move || -> Result<usize> {
            let mut done_by_others = 0usize;
            // one part: rows the store does not hold (re-read when the part was another worker's), then sent
            let work = |part: &parts::Part, taken_over: bool| -> Result<bool> {
                let shard = &reader_shards[part.shard];
                let stored_now: Option<HashSet<String>> = if taken_over {
                    Some(crate::store::writer::stored_ids(&store_path)?)
                } else {
                    None
                };
                let keep = |id: &str| {
                    keep_set.contains(id) && stored_now.as_ref().is_none_or(|s| !s.contains(id))
                };
                let n = (part.start..part.start + part.len)
                    .filter(|r| keep(&shard.id(*r)))
                    .count();
                todo_r.lock().expect("todo lock").insert(
                    part.key.clone(),
                    PartTodo {
                        todo: n,
                        settled: 0,
                        sent: false,
                    },
                );
                let mut send = |row: RawRow| raw_tx.send(row).is_ok();
                let read = source::read_rows_range(
                    shard,
                    part.start,
                    part.len,
                    &image_column,
                    &caption_column,
                    &keep,
                    &mut send,
                )?;
                if let Some(u) = read.unreadable {
                    if strict {
                        return Err(Error::data(&shard.path, format!("{} (--strict)", u.error)));
                    }
                    // the rows read are encoded; the others are bad rows and the part stays unfinished (as a
                    // killed worker's), so that the next run takes it over and tries them again
                    say_r(format!(
                        "{}: {}; the {} row(s) not read are tried again by the next run",
                        shard.path.display(),
                        u.error,
                        u.ids.len()
                    ));
                    pb_r.inc(u.ids.len() as u64);
                    todo_r
                        .lock()
                        .expect("todo lock")
                        .get_mut(&part.key)
                        .expect("inserted above")
                        .sent = true;
                    unreadable_r
                        .lock()
                        .expect("unreadable lock")
                        .push((shard.path.display().to_string(), u));
                    return Ok(!read.stopped);
                }
                let cont = !read.stopped;
                let finished_now = {
                    let mut t = todo_r.lock().expect("todo lock");
                    let e = t.get_mut(&part.key).expect("inserted above");
                    e.sent = true;
                    e.settled >= e.todo
                };
                if finished_now {
                    todo_r.lock().expect("todo lock").remove(&part.key);
                    leases_r.finish(&part.key)?;
                }
                Ok(cont)
            };
            let mut deferred: Vec<parts::Part> = Vec::new();
            for part in mine {
                let n = keep_set_count(part, &reader_shards, &keep_set);
                match leases_r.try_acquire(part, n)? {
                    parts::Acquired::Ours { taken_over } => {
                        if taken_over {
                            say_r(format!(
                                "part {} was leased by a worker that stopped renewing it: taking it over",
                                part.key
                            ));
                        }
                        if !work(part, taken_over)? {
                            return Ok(done_by_others);
                        }
                    }
                    parts::Acquired::Done(_) => done_by_others += 1,
                    parts::Acquired::Held(_) => deferred.push(part.clone()),
                }
            }
            // parts another worker holds: wait until it finishes them, or until its lease expires
            let mut told: HashMap<String, String> = HashMap::new();
            while !deferred.is_empty() {
                if crate::stop::requested().is_some() {
                    return Ok(done_by_others);
                }
                let mut still = Vec::new();
                for part in deferred {
                    let n = keep_set_count(&part, &reader_shards, &keep_set);
                    match leases_r.try_acquire(&part, n)? {
                        parts::Acquired::Ours { taken_over } => {
                            if taken_over {
                                say_r(format!(
                                    "part {} was leased by a worker that stopped renewing it: taking it over",
                                    part.key
                                ));
                            }
                            if !work(&part, taken_over)? {
                                return Ok(done_by_others);
                            }
                        }
                        parts::Acquired::Done(_) => done_by_others += 1,
                        parts::Acquired::Held(info) => {
                            if told.get(&part.key) != Some(&info.owner) {
                                say_r(format!(
                                    "part {} is being encoded by another worker: {}; waiting for it to finish \
                                     (or for its lease to expire)",
                                    part.key,
                                    info.describe()
                                ));
                                told.insert(part.key.clone(), info.owner.clone());
                            }
                            still.push(part);
                        }
                    }
                }
                deferred = still;
                if !deferred.is_empty() {
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
            Ok(done_by_others)
        });
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(opts.num_workers.max(1))
            .thread_name(|i| format!("decode-{i}"))
            .build()
            .map_err(|e| Error::Arg(format!("cannot start the decode pool: {e}")))?;
        let transform = &transform;
        let budget = &decode_budget;
        let max_pixels = opts.max_image_pixels;
        let decoders = scope.spawn(move || {
            pool.scope(|s| {
                for _ in 0..pool.current_num_threads() {
                    let (rx, tx) = (raw_rx.clone(), dec_tx.clone());
                    s.spawn(move |_| {
                        for row in rx.iter() {
                            if tx
                                .send(decode_row(row, transform, budget, max_pixels))
                                .is_err()
                            {
                                break;
                            }
                        }
                    });
                }
                drop(dec_tx);
            });
        });

        // a row of a part is settled once committed (or skipped as bad); a part whose rows are all settled
        // and all sent is finished: its lease says done
        let settle = |ids: &[String]| -> Result<()> {
            let mut finished = Vec::new();
            {
                let mut t = todo.lock().expect("todo lock");
                for id in ids {
                    if let Some(key) = part_key_of(id, &rows_of, opts.part_rows) {
                        if let Some(e) = t.get_mut(&key) {
                            e.settled += 1;
                            leases.add_done(&key, 1);
                            if e.sent && e.settled >= e.todo {
                                finished.push(key);
                            }
                        }
                    }
                }
                for k in &finished {
                    t.remove(k);
                }
            }
            for k in finished {
                leases.finish(&k)?;
            }
            Ok(())
        };
        let kill_after = kill_after_commits();
        let mut commits = 0usize;
        let mut uncommitted: Vec<String> = Vec::new();
        // device batches never mix pixel sizes: one open batch per size (one in a square run, one per
        // bucket met so far in a multi-scale run); a size whose batch is full is encoded at once, the others
        // when the run needs its rows committed
        let mut batches: OpenBatches = BTreeMap::new();
        let mut flush = |batches: &mut OpenBatches,
                         only: Option<PixelSize>,
                         writer: &mut StoreWriter,
                         report: &mut PrepReport,
                         force_commit: bool|
         -> Result<()> {
            let sizes: Vec<PixelSize> = match only {
                Some(size) => vec![size],
                None => batches.keys().copied().collect(),
            };
            for size in sizes {
                let Some(batch) = batches.remove(&size).filter(|b| !b.is_empty()) else {
                    continue;
                };
                let n = batch.len();
                // a row with NaN/Inf never reaches the store: a bad row with its reason
                let mut bad_ids = Vec::new();
                for row in encode_batch(&enc, opts, batch, size)? {
                    if let Some(bad) = non_finite(&row, writer.config()) {
                        bad_ids.push(bad.id.clone());
                        report.add_bad(bad);
                        continue;
                    }
                    uncommitted.push(row.id.clone());
                    writer.push(row);
                }
                report.rows_encoded += n - bad_ids.len();
                pb.inc(n as u64);
                if !bad_ids.is_empty() {
                    settle(&bad_ids)?;
                }
            }
            if writer.pending_len() >= opts.commit_every
                || (force_commit && writer.pending_len() > 0)
            {
                leases.check_not_lost()?;
                let rows = writer.pending_len();
                report.rows_written += writer.commit().map_err(|e| {
                    e.on_full_disk(
                        &opts.output,
                        None,
                        &format!(
                            "the commit of {rows} row(s) failed and the store is unchanged since its last \
                             commit ({} row(s) written by this run); free some space and rerun the same \
                             command: it encodes only the rows the store lacks",
                            report.rows_written
                        ),
                    )
                })?;
                commits += 1;
                if kill_after == Some(commits) {
                    std::process::abort();
                }
            }
            if writer.pending_len() == 0 && !uncommitted.is_empty() {
                settle(&std::mem::take(&mut uncommitted))?;
            }
            Ok(())
        };
        let mut outcome = Ok(());
        loop {
            if let Some(signal) = crate::stop::requested() {
                // a polite stop: what is decoded but not encoded is dropped (the next run reads it again);
                // the open batches are encoded and committed below
                say(format!(
                    "{signal}: committing the rows encoded so far and stopping (a second signal exits at once)"
                ));
                stopped_by = Some(signal);
                break;
            }
            let item = match dec_rx.recv_timeout(Duration::from_millis(200)) {
                Ok(item) => Some(item),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => None,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            };
            match item {
                Some(Decoded::Ok {
                    id,
                    caption,
                    pixels,
                    size,
                }) => {
                    let batch = batches
                        .entry(size)
                        .or_insert_with(|| Vec::with_capacity(opts.batch_size));
                    batch.push((id, caption, pixels));
                    // a full batch goes at once; so does the fullest one when many buckets hold rows back
                    // (bounds the decoded pixels held: 40 buckets of 1024² images would be GBs)
                    let held: usize = batches.values().map(Vec::len).sum();
                    let ready = if batches[&size].len() == opts.batch_size {
                        Some(size)
                    } else if held > 2 * opts.batch_size {
                        batches.iter().max_by_key(|(_, b)| b.len()).map(|(s, _)| *s)
                    } else {
                        None
                    };
                    if let Some(ready) = ready {
                        if let Err(e) =
                            flush(&mut batches, Some(ready), &mut writer, &mut report, false)
                        {
                            outcome = Err(e);
                            break;
                        }
                    }
                }
                Some(Decoded::Bad(bad)) => {
                    pb.inc(1);
                    let id = bad.id.clone();
                    report.add_bad(bad);
                    pb.set_message(format!("skipped {}", report.bad_rows.len()));
                    if let Err(e) = settle(std::slice::from_ref(&id)) {
                        outcome = Err(e);
                        break;
                    }
                }
                None => {}
            }
            // Rows held back (a batch smaller than --batch_size, a commit smaller than --commit_every) may be all
            // that is left of a part while the reader waits for another worker's part: commit them rather than
            // hold the part open (two workers could otherwise wait on each other forever).
            if dec_rx.is_empty() && (!batches.is_empty() || writer.pending_len() > 0) {
                let all_sent = todo.lock().expect("todo lock").values().all(|e| e.sent);
                if all_sent {
                    if let Err(e) = flush(&mut batches, None, &mut writer, &mut report, true) {
                        outcome = Err(e);
                        break;
                    }
                }
            }
        }
        drop(dec_rx);
        if outcome.is_ok() {
            outcome = flush(&mut batches, None, &mut writer, &mut report, true);
        }
        decoders
            .join()
            .map_err(|_| Error::Arg("a decode worker panicked".into()))?;
        let done_by_others = reader
            .join()
            .map_err(|_| Error::Arg("the parquet reader panicked".into()))??;
        outcome.map(|_| done_by_others)
    });
    leases.stop();
    pb.finish_and_clear();
    for (path, u) in std::mem::take(&mut *unreadable.lock().expect("unreadable lock")) {
        for id in u.ids {
            report.add_bad(BadRow {
                id,
                reason: "unreadable shard".into(),
                detail: u.error.clone(),
            });
        }
        report.add_bad_shard(BadShard {
            path,
            error: u.error,
        });
    }
    if let Ok(n) = &result {
        report.parts_done_by_others = *n;
        if *n > 0 {
            say(format!(
                "{n} of this worker's {} part(s) were finished by other workers",
                mine.len()
            ));
        }
    }
    // the end-of-run check: no id may be stored twice (older versions or hand-made stores can hold some)
    if result.is_ok() {
        let dups = crate::store::maintain::duplicate_ids(&opts.output)?;
        report.duplicate_ids = dups.len();
    }
    // the last worker to finish compacts the store when its many small commits would slow reading
    if result.is_ok() {
        let leases = parts::list_leases(&opts.output)?;
        let all_done = all_parts.iter().all(|p| {
            leases
                .iter()
                .any(|l| l.part == p.key && l.state == parts::LeaseState::Done)
        });
        if all_done && crate::store::maintain::needs_compaction(&opts.output)? {
            match crate::store::maintain::compact(&opts.output) {
                Ok(c) => {
                    report.compacted = true;
                    say(format!(
                        "compacted the store: {} fragments -> {}",
                        c.fragments_before, c.fragments_after
                    ));
                }
                // another worker finishing at the same moment may be compacting: its result serves
                Err(e) => say(format!("compaction skipped: {e}")),
            }
        }
    }
    report.finish(started.elapsed().as_secs_f64());
    report.status = match (&result, stopped_by) {
        (Err(e), _) => format!("failed: {e}"),
        (Ok(_), Some(signal)) => format!("stopped by {signal}"),
        (Ok(_), None) => "finished".into(),
    };
    report.write(&report_path)?;
    result?;
    Ok(report)
}

/// Refuses inputs that leave nothing to do before anything is loaded or written: no rows at all (every file
/// empty or unreadable), or with `strict` any unreadable file.
fn check_inputs(inputs: &source::Inputs, n_files: usize, strict: bool) -> Result<()> {
    let list = |bad: &[BadShard]| {
        bad.iter()
            .map(|b| format!("{}: {}", b.path, b.error))
            .collect::<Vec<_>>()
            .join("; ")
    };
    if strict && !inputs.bad.is_empty() {
        return Err(Error::data(
            &inputs.bad[0].path,
            format!(
                "{} of the {n_files} input file(s) cannot be read (--strict): {}. Nothing was written",
                inputs.bad.len(),
                list(&inputs.bad)
            ),
        ));
    }
    if inputs.shards.iter().all(|s| s.num_rows == 0) {
        let empty = inputs.shards.len();
        let msg = if inputs.bad.is_empty() {
            if n_files == 1 {
                format!(
                    "the input file {} holds no rows",
                    inputs.shards[0].path.display()
                )
            } else {
                format!("the {n_files} input files hold no rows")
            }
        } else {
            format!(
                "no rows to encode: of the {n_files} input file(s), {empty} hold no rows and {} cannot be read ({})",
                inputs.bad.len(),
                list(&inputs.bad)
            )
        };
        return Err(Error::Arg(format!(
            "{msg}; nothing to do, no store was created or changed"
        )));
    }
    Ok(())
}

/// Rows of `part` in `keep` (not stored when the run started).
fn keep_set_count(part: &parts::Part, shards: &[Shard], keep: &HashSet<String>) -> usize {
    let shard = &shards[part.shard];
    (part.start..part.start + part.len)
        .filter(|r| keep.contains(&shard.id(*r)))
        .count()
}
