//! Prompt encoding exactly as diffusers `SanaPipeline.encode_prompt` (docs/ALGORITHM.md §4): lower-case + strip, optional
//! complex-human-instruction prefix, fixed-length right padding and truncation by the pipeline's own tokenizer,
//! Gemma-2 hidden states, then the "BOS + last window" token selection.

use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

use crate::models::gemma2::Gemma2Encoder;
use crate::{Error, Result};

/// diffusers' default complex human instruction (`SanaPipeline.__call__`, `SanaSprintPipeline`, the training
/// script), joined with "\n" and prepended to every prompt. The last line ends with a space on purpose.
pub const COMPLEX_HUMAN_INSTRUCTION: [&str; 8] = [
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional commentary or evaluations:",
    "User Prompt: ",
];

/// What the tokenizer feeds the text encoder for a batch of prompts (before the token selection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptTokens {
    /// (B, S) token ids, S = `max_sequence_length`, or n_chi + `max_sequence_length` − 2 with the instruction.
    pub input_ids: Vec<Vec<u32>>,
    /// (B, S) ones for real tokens, zeros for padding.
    pub attention_mask: Vec<Vec<u32>>,
}

/// The pipeline's tokenizer plus its Gemma-2 text encoder: turns prompts into SANA's caption embeddings.
pub struct PromptEncoder {
    /// Padding and truncation are set per call (their length depends on the instruction), hence the lock.
    tokenizer: Mutex<Tokenizer>,
    pad_id: u32,
    pad_token: String,
    text_encoder: Gemma2Encoder,
}

impl PromptEncoder {
    /// Loads `tokenizer/` and `text_encoder/` of a diffusers pipeline folder; the encoder runs in `dtype`. Both
    /// are checked before any weight is loaded: the tokenizer's files, the text encoder's config and weight
    /// headers, and that every token id has a row in the text encoder's embedding.
    pub fn load(pipeline_dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let tokenizer_dir = pipeline_dir.join("tokenizer");
        let tokenizer = load_tokenizer(&tokenizer_dir)?;
        let (pad_token, pad_id) = pad_token_id(&tokenizer, &tokenizer_dir)?;
        let text_dir = pipeline_dir.join("text_encoder");
        let (config, weights) = Gemma2Encoder::open(&text_dir)?;
        check_vocab_fits(&tokenizer, pipeline_dir, config.vocab_size)?;
        let text_encoder = Gemma2Encoder::from_weights(&config, weights, &text_dir, dtype, device)?;
        Ok(Self {
            tokenizer: Mutex::new(tokenizer),
            pad_id,
            pad_token,
            text_encoder,
        })
    }

    /// `pad_token` is the tokenizer's padding token (Gemma: `<pad>`, id 0). Every token id of the tokenizer
    /// must have a row in the text encoder's embedding.
    pub fn new(tokenizer: Tokenizer, pad_token: &str, text_encoder: Gemma2Encoder) -> Result<Self> {
        let pad_id = tokenizer.token_to_id(pad_token).ok_or_else(|| {
            Error::Tokenizer(format!(
                "the padding token {pad_token:?} is not in the vocabulary"
            ))
        })?;
        let rows = text_encoder.config().vocab_size;
        if let Some((max, count)) = largest_id(&tokenizer).filter(|&(max, _)| max as usize >= rows)
        {
            return Err(Error::Tokenizer(format!(
                "token ids go up to {max} ({count} tokens) but the text encoder's embedding has {rows} rows: the \
                 tokenizer and the text encoder come from different models"
            )));
        }
        Ok(Self {
            tokenizer: Mutex::new(tokenizer),
            pad_id,
            pad_token: pad_token.to_string(),
            text_encoder,
        })
    }

    /// The Gemma-2 encoder (its dtype, device and hidden size D).
    pub fn text_encoder(&self) -> &Gemma2Encoder {
        &self.text_encoder
    }

