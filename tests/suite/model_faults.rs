//! Damaged teacher folders are refused when the models are loaded — before any row is encoded, any training step
//! runs or anything is written (the output folder stays empty, the store unchanged) — with an error that names
//! the file and how to get it again: safetensors files cut inside the tensor data and inside the header, Git
//! LFS pointers, tensors stored as integers, a folder with only an fp16 `variant`, a sharded text encoder with
//! a missing shard or an index that does not match its shards, a tokenizer with more ids than the text
//! encoder's embedding has rows, missing and unparsable configs. A sharded text encoder encodes exactly as the
//! same weights in one file (and in another number of shards).

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use sana_sprint::device::MixedPrecision;
use sana_sprint::hub;
use sana_sprint::models::dcae::DcaeEncoder;
use sana_sprint::models::sana::SanaTransformer2DModel;
use sana_sprint::models::weights::Weights;
use sana_sprint::prep::{self, PrepOptions};
use sana_sprint::text::{PromptEncoder, COMPLEX_HUMAN_INSTRUCTION};
use sana_sprint::train::trainer;

use crate::prep_e2e::{hub as offline_hub, root};
use crate::train_loop::{copy_teacher, demo_store, edit_json, options, snapshot, tiny_model};

const VAE: &str = "vae/diffusion_pytorch_model.safetensors";
const TRANSFORMER: &str = "transformer/diffusion_pytorch_model.safetensors";
const SHARD_1: &str = "text_encoder/model-00001-of-00002.safetensors";
const SHARD_2: &str = "text_encoder/model-00002-of-00002.safetensors";
const INDEX: &str = "text_encoder/model.safetensors.index.json";

fn assert_has(err: &str, needles: &[&str]) {
    for needle in needles {
        assert!(err.contains(needle), "error lacks {needle:?}: {err}");
    }
}

fn is_empty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir).unwrap().next().is_none()
}

fn prep_options(model: &Path, output: &Path) -> PrepOptions {
    PrepOptions {
        pretrained_model_name_or_path: model.display().to_string(),
        file_path: vec![root()
            .join("datasets/demo/train_000.parquet")
            .display()
            .to_string()],
        output: output.to_path_buf(),
        resolution: 64,
        mixed_precision: MixedPrecision::No,
        device: "cpu".into(),
        progress: false,
        ..PrepOptions::default()
    }
}

/// `sprint-prep` (the library run) on the pipeline `model` fails with an error holding every one of `needles`
/// and writes nothing: its output folder stays empty (no store, no report).
fn prep_refused(model: &Path, needles: &[&str]) -> String {
    let out = tempfile::tempdir().unwrap();
    let err = prep::run(
        &prep_options(model, &out.path().join("s.lance")),
        &offline_hub(),
    )
    .unwrap_err()
    .to_string();
    assert_has(&err, needles);
    assert!(
        is_empty_dir(out.path()),
        "a refused prep wrote into {}",
        out.path().display()
    );
    err
}

/// `sprint-train` (the library run, with `--validation_prompt` when `validation`: then the VAE, the text
/// encoder and the tokenizer are loaded too) on the teacher `model` fails with an error holding every one of
/// `needles`, creates no output folder and leaves the store as it was.
fn train_refused(model: &Path, validation: bool, needles: &[&str]) -> String {
    let out = tempfile::tempdir().unwrap();
    let mut o = options(&out.path().join("run"));
    o.pretrained_model_name_or_path = model.to_path_buf();
    if validation {
        o.validation_prompts = vec!["a red cube".into()];
    }
    let store = snapshot(demo_store());
    let err = trainer::run(&o).unwrap_err().to_string();
    assert_has(&err, needles);
    assert!(
        is_empty_dir(out.path()),
        "a refused run wrote {}",
        o.output_dir.display()
    );
    assert!(
        snapshot(demo_store()) == store,
        "a refused run changed the store"
    );
    err
}

/// The byte where a safetensors file's tensor data starts (8 + its header length).
fn data_start(path: &Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    8 + u64::from_le_bytes(bytes[..8].try_into().unwrap())
}

