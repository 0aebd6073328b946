//! Normalisations: LayerNorm and RMSNorm over the last dim as [`Dual`] ops (with their forward-mode rules), and
//! RMSNorm over the channel axis of NCHW tensors (DC-AE). All compute in f32 (f64 for f64 input).

use candle_core::{DType, Result, Tensor, D};

use crate::nn::dual::{compute_dtype, Dual};
use crate::nn::fused::{attach, sum_to};

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

/// `LN(x)·(1 + scale) + shift` (LayerNorm without affine, then SANA's adaLN modulation; `scale` and `shift`
/// broadcast over the tokens), with LayerNorm computed in f32 (f64 for f64 input) and the modulation in x's
/// dtype. Without tangents it is one graph node that keeps only its output (`nn::fused`); its backward
/// recomputes the normalised input n and σ from x: dshift = Σ g, dscale = Σ g ⊙ n, and with ḡ = g ⊙ (1 + scale),
/// dx = (ḡ − mean(ḡ) − n·mean(ḡ ⊙ n)) / σ.
pub fn layer_norm_modulate(x: &Dual, shift: &Dual, scale: &Dual, eps: f64) -> Result<Dual> {
    let composed = |x: &Dual, shift: &Dual, scale: &Dual| -> Result<Dual> {
        layer_norm(x, eps)?
            .mul(&scale.affine(1.0, 1.0)?)?
            .add(shift)
    };
    if x.tangent.is_some() || shift.tangent.is_some() || scale.tangent.is_some() {
        return composed(x, shift, scale);
    }
    let value = composed(
        &x.detached_constant(),
        &shift.detached_constant(),
        &scale.detached_constant(),
    )?
    .primal;
    let inputs = [&x.primal, &scale.primal, &shift.primal];
    let primal = attach(
        "layer-norm-modulate",
        value,
        &inputs,
        move |args, _res, grad| {
            let (x, scale, shift) = (args[0].detach(), args[1].detach(), args[2]);
            let (dtype, cdt) = (x.dtype(), compute_dtype(x.dtype()));
            let xf = x.to_dtype(cdt)?;
            let centred = xf.broadcast_sub(&xf.mean_keepdim(D::Minus1)?)?;
            let inv_std = (centred.sqr()?.mean_keepdim(D::Minus1)? + eps)?
                .sqrt()?
                .recip()?;
            let normed = centred.broadcast_mul(&inv_std)?;
            let grad_shift = sum_to(grad, shift.shape())?;
            let grad_scale = sum_to(
                &grad.broadcast_mul(&normed.to_dtype(dtype)?)?,
                scale.shape(),
            )?;
            let g = grad
                .broadcast_mul(&scale.affine(1.0, 1.0)?)?
                .to_dtype(cdt)?;
            let along = normed.broadcast_mul(&(&g * &normed)?.mean_keepdim(D::Minus1)?)?;
            let grad_x = g
                .broadcast_sub(&g.mean_keepdim(D::Minus1)?)?
                .sub(&along)?
                .broadcast_mul(&inv_std)?
                .to_dtype(dtype)?;
            Ok(vec![Some(grad_x), Some(grad_scale), Some(grad_shift)])
        },
    )?;
    Ok(Dual::constant(primal))
}

/// diffusers `RMSNorm` with weight over the last dim, computed in f32 (f64 for f64 input) and cast back:
/// y = w ⊙ x·r, r = (mean(x²) + eps)^(−1/2); ẏ = w ⊙ r·(ẋ − x·r²·mean(x ⊙ ẋ)).
/// Without a tangent it is one graph node that keeps only its output (`nn::fused`); its backward:
/// with u = x·r and ḡ = g ⊙ w, dx = r·(ḡ − u·mean(u ⊙ ḡ)), dw = Σ g ⊙ u over every dim but the last.
pub fn rms_norm(x: &Dual, weight: &Tensor, eps: f64) -> Result<Dual> {
    if x.tangent.is_some() {
        return rms_norm_composed(x, weight, eps);
    }
    let value = rms_norm_composed(&x.detached_constant(), &weight.detach(), eps)?.primal;
    let primal = attach(
        "rms-norm",
        value,
        &[&x.primal, weight],
        move |args, _res, grad| {
            let (x, w) = (args[0].detach(), args[1].detach());
            let cdt = compute_dtype(x.dtype());
            let (xf, wf, g) = (x.to_dtype(cdt)?, w.to_dtype(cdt)?, grad.to_dtype(cdt)?);
            let r = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?
                .sqrt()?
                .recip()?;
            let u = xf.broadcast_mul(&r)?;
            let grad_w = if args[1].track_op() {
                Some(sum_to(&(&g * &u)?, wf.shape())?.to_dtype(w.dtype())?)
            } else {
                None
            };
            let gu = g.broadcast_mul(&wf)?;
            let along = u.broadcast_mul(&(&u * &gu)?.mean_keepdim(D::Minus1)?)?;
            let grad_x = (gu - along)?.broadcast_mul(&r)?.to_dtype(x.dtype())?;
            Ok(vec![Some(grad_x), grad_w])
        },
    )?;
    Ok(Dual::constant(primal))
}

/// The composed form of [`rms_norm`] (its forward, and the rule for tangents).
fn rms_norm_composed(x: &Dual, weight: &Tensor, eps: f64) -> Result<Dual> {
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
    fn fused_norms_match_the_composed_ops_in_value_and_gradients() -> Result<()> {
        use crate::nn::fused::tests::compare;
        let dev = Device::Cpu;
        for dtype in [DType::F64, DType::F32] {
            let tol = if dtype == DType::F64 { 1e-12 } else { 2e-5 };
            let rand = |shape: &[usize]| Tensor::randn(0f64, 1., shape, &dev)?.to_dtype(dtype);
            let c = |t: &Tensor| Dual::constant(t.clone());
            // x, scale, shift (scale and shift broadcast over the tokens, as the block's chunks are)
            let inputs = [rand(&[2, 7, 16])?, rand(&[2, 1, 16])?, rand(&[2, 1, 16])?];
            let (value, grad, scale) = compare(
                &inputs,
                &|t| Ok(layer_norm_modulate(&c(&t[0]), &c(&t[2]), &c(&t[1]), 1e-6)?.primal),
                &|t| {
                    Ok(layer_norm(&c(&t[0]), 1e-6)?
                        .mul(&c(&t[1]).affine(1.0, 1.0)?)?
                        .add(&c(&t[2]))?
                        .primal)
                },
            )?;
            assert_eq!(
                value, 0.0,
                "{dtype:?}: LN + modulate forward is the composed forward"
            );
            assert!(
                grad <= tol * scale,
                "{dtype:?}: LN + modulate gradients differ by {grad}"
            );
            // x and a trainable weight
            let inputs = [rand(&[2, 7, 16])?, rand(&[16])?];
            let (value, grad, scale) = compare(
                &inputs,
                &|t| Ok(rms_norm(&c(&t[0]), &t[1], 1e-5)?.primal),
                &|t| Ok(rms_norm_composed(&c(&t[0]), &t[1], 1e-5)?.primal),
            )?;
            assert_eq!(
                value, 0.0,
                "{dtype:?}: RMSNorm forward is the composed forward"
            );
            assert!(
                grad <= tol * scale,
                "{dtype:?}: RMSNorm gradients differ by {grad}"
            );
        }
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
