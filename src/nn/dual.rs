//! `Dual { primal, tangent }` tensors and their forward-mode rules.
//!
//! A `Dual` is a value plus, optionally, its directional derivative (the tangent of a JVP). Every op computes
//! the primal from candle primitives that have a backward (so reverse mode works through the same code) and
//! evaluates its forward-mode rule only when a tangent is present: a `Dual` without a tangent is the plain
//! forward pass, at no extra cost. Tangents keep the dtype of their primal.

use candle_core::shape::Dims;
use candle_core::{DType, Device, Result, Shape, Tensor, D};

/// A tensor with an optional forward-mode tangent of the same shape.
#[derive(Clone, Debug)]
pub struct Dual {
    pub primal: Tensor,
    pub tangent: Option<Tensor>,
}

impl From<Tensor> for Dual {
    fn from(primal: Tensor) -> Self {
        Self::constant(primal)
    }
}

/// The dtype for numerically sensitive maths (norms, softmax, attention sums, time features): f32, or f64 when
/// the input already is f64.
pub fn compute_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Sums two optional tangents (`None` is a zero tangent).
fn add_tangents(a: Option<Tensor>, b: Option<Tensor>) -> Result<Option<Tensor>> {
    match (a, b) {
        (Some(a), Some(b)) => Ok(Some(a.broadcast_add(&b)?)),
        (a, None) => Ok(a),
        (None, b) => Ok(b),
    }
}

/// Expands a tangent produced by a broadcasting op to the shape of that op's result.
fn fit(tangent: Option<Tensor>, shape: &Shape) -> Result<Option<Tensor>> {
    tangent
        .map(|t| {
            if t.shape() == shape {
                Ok(t)
            } else {
                t.broadcast_as(shape)
            }
        })
        .transpose()
}

impl Dual {
    /// A dual number; `tangent` must have the primal's shape when given.
    pub fn new(primal: Tensor, tangent: Option<Tensor>) -> Self {
        Self { primal, tangent }
    }

    /// A constant (zero tangent).
    pub fn constant(primal: Tensor) -> Self {
        Self {
            primal,
            tangent: None,
        }
    }

    /// A value with a tangent.
    pub fn with_tangent(primal: Tensor, tangent: Tensor) -> Self {
        Self {
            primal,
            tangent: Some(tangent),
        }
    }

    pub fn dims(&self) -> &[usize] {
        self.primal.dims()
    }

    pub fn shape(&self) -> &Shape {
        self.primal.shape()
    }

    pub fn dtype(&self) -> DType {
        self.primal.dtype()
    }

    pub fn device(&self) -> &Device {
        self.primal.device()
    }

    /// The tangent, or zeros when there is none.
    pub fn tangent_or_zeros(&self) -> Result<Tensor> {
        match &self.tangent {
            Some(t) => Ok(t.clone()),
            None => self.primal.zeros_like(),
        }
    }

