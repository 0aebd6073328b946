//! One graph node for a chain of ops: the training forward's memory diet.
//!
//! candle's backward keeps every node of the forward graph, and with it every intermediate tensor, until the
//! step's backward ends, whether or not its gradient rule needs it. A LayerNorm written as tensor ops keeps the
//! centred input, its square and the normalised output; a softmax keeps five score-sized tensors. PyTorch's
//! autograd keeps only what each backward formula reads.
//!
//! [`attach`] closes that gap for a chain of ops whose backward we write by hand: the chain's value is computed
//! from detached inputs (no graph, so its intermediates are freed as it goes), then handed to a single custom
//! op whose arguments are the chain's inputs and whose backward is the hand-written rule. The graph keeps the
//! inputs (which it usually holds anyway) and one output. The value is the very tensor the composed ops
//! produce — the forward is bitwise the same — and it costs one copy of the output. Nothing here is
//! device-specific: the value is built with ordinary tensor ops and copied with the backend's strided copy, so
//! the CPU tests exercise exactly what runs on a GPU.
//!
//! The chains fused this way (each with its own gradient test in its module): LayerNorm + modulation and
//! RMSNorm (`nn::norm`), the scaled, masked softmax and the ReLU linear attention (`nn::attention`), the gated
//! residual update (here), and the GLUMBConv depthwise conv + bias + gate (`nn::depthwise`).

use std::sync::Mutex;

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::Tensor;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Storage,
};

use crate::nn::dual::Dual;

/// A hand-written backward: (the chain's inputs, its output, the output's gradient) → one gradient per input
/// (`None` for an input that needs none).
pub type Backward =
    dyn Fn(&[&Tensor], &Tensor, &Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync;

/// The custom op behind [`attach`]: its forward hands over the precomputed value (taken, so the op does not
/// keep it), its backward is the chain's rule.
struct Attached {
    name: &'static str,
    value: Mutex<Option<Tensor>>,
    backward: Box<Backward>,
}

impl Attached {
    /// A contiguous copy of the value on the backend of `S`.
    fn take<S>(&self, pick: impl Fn(&Storage) -> Option<&S>) -> Result<(S, Shape)>
    where
        S: BackendStorage,
        S::Device: BackendDevice<Storage = S>,
    {
        let value = self
            .value
            .lock()
            .expect("fused value lock")
            .take()
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: forward ran twice", self.name)))?;
        let (storage, layout) = value.storage_and_layout();
        let Some(s) = pick(&storage) else {
            bail!(
                "{}: the value is on another device than the inputs",
                self.name
            )
        };
        let mut dst = s.device().zeros_impl(layout.shape(), s.dtype())?;
        s.copy_strided_src(&mut dst, 0, layout)?;
        Ok((dst, layout.shape().clone()))
    }

    fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        self.take(|s| match s {
            Storage::Cpu(s) => Some(s),
            _ => None,
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        self.take(|s| match s {
            Storage::Cuda(s) => Some(s),
            _ => None,
        })
    }

    fn grads<const N: usize>(
        &self,
        args: [&Tensor; N],
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<[Option<Tensor>; N]> {
        let grads = (self.backward)(&args, res, grad)?;
        grads.try_into().map_err(|g: Vec<_>| {
            candle_core::Error::Msg(format!(
                "{}: backward gave {} gradients for {N} inputs",
                self.name,
                g.len()
            ))
        })
    }
}

impl CustomOp1 for Attached {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda()
    }
    fn bwd(&self, a: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let [ga] = self.grads([a], res, grad)?;
        Ok(ga)
    }
}

impl CustomOp2 for Attached {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda()
    }
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [ga, gb] = self.grads([a, b], res, grad)?;
        Ok((ga, gb))
    }
}

impl CustomOp3 for Attached {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu()
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda()
    }
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [ga, gb, gc] = self.grads([a, b, c], res, grad)?;
        Ok((ga, gb, gc))
    }
}

/// `value` (computed from detached copies of `inputs`) as the output of one graph node over `inputs` whose
/// backward is `backward`. Returns `value` itself when no input carries a graph. One to three inputs.
pub fn attach(
    name: &'static str,
    value: Tensor,
    inputs: &[&Tensor],
    backward: impl Fn(&[&Tensor], &Tensor, &Tensor) -> Result<Vec<Option<Tensor>>>
        + Send
        + Sync
        + 'static,
) -> Result<Tensor> {
    if !inputs.iter().any(|t| t.track_op()) {
        return Ok(value);
    }
    let op = Attached {
        name,
        value: Mutex::new(Some(value)),
        backward: Box::new(backward),
    };
    match inputs {
        [a] => a.apply_op1(op),
        [a, b] => a.apply_op2(b, op),
        [a, b, c] => a.apply_op3(b, c, op),
        _ => bail!(
            "{name}: attach takes one to three inputs, got {}",
            inputs.len()
        ),
    }
}

/// `t` summed down to `shape` (the gradient of a broadcast): leading dims `shape` lacks are summed away, dims
/// where `shape` has 1 are summed with keepdim.
pub fn sum_to(t: &Tensor, shape: &Shape) -> Result<Tensor> {
    let mut t = t.clone();
    while t.rank() > shape.rank() {
        t = t.sum(0)?;
    }
    for (d, &want) in shape.dims().iter().enumerate() {
        if want == 1 && t.dim(d)? != 1 {
            t = t.sum_keepdim(d)?;
        }
    }
    Ok(t)
}

