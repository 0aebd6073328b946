//! LADD discriminator: frozen teacher trunk tapped at chosen blocks + trainable DiscHeads (docs/ALGORITHM.md §5.8).
//!
//! A head maps the output (B, N, C) of one teacher block to one logit per token (B, N). PyTorch runs the heads
//! on (B, C, N) ("channels × tokens"); here they run channels-last on the block output as it comes, which makes
//! every convolution one matmul over (B·N, C·k) and needs no transposes. The maths and the state-dict key names
//! (`{k}.main.0.0.weight_orig`, …) are those of the reference; u and v are buffers, everything else is a `Var`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;

use crate::models::sana::TextContext;
use crate::models::trigflow::SanaTrigFlow;
use crate::models::weights::Weights;
use crate::rng::SeededRng;
use crate::{Error, Result};

/// Power iterations run on fresh heads (docs/ALGORITHM.md §9 #14: the reference's first G step uses random u, v).
pub const INIT_POWER_ITERATIONS: usize = 10;

/// Teacher blocks tapped by the heads, in head order (`--head_block_ids` default, 0-based).
pub const DEFAULT_HEAD_BLOCK_IDS: [usize; 4] = [2, 8, 14, 19];

/// `torch.nn.utils.spectral_norm` eps of `normalize(x) = x / max(‖x‖₂, eps)`.
const SPECTRAL_NORM_EPS: f64 = 1e-12;
/// BatchNormLocal: samples per normalisation group and variance eps.
const VIRTUAL_BATCH: usize = 8;
const BATCH_NORM_EPS: f64 = 1e-5;
const LEAKY_RELU_SLOPE: f64 = 0.2;
/// Kernel size of the residual block's convolution.
const WIDE_KERNEL: usize = 9;

/// Whether a forward runs one spectral-norm power iteration first (torch `train()`, phase D) or uses the
/// stored u, v (torch `eval()`, phase G). BatchNormLocal behaves the same in both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Train,
    Eval,
}

/// `x / max(‖x‖₂, eps)` of a vector.
fn normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_all()?.sqrt()?.maximum(SPECTRAL_NORM_EPS)?;
    Ok(x.broadcast_div(&norm)?)
}

/// LeakyReLU(0.2) from relu, which has a backward pass.
fn leaky_relu(x: &Tensor) -> Result<Tensor> {
    Ok((x.relu()? - x.neg()?.relu()?.affine(LEAKY_RELU_SLOPE, 0.0)?)?)
}

/// Conv1d (stride 1, padding k//2, circular) whose weight is `weight_orig / σ`, with σ from
/// `torch.nn.utils.spectral_norm(dim=0, n_power_iterations=1, eps=1e-12)` (docs/ALGORITHM.md §5.8).
#[derive(Debug)]
pub struct SpectralConv1d {
    /// (out, in, k), trainable.
    weight_orig: Var,
    /// (out,), trainable.
    bias: Var,
    /// Power-iteration buffers `weight_u` (out,) and `weight_v` (in·k,), replaced (never written in place) so
    /// that a graph built earlier keeps the u, v it was built with, as torch's `u.clone()` ensures.
    u: Mutex<Tensor>,
    v: Mutex<Tensor>,
    kernel: usize,
}

impl SpectralConv1d {
    /// Fresh torch-default init: weight and bias U(±1/√(in·k)) (kaiming-uniform a=√5); u, v normalised normals.
    fn init(
        rng: &mut SeededRng,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        device: &Device,
    ) -> Result<Self> {
        let fan_in = in_channels * kernel;
        let bound = 1.0 / (fan_in as f64).sqrt();
        let weight = Tensor::from_vec(
            rng.uniform(out_channels * fan_in, bound),
            (out_channels, in_channels, kernel),
            device,
        )?;
        let bias = Tensor::from_vec(rng.uniform(out_channels, bound), out_channels, device)?;
        let u = normalize(&Tensor::from_vec(
            rng.normal(out_channels),
            out_channels,
            device,
        )?)?;
        let v = normalize(&Tensor::from_vec(rng.normal(fan_in), fan_in, device)?)?;
        Ok(Self {
            weight_orig: Var::from_tensor(&weight)?,
            bias: Var::from_tensor(&bias)?,
            u: Mutex::new(u),
            v: Mutex::new(v),
            kernel,
        })
    }