    /// Applies a linear map without offset (reshape, slice, matmul by a constant, ...) to primal and tangent.
    pub fn map(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Dual> {
        Ok(Dual {
            primal: f(&self.primal)?,
            tangent: self.tangent.as_ref().map(&f).transpose()?,
        })
    }

    // ------------------------------------------------------------------ structural ops (linear)

    pub fn reshape<S: candle_core::shape::ShapeWithOneHole + Clone>(&self, s: S) -> Result<Dual> {
        self.map(|t| t.reshape(s.clone()))
    }

    pub fn transpose(&self, d1: usize, d2: usize) -> Result<Dual> {
        self.map(|t| t.transpose(d1, d2))
    }

    pub fn permute<P: Dims + Clone>(&self, dims: P) -> Result<Dual> {
        self.map(|t| t.permute(dims.clone()))
    }

    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Dual> {
        self.map(|t| t.narrow(dim, start, len))
    }

    /// Splits into `n` equal chunks along `dim` (views).
    pub fn chunk(&self, n: usize, dim: usize) -> Result<Vec<Dual>> {
        let len = self.dims()[dim] / n;
        (0..n).map(|i| self.narrow(dim, i * len, len)).collect()
    }

    pub fn unsqueeze(&self, dim: usize) -> Result<Dual> {
        self.map(|t| t.unsqueeze(dim))
    }

    pub fn flatten_from(&self, dim: usize) -> Result<Dual> {
        self.map(|t| t.flatten_from(dim))
    }

    pub fn contiguous(&self) -> Result<Dual> {
        self.map(|t| t.contiguous())
    }

    pub fn broadcast_as<S: Into<Shape> + Clone>(&self, s: S) -> Result<Dual> {
        self.map(|t| t.broadcast_as(s.clone()))
    }

    pub fn to_dtype(&self, dtype: DType) -> Result<Dual> {
        self.map(|t| t.to_dtype(dtype))
    }

    pub fn pad_with_zeros(&self, dim: usize, left: usize, right: usize) -> Result<Dual> {
        self.map(|t| t.pad_with_zeros(dim, left, right))
    }

    /// Concatenation; parts without a tangent contribute zeros to the result's tangent.
    pub fn cat(parts: &[&Dual], dim: usize) -> Result<Dual> {
        let primals: Vec<&Tensor> = parts.iter().map(|d| &d.primal).collect();
        let primal = Tensor::cat(&primals, dim)?;
        let tangent = if parts.iter().any(|d| d.tangent.is_some()) {
            let tangents = parts
                .iter()
                .map(|d| d.tangent_or_zeros())
                .collect::<Result<Vec<_>>>()?;
            Some(Tensor::cat(&tangents, dim)?)
        } else {
            None
        };
        Ok(Dual { primal, tangent })
    }

    // ------------------------------------------------------------------ arithmetic (broadcasting)

    /// `self + rhs` with broadcasting.
    pub fn add(&self, rhs: &Dual) -> Result<Dual> {
        let primal = self.primal.broadcast_add(&rhs.primal)?;
        let tangent = add_tangents(self.tangent.clone(), rhs.tangent.clone())?;
        Ok(Dual {
            tangent: fit(tangent, primal.shape())?,
            primal,
        })
    }

    /// `self - rhs` with broadcasting.
    pub fn sub(&self, rhs: &Dual) -> Result<Dual> {
        let primal = self.primal.broadcast_sub(&rhs.primal)?;
        let tangent = add_tangents(
            self.tangent.clone(),
            rhs.tangent.as_ref().map(|t| t.neg()).transpose()?,
        )?;
        Ok(Dual {
            tangent: fit(tangent, primal.shape())?,
            primal,
        })
    }

    /// `self ⊙ rhs` with broadcasting: ẏ = ȧ·b + a·ḃ.
    pub fn mul(&self, rhs: &Dual) -> Result<Dual> {
        let primal = self.primal.broadcast_mul(&rhs.primal)?;
        let da = self
            .tangent
            .as_ref()
            .map(|t| t.broadcast_mul(&rhs.primal))
            .transpose()?;
        let db = rhs
            .tangent
            .as_ref()
            .map(|t| self.primal.broadcast_mul(t))
            .transpose()?;
        Ok(Dual {
            tangent: fit(add_tangents(da, db)?, primal.shape())?,
            primal,
        })
    }

    /// `self / rhs` with broadcasting: ẏ = (ȧ − y·ḃ) / b.
    pub fn div(&self, rhs: &Dual) -> Result<Dual> {
        let primal = self.primal.broadcast_div(&rhs.primal)?;
        let db = rhs
            .tangent
            .as_ref()
            .map(|t| primal.broadcast_mul(t)?.neg())
            .transpose()?;
        let tangent = add_tangents(self.tangent.clone(), db)?
            .map(|t| t.broadcast_div(&rhs.primal))
            .transpose()?;
        Ok(Dual {
            tangent: fit(tangent, primal.shape())?,
            primal,
        })
    }

    /// `mul·x + add` for scalars.
    pub fn affine(&self, mul: f64, add: f64) -> Result<Dual> {
        Ok(Dual {
            primal: self.primal.affine(mul, add)?,
            tangent: self
                .tangent
                .as_ref()
                .map(|t| t.affine(mul, 0.))
                .transpose()?,
        })
    }

    /// Batched matrix product over equal batch dims: ẏ = ȧ·b + a·ḃ.
    pub fn matmul(&self, rhs: &Dual) -> Result<Dual> {
        let primal = self.primal.matmul(&rhs.primal)?;
        let da = self
            .tangent
            .as_ref()
            .map(|t| t.matmul(&rhs.primal))
            .transpose()?;
        let db = rhs
            .tangent
            .as_ref()
            .map(|t| self.primal.matmul(t))
            .transpose()?;
        Ok(Dual {
            tangent: add_tangents(da, db)?,
            primal,
        })
    }

    /// Sum over `dim`, keeping it.
    pub fn sum_keepdim(&self, dim: usize) -> Result<Dual> {
        self.map(|t| t.sum_keepdim(dim))
    }

    /// Mean over `dim`, keeping it.
    pub fn mean_keepdim(&self, dim: usize) -> Result<Dual> {
        self.map(|t| t.mean_keepdim(dim))
    }

    // ------------------------------------------------------------------ pointwise functions

    /// ẏ = 2x·ẋ.
    pub fn sqr(&self) -> Result<Dual> {
        Ok(Dual {
            primal: self.primal.sqr()?,
            tangent: self
                .tangent
                .as_ref()
                .map(|t| (t * &self.primal)?.affine(2., 0.))
                .transpose()?,
        })
    }

    /// ẏ = ẋ / (2y).
    pub fn sqrt(&self) -> Result<Dual> {
        let primal = self.primal.sqrt()?;
        let tangent = self
            .tangent
            .as_ref()
            .map(|t| t / primal.affine(2., 0.)?)
            .transpose()?;
        Ok(Dual { primal, tangent })
    }

    /// ẏ = cos(x)·ẋ.
    pub fn sin(&self) -> Result<Dual> {
        Ok(Dual {
            primal: self.primal.sin()?,
            tangent: self
                .tangent
                .as_ref()
                .map(|t| t * self.primal.cos()?)
                .transpose()?,
        })
    }

    /// ẏ = −sin(x)·ẋ.
    pub fn cos(&self) -> Result<Dual> {
        Ok(Dual {
            primal: self.primal.cos()?,
            tangent: self
                .tangent
                .as_ref()
                .map(|t| t * self.primal.sin()?.neg()?)
                .transpose()?,
        })
    }

    /// SiLU x·σ(x): ẏ = σ(x)·(1 + x·(1 − σ(x)))·ẋ.
    pub fn silu(&self) -> Result<Dual> {
        let tangent = match &self.tangent {
            Some(t) => {
                let sig = candle_nn::ops::sigmoid(&self.primal)?;
                let slope = ((&self.primal * sig.affine(-1., 1.)?)? + 1.)?;
                Some(((sig * slope)? * t)?)
            }
            None => None,
        };
        Ok(Dual {
            primal: self.primal.silu()?,
            tangent,
        })
    }

    /// ReLU: ẏ = 1[x > 0]·ẋ.
    pub fn relu(&self) -> Result<Dual> {
        let tangent = match &self.tangent {
            Some(t) => Some((t * self.primal.gt(0.)?.to_dtype(t.dtype())?)?),
            None => None,
        };
        Ok(Dual {
            primal: self.primal.relu()?,
            tangent,
        })
    }
}

// ---------------------------------------------------------------------- layers

/// `y = x·Wᵀ + b` over the last dim (PyTorch layout `[out, in]`); also a 1×1 convolution on channels-last input.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// Primal: x·Wᵀ + b; tangent: ẋ·Wᵀ.
    pub fn forward(&self, x: &Dual) -> Result<Dual> {
        let mut y = x.map(|t| self.matmul(t))?;
        if let Some(b) = &self.bias {
            y.primal = y.primal.broadcast_add(b)?;
        }
        Ok(y)
    }