    /// Tokenises as `_get_gemma_prompt_embeds`: `prompt.lower().strip()`, the instruction lines joined with
    /// "\n" prepended (when given and non-empty), padding to and truncation at the fixed length, BOS from the
    /// tokenizer's post-processor.
    pub fn tokenize(
        &self,
        prompts: &[String],
        instruction: Option<&[&str]>,
        max_sequence_length: usize,
    ) -> Result<PromptTokens> {
        if max_sequence_length < 2 {
            return Err(Error::Arg(format!(
                "max_sequence_length must be at least 2, got {max_sequence_length}"
            )));
        }
        let mut tokenizer = self
            .tokenizer
            .lock()
            .map_err(|_| Error::Tokenizer("the tokenizer lock was poisoned by a panic".into()))?;
        tokenizer.with_padding(None);
        tokenizer.with_truncation(None).map_err(tokenizer_error)?;
        let prompts: Vec<String> = prompts
            .iter()
            .map(|p| python_strip(&p.to_lowercase()).to_string())
            .collect();
        let (texts, length) = match instruction {
            Some(lines) if !lines.is_empty() => {
                let prefix = lines.join("\n");
                // counted with the special tokens (BOS), on the instruction alone
                let n_chi = tokenizer
                    .encode(prefix.as_str(), true)
                    .map_err(tokenizer_error)?
                    .len();
                let texts = prompts.iter().map(|p| format!("{prefix}{p}")).collect();
                (texts, n_chi + max_sequence_length - 2)
            }
            _ => (prompts, max_sequence_length),
        };
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id: self.pad_id,
            pad_type_id: 0,
            pad_token: self.pad_token.clone(),
        }));
        tokenizer
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(tokenizer_error)?;
        let encodings = tokenizer
            .encode_batch(texts, true)
            .map_err(tokenizer_error)?;
        Ok(PromptTokens {
            input_ids: encodings.iter().map(|e| e.get_ids().to_vec()).collect(),
            attention_mask: encodings
                .iter()
                .map(|e| e.get_attention_mask().to_vec())
                .collect(),
        })
    }

    /// `SanaPipeline.encode_prompt(prompts, complex_human_instruction=instruction, max_sequence_length)`:
    /// returns the embeddings (B, max_sequence_length, D) in the text encoder's dtype and the attention mask
    /// (B, max_sequence_length) as u32 0/1 (always ones then zeros). Rows are token 0 (BOS) followed by the
    /// last `max_sequence_length − 1` positions of the tokenised sequence.
    pub fn encode(
        &self,
        prompts: &[String],
        instruction: Option<&[&str]>,
        max_sequence_length: usize,
    ) -> Result<(Tensor, Tensor)> {
        let tokens = self.tokenize(prompts, instruction, max_sequence_length)?;
        let (b, s) = (
            tokens.input_ids.len(),
            tokens.input_ids.first().map_or(0, |r| r.len()),
        );
        if b == 0 {
            return Err(Error::Arg("no prompts to encode".into()));
        }
        let device = self.text_encoder.device();
        let flat = |rows: Vec<Vec<u32>>| rows.into_iter().flatten().collect::<Vec<u32>>();
        let input_ids = Tensor::from_vec(flat(tokens.input_ids), (b, s), device)?;
        let mask = Tensor::from_vec(flat(tokens.attention_mask), (b, s), device)?;
        let embeds = self.text_encoder.forward(&input_ids, &mask)?;
        let select = selected_positions(s, max_sequence_length)?;
        if select.iter().copied().eq(0..s as u32) {
            return Ok((embeds, mask));
        }
        let select = Tensor::new(select.as_slice(), device)?;
        Ok((
            embeds.index_select(&select, 1)?,
            mask.index_select(&select, 1)?,
        ))
    }

    /// The unconditional embedding used for classifier-free guidance in training: `batch_size` empty prompts
    /// encoded without the instruction (tokens BOS then padding; mask one then zeros).
    pub fn encode_negative(
        &self,
        batch_size: usize,
        max_sequence_length: usize,
    ) -> Result<(Tensor, Tensor)> {
        self.encode(&vec![String::new(); batch_size], None, max_sequence_length)
    }
}