    /// Loads `weight_orig`, `bias`, `weight_u`, `weight_v` under `vb`.
    fn load(
        vb: &VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
    ) -> Result<Self> {
        let weight = vb.get((out_channels, in_channels, kernel), "weight_orig")?;
        let bias = vb.get(out_channels, "bias")?;
        let u = vb.get(out_channels, "weight_u")?.detach();
        let v = vb.get(in_channels * kernel, "weight_v")?.detach();
        Ok(Self {
            weight_orig: Var::from_tensor(&weight)?,
            bias: Var::from_tensor(&bias)?,
            u: Mutex::new(u),
            v: Mutex::new(v),
            kernel,
        })
    }

    /// W_mat = weight_orig viewed (out, in·k).
    fn weight_matrix(&self) -> Result<Tensor> {
        Ok(self.weight_orig.as_tensor().flatten_from(1)?)
    }

    fn buffers(&self) -> (Tensor, Tensor) {
        let u = self.u.lock().expect("spectral-norm buffer lock").clone();
        let v = self.v.lock().expect("spectral-norm buffer lock").clone();
        (u, v)
    }

    /// One power iteration without a graph: v ← normalize(Wᵀu), u ← normalize(W v); returns the new (u, v).
    pub fn power_iteration(&self) -> Result<(Tensor, Tensor)> {
        let w = self.weight_matrix()?.detach();
        let (u, _) = self.buffers();
        let v = normalize(&u.unsqueeze(0)?.matmul(&w)?.squeeze(0)?)?;
        let u = normalize(&w.matmul(&v.unsqueeze(1)?)?.squeeze(1)?)?;
        *self.u.lock().expect("spectral-norm buffer lock") = u.clone();
        *self.v.lock().expect("spectral-norm buffer lock") = v.clone();
        Ok((u, v))
    }

    /// The normalised weight matrix W_mat / σ, σ = uᵀ W_mat v (differentiable in W; u, v constants).
    fn normalized_weight(&self, mode: Mode) -> Result<Tensor> {
        let (u, v) = match mode {
            Mode::Train => self.power_iteration()?,
            Mode::Eval => self.buffers(),
        };
        let w = self.weight_matrix()?;
        let sigma = u.unsqueeze(0)?.matmul(&w)?.matmul(&v.unsqueeze(1)?)?;
        Ok(w.broadcast_div(&sigma)?)
    }

    /// Channels-last convolution: x (B, N, in) → (B, N, out).
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let weight = self.normalized_weight(mode)?;
        let pad = self.kernel / 2;
        if pad > n {
            return Err(Error::Arg(format!(
                "circular padding {pad} needs at least {pad} tokens, got {n}"
            )));
        }
        // Taps stacked in W_mat's column order (channel-major, tap-minor).
        let cols = if self.kernel == 1 {
            x.reshape((b * n, c))?
        } else {
            let padded = Tensor::cat(&[&x.narrow(1, n - pad, pad)?, x, &x.narrow(1, 0, pad)?], 1)?;
            let taps: Vec<Tensor> = (0..self.kernel)
                .map(|j| padded.narrow(1, j, n))
                .collect::<candle_core::Result<_>>()?;
            Tensor::stack(&taps, 3)?.reshape((b * n, c * self.kernel))?
        };
        let out = cols
            .matmul(&weight.t()?)?
            .broadcast_add(self.bias.as_tensor())?;
        Ok(out.reshape((b, n, ()))?)
    }
}

impl Named for SpectralConv1d {
    fn named_tensors(&self, prefix: &str, out: &mut Vec<(String, Tensor)>) {
        let (u, v) = self.buffers();
        out.push((
            format!("{prefix}.weight_orig"),
            self.weight_orig.as_tensor().clone(),
        ));
        out.push((format!("{prefix}.bias"), self.bias.as_tensor().clone()));
        out.push((format!("{prefix}.weight_u"), u));
        out.push((format!("{prefix}.weight_v"), v));
    }

    fn named_vars(&self, prefix: &str, out: &mut Vec<(String, Var)>) {
        out.push((format!("{prefix}.weight_orig"), self.weight_orig.clone()));
        out.push((format!("{prefix}.bias"), self.bias.clone()));
    }
}

/// A module's state under `prefix`: every tensor (buffers included), or only the trainable variables.
trait Named {
    fn named_tensors(&self, prefix: &str, out: &mut Vec<(String, Tensor)>);
    fn named_vars(&self, prefix: &str, out: &mut Vec<(String, Var)>);
}

