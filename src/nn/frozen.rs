//! `x · Wᵀ` for a frozen weight W: the same product as `Tensor::matmul`, but backward gives only x its gradient.
//!
//! candle's backward computes a gradient for both operands of a matmul even when one of them is a constant
//! (it stores it and never uses it). In the generator phase the LADD loss back-propagates through the frozen
//! teacher's 20 blocks, so every teacher linear layer would cost one extra weight-sized matmul in backward and
//! keep a teacher-sized set of useless gradients alive until the step ends. This op skips both.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

struct FrozenRhsMatmul;

impl FrozenRhsMatmul {
    fn dims(l1: &Layout, l2: &Layout) -> Result<(usize, usize, usize)> {
        let (m, k) = l1.shape().dims2()?;
        let (k2, n) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("frozen matmul: inner dims differ ({k} vs {k2})");
        }
        Ok((m, n, k))
    }
}

impl CustomOp2 for FrozenRhsMatmul {
    fn name(&self) -> &'static str {
        "frozen-rhs-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (m, n, k) = Self::dims(l1, l2)?;
        Ok((s1.matmul(s2, (1, m, n, k), l1, l2)?, Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (m, n, k) = Self::dims(l1, l2)?;
        Ok((s1.matmul(s2, (1, m, n, k), l1, l2)?, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        rhs: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(&rhs.t()?)?), None))
    }
}

/// `x (M, K) · rhs (K, N)` where `rhs` carries no graph: x gets its gradient, `rhs` none. Falls back to the
/// plain matmul when x carries no graph either (nothing to save) or when `rhs` does (it needs its gradient).
pub fn matmul_frozen_rhs(x: &Tensor, rhs: &Tensor) -> Result<Tensor> {
    if x.track_op() && !rhs.track_op() {
        x.apply_op2(rhs, FrozenRhsMatmul)
    } else {
        x.matmul(rhs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn same_product_and_input_gradient_without_weight_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (5, 7), &dev)?)?;
        let w = Tensor::randn(0f32, 1., (3, 7), &dev)?;
        let cot = Tensor::randn(0f32, 1., (5, 3), &dev)?;
        let plain = x.as_tensor().matmul(&w.t()?)?;
        let frozen = matmul_frozen_rhs(x.as_tensor(), &w.t()?)?;
        let diff = (&plain - &frozen)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        let wt = w.t()?;
        let g_plain = (x.as_tensor().matmul(&wt)? * &cot)?.sum_all()?.backward()?;
        let g_frozen = (matmul_frozen_rhs(x.as_tensor(), &wt)? * &cot)?
            .sum_all()?
            .backward()?;
        drop((plain, frozen));
        let (a, b) = (
            g_plain.get(x.as_tensor()).unwrap(),
            g_frozen.get(x.as_tensor()).unwrap(),
        );
        assert!((a - b)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-5);
        // the plain matmul stores a gradient for the constant weight; the frozen one does not
        assert!(g_plain.get(&wt).is_some());
        assert!(g_frozen.get(&wt).is_none());
        Ok(())
    }
}