/// Number of ones in each row of a (B, L) 0/1 mask: the rows of the embedding the latent store keeps.
pub fn prompt_lens(mask: &Tensor) -> Result<Vec<usize>> {
    let rows = mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    Ok(rows
        .iter()
        .map(|r| r.iter().filter(|&&v| v != 0.0).count())
        .collect())
}

/// Loads `tokenizer.json` from a pipeline's `tokenizer/` folder.
pub fn load_tokenizer(dir: &Path) -> Result<Tokenizer> {
    let path = dir.join("tokenizer.json");
    if !path.is_file() {
        return Err(Error::Missing {
            what: "tokenizer".into(),
            hint: format!(
                "point at a diffusers pipeline folder whose tokenizer/ holds tokenizer.json (the fast-tokenizer \
                 file; a SentencePiece tokenizer.model alone is not enough); download it: {}",
                crate::hub::download_command(&path)
            ),
            path,
        });
    }
    Tokenizer::from_file(&path).map_err(|e| {
        Error::Tokenizer(format!(
            "{}: not a readable tokenizer.json ({e}): the file is damaged or truncated; download it again: {}",
            path.display(),
            crate::hub::download_command(&path)
        ))
    })
}

/// The padding token of the tokenizer in `dir` (see [`pad_token_name`]) and its id, which must exist.
pub fn pad_token_id(tokenizer: &Tokenizer, dir: &Path) -> Result<(String, u32)> {
    let pad = pad_token_name(dir)?;
    match tokenizer.token_to_id(&pad) {
        Some(id) => Ok((pad, id)),
        None => Err(Error::Tokenizer(format!(
            "{}: the padding token {pad:?} is not in the vocabulary of tokenizer.json: the tokenizer's files \
             come from different models; download tokenizer/ again: {}",
            dir.display(),
            crate::hub::download_folder_command(dir)
        ))),
    }
}

/// The largest token id of a tokenizer (added tokens included) and the number of distinct tokens.
fn largest_id(tokenizer: &Tokenizer) -> Option<(u32, usize)> {
    let vocab = tokenizer.get_vocab(true);
    vocab.values().copied().max().map(|max| (max, vocab.len()))
}

/// Refuses a tokenizer (`<pipeline_dir>/tokenizer/`) with token ids beyond the `rows` rows of the embedding of
/// the text encoder (`<pipeline_dir>/text_encoder/`): such a token would index past the embedding. Names both
/// sizes and both folders.
pub fn check_vocab_fits(tokenizer: &Tokenizer, pipeline_dir: &Path, rows: usize) -> Result<()> {
    let Some((max, count)) = largest_id(tokenizer) else {
        return Ok(());
    };
    if (max as usize) < rows {
        return Ok(());
    }
    let path = pipeline_dir.join("tokenizer").join("tokenizer.json");
    Err(Error::model(
        &path,
        format!(
            "the tokenizer does not match the text encoder: its token ids go up to {max} ({count} tokens), but \
             {} has {rows} embedding rows (vocab_size {rows}); the tokenizer/ and text_encoder/ folders come \
             from different models. Use the pipeline's own tokenizer and text encoder: download both again \
             ({}, and the same for text_encoder/)",
            pipeline_dir.join("text_encoder").display(),
            crate::hub::download_folder_command(&pipeline_dir.join("tokenizer")),
        ),
    ))
}