/// Cuts the file at `path` to `len` bytes.
fn truncate(path: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// Cuts a safetensors file in the middle of its tensor data.
fn cut_in_data(path: &Path) {
    let (start, len) = (data_start(path), std::fs::metadata(path).unwrap().len());
    truncate(path, start + (len - start) / 2);
}

/// Cuts a safetensors file in the middle of its JSON header.
fn cut_in_header(path: &Path) {
    truncate(path, data_start(path) / 2 + 4);
}

fn load_tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn save_tensors(path: &Path, tensors: &HashMap<String, Tensor>) {
    candle_core::safetensors::save(tensors, path).unwrap();
}

/// Rewrites the safetensors file at `path` with tensor `name` stored as `dtype` (values converted).
fn store_as(path: &Path, name: &str, dtype: DType) {
    let mut t = load_tensors(path);
    let converted = t[name].to_dtype(dtype).unwrap();
    t.insert(name.to_string(), converted);
    save_tensors(path, &t);
}

/// The alphabetically first tensor of a safetensors file.
fn first_key(path: &Path) -> String {
    let mut keys: Vec<String> = load_tensors(path).into_keys().collect();
    keys.sort();
    keys.remove(0)
}

#[test]
fn truncated_weights_are_named_for_prep() {
    for (file, cut, what) in [
        (VAE, cut_in_data as fn(&Path), "truncated: the file is"),
        (VAE, cut_in_header, "truncated inside its header"),
        (SHARD_1, cut_in_data, "truncated: the file is"),
        (SHARD_2, cut_in_header, "truncated inside its header"),
    ] {
        let model = copy_teacher();
        let path = model.path().join(file);
        cut(&path);
        let err = prep_refused(
            model.path(),
            &[
                &path.display().to_string(),
                what,
                "hf download <repo-id>",
                file,
            ],
        );
        println!("{err}");
    }
    // the percentage present is given for a cut in the data
    let model = copy_teacher();
    let path = model.path().join(VAE);
    let len = std::fs::metadata(&path).unwrap().len();
    truncate(&path, len - 1000);
    prep_refused(
        model.path(),
        &["% present", &format!("the file is {}", len - 1000)],
    );
    // a Git LFS pointer in place of the weights
    let model = copy_teacher();
    std::fs::write(
        model.path().join(VAE),
        "version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 953068\n",
    )
    .unwrap();
    prep_refused(model.path(), &["Git LFS pointer", VAE, "git lfs pull"]);
    // an empty file, and bytes appended after the last tensor
    let model = copy_teacher();
    std::fs::write(model.path().join(VAE), b"").unwrap();
    prep_refused(model.path(), &["truncated: the file is 0 bytes", VAE]);
    let model = copy_teacher();
    let mut bytes = std::fs::read(model.path().join(VAE)).unwrap();
    bytes.extend_from_slice(&[0; 16]);
    std::fs::write(model.path().join(VAE), bytes).unwrap();
    prep_refused(
        model.path(),
        &["corrupt", "16 more than its header describes", VAE],
    );
}

#[test]
fn truncated_weights_are_named_for_train() {
    for (file, cut, what, validation) in [
        (
            TRANSFORMER,
            cut_in_data as fn(&Path),
            "truncated: the file is",
            false,
        ),
        (
            TRANSFORMER,
            cut_in_header,
            "truncated inside its header",
            false,
        ),
        (VAE, cut_in_data, "truncated: the file is", true),
        (SHARD_2, cut_in_data, "truncated: the file is", true),
    ] {
        let model = copy_teacher();
        let path = model.path().join(file);
        cut(&path);
        train_refused(
            model.path(),
            validation,
            &[&path.display().to_string(), what, "hf download"],
        );
    }
    // without validation prompts only the transformer is read: a damaged VAE does not stop a run that accepts
    // a teacher folder whose encoders differ from the store's (their fingerprints are compared otherwise)
    let model = copy_teacher();
    cut_in_data(&model.path().join(VAE));
    let out = tempfile::tempdir().unwrap();
    let mut o = options(&out.path().join("run"));
    o.pretrained_model_name_or_path = model.path().to_path_buf();
    o.max_train_steps = Some(2);
    o.allow_store_mismatch = true;
    assert_eq!(trainer::run(&o).unwrap().global_step, 2);
}

#[test]
fn integer_weights_are_refused_and_f64_is_converted() {
    for (file, dtype, name) in [(VAE, DType::I64, "I64"), (VAE, DType::U8, "U8")] {
        let model = copy_teacher();
        let path = model.path().join(file);
        let key = first_key(&path);
        store_as(&path, &key, dtype);
        prep_refused(
            model.path(),
            &[
                &path.display().to_string(),
                &format!("tensor \"{key}\" is stored as {name}"),
                "must be floats",
                "hf download",
            ],
        );
    }
    // a bf16 text-encoder shard with one integer tensor
    let model = copy_teacher();
    store_as(&model.path().join(SHARD_2), "norm.weight", DType::I64);
    prep_refused(model.path(), &[SHARD_2, "\"norm.weight\" is stored as I64"]);
    // F64 is a float: converted on load as PyTorch does, to the same values
    let model = copy_teacher();
    let path = model.path().join(VAE);
    let key = first_key(&path);
    store_as(&path, &key, DType::F64);
    hub::check_pipeline(model.path(), &["vae"]).unwrap();
    let stored = Weights::from_folder(&model.path().join("vae"), &["diffusion_pytorch_model"])
        .unwrap()
        .load(&key, DType::F32, &Device::Cpu)
        .unwrap();
    let original = load_tensors(&tiny_model().join(VAE)).remove(&key).unwrap();
    assert_eq!(
        stored.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        original.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
}

/// Replaces the weights `file` of the pipeline at `root` by an fp16 `variant` (`<stem>.fp16.safetensors`, as
/// diffusers saves `variant="fp16"`); returns the path of the default file, now missing.
fn only_fp16_variant(root: &Path, file: &str) -> std::path::PathBuf {
    let path = root.join(file);
    let mut t = load_tensors(&path);
    for v in t.values_mut() {
        *v = v.to_dtype(DType::F16).unwrap();
    }
    save_tensors(&path.with_extension("fp16.safetensors"), &t);
    std::fs::remove_file(&path).unwrap();
    path
}

#[test]
fn a_variant_only_folder_names_the_default_file() {
    let model = copy_teacher();
    let path = only_fp16_variant(model.path(), VAE);
    prep_refused(
        model.path(),
        &[
            &path.display().to_string(),
            "diffusion_pytorch_model.fp16.safetensors",
            "download the default weights",
            &format!("hf download <repo-id> {VAE}"),
        ],
    );
}

/// Rewrites the text encoder of the pipeline at `root` as `n` shards named as transformers names them
/// (`model-0000i-of-0000n.safetensors`, keys in name order split into `n` runs) with their
/// `model.safetensors.index.json`, or as one `model.safetensors` when `n` is 1.
fn reshard_text_encoder(root: &Path, n: usize) {
    let dir = root.join("text_encoder");
    let mut all = HashMap::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            all.extend(load_tensors(&path));
            std::fs::remove_file(&path).unwrap();
        }
    }
    let _ = std::fs::remove_file(dir.join("model.safetensors.index.json"));
    if n == 1 {
        save_tensors(&dir.join("model.safetensors"), &all);
        return;
    }
    let mut keys: Vec<&String> = all.keys().collect();
    keys.sort();
    let per = keys.len().div_ceil(n);
    let mut weight_map = serde_json::Map::new();
    let mut total = 0;
    for (i, chunk) in keys.chunks(per).enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        let shard: HashMap<String, Tensor> = chunk
            .iter()
            .map(|k| ((*k).clone(), all[*k].clone()))
            .collect();
        for (k, t) in &shard {
            weight_map.insert(k.clone(), file.clone().into());
            total += t.elem_count() * t.dtype().size_in_bytes();
        }
        save_tensors(&dir.join(&file), &shard);
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index).unwrap(),
    )
    .unwrap();
}