/// `BatchNormLocal(C, affine=True, virtual_bs=8, eps=1e-5)`: per group of ⌈B/8⌉ groups and per channel, mean
/// and biased variance over the group's samples and all tokens; no running statistics.
#[derive(Debug)]
pub struct BatchNormLocal {
    weight: Var,
    bias: Var,
}

impl BatchNormLocal {
    fn init(channels: usize, device: &Device) -> Result<Self> {
        Ok(Self {
            weight: Var::ones(channels, DType::F32, device)?,
            bias: Var::zeros(channels, DType::F32, device)?,
        })
    }

    fn load(vb: &VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            weight: Var::from_tensor(&vb.get(channels, "weight")?)?,
            bias: Var::from_tensor(&vb.get(channels, "bias")?)?,
        })
    }

    /// x (B, N, C) → (B, N, C).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let groups = b.div_ceil(VIRTUAL_BATCH);
        if !b.is_multiple_of(groups) {
            return Err(Error::Arg(format!(
                "BatchNormLocal: batch {b} does not split into {groups} equal virtual batches \
                 of at most {VIRTUAL_BATCH}"
            )));
        }
        // Channels-last, a group's samples and tokens are one contiguous axis.
        let grouped = x.reshape((groups, (b / groups) * n, c))?;
        let mean = grouped.mean_keepdim(1)?;
        let centered = grouped.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(1)?;
        let normed = centered.broadcast_div(&(var + BATCH_NORM_EPS)?.sqrt()?)?;
        let out = normed
            .broadcast_mul(self.weight.as_tensor())?
            .broadcast_add(self.bias.as_tensor())?;
        Ok(out.reshape((b, n, c))?)
    }
}

impl Named for BatchNormLocal {
    fn named_tensors(&self, prefix: &str, out: &mut Vec<(String, Tensor)>) {
        out.push((format!("{prefix}.weight"), self.weight.as_tensor().clone()));
        out.push((format!("{prefix}.bias"), self.bias.as_tensor().clone()));
    }

    fn named_vars(&self, prefix: &str, out: &mut Vec<(String, Var)>) {
        out.push((format!("{prefix}.weight"), self.weight.clone()));
        out.push((format!("{prefix}.bias"), self.bias.clone()));
    }
}

/// `make_block(C, k)`: SpectralConv1d(C → C, k) → BatchNormLocal(C) → LeakyReLU(0.2).
#[derive(Debug)]
struct ConvBlock {
    conv: SpectralConv1d,
    norm: BatchNormLocal,
}

impl ConvBlock {
    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        leaky_relu(&self.norm.forward(&self.conv.forward(x, mode)?)?)
    }
}

/// `DiscHead(C, c_dim=0, cmap_dim=0)`: main = [block(C, k=1), Residual(block(C, k=9))],
/// cls = SpectralConv1d(C → 1, k=1).
#[derive(Debug)]
pub struct DiscHead {
    /// `main.0`
    pointwise: ConvBlock,
    /// `main.1.fn`, inside the residual (fn(x) + x)/√2
    wide: ConvBlock,
    cls: SpectralConv1d,
}

impl DiscHead {
    fn init(rng: &mut SeededRng, channels: usize, device: &Device) -> Result<Self> {
        let mut block = |kernel| -> Result<ConvBlock> {
            Ok(ConvBlock {
                conv: SpectralConv1d::init(rng, channels, channels, kernel, device)?,
                norm: BatchNormLocal::init(channels, device)?,
            })
        };
        let pointwise = block(1)?;
        let wide = block(WIDE_KERNEL)?;
        let cls = SpectralConv1d::init(rng, channels, 1, 1, device)?;
        Ok(Self {
            pointwise,
            wide,
            cls,
        })
    }

    /// Loads one head under `vb` (the head's index prefix, e.g. `vb.pp("0")`).
    pub fn load(vb: &VarBuilder, channels: usize) -> Result<Self> {
        let block = |vb: VarBuilder, kernel| -> Result<ConvBlock> {
            Ok(ConvBlock {
                conv: SpectralConv1d::load(&vb.pp("0"), channels, channels, kernel)?,
                norm: BatchNormLocal::load(&vb.pp("1"), channels)?,
            })
        };
        Ok(Self {
            pointwise: block(vb.pp("main.0"), 1)?,
            wide: block(vb.pp("main.1.fn"), WIDE_KERNEL)?,
            cls: SpectralConv1d::load(&vb.pp("cls"), channels, 1, 1)?,
        })
    }

