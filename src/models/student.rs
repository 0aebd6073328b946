//! The trainable student (docs/ALGORITHM.md §5.2): a guidance-embedding `SanaTransformer2DModel` in TrigFlow form with the
//! logvar head, held as f32 `Var`s in a `VarMap` (f32 master weights whatever the checkpoint dtype, ALGORITHM.md §9 #3).
//!
//! Built either from the teacher checkpoint (the training start: teacher weights copied, the timestep embedder
//! remapped, the guidance embedder and logvar head freshly initialised from a seeded generator) or from saved
//! student weights (resume). The model holds views of the variables, so optimiser updates (`Var::set`) reach
//! it in place; [`Student::detached`] gives a second model over the same storage that builds no graph, for the
//! student's no-grad passes (the JVP pass among them).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};

use crate::models::sana::{SanaConfig, SanaTransformer2DModel, SelfAttention};
use crate::models::trigflow::SanaTrigFlow;
use crate::models::weights::Weights;
use crate::rng::SeededRng;
use crate::{Error, Result};

/// Standard deviation of the learnable guidance embedder's `linear_1.weight` (NVlabs SANA-Sprint).
pub const GUIDANCE_INIT_STD: f64 = 0.02;

/// How the student's guidance embedder `time_embed.guidance_embedder` (absent from the teacher) starts
/// (docs/ALGORITHM.md §9 #2). Both choices make the guidance embedding exactly 0 at initialisation, so the student
/// starts as the teacher; they differ in what can be learned.
/// `--guidance_init` (`learnable` | `zero`).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum GuidanceInit {
    /// `linear_1.weight` ~ N(0, 0.02²), `linear_1.bias` = 0, `linear_2` = 0 (NVlabs original, recommended):
    /// the embedding can learn to depend on the guidance scale.
    #[default]
    Learnable,
    /// All four tensors zero (the diffusers training script as written): only `linear_2.bias` ever gets a
    /// gradient, so the trained embedding is a constant that ignores the guidance scale.
    Zero,
}

/// The student: trainable variables plus the model built on them.
pub struct Student {
    /// Every trainable tensor under its checkpoint name (diffusers keys + `logvar_linear.{weight,bias}`), f32.
    pub varmap: VarMap,
    /// The TrigFlow student (with logvar head) reading `varmap`'s variables.
    pub model: SanaTrigFlow,
    config: SanaConfig,
    self_attention: SelfAttention,
    device: Device,
}

/// The student as a training step computes with it ([`Student::compute_models`]).
#[derive(Clone, Debug)]
pub struct ComputeModels {
    /// Weights that lead back to the trainable variables: its passes build a graph.
    pub tracked: SanaTrigFlow,
    /// The same weights without a graph, for the JVP and the no-grad passes.
    pub frozen: SanaTrigFlow,
}

/// Where each requested tensor's initial value comes from.
enum Source {
    /// A teacher checkpoint (`guidance_embeds = false` keys), per docs/ALGORITHM.md §5.2.
    Teacher { guidance: GuidanceInit, seed: u64 },
    /// A saved student: every tensor by its own name.
    Student,
}

/// A VarBuilder backend that turns each tensor the model asks for into an f32 `Var` registered in `varmap`.
struct VarInit {
    weights: Weights,
    source: Source,
    varmap: VarMap,
}

impl VarInit {
    fn file(&self) -> PathBuf {
        self.weights.files().first().cloned().unwrap_or_default()
    }

    /// A tensor read from the checkpoint by `key`, checked against `shape`.
    fn stored(&self, key: &str, shape: &Shape, device: &Device) -> Result<Tensor> {
        let tensor = self.weights.load(key, DType::F32, device)?;
        if tensor.shape() != shape {
            return Err(Error::model(
                self.file(),
                format!(
                    "tensor \"{key}\" has shape {:?}, the student expects {:?}",
                    tensor.dims(),
                    shape.dims()
                ),
            ));
        }
        Ok(tensor)
    }