/// `x + gate·y` with `gate` broadcast over `y` (a block's gated residual update), as one graph node when no
/// tangent is carried: the product is not kept for backward.
pub fn gated_residual(x: &Dual, gate: &Dual, y: &Dual) -> Result<Dual> {
    if x.tangent.is_some() || gate.tangent.is_some() || y.tangent.is_some() {
        return x.add(&gate.mul(y)?);
    }
    let (xd, gd, yd) = (x.primal.detach(), gate.primal.detach(), y.primal.detach());
    let value = xd.broadcast_add(&gd.broadcast_mul(&yd)?)?;
    let primal = attach(
        "gated-residual",
        value,
        &[&x.primal, &gate.primal, &y.primal],
        |args, _res, grad| {
            let (x, gate, y) = (args[0], args[1].detach(), args[2].detach());
            let grad_x = sum_to(grad, x.shape())?;
            let grad_gate = sum_to(&grad.broadcast_mul(&y)?, gate.shape())?;
            let grad_y = sum_to(&grad.broadcast_mul(&gate)?, y.shape())?;
            Ok(vec![Some(grad_x), Some(grad_gate), Some(grad_y)])
        },
    )?;
    Ok(Dual::constant(primal))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// Runs `f` on Var copies of `inputs` twice — as given (`fused`) and with the same maths composed
    /// (`composed`) — and returns (max |value difference|, max |gradient difference| over the inputs,
    /// largest gradient magnitude) under the loss Σ out ⊙ w for a fixed random w.
    pub(crate) fn compare(
        inputs: &[Tensor],
        fused: &dyn Fn(&[Tensor]) -> Result<Tensor>,
        composed: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<(f64, f64, f64)> {
        let run = |f: &dyn Fn(&[Tensor]) -> Result<Tensor>| -> Result<(Tensor, Vec<Tensor>)> {
            let vars: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let out = f(&ts)?;
            let w = Tensor::arange(0u32, out.elem_count() as u32, out.device())?
                .to_dtype(DType::F64)?
                .affine(0.37, 0.)?
                .sin()?
                .reshape(out.shape())?
                .to_dtype(out.dtype())?;
            let grads = (&out * &w)?.sum_all()?.backward()?;
            let gs = ts
                .iter()
                .map(|t| {
                    grads
                        .get(t)
                        .cloned()
                        .ok_or_else(|| candle_core::Error::Msg("no grad".into()))
                })
                .collect::<Result<Vec<_>>>()?;
            Ok((out.detach(), gs))
        };
        let max = |a: &Tensor, b: &Tensor| -> Result<f64> {
            (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f64>()
        };
        let (fv, fg) = run(fused)?;
        let (cv, cg) = run(composed)?;
        let mut grad_err = 0f64;
        let mut grad_scale = 0f64;
        for (a, b) in fg.iter().zip(&cg) {
            grad_err = grad_err.max(max(a, b)?);
            grad_scale = grad_scale.max(
                b.to_dtype(DType::F64)?
                    .abs()?
                    .flatten_all()?
                    .max(0)?
                    .to_scalar::<f64>()?,
            );
        }
        Ok((max(&fv, &cv)?, grad_err, grad_scale))
    }

    #[test]
    fn gated_residual_matches_the_composed_ops_in_value_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let inputs = [
            Tensor::randn(0f64, 1., (2, 5, 6), &dev)?,
            Tensor::randn(0f64, 1., (2, 1, 6), &dev)?,
            Tensor::randn(0f64, 1., (2, 5, 6), &dev)?,
        ];
        let c = |t: &[Tensor]| -> Vec<Dual> { t.iter().cloned().map(Dual::constant).collect() };
        let (value, grad, scale) = compare(
            &inputs,
            &|t| Ok(gated_residual(&c(t)[0], &c(t)[1], &c(t)[2])?.primal),
            &|t| Ok(c(t)[0].add(&c(t)[1].mul(&c(t)[2])?)?.primal),
        )?;
        assert_eq!(
            value, 0.0,
            "the forward is the composed forward, bit for bit"
        );
        assert!(grad <= 1e-12 * scale.max(1.0), "gradients differ by {grad}");
        Ok(())
    }

    #[test]
    fn the_fused_node_keeps_only_its_output() -> Result<()> {
        // the gated residual's graph: one node over the three inputs, no product node
        let dev = Device::Cpu;
        let v = |shape: (usize, usize, usize)| {
            Var::from_tensor(&Tensor::zeros(shape, DType::F32, &dev).unwrap()).unwrap()
        };
        let (x, g, y) = (v((1, 4, 3)), v((1, 1, 3)), v((1, 4, 3)));
        let out = gated_residual(
            &Dual::constant(x.as_tensor().clone()),
            &Dual::constant(g.as_tensor().clone()),
            &Dual::constant(y.as_tensor().clone()),
        )?;
        assert_eq!(out.primal.sorted_nodes().len(), 4, "output + three inputs");
        let composed = x
            .as_tensor()
            .broadcast_add(&g.as_tensor().broadcast_mul(y.as_tensor())?)?;
        assert!(composed.sorted_nodes().len() > 4);
        Ok(())
    }
}
