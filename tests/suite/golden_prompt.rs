//! Prompt encoding parity with the real diffusers `SanaPipeline.encode_prompt` on the tiny pipeline
//! datasets/tiny-sana-sprint (fixture `prompt_tiny`, tools/golden/make_tiny_pipeline.py): token ids exactly,
//! masks exactly, embeddings in f32 (text encoder weights stored bf16, run in f32 on both sides).
//!
//! The prompts cover upper case, surrounding whitespace, accented and CJK characters (byte fallback), an empty
//! prompt, and one long enough to be truncated; with the default complex human instruction ("chi"), without it
//! ("plain"), and the empty negative prompt ("negative").

use crate::common::{fixture_path, max_abs_diff};

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sana_sprint::models::weights::Weights;
use sana_sprint::text::{prompt_lens, PromptEncoder, COMPLEX_HUMAN_INSTRUCTION};

/// Max abs error allowed on the embeddings (f32; observed ≈ 1e-6 on values of magnitude ≈ 1–5).
const EMBED_TOLERANCE: f64 = 1e-4;

struct Fixture {
    prompts: Vec<String>,
    max_sequence_length: usize,
    meta: serde_json::Value,
    tensors: Weights,
}

impl Fixture {
    fn load() -> Self {
        let meta: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture_path("prompt_tiny.json")).unwrap(),
        )
        .unwrap();
        let prompts = meta["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap().to_string())
            .collect();
        let max_sequence_length = meta["max_sequence_length"].as_u64().unwrap() as usize;
        let tensors = Weights::from_files(&[fixture_path("prompt_tiny.safetensors")]).unwrap();
        Self {
            prompts,
            max_sequence_length,
            meta,
            tensors,
        }
    }

    fn rows(&self, name: &str) -> Vec<Vec<u32>> {
        self.tensors
            .load(name, DType::U32, &Device::Cpu)
            .unwrap()
            .to_vec2::<u32>()
            .unwrap()
    }

    fn prompt_lens(&self, case: &str) -> Vec<usize> {
        self.meta["cases"][case]["prompt_len"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect()
    }

    /// Compares the returned embeddings and mask of one case with the fixture; returns the max abs error.
    fn check_embeddings(&self, case: &str, embeds: &Tensor, mask: &Tensor) -> f64 {
        let b = self.prompts.len();
        assert_eq!(embeds.dims(), &[b, self.max_sequence_length, 64]);
        assert_eq!(embeds.dtype(), DType::F32);
        assert_eq!(
            mask.to_vec2::<u32>().unwrap(),
            self.rows(&format!("{case}.mask")),
            "{case} mask"
        );
        assert_eq!(
            prompt_lens(mask).unwrap(),
            self.prompt_lens(case),
            "{case} prompt_len"
        );
        let rows = self
            .tensors
            .load(&format!("{case}.rows"), DType::U32, &Device::Cpu)
            .unwrap();
        let rows: Vec<u32> = rows.to_vec1().unwrap();
        let expected = self
            .tensors
            .load(&format!("{case}.embeds_rows"), DType::F32, &Device::Cpu)
            .unwrap();
        let mut start = 0;
        let mut max_err = 0f64;
        for (i, &n) in rows.iter().enumerate() {
            let n = n as usize;
            let ours = embeds.get(i).unwrap().narrow(0, 0, n).unwrap();
            let reference = expected.narrow(0, start, n).unwrap();
            max_err = max_err.max(max_abs_diff(&ours, &reference));
            start += n;
        }
        assert_eq!(start, expected.dim(0).unwrap());
        eprintln!("{case}: embeddings max abs err {max_err:.3e}");
        assert!(
            max_err <= EMBED_TOLERANCE,
            "{case}: max abs error {max_err}"
        );
        max_err
    }
}

fn encoder() -> PromptEncoder {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("datasets/tiny-sana-sprint");
    PromptEncoder::load(&dir, DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn token_ids_match_the_real_tokenizer() {
    let (fx, enc) = (Fixture::load(), encoder());
    let chi = enc
        .tokenize(
            &fx.prompts,
            Some(&COMPLEX_HUMAN_INSTRUCTION),
            fx.max_sequence_length,
        )
        .unwrap();
    assert_eq!(chi.input_ids, fx.rows("chi.input_ids"));
    assert_eq!(chi.attention_mask, fx.rows("chi.token_mask"));
    let n_chi = fx.meta["n_chi"].as_u64().unwrap() as usize;
    assert_eq!(chi.input_ids[0].len(), n_chi + fx.max_sequence_length - 2);

    let plain = enc
        .tokenize(&fx.prompts, None, fx.max_sequence_length)
        .unwrap();
    assert_eq!(plain.input_ids, fx.rows("plain.input_ids"));
    assert_eq!(plain.attention_mask, fx.rows("plain.token_mask"));
    // an empty instruction list means no instruction, as in Python (`if not complex_human_instruction`)
    assert_eq!(
        enc.tokenize(&fx.prompts, Some(&[]), fx.max_sequence_length)
            .unwrap(),
        plain
    );

    let empty = vec![String::new(); fx.prompts.len()];
    let negative = enc.tokenize(&empty, None, fx.max_sequence_length).unwrap();
    assert_eq!(negative.input_ids, fx.rows("negative.input_ids"));
}

#[test]
fn embeddings_with_instruction_match_diffusers() {
    let (fx, enc) = (Fixture::load(), encoder());
    let (embeds, mask) = enc
        .encode(
            &fx.prompts,
            Some(&COMPLEX_HUMAN_INSTRUCTION),
            fx.max_sequence_length,
        )
        .unwrap();
    fx.check_embeddings("chi", &embeds, &mask);
}

#[test]
fn embeddings_without_instruction_match_diffusers() {
    let (fx, enc) = (Fixture::load(), encoder());
    let (embeds, mask) = enc
        .encode(&fx.prompts, None, fx.max_sequence_length)
        .unwrap();
    fx.check_embeddings("plain", &embeds, &mask);
}

#[test]
fn negative_prompt_matches_diffusers() {
    let (fx, enc) = (Fixture::load(), encoder());
    let (embeds, mask) = enc
        .encode_negative(fx.prompts.len(), fx.max_sequence_length)
        .unwrap();
    fx.check_embeddings("negative", &embeds, &mask);
    assert!(prompt_lens(&mask).unwrap().iter().all(|&n| n == 1));
}