    fn initial_value(&self, name: &str, shape: &Shape, device: &Device) -> Result<Tensor> {
        let (guidance, seed) = match self.source {
            Source::Student => return self.stored(name, shape, device),
            Source::Teacher { guidance, seed } => (guidance, seed),
        };
        if let Some(rest) = name.strip_prefix("time_embed.timestep_embedder.") {
            // AdaLayerNormSingle nests the embedder under `emb.`; the guidance variant does not
            return self.stored(
                &format!("time_embed.emb.timestep_embedder.{rest}"),
                shape,
                device,
            );
        }
        let mut rng = SeededRng::for_name(seed, name);
        if name.starts_with("time_embed.guidance_embedder.") {
            return Ok(match (guidance, name) {
                (GuidanceInit::Learnable, "time_embed.guidance_embedder.linear_1.weight") => {
                    rng.normal_tensor(shape, 0.0, GUIDANCE_INIT_STD, device)?
                }
                _ => Tensor::zeros(shape, DType::F32, device)?,
            });
        }
        match name {
            "logvar_linear.weight" => {
                // Xavier-uniform: U(±√(6 / (fan_in + fan_out)))
                let (fan_out, fan_in) = shape.dims2()?;
                let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
                Ok(rng.uniform_tensor(shape, bound, device)?)
            }
            "logvar_linear.bias" => Ok(Tensor::zeros(shape, DType::F32, device)?),
            _ => self.stored(name, shape, device),
        }
    }
}

impl SimpleBackend for VarInit {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _hints: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Some(var) = self.varmap.data().lock().unwrap().get(name) {
            return Ok(var.as_tensor().clone());
        }
        let value = self
            .initial_value(name, &shape, device)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?
            .to_dtype(dtype)?;
        let var = Var::from_tensor(&value)?;
        let tensor = var.as_tensor().clone();
        self.varmap
            .data()
            .lock()
            .unwrap()
            .insert(name.to_string(), var);
        Ok(tensor)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _device: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("the student asks for every tensor with its shape, not for {name}")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// The TrigFlow student with logvar head over `vb`.
fn student_model(
    cfg: &SanaConfig,
    vb: &VarBuilder,
    self_attention: SelfAttention,
) -> Result<SanaTrigFlow> {
    let transformer =
        SanaTransformer2DModel::new(cfg, vb.clone())?.with_self_attention(self_attention);
    SanaTrigFlow::with_logvar(transformer, vb)
}

impl Student {
    /// Initialises the student from a diffusers teacher `transformer/` folder (`config.json` with
    /// `guidance_embeds = false`, safetensors in any dtype), as the training script does (docs/ALGORITHM.md §5.2):
    /// `time_embed.timestep_embedder.*` ← `time_embed.emb.timestep_embedder.*`, every other backbone tensor
    /// copied 1:1, the guidance embedder per `guidance`, `logvar_linear` Xavier-uniform weight and zero bias.
    /// Fresh tensors are drawn from a generator seeded by `seed` (per tensor name). Self-attention stays the
    /// checkpoint's linear attention (docs/ALGORITHM.md §9 #1; see [`Self::with_self_attention`]).
    pub fn from_teacher(
        teacher_dir: &Path,
        guidance: GuidanceInit,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let config_path = teacher_dir.join("config.json");
        let config = SanaConfig::from_folder(teacher_dir)?;
        config
            .validate()
            .map_err(|msg| Error::model(&config_path, msg))?;
        if config.guidance_embeds {
            return Err(Error::model(
                &config_path,
                "guidance_embeds is true: this is a student (Sprint) checkpoint, not a teacher; pass the \
                 teacher's transformer folder (guidance_embeds = false)",
            ));
        }
        let weights = Weights::from_folder(teacher_dir, &["diffusion_pytorch_model"])?;
        Self::from_teacher_weights(&config, weights, guidance, seed, device)
    }