    /// Feature (B, N, C) → logits (B, N).
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let h = self.pointwise.forward(x, mode)?;
        let h = ((self.wide.forward(&h, mode)? + h)? / std::f64::consts::SQRT_2)?;
        Ok(self.cls.forward(&h, mode)?.squeeze(2)?)
    }

    fn convs(&self) -> [&SpectralConv1d; 3] {
        [&self.pointwise.conv, &self.wide.conv, &self.cls]
    }

    /// The head's modules under their state-dict names, in state-dict order.
    fn parts(&self) -> [(&'static str, &dyn Named); 5] {
        [
            ("main.0.0", &self.pointwise.conv),
            ("main.0.1", &self.pointwise.norm),
            ("main.1.fn.0", &self.wide.conv),
            ("main.1.fn.1", &self.wide.norm),
            ("cls", &self.cls),
        ]
    }

    fn named_tensors(&self, prefix: &str, out: &mut Vec<(String, Tensor)>) {
        for (name, part) in self.parts() {
            part.named_tensors(&format!("{prefix}.{name}"), out);
        }
    }

    fn named_vars(&self, prefix: &str, out: &mut Vec<(String, Var)>) {
        for (name, part) in self.parts() {
            part.named_vars(&format!("{prefix}.{name}"), out);
        }
    }
}

/// The reference records tapped features in execution order and pairs them with the heads in list order, so
/// only increasing block ids mean what they say.
fn check_block_ids(block_ids: &[usize]) -> Result<()> {
    if block_ids.is_empty() || block_ids.windows(2).any(|w| w[0] >= w[1]) {
        return Err(Error::Arg(format!(
            "head block ids must be a non-empty strictly increasing list, got {block_ids:?}"
        )));
    }
    Ok(())
}

/// The trainable heads of the LADD discriminator (`disc.heads`), head k reading teacher block `block_ids[k]`.
#[derive(Debug)]
pub struct DiscHeads {
    heads: Vec<DiscHead>,
    block_ids: Vec<usize>,
    channels: usize,
}

impl DiscHeads {
    /// Fresh heads (f32) for `channels` = the teacher's inner dim, one per entry of `block_ids` (strictly
    /// increasing teacher block indices, e.g. [`DEFAULT_HEAD_BLOCK_IDS`]), with torch's default initialisation
    /// drawn from a generator seeded by `seed`, then [`INIT_POWER_ITERATIONS`] power iterations so that the
    /// first eval-mode forward does not divide by σ = uᵀWv of random u, v (docs/ALGORITHM.md §9 #14).
    pub fn new(block_ids: &[usize], channels: usize, seed: u64, device: &Device) -> Result<Self> {
        check_block_ids(block_ids)?;
        let mut rng = SeededRng::new(seed);
        let heads = block_ids
            .iter()
            .map(|_| DiscHead::init(&mut rng, channels, device))
            .collect::<Result<_>>()?;
        let heads = Self {
            heads,
            block_ids: block_ids.to_vec(),
            channels,
        };
        heads.power_iterations(INIT_POWER_ITERATIONS)?;
        Ok(heads)
    }

    /// Loads heads `0..block_ids.len()` by their state-dict names (`{k}.main.0.0.weight_orig`, …) from `vb`;
    /// the tensors become `Var`s of `vb`'s dtype.
    pub fn load(vb: &VarBuilder, block_ids: &[usize], channels: usize) -> Result<Self> {
        check_block_ids(block_ids)?;
        let heads = (0..block_ids.len())
            .map(|k| DiscHead::load(&vb.pp(k.to_string()), channels))
            .collect::<Result<_>>()?;
        Ok(Self {
            heads,
            block_ids: block_ids.to_vec(),
            channels,
        })
    }

    /// Loads heads saved by [`Self::save`] (or converted from `disc_heads.pt`) in f32; the channel count is
    /// read from the file, the number of heads must equal `block_ids.len()`.
    pub fn load_file(path: &Path, block_ids: &[usize], device: &Device) -> Result<Self> {
        let weights = Weights::from_files(&[path.to_path_buf()])?;
        let stored_heads = (0..)
            .take_while(|k| weights.contains(&format!("{k}.cls.bias")))
            .count();
        if stored_heads != block_ids.len() {
            return Err(Error::model(
                path,
                format!(
                    "holds {stored_heads} discriminator heads, but {} head block ids were given ({block_ids:?})",
                    block_ids.len()
                ),
            ));
        }
        let channels = weights.shape("0.main.0.1.weight")?[0];
        Self::load(
            &weights.var_builder(DType::F32, device),
            block_ids,
            channels,
        )
    }