/// The prompt embeddings and mask of the pipeline at `root` for a few prompts, as bits.
fn encode_bits(root: &Path) -> (Vec<u32>, Vec<u32>) {
    let enc = PromptEncoder::load(root, DType::F32, &Device::Cpu).unwrap();
    let prompts = vec![
        "A red cube on a table".to_string(),
        "two cats".to_string(),
        String::new(),
    ];
    let (emb, mask) = enc
        .encode(&prompts, Some(&COMPLEX_HUMAN_INSTRUCTION[..]), 40)
        .unwrap();
    let bits = emb
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect();
    (bits, mask.flatten_all().unwrap().to_vec1::<u32>().unwrap())
}

#[test]
fn sharded_text_encoder_loads_identically_and_missing_shards_are_named() {
    // the tiny pipeline's text encoder is itself sharded (2 shards); one file and 3 shards encode the same
    let two = encode_bits(&tiny_model());
    let single = copy_teacher();
    reshard_text_encoder(single.path(), 1);
    assert!(!single.path().join(INDEX).exists());
    let three = copy_teacher();
    reshard_text_encoder(three.path(), 3);
    assert!(three
        .path()
        .join("text_encoder/model-00003-of-00003.safetensors")
        .is_file());
    assert!(
        two == encode_bits(single.path()),
        "one file encodes differently"
    );
    assert!(
        two == encode_bits(three.path()),
        "three shards encode differently"
    );
    hub::check_pipeline(three.path(), &["vae", "text_encoder", "tokenizer"]).unwrap();

    // a shard missing: named, with the index that lists it
    let shard = three
        .path()
        .join("text_encoder/model-00002-of-00003.safetensors");
    std::fs::remove_file(&shard).unwrap();
    let index = three.path().join(INDEX);
    prep_refused(
        three.path(),
        &[
            &shard.display().to_string(),
            &index.display().to_string(),
            "one of the 3 shards",
            "hf download <repo-id> text_encoder/model-00002-of-00003.safetensors",
        ],
    );

    // the index gives a tensor to a shard that does not hold it
    let model = copy_teacher();
    let index = model.path().join(INDEX);
    edit_json(&index, |v| {
        v["weight_map"]["norm.weight"] = "model-00001-of-00002.safetensors".into();
    });
    prep_refused(
        model.path(),
        &[
            &index.display().to_string(),
            "maps tensor \"norm.weight\" to model-00001-of-00002.safetensors, which does not hold it",
            "it is in model-00002-of-00002.safetensors",
            "different downloads",
        ],
    );
    // ... or to a shard that holds nothing of that name anywhere
    let model = copy_teacher();
    edit_json(&model.path().join(INDEX), |v| {
        v["weight_map"]["layers.9.mlp.up_proj.weight"] = "model-00001-of-00002.safetensors".into();
    });
    prep_refused(
        model.path(),
        &["\"layers.9.mlp.up_proj.weight\"", "no shard holds it"],
    );
    // an unparsable index
    let model = copy_teacher();
    std::fs::write(model.path().join(INDEX), "{\"weight_map\": {").unwrap();
    prep_refused(model.path(), &[INDEX, "invalid index json", "hf download"]);
}

