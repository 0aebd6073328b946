//! Attention as [`Dual`] ops: softmax over the last dim, softmax attention and SANA's ReLU linear attention,
//! each with its forward-mode rule and computed in f32 (f64 for f64 input).

use candle_core::{Result, Tensor, D};

use crate::nn::dual::{compute_dtype, Dual};
use crate::nn::fused::attach;

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
    let raw = q.matmul(&k.transpose(2, 3)?)?;
    let bias = bias.map(|b| b.to_dtype(cdt)).transpose()?;
    let p = if raw.tangent.is_some() {
        scaled_softmax_composed(&raw, scale, bias.as_ref())?
    } else {
        Dual::constant(scaled_softmax(&raw.primal, scale, bias)?)
    };
    p.matmul(&v)?.to_dtype(dtype)
}

/// `softmax(s·scale + bias)` over the last dim, composed of [`Dual`] ops.
fn scaled_softmax_composed(raw: &Dual, scale: f64, bias: Option<&Tensor>) -> Result<Dual> {
    let mut scores = raw.affine(scale, 0.)?;
    if let Some(bias) = bias {
        scores = scores.add(&Dual::constant(bias.clone()))?;
    }
    softmax_last_dim(&scores)
}

/// [`scaled_softmax_composed`] without a tangent, as one graph node that keeps only its output p (`nn::fused`;
/// the composed ops keep five score-sized tensors). Backward: ds = scale·(g ⊙ p − p·Σ g ⊙ p); the mask
/// bias is a constant and gets no gradient.
fn scaled_softmax(raw: &Tensor, scale: f64, bias: Option<Tensor>) -> Result<Tensor> {
    let value =
        scaled_softmax_composed(&Dual::constant(raw.detach()), scale, bias.as_ref())?.primal;
    attach("scaled-softmax", value, &[raw], move |_args, p, grad| {
        let gp = (grad.to_dtype(p.dtype())? * p)?;
        let grad_raw = (&gp - p.broadcast_mul(&gp.sum_keepdim(D::Minus1)?)?)?.affine(scale, 0.)?;
        Ok(vec![Some(grad_raw)])
    })
}

/// Sana's ReLU-kernel linear attention in f32 (f64 for f64 inputs; `SanaLinearAttnProcessor2_0`), token-major: q, k, v (B,H,N,d)
/// → (B,H,N,d) in q's dtype. out_n = Σ_m v_m (k'_m·q'_n) / (Σ_m k'_m·q'_n + 1e−15) with q' = relu(q),
/// k' = relu(k); the normaliser comes from a column of ones appended to v (the reference's padding trick),
/// whose tangent is zero. Without tangents it is one graph node that keeps only its output (`nn::fused`); its
/// backward recomputes k'ᵀ·[v, 1] and q'·(k'ᵀ·[v, 1]) (small: d × (d+1) per head).
pub fn relu_linear_attention(q: &Dual, k: &Dual, v: &Dual) -> Result<Dual> {
    if q.tangent.is_some() || k.tangent.is_some() || v.tangent.is_some() {
        return relu_linear_attention_composed(q, k, v);
    }
    let value = relu_linear_attention_composed(
        &q.detached_constant(),
        &k.detached_constant(),
        &v.detached_constant(),
    )?
    .primal;
    let inputs = [&q.primal, &k.primal, &v.primal];
    let primal = attach(
        "relu-linear-attention",
        value,
        &inputs,
        |args, _res, grad| {
            // recomputed: q' = relu(q), k' = relu(k), kv = k'ᵀ·[v, 1], out = q'·kv = [num, den − 1e−15]
            let (q, k, v) = (args[0].detach(), args[1].detach(), args[2].detach());
            let cdt = compute_dtype(q.dtype());
            let (qf, kf, vf) = (q.to_dtype(cdt)?, k.to_dtype(cdt)?, v.to_dtype(cdt)?);
            let (qr, kr) = (qf.relu()?, kf.relu()?);
            let (b, h, n, d) = vf.dims4()?;
            let vp = Tensor::cat(&[&vf, &Tensor::ones((b, h, n, 1), cdt, vf.device())?], 3)?;
            let kv = kr.transpose(2, 3)?.matmul(&vp)?;
            let out = qr.matmul(&kv)?;
            let den = (out.narrow(3, d, 1)? + 1e-15)?;
            let y = out.narrow(3, 0, d)?.broadcast_div(&den)?;
            // y = num / den: dnum = g / den, dden = −Σ g ⊙ y / den
            let g = grad.to_dtype(cdt)?;
            let d_num = g.broadcast_div(&den)?;
            let d_den = (&g * &y)?.sum_keepdim(3)?.neg()?.broadcast_div(&den)?;
            let d_out = Tensor::cat(&[&d_num, &d_den], 3)?;
            let d_qr = d_out.matmul(&kv.transpose(2, 3)?)?;
            let d_kv = qr.transpose(2, 3)?.matmul(&d_out)?;
            let d_kr = vp.matmul(&d_kv.transpose(2, 3)?)?;
            let d_v = kr.matmul(&d_kv)?.narrow(3, 0, d)?;
            let relu_mask = |t: &Tensor| t.gt(0.)?.to_dtype(cdt);
            let d_q = (d_qr * relu_mask(&qf)?)?.to_dtype(q.dtype())?;
            let d_k = (d_kr * relu_mask(&kf)?)?.to_dtype(k.dtype())?;
            Ok(vec![Some(d_q), Some(d_k), Some(d_v.to_dtype(v.dtype())?)])
        },
    )?;
    Ok(Dual::constant(primal))
}