/// The padding token as transformers resolves it (`PreTrainedTokenizerBase._from_pretrained`,
/// `tokenization_utils_base.py`): `tokenizer_config.json`'s `pad_token` (a string or `{"content": …}`); when that
/// file has no `added_tokens_decoder`, a `pad_token` in the legacy `special_tokens_map.json` overrides it; when
/// neither names one, `GemmaTokenizer`'s default `<pad>`.
fn pad_token_name(dir: &Path) -> Result<String> {
    fn read(path: &Path) -> Result<Option<serde_json::Value>> {
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map(Some).map_err(|e| {
            Error::Tokenizer(format!(
                "{}: invalid JSON ({e}): the file is damaged; download it again: {}",
                path.display(),
                crate::hub::download_command(path)
            ))
        })
    }
    fn pad_of(config: &serde_json::Value) -> Option<String> {
        match config.get("pad_token")? {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
            _ => None,
        }
    }
    let config = read(&dir.join("tokenizer_config.json"))?;
    let mut pad = config.as_ref().and_then(pad_of);
    let legacy = config
        .as_ref()
        .is_none_or(|c| c.get("added_tokens_decoder").is_none());
    if legacy {
        if let Some(map_pad) = read(&dir.join("special_tokens_map.json"))?
            .as_ref()
            .and_then(pad_of)
        {
            pad = Some(map_pad);
        }
    }
    Ok(pad.unwrap_or_else(|| "<pad>".into()))
}

/// Python's `str.strip()`: Unicode whitespace plus the ASCII separators U+001C..U+001F that Python counts too.
fn python_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

/// `[0] + list(range(-(max_sequence_length - 1), 0))` resolved against a sequence of length `s`.
fn selected_positions(s: usize, max_sequence_length: usize) -> Result<Vec<u32>> {
    let tail = max_sequence_length - 1;
    if tail > s {
        return Err(Error::Arg(format!(
            "cannot select the last {tail} of {s} tokens (max_sequence_length {max_sequence_length} too long)"
        )));
    }
    Ok(std::iter::once(0)
        .chain((s - tail..s).map(|i| i as u32))
        .collect())
}

fn tokenizer_error(e: tokenizers::Error) -> Error {
    Error::Tokenizer(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_matches_python_whitespace() {
        assert_eq!(
            python_strip(" \t\n\u{a0}\u{3000}\u{1f}a b\u{2029}\u{85} "),
            "a b"
        );
        assert_eq!(python_strip("\u{200b}x"), "\u{200b}x");
    }

    #[test]
    fn lowercase_matches_python() {
        // Python: "ÉCOLE İ ΟΔΟΣ".lower() == "école i̇ οδος" (full case mapping, final sigma)
        assert_eq!("ÉCOLE İ ΟΔΟΣ".to_lowercase(), "école i\u{307} οδος");
    }

    #[test]
    fn selection_is_bos_plus_last_window() {
        assert_eq!(selected_positions(5, 5).unwrap(), vec![0, 1, 2, 3, 4]);
        assert_eq!(selected_positions(8, 4).unwrap(), vec![0, 5, 6, 7]);
        // a one-token instruction makes the sequence shorter than the output: Python repeats index 0
        assert_eq!(selected_positions(3, 4).unwrap(), vec![0, 0, 1, 2]);
        assert!(selected_positions(2, 4).is_err());
    }

    #[test]
    fn pad_token_follows_transformers_precedence() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        assert_eq!(pad_token_name(dir.path()).unwrap(), "<pad>");
        write(
            "special_tokens_map.json",
            r#"{"pad_token": {"content": "<map>", "lstrip": false}}"#,
        );
        assert_eq!(pad_token_name(dir.path()).unwrap(), "<map>");
        // A legacy tokenizer_config (no added_tokens_decoder): the special-tokens map still wins.
        write("tokenizer_config.json", r#"{"pad_token": "<cfg>"}"#);
        assert_eq!(pad_token_name(dir.path()).unwrap(), "<map>");
        // A current one: the map is not read.
        write(
            "tokenizer_config.json",
            r#"{"pad_token": {"content": "<cfg>"}, "added_tokens_decoder": {}}"#,
        );
        assert_eq!(pad_token_name(dir.path()).unwrap(), "<cfg>");
        write(
            "tokenizer_config.json",
            r#"{"pad_token": null, "added_tokens_decoder": {}}"#,
        );
        assert_eq!(pad_token_name(dir.path()).unwrap(), "<pad>");
    }
}
