//! `Dual { primal, tangent }` tensors and their forward-mode rules.
//!
//! A `Dual` is a value plus, optionally, its directional derivative (the tangent of a JVP). Every op computes
//! the primal from candle primitives that have a backward (so reverse mode works through the same code) and
//! evaluates its forward-mode rule only when a tangent is present: a `Dual` without a tangent is the plain
//! forward pass, at no extra cost. Tangents keep the dtype of their primal.

use candle_core::shape::Dims;
use candle_core::{DType, Device, Result, Shape, Tensor};

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

    /// The primal alone, without its graph or tangent: a constant of the same values.
    pub fn detached_constant(&self) -> Self {
        Self::constant(self.primal.detach())
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
pub(crate) mod tests {
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

    /// Checks the tangent of a unary dual op against central differences of its primal (f64). Shared by the
    /// rule tests of the other `nn` files.
    pub(crate) fn check_rule(
        name: &str,
        shape: &[usize],
        op: &dyn Fn(&Dual) -> Result<Dual>,
    ) -> Result<()> {
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
        let c = Dual::constant(Tensor::randn(0f64, 1., (2, 3, 8), &dev)?);
        check_rule("silu", &[2, 3, 8], &|x| x.silu())?;
        check_rule("sin·cos/sqrt", &[2, 3, 8], &|x| {
            x.sin()?
                .mul(&x.cos()?)?
                .div(&x.sqr()?.affine(1., 1.)?.sqrt()?)
        })?;
        check_rule("mul/div by constants", &[2, 3, 8], &|x| {
            x.mul(&c)?.div(&c.sqr()?.affine(1., 2.)?)
        })?;
        check_rule("timestep features", &[3], &|t| timestep_features(t, 16))?;
        Ok(())
    }

    #[test]
    fn no_tangent_means_no_tangent_work() -> Result<()> {
        let x = Dual::constant(Tensor::randn(0f32, 1., (2, 4), &Device::Cpu)?);
        let y = crate::nn::norm::layer_norm(&x.silu()?.mul(&x)?, 1e-6)?;
        assert!(y.tangent.is_none());
        Ok(())
    }
}