    /// Writes every head tensor, buffers included, under its state-dict name.
    pub fn save(&self, path: &Path) -> Result<()> {
        let tensors: HashMap<String, Tensor> = self.named_tensors().into_iter().collect();
        crate::train::checkpoint::write_file_atomically(path, |tmp| {
            candle_core::safetensors::save(&tensors, tmp)
                .map_err(|e| Error::model(path, format!("cannot write the heads: {e}")))
        })
    }

    pub fn heads(&self) -> &[DiscHead] {
        &self.heads
    }

    /// The teacher block read by each head, in head order.
    pub fn block_ids(&self) -> &[usize] {
        &self.block_ids
    }

    /// Feature width C (the teacher's inner dim).
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Trainable parameters (weight_orig, bias, norm weight/bias of every head) with their state-dict names;
    /// the u, v buffers are not parameters.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (k, head) in self.heads.iter().enumerate() {
            head.named_vars(&k.to_string(), &mut out);
        }
        out
    }

    /// The trainable parameters, for the optimiser.
    pub fn vars(&self) -> Vec<Var> {
        self.named_vars().into_iter().map(|(_, v)| v).collect()
    }

    /// The state dict: parameters and u, v buffers under their names.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (k, head) in self.heads.iter().enumerate() {
            head.named_tensors(&k.to_string(), &mut out);
        }
        out
    }

    /// Runs `n` power iterations on every spectral convolution (no forward), so that σ is a sound estimate of
    /// the largest singular value before the first eval-mode use (docs/ALGORITHM.md §9 #14).
    pub fn power_iterations(&self, n: usize) -> Result<()> {
        for head in &self.heads {
            for conv in head.convs() {
                for _ in 0..n {
                    conv.power_iteration()?;
                }
            }
        }
        Ok(())
    }

    /// Head k on feature k (B, N, C) (converted to the heads' dtype) → one (B, N) logit map per head.
    pub fn forward(&self, features: &[Tensor], mode: Mode) -> Result<Vec<Tensor>> {
        if features.len() != self.heads.len() {
            return Err(Error::Arg(format!(
                "{} features for {} discriminator heads",
                features.len(),
                self.heads.len()
            )));
        }
        self.heads
            .iter()
            .zip(features)
            .map(|(head, f)| head.forward(&f.to_dtype(head.cls.bias.dtype())?, mode))
            .collect()
    }

    /// Train-mode forward (phase D): one power iteration per convolution first, buffers updated.
    pub fn forward_train(&self, features: &[Tensor]) -> Result<Vec<Tensor>> {
        self.forward(features, Mode::Train)
    }

    /// Eval-mode forward (phase G): the stored u, v.
    pub fn forward_eval(&self, features: &[Tensor]) -> Result<Vec<Tensor>> {
        self.forward(features, Mode::Eval)
    }
}

/// Discriminator logits (B, K·N) of `SanaMSCMDiscriminator` (docs/ALGORITHM.md §5.8): the frozen teacher wrapper runs on
/// x = x_D/σd (B, C, H, W) at TrigFlow time t (B,) with prompts y (B, L, caption_channels) and mask (B, L),
/// up to the last tapped block; head k reads block `heads.block_ids()[k]`; the head outputs are concatenated
/// in head order. Gradients flow into the heads' `Var`s and, through the teacher, into x.
pub fn logits(
    teacher: &SanaTrigFlow,
    x: &Tensor,
    t: &Tensor,
    y: &Tensor,
    mask: Option<&Tensor>,
    heads: &DiscHeads,
    mode: Mode,
) -> Result<Tensor> {
    logits_ctx(teacher, x, t, &teacher.text_context(y, mask)?, heads, mode)
}

/// [`logits`] over the teacher's precomputed [`TextContext`] of the prompts.
pub fn logits_ctx(
    teacher: &SanaTrigFlow,
    x: &Tensor,
    t: &Tensor,
    text: &TextContext,
    heads: &DiscHeads,
    mode: Mode,
) -> Result<Tensor> {
    let features = teacher.block_outputs_ctx(x, text, t, None, heads.block_ids())?;
    let per_head = heads.forward(&features, mode)?;
    Ok(Tensor::cat(&per_head, 1)?)
}