    /// `forward` on a plain tensor.
    pub fn forward_t(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward(&Dual::constant(x.clone()))?.primal)
    }

    fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let (rows, inner) = (
            dims[..dims.len() - 1].iter().product::<usize>(),
            dims[dims.len() - 1],
        );
        let mut out_dims = dims.to_vec();
        *out_dims
            .last_mut()
            .expect("linear input has at least one dim") = self.weight.dim(0)?;
        // a frozen weight (the teacher's) gets no gradient: see nn::frozen
        crate::nn::frozen::matmul_frozen_rhs(&x.reshape((rows, inner))?, &self.weight.t()?)?
            .reshape(out_dims)
    }
}

/// LayerNorm without affine over the last dim, computed in f32 (f64 for f64 input) and cast back:
/// ẏ = (ẋ − mean(ẋ) − n·mean(n ⊙ ẋ)) / σ with n the normalised input.
pub fn layer_norm(x: &Dual, eps: f64) -> Result<Dual> {
    let (dtype, cdt) = (x.dtype(), compute_dtype(x.dtype()));
    let xf = x.primal.to_dtype(cdt)?;
    let centred = xf.broadcast_sub(&xf.mean_keepdim(D::Minus1)?)?;
    let inv_std = (centred.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    let normed = centred.broadcast_mul(&inv_std)?;
    let tangent = match &x.tangent {
        Some(t) => {
            let tf = t.to_dtype(cdt)?;
            let along = normed.broadcast_mul(&(&normed * &tf)?.mean_keepdim(D::Minus1)?)?;
            let dt = tf
                .broadcast_sub(&tf.mean_keepdim(D::Minus1)?)?
                .sub(&along)?;
            Some(dt.broadcast_mul(&inv_std)?.to_dtype(dtype)?)
        }
        None => None,
    };
    Ok(Dual {
        primal: normed.to_dtype(dtype)?,
        tangent,
    })
}

/// diffusers `RMSNorm` with weight over the last dim, computed in f32 (f64 for f64 input) and cast back:
/// y = w ⊙ x·r, r = (mean(x²) + eps)^(−1/2); ẏ = w ⊙ r·(ẋ − x·r²·mean(x ⊙ ẋ)).
pub fn rms_norm(x: &Dual, weight: &Tensor, eps: f64) -> Result<Dual> {
    let (dtype, cdt) = (x.dtype(), compute_dtype(x.dtype()));
    let xf = x.primal.to_dtype(cdt)?;
    let w = weight.to_dtype(cdt)?;
    let r = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    let primal = xf.broadcast_mul(&r)?.broadcast_mul(&w)?.to_dtype(dtype)?;
    let tangent = match &x.tangent {
        Some(t) => {
            let tf = t.to_dtype(cdt)?;
            let proj = (&xf * &tf)?
                .mean_keepdim(D::Minus1)?
                .broadcast_mul(&r.sqr()?)?;
            let dt = tf
                .sub(&xf.broadcast_mul(&proj)?)?
                .broadcast_mul(&r)?
                .broadcast_mul(&w)?;
            Some(dt.to_dtype(dtype)?)
        }
        None => None,
    };
    Ok(Dual { primal, tangent })
}

/// Softmax over the last dim in f32 (composed, so it has a backward): ṗ = p ⊙ (ż − Σ p ż).
pub fn softmax_last_dim(x: &Dual) -> Result<Dual> {
    let (dtype, cdt) = (x.dtype(), compute_dtype(x.dtype()));
    let xf = x.primal.to_dtype(cdt)?;
    // softmax is shift invariant, so the max needs no gradient
    let shifted = xf
        .broadcast_sub(&xf.max_keepdim(D::Minus1)?.detach())?
        .exp()?;
    let p = shifted.broadcast_div(&shifted.sum_keepdim(D::Minus1)?)?;
    let tangent = match &x.tangent {
        Some(t) => {
            let tf = t.to_dtype(cdt)?;
            let mean = (&p * &tf)?.sum_keepdim(D::Minus1)?;
            Some((&p * tf.broadcast_sub(&mean)?)?.to_dtype(dtype)?)
        }
        None => None,
    };
    Ok(Dual {
        primal: p.to_dtype(dtype)?,
        tangent,
    })
}

/// Softmax attention in f32 (f64 for f64 inputs): q (B,H,N,d), k and v (B,H,L,d), optional additive bias broadcastable to
/// (B,H,N,L); returns (B,H,N,d) in q's dtype. `softmax(q·kᵀ·scale + bias)·v`.
pub fn softmax_attention(
    q: &Dual,
    k: &Dual,
    v: &Dual,
    scale: f64,
    bias: Option<&Tensor>,
) -> Result<Dual> {
    let (dtype, cdt) = (q.dtype(), compute_dtype(q.dtype()));
    let (q, k, v) = (q.to_dtype(cdt)?, k.to_dtype(cdt)?, v.to_dtype(cdt)?);
    let mut scores = q.matmul(&k.transpose(2, 3)?)?.affine(scale, 0.)?;
    if let Some(bias) = bias {
        scores = scores.add(&Dual::constant(bias.to_dtype(cdt)?))?;
    }
    softmax_last_dim(&scores)?.matmul(&v)?.to_dtype(dtype)
}

/// Sana's ReLU-kernel linear attention in f32 (f64 for f64 inputs; `SanaLinearAttnProcessor2_0`), token-major: q, k, v (B,H,N,d)
/// → (B,H,N,d) in q's dtype. out_n = Σ_m v_m (k'_m·q'_n) / (Σ_m k'_m·q'_n + 1e−15) with q' = relu(q),
/// k' = relu(k); the normaliser comes from a column of ones appended to v (the reference's padding trick),
/// whose tangent is zero.
pub fn relu_linear_attention(q: &Dual, k: &Dual, v: &Dual) -> Result<Dual> {
    let (dtype, cdt) = (q.dtype(), compute_dtype(q.dtype()));
    let q = q.relu()?.to_dtype(cdt)?;
    let k = k.relu()?.to_dtype(cdt)?;
    let v = v.to_dtype(cdt)?;
    let (b, h, n, d) = v.primal.dims4()?;
    let ones = Dual::constant(Tensor::ones((b, h, n, 1), cdt, v.device())?);
    let v_padded = Dual::cat(&[&v, &ones], 3)?;
    let kv = k.transpose(2, 3)?.matmul(&v_padded)?; // (B,H,d,d+1)
    let out = q.matmul(&kv)?; // (B,H,N,d+1)
    let normaliser = out.narrow(3, d, 1)?.affine(1., 1e-15)?;
    out.narrow(3, 0, d)?.div(&normaliser)?.to_dtype(dtype)
}

/// Depthwise 2-D convolution (stride 1, zero padding k/2, odd k) on channels-last input x (B,H,W,C) as a sum
/// of k² shifted slices times per-channel weights; `weight` in PyTorch layout (C,1,kh,kw). The zero-padded
/// input is flattened to rows of W+2p tokens so that every tap is one contiguous slice of it (cheap forward
/// and cheap backward); output positions in the pad columns are computed and dropped. Linear, so the tangent
/// is the same sum without the bias.
pub fn depthwise_conv2d_channels_last(
    x: &Dual,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Dual> {
    let (_, _, kh, kw) = weight.dims4()?;
    let taps = conv_taps(weight)?;
    let conv = |t: &Tensor| -> Result<Tensor> {
        if t.track_op() || weight.track_op() {
            // computed without a graph, then given its gradient by a custom backward: the graph keeps the input
            // and one output-sized copy instead of the k² shifted products and partial sums (17 activation-sized
            // tensors for a 3×3 kernel, the largest activations of a SANA block)
            let value = shifted_sum_conv(&t.detach(), &taps.detach(), kh, kw)?;
            value.apply_op3(t, weight, DepthwiseConvBackward { kh, kw })
        } else {
            shifted_sum_conv(t, &taps, kh, kw)
        }
    };
    let mut y = x.map(conv)?;
    if let Some(b) = bias {
        y.primal = y.primal.broadcast_add(b)?;
    }
    Ok(y)
}

/// Per-tap rows of per-channel weights (kh·kw, C) of a depthwise weight (C, 1, kh, kw).
fn conv_taps(weight: &Tensor) -> Result<Tensor> {
    let (c, _, kh, kw) = weight.dims4()?;
    weight.reshape((c, kh * kw))?.t()?.contiguous()
}

/// The zero-padded input (B, (H+2p)·(W+2p), C) flattened to rows of W+2p tokens, the row length, and the number
/// of flat output positions (output (y, x) sits at y·row + x).
fn padded_rows(t: &Tensor, kh: usize, kw: usize) -> Result<(Tensor, usize, usize)> {
    let (b, h, w, c) = t.dims4()?;
    let (ph, pw) = (kh / 2, kw / 2);
    let row = w + 2 * pw;
    let padded = t
        .pad_with_zeros(2, pw, pw)?
        .pad_with_zeros(1, ph, ph)?
        .reshape((b, (h + 2 * ph) * row, c))?;
    Ok((padded, row, (h - 1) * row + w))
}

/// Depthwise conv of channels-last t (B, H, W, C) with taps (kh·kw, C) as k² shifted contiguous slices.
fn shifted_sum_conv(t: &Tensor, taps: &Tensor, kh: usize, kw: usize) -> Result<Tensor> {
    let (b, h, w, c) = t.dims4()?;
    let (padded, row, len) = padded_rows(t, kh, kw)?;
    let mut acc: Option<Tensor> = None;
    for dy in 0..kh {
        for dx in 0..kw {
            // output (y, x) reads padded[y·row + x + dy·row + dx]
            let term = padded
                .narrow(1, dy * row + dx, len)?
                .broadcast_mul(&taps.get(dy * kw + dx)?)?;
            acc = Some(match acc {
                Some(a) => (a + term)?,
                None => term,
            });
        }
    }
    acc.expect("kernel has at least one tap")
        .pad_with_zeros(1, 0, row - w)?
        .reshape((b, h, row, c))?
        .narrow(2, 0, w)
}

/// Identity on the precomputed conv output (arg 1) whose backward gives the conv's input (arg 2) and weight
/// (arg 3) their gradients: dx = conv(dy, flipped kernel), dw[c, i, j] = Σ x_pad[·, y+i, x+j, c]·dy[·, y, x, c].
struct DepthwiseConvBackward {
    kh: usize,
    kw: usize,
}

impl DepthwiseConvBackward {
    fn copy<S>(s: &S, l: &candle_core::Layout) -> Result<(S, Shape)>
    where
        S: candle_core::backend::BackendStorage,
        S::Device: candle_core::backend::BackendDevice<Storage = S>,
    {
        use candle_core::backend::BackendDevice;
        let mut dst = s.device().zeros_impl(l.shape(), s.dtype())?;
        s.copy_strided_src(&mut dst, 0, l)?;
        Ok((dst, l.shape().clone()))
    }
}

impl candle_core::CustomOp3 for DepthwiseConvBackward {
    fn name(&self) -> &'static str {
        "depthwise-conv-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        Self::copy(s1, l1)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &candle_core::Layout,
        _: &candle_core::CudaStorage,
        _: &candle_core::Layout,
        _: &candle_core::CudaStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Self::copy(s1, l1)
    }

    fn bwd(
        &self,
        _value: &Tensor,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (kh, kw) = (self.kh, self.kw);
        let (x, g) = (x.detach(), grad.detach().to_dtype(x.dtype())?);
        let taps = conv_taps(&weight.detach())?;
        // the kernel flipped in both spatial dims = the tap rows in reverse order
        let reversed: Vec<u32> = (0..(kh * kw) as u32).rev().collect();
        let flipped = taps.index_select(&Tensor::new(reversed, taps.device())?, 0)?;
        let grad_x = shifted_sum_conv(&g, &flipped, kh, kw)?;

        let (b, h, w, c) = x.dims4()?;
        let (padded, row, len) = padded_rows(&x, kh, kw)?;
        let g_rows = g
            .pad_with_zeros(2, 0, row - w)?
            .reshape((b, h * row, c))?
            .narrow(1, 0, len)?;
        let per_tap = (0..kh * kw)
            .map(|k| {
                let (dy, dx) = (k / kw, k % kw);
                padded
                    .narrow(1, dy * row + dx, len)?
                    .mul(&g_rows)?
                    .sum((0, 1))
            })
            .collect::<Result<Vec<_>>>()?;
        let grad_w = Tensor::stack(&per_tap, 0)?
            .t()?
            .reshape((c, 1, kh, kw))?
            .to_dtype(weight.dtype())?;
        Ok((None, Some(grad_x), Some(grad_w)))
    }
}

/// diffusers `get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)`: (B,) → (B, dim)
/// `[cos(t·ω), sin(t·ω)]` with ω_i = 10000^(−i/(dim/2)) computed in f32 as diffusers does; f32 (f64 for f64 t).
pub fn timestep_features(t: &Dual, dim: usize) -> Result<Dual> {
    let half = dim / 2;
    let log_period = -(10000f64.ln() as f32);
    let freqs: Vec<f32> = (0..half)
        .map(|i| (log_period * i as f32 / half as f32).exp())
        .collect();
    let cdt = compute_dtype(t.dtype());
    let freqs = Dual::constant(Tensor::from_vec(freqs, (1, half), t.device())?.to_dtype(cdt)?);
    let args = t.to_dtype(cdt)?.unsqueeze(1)?.mul(&freqs)?;
    Dual::cat(&[&args.cos()?, &args.sin()?], 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Central difference of `f` at `x` along `dx`, in f64.
    fn central_difference(
        f: &dyn Fn(&Tensor) -> Result<Tensor>,
        x: &Tensor,
        dx: &Tensor,
    ) -> Result<Tensor> {
        let h = 1e-5;
        let plus = f(&(x + dx.affine(h, 0.)?)?)?;
        let minus = f(&(x - dx.affine(h, 0.)?)?)?;
        (plus - minus)? / (2. * h)
    }

    fn max_rel_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
        let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
        let scale = b
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f64>()?
            .max(1e-12);
        Ok(diff / scale)
    }

    /// Checks the tangent of a unary dual op against central differences of its primal (f64).
    fn check_rule(name: &str, shape: &[usize], op: &dyn Fn(&Dual) -> Result<Dual>) -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f64, 1., shape, &dev)?;
        let dx = Tensor::randn(0f64, 1., shape, &dev)?;
        let jvp = op(&Dual::with_tangent(x.clone(), dx.clone()))?
            .tangent
            .expect("tangent");
        let fd = central_difference(&|t| Ok(op(&Dual::constant(t.clone()))?.primal), &x, &dx)?;
        let err = max_rel_diff(&jvp, &fd)?;
        assert!(
            err < 1e-6,
            "{name}: tangent differs from central differences by {err:.2e} (relative)"
        );
        Ok(())
    }

    #[test]
    fn tangent_rules_agree_with_central_differences() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(1f64, 0.1, 8, &dev)?;
        let wk = Tensor::randn(0f64, 0.3, (8, 1, 3, 3), &dev)?;
        let c = Dual::constant(Tensor::randn(0f64, 1., (2, 3, 8), &dev)?);
        check_rule("layer_norm", &[2, 3, 8], &|x| layer_norm(x, 1e-6))?;
        check_rule("rms_norm", &[2, 3, 8], &|x| rms_norm(x, &w, 1e-5))?;
        check_rule("softmax", &[2, 3, 8], &softmax_last_dim)?;
        check_rule("silu", &[2, 3, 8], &|x| x.silu())?;
        check_rule("sin·cos/sqrt", &[2, 3, 8], &|x| {
            x.sin()?
                .mul(&x.cos()?)?
                .div(&x.sqr()?.affine(1., 1.)?.sqrt()?)
        })?;
        check_rule("mul/div by constants", &[2, 3, 8], &|x| {
            x.mul(&c)?.div(&c.sqr()?.affine(1., 2.)?)
        })?;
        check_rule("depthwise conv", &[1, 4, 5, 8], &|x| {
            depthwise_conv2d_channels_last(x, &wk, None)
        })?;
        check_rule("timestep features", &[3], &|t| timestep_features(t, 16))?;
        let split = |x: &Dual| -> Result<(Dual, Dual, Dual)> {
            let parts = x.chunk(3, 3)?;
            Ok((
                parts[0].contiguous()?,
                parts[1].contiguous()?,
                parts[2].contiguous()?,
            ))
        };
        check_rule("relu linear attention", &[1, 2, 6, 12], &|x| {
            let (q, k, v) = split(x)?;
            // keep q, k away from the ReLU kink so that differences are smooth
            relu_linear_attention(&q.affine(1., 3.)?, &k.affine(1., 3.)?, &v)
        })?;
        check_rule("softmax attention", &[1, 2, 6, 12], &|x| {
            let (q, k, v) = split(x)?;
            softmax_attention(&q, &k, &v, 0.5, None)
        })?;
        Ok(())
    }

    #[test]
    fn depthwise_conv_custom_backward_matches_autograd() -> Result<()> {
        let dev = Device::Cpu;
        for (kh, shape) in [
            (3usize, (2usize, 5usize, 4usize, 6usize)),
            (5, (1, 3, 7, 2)),
        ] {
            let x = candle_core::Var::from_tensor(&Tensor::randn(0f64, 1., shape, &dev)?)?;
            let w = candle_core::Var::from_tensor(&Tensor::randn(
                0f64,
                1.,
                (shape.3, 1, kh, kh),
                &dev,
            )?)?;
            let cot = Tensor::randn(0f64, 1., shape, &dev)?;
            let fused = depthwise_conv2d_channels_last(
                &Dual::constant(x.as_tensor().clone()),
                w.as_tensor(),
                None,
            )?;
            let plain = shifted_sum_conv(x.as_tensor(), &conv_taps(w.as_tensor())?, kh, kh)?;
            assert!(
                (&fused.primal - &plain)?
                    .abs()?
                    .max_all()?
                    .to_scalar::<f64>()?
                    < 1e-12
            );
            let g_fused = (fused.primal * &cot)?.sum_all()?.backward()?;
            let g_plain = (plain * &cot)?.sum_all()?.backward()?;
            for v in [&x, &w] {
                let (a, b) = (
                    g_fused.get(v.as_tensor()).unwrap(),
                    g_plain.get(v.as_tensor()).unwrap(),
                );
                let err = (a - b)?.abs()?.max_all()?.to_scalar::<f64>()?;
                assert!(err < 1e-10, "kernel {kh}: gradient differs by {err}");
            }
        }
        Ok(())
    }

    #[test]
    fn depthwise_conv_matches_grouped_conv2d() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 6, 5, 7), &dev)?; // NCHW
        let w = Tensor::randn(0f32, 1., (6, 1, 3, 3), &dev)?;
        let b = Tensor::randn(0f32, 1., 6, &dev)?;
        let want = x
            .conv2d(&w, 1, 1, 1, 6)?
            .broadcast_add(&b.reshape((1, 6, 1, 1))?)?;
        let got = depthwise_conv2d_channels_last(
            &Dual::constant(x.permute((0, 2, 3, 1))?),
            &w,
            Some(&b),
        )?
        .primal
        .permute((0, 3, 1, 2))?;
        let err = (got - want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(err < 1e-5, "max abs error {err}");
        Ok(())
    }

    #[test]
    fn no_tangent_means_no_tangent_work() -> Result<()> {
        let x = Dual::constant(Tensor::randn(0f32, 1., (2, 4), &Device::Cpu)?);
        let y = layer_norm(&x.silu()?.mul(&x)?, 1e-6)?;
        assert!(y.tangent.is_none());
        Ok(())
    }
}