/// [`relu_linear_attention`] composed of [`Dual`] ops (its forward, and the rule for tangents).
fn relu_linear_attention_composed(q: &Dual, k: &Dual, v: &Dual) -> Result<Dual> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::dual::tests::check_rule;

    #[test]
    fn attention_tangent_rules_agree_with_central_differences() -> Result<()> {
        check_rule("softmax", &[2, 3, 8], &softmax_last_dim)?;
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
    fn fused_linear_attention_matches_the_composed_ops_in_value_and_gradients() -> Result<()> {
        use crate::nn::fused::tests::compare;
        use candle_core::{DType, Device};
        let dev = Device::Cpu;
        for dtype in [DType::F64, DType::F32] {
            let tol = if dtype == DType::F64 { 1e-12 } else { 2e-5 };
            // q and k shifted so that most entries pass the ReLU and the normaliser stays away from 0
            let rand = |shift: f64| {
                (Tensor::randn(0f64, 1., (2, 3, 7, 5), &dev)? + shift)?.to_dtype(dtype)
            };
            let inputs = [rand(0.5)?, rand(0.5)?, rand(0.0)?];
            let c = |t: &Tensor| Dual::constant(t.clone());
            let (value, grad, scale) = compare(
                &inputs,
                &|t| Ok(relu_linear_attention(&c(&t[0]), &c(&t[1]), &c(&t[2]))?.primal),
                &|t| Ok(relu_linear_attention_composed(&c(&t[0]), &c(&t[1]), &c(&t[2]))?.primal),
            )?;
            assert_eq!(value, 0.0, "{dtype:?}: the forward is the composed forward");
            assert!(grad <= tol * scale, "{dtype:?}: gradients differ by {grad}");
        }
        Ok(())
    }

    #[test]
    fn fused_softmax_matches_the_composed_ops_in_value_and_gradients() -> Result<()> {
        use crate::nn::fused::tests::compare;
        use candle_core::{DType, Device};
        let dev = Device::Cpu;
        for dtype in [DType::F64, DType::F32] {
            let tol = if dtype == DType::F64 { 1e-12 } else { 2e-5 };
            let scores = Tensor::randn(0f64, 3., (2, 3, 5, 9), &dev)?.to_dtype(dtype)?;
            // a padding mask over the last 4 keys, broadcast over heads and queries
            let mask: Vec<f64> = (0..2 * 9)
                .map(|i| if i % 9 >= 5 { -1e4 } else { 0. })
                .collect();
            let bias = Tensor::from_vec(mask, (2, 1, 1, 9), &dev)?.to_dtype(dtype)?;
            for bias in [None, Some(bias)] {
                let (value, grad, scale) = compare(
                    std::slice::from_ref(&scores),
                    &|t| scaled_softmax(&t[0], 0.3, bias.clone()),
                    &|t| {
                        Ok(scaled_softmax_composed(
                            &Dual::constant(t[0].clone()),
                            0.3,
                            bias.as_ref(),
                        )?
                        .primal)
                    },
                )?;
                let masked = bias.is_some();
                assert_eq!(
                    value, 0.0,
                    "{dtype:?} mask {masked}: the forward is the composed forward"
                );
                assert!(
                    grad <= tol * scale,
                    "{dtype:?} mask {masked}: gradients differ by {grad}"
                );
            }
        }
        Ok(())
    }
}
