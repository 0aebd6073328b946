//! Normalisations: LayerNorm and RMSNorm over the last dim as [`Dual`] ops (with their forward-mode rules), and
//! RMSNorm over the channel axis of NCHW tensors (DC-AE). All compute in f32 (f64 for f64 input).

use candle_core::{DType, Result, Tensor, D};

use crate::nn::dual::{compute_dtype, Dual};

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

/// diffusers `RMSNorm` applied over the channel axis of a (B, C, H, W) tensor: computed in f32,
/// `x · rsqrt(mean_c(x²) + eps) · weight + bias`, returned in the weight's dtype.
pub fn rms_norm_channels(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let x32 = x.to_dtype(DType::F32)?;
    // Mean over channels as a (1, C) x (C, H·W) matmul: contiguous and multi-threaded.
    let ones = Tensor::full(1f32 / c as f32, (1, c), x.device())?.broadcast_left(b)?;
    let mean_sq = ones.matmul(&x32.sqr()?.reshape((b, c, h * w))?)?;
    let inv_rms = (mean_sq + eps)?.sqrt()?.recip()?.reshape((b, 1, h, w))?;
    let y = x32.broadcast_mul(&inv_rms)?.to_dtype(weight.dtype())?;
    let y = y.broadcast_mul(&weight.reshape((1, c, 1, 1))?)?;
    match bias {
        Some(bias) => y.broadcast_add(&bias.reshape((1, c, 1, 1))?),
        None => Ok(y),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::dual::tests::check_rule;
    use candle_core::Device;

    #[test]
    fn norm_tangent_rules_agree_with_central_differences() -> Result<()> {
        let w = Tensor::randn(1f64, 0.1, 8, &Device::Cpu)?;
        check_rule("layer_norm", &[2, 3, 8], &|x| layer_norm(x, 1e-6))?;
        check_rule("rms_norm", &[2, 3, 8], &|x| rms_norm(x, &w, 1e-5))?;
        Ok(())
    }

    #[test]
    fn rms_norm_channels_matches_channels_last_rms_norm() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 6, 3, 2), &dev)?;
        let weight = Tensor::randn(0f32, 1., 6, &dev)?;
        let bias = Tensor::randn(0f32, 1., 6, &dev)?;
        let ours = rms_norm_channels(&x, &weight, Some(&bias), 1e-5)?;
        let last = x.permute((0, 2, 3, 1))?;
        let reference = last
            .broadcast_div(&(last.sqr()?.mean_keepdim(3)? + 1e-5)?.sqrt()?)?
            .broadcast_mul(&weight)?
            .broadcast_add(&bias)?
            .permute((0, 3, 1, 2))?;
        let err = crate::nn::test_util::max_abs_diff(&ours, &reference);
        assert!(err < 1e-5, "max abs error {err}");
        Ok(())
    }
}