/// Adds `n` special tokens after the last id of the tokenizer.json of the pipeline at `root`.
fn add_tokens(root: &Path, n: usize) {
    edit_json(&root.join("tokenizer/tokenizer.json"), |v| {
        let added = v["added_tokens"].as_array_mut().unwrap();
        for i in 0..n {
            added.push(serde_json::json!({
                "id": 1000 + i, "content": format!("<extra_{i}>"), "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true
            }));
        }
    });
}

#[test]
fn a_tokenizer_that_does_not_fit_the_text_encoder_is_refused() {
    // more token ids than embedding rows
    let model = copy_teacher();
    add_tokens(model.path(), 4);
    let err = prep_refused(
        model.path(),
        &[
            "tokenizer/tokenizer.json",
            "token ids go up to 1003 (1004 tokens)",
            "has 1000 embedding rows",
            "different models",
        ],
    );
    println!("{err}");
    // a text encoder with a smaller vocabulary (config and embedding both 500)
    let model = copy_teacher();
    let shard = model.path().join(SHARD_1);
    let mut t = load_tensors(&shard);
    let smaller = t["embed_tokens.weight"].narrow(0, 0, 500).unwrap();
    t.insert("embed_tokens.weight".into(), smaller);
    save_tensors(&shard, &t);
    edit_json(&model.path().join("text_encoder/config.json"), |v| {
        v["vocab_size"] = 500.into()
    });
    prep_refused(
        model.path(),
        &["up to 999 (1000 tokens)", "has 500 embedding rows"],
    );
    // a config whose vocab_size disagrees with the weights
    let model = copy_teacher();
    edit_json(&model.path().join("text_encoder/config.json"), |v| {
        v["vocab_size"] = 500.into()
    });
    prep_refused(
        model.path(),
        &[
            "text_encoder/config.json",
            "vocab_size is 500",
            "embed_tokens.weight has shape [1000, 64]",
            SHARD_1,
        ],
    );
    // the tokenizer missing, or cut short
    let model = copy_teacher();
    std::fs::remove_file(model.path().join("tokenizer/tokenizer.json")).unwrap();
    prep_refused(
        model.path(),
        &[
            "missing tokenizer/tokenizer.json",
            "hf download <repo-id> tokenizer/tokenizer.json",
        ],
    );
    let model = copy_teacher();
    let tokenizer = model.path().join("tokenizer/tokenizer.json");
    truncate(&tokenizer, std::fs::metadata(&tokenizer).unwrap().len() / 2);
    prep_refused(
        model.path(),
        &[
            "tokenizer/tokenizer.json",
            "not a readable tokenizer.json",
            "hf download",
        ],
    );
}