    /// [`Self::from_teacher`] on already opened teacher weights with the teacher's config.
    pub fn from_teacher_weights(
        teacher_config: &SanaConfig,
        teacher: Weights,
        guidance: GuidanceInit,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        Self::build(
            teacher_config,
            teacher,
            Source::Teacher { guidance, seed },
            device,
        )
    }

    /// Loads a saved student (every backbone tensor of the guidance variant plus `logvar_linear.*`, any
    /// dtype) as f32 variables; `config` is the backbone's (its `guidance_embeds` is taken as true).
    pub fn from_weights(config: &SanaConfig, weights: Weights, device: &Device) -> Result<Self> {
        Self::build(config, weights, Source::Student, device)
    }

    fn build(
        config: &SanaConfig,
        weights: Weights,
        source: Source,
        device: &Device,
    ) -> Result<Self> {
        let config = SanaConfig {
            guidance_embeds: true,
            ..config.clone()
        };
        let varmap = VarMap::new();
        let backend = VarInit {
            weights,
            source,
            varmap: varmap.clone(),
        };
        let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone());
        let self_attention = SelfAttention::Linear;
        let model = student_model(&config, &vb, self_attention)?;
        Ok(Self {
            varmap,
            model,
            config,
            self_attention,
            device: device.clone(),
        })
    }

    /// The same variables driving a model with the given self-attention (softmax reproduces the reference
    /// script's processor swap, docs/ALGORITHM.md §9 #1).
    pub fn with_self_attention(mut self, kind: SelfAttention) -> Result<Self> {
        let vb = VarBuilder::from_varmap(&self.varmap, DType::F32, &self.device);
        self.model = student_model(&self.config, &vb, kind)?;
        self.self_attention = kind;
        Ok(self)
    }

    /// The student's backbone config (`guidance_embeds = true`).
    pub fn config(&self) -> &SanaConfig {
        &self.config
    }

    pub fn self_attention(&self) -> SelfAttention {
        self.self_attention
    }

    /// The variables sorted by name (a stable order for optimisers, clipping and checkpoints).
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let mut vars: Vec<(String, Var)> = self
            .varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(name, var)| (name.clone(), var.clone()))
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    /// Number of trainable scalars.
    pub fn parameter_count(&self) -> usize {
        self.varmap.all_vars().iter().map(|v| v.elem_count()).sum()
    }

    /// The student computing in `dtype` (docs/ALGORITHM.md §9 #3: f32 master weights, bf16 compute): a model whose weights
    /// are `dtype` casts of the variables (its passes build a graph back to the f32 variables) and a frozen twin
    /// of the same casts (no graph). In f32 the models read the variables directly. Casts are snapshots: rebuild
    /// after every optimiser step (f32 models see `Var::set` updates in place).
    pub fn compute_models(&self, dtype: DType) -> Result<ComputeModels> {
        if dtype == DType::F32 {
            return Ok(ComputeModels {
                tracked: self.model.clone(),
                frozen: self.detached()?,
            });
        }
        let mut tracked = HashMap::new();
        let mut frozen = HashMap::new();
        for (name, var) in self.varmap.data().lock().unwrap().iter() {
            let cast = var.as_tensor().to_dtype(dtype)?;
            frozen.insert(name.clone(), cast.detach());
            tracked.insert(name.clone(), cast);
        }
        let build = |tensors| {
            let vb = VarBuilder::from_tensors(tensors, dtype, &self.device);
            student_model(&self.config, &vb, self.self_attention)
        };
        Ok(ComputeModels {
            tracked: build(tracked)?,
            frozen: build(frozen)?,
        })
    }

    /// A model over the same storage whose weights are plain tensors: its passes build no graph and see every
    /// later `Var::set` (optimiser step).
    pub fn detached(&self) -> Result<SanaTrigFlow> {
        let tensors: HashMap<String, Tensor> = self
            .varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
            .collect();
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &self.device);
        student_model(&self.config, &vb, self.self_attention)
    }
}
