//! The two depthwise 2-D convolutions (groups == channels, stride 1), both as sums of k² shifted slices of the
//! zero-padded input times per-channel tap weights:
//! - [`depthwise_conv2d_channels_last`]: a [`Dual`] op on channels-last (B, H, W, C) tokens (SANA's GLUMBConv),
//!   with a custom backward that keeps the graph small;
//! - [`depthwise_conv2d`]: NCHW (DC-AE), chunked over channels on the CPU.

use candle_core::{bail, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::nn::conv::pad2d;
use crate::nn::depthwise_cpu;
use crate::nn::dual::Dual;
use crate::nn::fused::attach;

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
            let value = conv(&t.detach(), &taps.detach(), kh, kw)?;
            value.apply_op3(t, weight, DepthwiseConvBackward { kh, kw })
        } else {
            conv(t, &taps, kh, kw)
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

/// A depthwise weight (C, 1, kh, kw) in `dtype` from per-tap rows (kh·kw, C): the inverse of [`conv_taps`].
fn taps_to_weight(
    taps: &Tensor,
    kh: usize,
    kw: usize,
    dtype: candle_core::DType,
) -> Result<Tensor> {
    let c = taps.dim(1)?;
    taps.t()?.reshape((c, 1, kh, kw))?.to_dtype(dtype)
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

/// Depthwise conv of channels-last t (B, H, W, C) with taps (kh·kw, C): the CPU kernel where it serves
/// (f32/f64 on the CPU, no graph to record), else [`shifted_sum_conv`]. Both sum the taps in the same order
/// from zero, so they agree bitwise.
fn conv(t: &Tensor, taps: &Tensor, kh: usize, kw: usize) -> Result<Tensor> {
    if !t.track_op() && !taps.track_op() {
        if let Some(out) = depthwise_cpu::conv(t, taps, kh, kw)? {
            return Ok(out);
        }
    }
    shifted_sum_conv(t, taps, kh, kw)
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
        let (grad_x, grad_w) = conv_grads(x, weight, grad, self.kh, self.kw)?;
        Ok((None, Some(grad_x), Some(grad_w)))
    }
}

/// Gradients of the channels-last depthwise conv of x (B, H, W, C) with `weight` (C, 1, kh, kw) given the
/// output's gradient: dx = conv(dy, flipped kernel), dw[c, i, j] = Σ x_pad[·, y+i, x+j, c]·dy[·, y, x, c].
fn conv_grads(
    x: &Tensor,
    weight: &Tensor,
    grad: &Tensor,
    kh: usize,
    kw: usize,
) -> Result<(Tensor, Tensor)> {
    let (x, g) = (x.detach(), grad.detach().to_dtype(x.dtype())?);
    let taps = conv_taps(&weight.detach())?;
    if let Some((grad_x, dtaps)) = depthwise_cpu::conv_grads(&x, &taps, &g, kh, kw)? {
        return Ok((grad_x, taps_to_weight(&dtaps, kh, kw, weight.dtype())?));
    }
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
    let grad_w = taps_to_weight(&Tensor::stack(&per_tap, 0)?, kh, kw, weight.dtype())?;
    Ok((grad_x, grad_w))
}

/// The middle of SANA's GLUMBConv on channels-last p (B, H, W, 2C), the inverted 1×1 conv's output: silu, the
/// depthwise conv plus bias, split into halves h and gate along the channels, then h ⊙ silu(gate) → (B, H, W, C).
///
/// Without a tangent it is one graph node over (p, weight, bias) that keeps only its output (`nn::fused`): the
/// composed form keeps silu(p), the conv's output twice, the biased output, silu(gate) and the product, the
/// largest activations of a SANA block. Backward recomputes s = silu(p) and d = conv(s) + bias, then
/// dh = g ⊙ silu(gate), dgate = g ⊙ h ⊙ σ(gate)·(1 + gate·(1 − σ(gate))), db = Σ [dh, dgate], the conv's own
/// gradients of [dh, dgate], and dp = ds ⊙ σ(p)·(1 + p·(1 − σ(p))). On the CPU (f32/f64) the forward and the
/// backward are each one pass of `nn::depthwise_cpu`'s kernels (the forward bitwise the composed ops'); elsewhere
/// they are tensor ops.
pub fn silu_depthwise_glu(p: &Dual, weight: &Tensor, bias: &Tensor) -> Result<Dual> {
    let composed = |p: &Dual, weight: &Tensor, bias: &Tensor| -> Result<Dual> {
        let d = depthwise_conv2d_channels_last(&p.silu()?, weight, Some(bias))?;
        let c = d.dims()[3] / 2;
        let (h, gate) = (d.narrow(3, 0, c)?, d.narrow(3, c, c)?);
        h.mul(&gate.silu()?)
    };
    if p.tangent.is_some() {
        return composed(p, weight, bias);
    }
    let (_, _, kh, kw) = weight.dims4()?;
    let taps = conv_taps(&weight.detach())?;
    let value =
        match depthwise_cpu::silu_gated_conv(&p.primal.detach(), &taps, &bias.detach(), kh, kw)? {
            Some(value) => value,
            None => composed(&p.detached_constant(), &weight.detach(), &bias.detach())?.primal,
        };
    let primal = attach(
        "silu-depthwise-glu",
        value,
        &[&p.primal, weight, bias],
        move |args, _res, grad| {
            let (p, weight, bias) = (args[0].detach(), args[1].detach(), args[2].detach());
            let taps = conv_taps(&weight)?;
            let (grad_p, grad_w, grad_bias) =
                match depthwise_cpu::silu_gated_conv_backward(&p, &taps, &bias, grad, kh, kw)? {
                    Some((grad_p, dtaps, grad_bias)) => (
                        grad_p,
                        taps_to_weight(&dtaps, kh, kw, weight.dtype())?,
                        grad_bias,
                    ),
                    None => silu_gated_conv_backward_ops(&p, &weight, &taps, &bias, grad)?,
                };
            Ok(vec![
                Some(grad_p),
                Some(grad_w),
                Some(grad_bias.to_dtype(bias.dtype())?),
            ])
        },
    )?;
    Ok(Dual::constant(primal))
}

/// The backward of [`silu_depthwise_glu`] as tensor ops (a GPU, half types): gradients of p, the weight (in its
/// own layout) and the bias, recomputing s = silu(p) and d = conv(s) + bias.
fn silu_gated_conv_backward_ops(
    p: &Tensor,
    weight: &Tensor,
    taps: &Tensor,
    bias: &Tensor,
    grad: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (_, _, kh, kw) = weight.dims4()?;
    let g = grad.to_dtype(p.dtype())?;
    let sigmoid = |t: &Tensor| (t.neg()?.exp()? + 1.)?.recip();
    let s = p.silu()?;
    let d = conv(&s, taps, kh, kw)?.broadcast_add(bias)?;
    let c = d.dim(3)? / 2;
    let (h, gate) = (d.narrow(3, 0, c)?, d.narrow(3, c, c)?);
    let sig = sigmoid(&gate)?;
    let slope = ((&gate * sig.affine(-1., 1.)?)? + 1.)?;
    let grad_h = (&g * gate.silu()?)?;
    let grad_gate = ((&g * &h)? * (sig * slope)?)?;
    let grad_d = Tensor::cat(&[&grad_h, &grad_gate], 3)?;
    let grad_bias = grad_d.sum((0, 1, 2))?;
    let (grad_s, grad_w) = conv_grads(&s, weight, &grad_d, kh, kw)?;
    let sig_p = sigmoid(p)?;
    let silu_slope = ((p * sig_p.affine(-1., 1.)?)? + 1.)?;
    let grad_p = (grad_s * (sig_p * silu_slope)?)?;
    Ok((grad_p, grad_w, grad_bias))
}

/// Elements per channel chunk of [`depthwise_conv2d`] on the CPU: small enough for its k² passes to stay in
/// the L2 cache (6-8x faster than whole-tensor passes at the DC-AE's 4096-8192 channels).
const DEPTHWISE_CHUNK_ELEMS: usize = 32 * 1024;

/// Depthwise 2-D convolution (groups == channels, stride 1, zero padding `padding` on every side).
///
/// Computed as the sum over the `kh·kw` taps of a shifted slice of the padded input times the per-channel
/// tap weight; candle's grouped `conv2d` would run one convolution per channel instead. On the CPU the
/// channels are processed in cache-sized chunks in parallel.
/// `x`: (B, C, H, W); `weight`: (C, 1, kh, kw) as stored by PyTorch; `bias`: (C,).
pub fn depthwise_conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (wc, per_group, kh, kw) = weight.dims4()?;
    if wc != c || per_group != 1 {
        bail!(
            "depthwise_conv2d: weight {:?} does not fit {c} input channels (expected ({c}, 1, kh, kw))",
            weight.dims()
        )
    }
    if h + 2 * padding < kh || w + 2 * padding < kw {
        bail!("depthwise_conv2d: kernel {kh}x{kw} larger than the padded {h}x{w} input")
    }
    let plane = b * (h + 2 * padding + 1) * (w + 2 * padding);
    let chunk = (DEPTHWISE_CHUNK_ELEMS / plane).max(1);
    if !x.device().is_cpu() || chunk >= c {
        return depthwise_shifted_sum(x, weight, bias, padding);
    }
    let starts: Vec<usize> = (0..c).step_by(chunk).collect();
    let parts = starts
        .into_par_iter()
        .map(|start| {
            let n = chunk.min(c - start);
            let bias = bias.map(|b| b.narrow(0, start, n)).transpose()?;
            depthwise_shifted_sum(
                &x.narrow(1, start, n)?,
                &weight.narrow(0, start, n)?,
                bias.as_ref(),
                padding,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&parts, 1)
}

/// [`depthwise_conv2d`] on all channels at once. On the padded input flattened to (C, rows·cols), tap
/// (ky, kx) of every output pixel is one contiguous window starting at ky·cols + kx, so each tap is a single
/// long strided pass; the output is computed on full padded rows and cropped.
fn depthwise_shifted_sum(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (_, _, kh, kw) = weight.dims4()?;
    let (rows, cols) = (h + 2 * padding, w + 2 * padding);
    let (out_h, out_w) = (rows + 1 - kh, cols + 1 - kw);
    // One extra zero row at the bottom keeps the last tap's window inside the buffer.
    let flat =
        pad2d(x, padding, padding + 1, padding, padding)?.reshape((b, c, (rows + 1) * cols))?;
    let taps = weight.reshape((1, c, kh * kw))?;
    let mut acc: Option<Tensor> = None;
    for ky in 0..kh {
        for kx in 0..kw {
            let term = flat
                .narrow(2, ky * cols + kx, out_h * cols)?
                .broadcast_mul(&taps.narrow(2, ky * kw + kx, 1)?)?;
            acc = Some(match acc {
                None => term,
                Some(acc) => (acc + term)?,
            });
        }
    }
    let out = acc
        .expect("a kernel has at least one tap")
        .reshape((b, c, out_h, cols))?
        .narrow(3, 0, out_w)?;
    match bias {
        Some(bias) => out.broadcast_add(&bias.reshape((1, c, 1, 1))?),
        None => out.contiguous(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::dual::tests::check_rule;
    use crate::nn::test_util::max_abs_diff;
    use candle_core::Device;

    #[test]
    fn fused_silu_depthwise_glu_matches_the_composed_ops_in_value_and_gradients() -> Result<()> {
        use crate::nn::fused::tests::compare;
        use candle_core::{DType, Device};
        let dev = Device::Cpu;
        for dtype in [DType::F64, DType::F32] {
            let tol = if dtype == DType::F64 { 1e-12 } else { 2e-5 };
            let rand = |shape: &[usize]| Tensor::randn(0f64, 1., shape, &dev)?.to_dtype(dtype);
            // a (B, H, W, 2C) input on a non-square grid, the depthwise weight and bias
            let inputs = [rand(&[2, 3, 5, 8])?, rand(&[8, 1, 3, 3])?, rand(&[8])?];
            let (value, grad, scale) = compare(
                &inputs,
                &|t| Ok(silu_depthwise_glu(&Dual::constant(t[0].clone()), &t[1], &t[2])?.primal),
                &|t| {
                    let d = depthwise_conv2d_channels_last(
                        &Dual::constant(t[0].clone()).silu()?,
                        &t[1],
                        Some(&t[2]),
                    )?;
                    Ok(d.narrow(3, 0, 4)?.mul(&d.narrow(3, 4, 4)?.silu()?)?.primal)
                },
            )?;
            assert_eq!(value, 0.0, "{dtype:?}: the forward is the composed forward");
            assert!(grad <= tol * scale, "{dtype:?}: gradients differ by {grad}");
        }
        Ok(())
    }

    /// The CPU kernels (f32/f64) against the tensor-op path that a GPU runs: the conv bitwise, the conv's and
    /// the gated conv's gradients to rounding (relative to the largest gradient: 1e-12 in f64, 1e-5 in f32).
    #[test]
    fn cpu_kernels_match_the_tensor_op_path() -> Result<()> {
        use crate::nn::depthwise_cpu::tests::with_tensor_ops_only;
        use candle_core::{DType, Var};
        let dev = Device::Cpu;
        for dtype in [DType::F64, DType::F32] {
            let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
            // a non-square grid, batch 2, and a 5x5 kernel wider than the grid
            for (k, shape) in [(3usize, [2usize, 5, 4, 6]), (5, [1, 3, 7, 4])] {
                let c = shape[3];
                let rand = |s: &[usize]| Tensor::randn(0f64, 1., s, &dev)?.to_dtype(dtype);
                let (x, w, b) = (rand(&shape)?, rand(&[c, 1, k, k])?, rand(&[c])?);
                let cot_conv = rand(&shape)?;
                let cot_glu = rand(&[shape[0], shape[1], shape[2], c / 2])?;
                let run = || -> Result<Vec<Tensor>> {
                    let frozen =
                        depthwise_conv2d_channels_last(&Dual::constant(x.clone()), &w, None)?;
                    let (xv, wv, bv) = (
                        Var::from_tensor(&x)?,
                        Var::from_tensor(&w)?,
                        Var::from_tensor(&b)?,
                    );
                    let xd = Dual::constant(xv.as_tensor().clone());
                    let conv = depthwise_conv2d_channels_last(&xd, wv.as_tensor(), None)?.primal;
                    let gc = (conv * &cot_conv)?.sum_all()?.backward()?;
                    let glu = silu_depthwise_glu(&xd, wv.as_tensor(), bv.as_tensor())?.primal;
                    let gg = (&glu * &cot_glu)?.sum_all()?.backward()?;
                    let grad = |g: &candle_core::backprop::GradStore, v: &Var| {
                        g.get(v.as_tensor()).cloned().expect("a gradient")
                    };
                    Ok(vec![
                        frozen.primal,
                        glu,
                        grad(&gc, &xv),
                        grad(&gc, &wv),
                        grad(&gg, &xv),
                        grad(&gg, &wv),
                        grad(&gg, &bv),
                    ])
                };
                let native = run()?;
                let tensor_ops = with_tensor_ops_only(run)?;
                let names = [
                    "conv",
                    "silu gated conv",
                    "conv dx",
                    "conv dw",
                    "glu dx",
                    "glu dw",
                    "glu db",
                ];
                for ((name, a), b) in names.iter().zip(&native).zip(&tensor_ops) {
                    let err = (a - b)?
                        .abs()?
                        .max_all()?
                        .to_dtype(DType::F64)?
                        .to_scalar::<f64>()?;
                    let scale = b
                        .abs()?
                        .max_all()?
                        .to_dtype(DType::F64)?
                        .to_scalar::<f64>()?;
                    if name.ends_with("conv") {
                        assert_eq!(
                            err, 0.0,
                            "{dtype:?} k{k}: {name} is bitwise the tensor ops'"
                        );
                    } else {
                        assert!(
                            err <= tol * scale,
                            "{dtype:?} k{k}: {name} differs by {err} (scale {scale})"
                        );
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn channels_last_tangent_rule_agrees_with_central_differences() -> Result<()> {
        let wk = Tensor::randn(0f64, 0.3, (8, 1, 3, 3), &Device::Cpu)?;
        check_rule("depthwise conv", &[1, 4, 5, 8], &|x| {
            depthwise_conv2d_channels_last(x, &wk, None)
        })
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
        let err = crate::nn::test_util::max_abs_diff(&got, &want);
        assert!(err < 1e-5, "max abs error {err}");
        Ok(())
    }

    #[test]
    fn depthwise_matches_grouped_conv2d() -> Result<()> {
        let dev = Device::Cpu;
        for (b, c, h, w, k, pad) in [(1, 6, 7, 5, 3, 1), (2, 4, 6, 6, 5, 2), (1, 3, 4, 9, 3, 0)] {
            let x = Tensor::randn(0f32, 1., (b, c, h, w), &dev)?;
            let weight = Tensor::randn(0f32, 1., (c, 1, k, k), &dev)?;
            let bias = Tensor::randn(0f32, 1., c, &dev)?;
            let ours = depthwise_conv2d(&x, &weight, Some(&bias), pad)?;
            let reference = x
                .conv2d(&weight, pad, 1, 1, c)?
                .broadcast_add(&bias.reshape((1, c, 1, 1))?)?;
            assert_eq!(ours.dims(), reference.dims());
            assert!(max_abs_diff(&ours, &reference) < 1e-5);
        }
        Ok(())
    }
}