#[test]
fn missing_and_unparsable_configs_are_named() {
    for sub in ["vae", "text_encoder"] {
        let config = format!("{sub}/config.json");
        let model = copy_teacher();
        std::fs::remove_file(model.path().join(&config)).unwrap();
        prep_refused(
            model.path(),
            &[
                &format!("missing {config}"),
                &format!("hf download <repo-id> {config}"),
            ],
        );
        let model = copy_teacher();
        std::fs::write(model.path().join(&config), "{\"in_channels\": 3,").unwrap();
        prep_refused(
            model.path(),
            &[
                &model.path().join(&config).display().to_string(),
                "invalid",
                &format!("download it again: hf download <repo-id> {config}"),
            ],
        );
    }
    let model = copy_teacher();
    std::fs::write(model.path().join("tokenizer/tokenizer_config.json"), "{").unwrap();
    prep_refused(
        model.path(),
        &["tokenizer_config.json", "invalid JSON", "hf download"],
    );
}

/// sprint-train checks the teacher components it will load — the transformer, and with `--validation_prompt`
/// the VAE, the text encoder and the tokenizer — before comparing the store's fingerprints with them and
/// before writing anything.
#[test]
fn damaged_teachers_are_refused_by_train() {
    let model = copy_teacher();
    let path = model.path().join(TRANSFORMER);
    let key = first_key(&path);
    store_as(&path, &key, DType::U8);
    train_refused(
        model.path(),
        false,
        &[
            &path.display().to_string(),
            &format!("\"{key}\" is stored as U8"),
            "hf download",
        ],
    );
    let model = copy_teacher();
    let path = only_fp16_variant(model.path(), TRANSFORMER);
    train_refused(
        model.path(),
        false,
        &[
            &path.display().to_string(),
            "diffusion_pytorch_model.fp16.safetensors",
            "download the default weights",
        ],
    );
    // the transformer's config
    let model = copy_teacher();
    std::fs::write(model.path().join("transformer/config.json"), "").unwrap();
    train_refused(
        model.path(),
        false,
        &[
            "transformer/config.json",
            "invalid transformer config",
            "download it again: hf download <repo-id> transformer/config.json",
        ],
    );
    let model = copy_teacher();
    std::fs::remove_file(model.path().join("transformer/config.json")).unwrap();
    train_refused(model.path(), false, &["transformer"]);
    // with validation prompts: the VAE's config, a missing text-encoder shard, a tokenizer too large
    let model = copy_teacher();
    std::fs::write(model.path().join("vae/config.json"), "[").unwrap();
    train_refused(
        model.path(),
        true,
        &["vae/config.json", "invalid DC-AE config"],
    );
    let model = copy_teacher();
    std::fs::remove_file(model.path().join(SHARD_2)).unwrap();
    train_refused(model.path(), true, &[SHARD_2, INDEX, "one of the 2 shards"]);
    let model = copy_teacher();
    add_tokens(model.path(), 4);
    train_refused(
        model.path(),
        true,
        &[
            "tokenizer/tokenizer.json",
            "up to 1003",
            "1000 embedding rows",
        ],
    );
}

#[test]
fn the_clis_name_the_damaged_file() {
    let model = copy_teacher();
    let shard = model.path().join(SHARD_1);
    cut_in_data(&shard);
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_sprint-prep"))
        .arg("--pretrained_model_name_or_path")
        .arg(model.path())
        .arg("--file_path")
        .arg(root().join("datasets/demo/train_000.parquet"))
        .arg("--output")
        .arg(out.path().join("s.lance"))
        .args(["--resolution", "64", "--device", "cpu", "--no_progress"])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{stderr}");
    assert_has(
        &stderr,
        &[&shard.display().to_string(), "truncated", "hf download"],
    );
    assert!(is_empty_dir(out.path()));

    let model = copy_teacher();
    let weights = model.path().join(TRANSFORMER);
    store_as(&weights, &first_key(&weights), DType::I64);
    let run = Command::new(env!("CARGO_BIN_EXE_sprint-train"))
        .arg("--pretrained_model_name_or_path")
        .arg(model.path())
        .arg("--latents")
        .arg(demo_store())
        .arg("--output_dir")
        .arg(out.path().join("run"))
        .args(["--device", "cpu", "--no_progress", "--max_train_steps", "2"])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{stderr}");
    assert_has(
        &stderr,
        &[
            &weights.display().to_string(),
            "is stored as I64",
            "hf download",
        ],
    );
    assert!(is_empty_dir(out.path()));
}

#[test]
fn download_commands_name_the_repo_of_a_cache_snapshot() {
    let snap = Path::new("/c/hub/models--Efficient-Large-Model--Sana_Sprint/snapshots/abc123");
    assert_eq!(
        hub::download_command(&snap.join(VAE)),
        format!(
            "hf download Efficient-Large-Model/Sana_Sprint {VAE} --revision abc123 --force-download"
        )
    );
    assert_eq!(
        hub::download_folder_command(&snap.join("text_encoder")),
        "hf download Efficient-Large-Model/Sana_Sprint --include 'text_encoder/*' --revision abc123 \
         --force-download"
    );
    let local = hub::download_command(&tiny_model().join(VAE));
    assert!(
        local.starts_with(&format!(
            "hf download <repo-id> {VAE} --local-dir {} --force-download",
            tiny_model().display()
        )),
        "{local}"
    );
}

/// Prints how long the checks and the loads of the tiny pipeline take (`--nocapture`), and the cost of
/// reading a tokenizer of Gemma-2's size (256,000 tokens).
#[test]
fn checks_are_cheap() {
    let root = tiny_model();
    let time = |f: &dyn Fn()| {
        let t = Instant::now();
        for _ in 0..5 {
            f();
        }
        t.elapsed().as_secs_f64() / 5.0 * 1e3
    };
    let check = |components: &'static [&'static str]| {
        time(&|| hub::check_pipeline(&root, components).unwrap())
    };
    let (transformer, vae, text) = (
        check(&["transformer"]),
        check(&["vae"]),
        check(&["text_encoder", "tokenizer"]),
    );
    let load = time(&|| {
        PromptEncoder::load(&root, DType::F32, &Device::Cpu).unwrap();
        DcaeEncoder::load(&root.join("vae"), DType::F32, &Device::Cpu).unwrap();
        SanaTransformer2DModel::load(&root.join("transformer"), DType::F32, &Device::Cpu).unwrap();
    });
    println!(
        "tiny pipeline: checks {:.1} ms (transformer {transformer:.1}, vae {vae:.1}, text encoder + tokenizer \
         {text:.1}); loading text encoder + VAE encoder + transformer {load:.1} ms",
        transformer + vae + text
    );
    let big = tempfile::tempdir().unwrap();
    sana_sprint::synth::write_tokenizer(big.path(), 256_000).unwrap();
    let tokenizer = time(&|| {
        sana_sprint::text::load_tokenizer(big.path()).unwrap();
    });
    let tok = sana_sprint::text::load_tokenizer(big.path()).unwrap();
    let fit = time(&|| {
        sana_sprint::text::check_vocab_fits(&tok, Path::new("/x"), 256_000).unwrap();
    });
    println!("256k-token tokenizer: read {tokenizer:.1} ms, vocabulary check {fit:.1} ms");
}
