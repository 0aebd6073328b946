//! CPU kernels of the channels-last depthwise convolution (SANA's GLUMBConv) and of its gated backward.
//!
//! Written as tensor ops, the conv's backward is k² shifted products and reductions over activation-sized
//! tensors, most of them single-threaded in candle: one real-width 1.6B block spent 1.8 s of a 5.5 s
//! forward + backward there (docs/ALGORITHM.md §10). These loops read each pixel's channels as one contiguous
//! run, split the work over output rows with rayon and make one pass where the tensor ops made dozens.
//!
//! They serve f32 and f64 tensors on the CPU; every function answers `None` for anything else (another device,
//! a half type), and the caller then takes the tensor-op path, which is also what runs on a GPU. Tensors are
//! channels-last: (B, H, W, C) activations, taps (kh·kw, C) with tap (dy, dx) at row dy·kw + dx, stride 1,
//! zero padding k/2 on each side (odd k).

use candle_core::{DType, Device, Layout, Result, Storage, Tensor, WithDType};
use rayon::prelude::*;

/// A float type these kernels run in.
pub(crate) trait Real: WithDType + std::ops::Neg<Output = Self> {
    fn exp(self) -> Self;
}

impl Real for f32 {
    fn exp(self) -> Self {
        f32::exp(self)
    }
}

impl Real for f64 {
    fn exp(self) -> Self {
        f64::exp(self)
    }
}

/// silu(v) = v·σ(v), written as candle's CPU kernel writes it (so the forward matches its bitwise).
#[inline]
fn silu<T: Real>(v: T) -> T {
    v / (T::one() + (-v).exp())
}

/// silu of every element, in parallel.
fn silu_all<T: Real>(p: &[T]) -> Vec<T> {
    p.par_iter().map(|&v| silu(v)).collect()
}

/// The shape of one conv: batch, rows, columns, channels, kernel.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    h: usize,
    w: usize,
    c: usize,
    kh: usize,
    kw: usize,
}

impl Geometry {
    fn new(dims: (usize, usize, usize, usize), kh: usize, kw: usize) -> Self {
        let (_, h, w, c) = dims;
        Self { h, w, c, kh, kw }
    }

    fn row_len(&self) -> usize {
        self.w * self.c
    }

    /// Calls `f(tap index, first element of the input pixel it reads)` for each tap of output pixel (y, x) of
    /// image `bi` that lands inside the input, taps in row-major order.
    #[inline]
    fn for_taps(&self, bi: usize, y: usize, x: usize, mut f: impl FnMut(usize, usize)) {
        let (ph, pw) = (self.kh / 2, self.kw / 2);
        // input row y + dy - ph and column x + dx - pw must lie inside the image
        let dys = ph.saturating_sub(y)..self.kh.min(self.h + ph - y);
        let dxs = pw.saturating_sub(x)..self.kw.min(self.w + pw - x);
        for dy in dys {
            let row = (bi * self.h + y + dy - ph) * self.w;
            for dx in dxs.clone() {
                f(dy * self.kw + dx, (row + x + dx - pw) * self.c);
            }
        }
    }
}

/// o += a ⊙ b, elementwise over equal-length slices.
#[inline]
fn add_product<T: Real>(o: &mut [T], a: &[T], b: &[T]) {
    for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
        *o += a * b;
    }
}

/// `out` (one pixel's channels) = Σ over the taps of input · tap weight, taps in row-major order; the sum
/// starts from zero, so it equals the tensor ops' k² shifted products summed in that order.
fn conv_pixel<T: Real>(
    g: &Geometry,
    input: &[T],
    taps: &[T],
    bi: usize,
    y: usize,
    x: usize,
    out: &mut [T],
) {
    out.fill(T::zero());
    g.for_taps(bi, y, x, |t, start| {
        add_product(
            out,
            &input[start..start + g.c],
            &taps[t * g.c..(t + 1) * g.c],
        );
    });
}

/// The conv of `input` with `taps` into `out`, both (B, H, W, C), one output row per rayon task.
fn conv_into<T: Real>(g: &Geometry, input: &[T], taps: &[T], out: &mut [T]) {
    out.par_chunks_mut(g.row_len())
        .enumerate()
        .for_each(|(r, row)| {
            let (bi, y) = (r / g.h, r % g.h);
            for (x, pixel) in row.chunks_mut(g.c).enumerate() {
                conv_pixel(g, input, taps, bi, y, x, pixel);
            }
        });
}

/// Row groups of the weight-gradient reduction: a fixed number, so that its rounding does not depend on the
/// number of threads (enough groups for 16 threads).
const REDUCTION_GROUPS: usize = 16;

/// The taps of the kernel flipped in both spatial dims (the tap rows in reverse order): the conv with them is
/// the transposed conv, i.e. the input's gradient.
fn flipped<T: Real>(g: &Geometry, taps: &[T]) -> Vec<T> {
    taps.chunks(g.c).rev().flatten().copied().collect()
}

/// Input and weight gradients of the conv given the output's gradient `grad`: (dx, dtaps, Σ grad per channel).
/// dx = conv(grad, flipped taps); dtaps[t, c] = Σ over output pixels of grad · the input pixel tap t reads.
fn conv_grads_into<T: Real>(
    g: &Geometry,
    x: &[T],
    taps: &[T],
    grad: &[T],
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let taps_flipped = flipped(g, taps);
    let mut dx = vec![T::zero(); x.len()];
    let n_taps = g.kh * g.kw;
    // Fixed groups of rows, each giving its rows of dx and its partial tap and bias sums, then the partials
    // summed in group order: the same rounding on every run and any number of threads (a run resumed from a
    // checkpoint must reproduce the uninterrupted one bit for bit).
    let rows = x.len() / g.row_len();
    let rows_per_group = rows.div_ceil(REDUCTION_GROUPS).max(1);
    let partials: Vec<Vec<T>> = dx
        .par_chunks_mut(rows_per_group * g.row_len())
        .enumerate()
        .map(|(group, chunk)| {
            let mut acc = vec![T::zero(); (n_taps + 1) * g.c];
            for (i, row) in chunk.chunks_mut(g.row_len()).enumerate() {
                let r = group * rows_per_group + i;
                let (bi, y) = (r / g.h, r % g.h);
                for (xi, pixel) in row.chunks_mut(g.c).enumerate() {
                    conv_pixel(g, grad, &taps_flipped, bi, y, xi, pixel);
                    let start = (r * g.w + xi) * g.c;
                    let gp = &grad[start..start + g.c];
                    g.for_taps(bi, y, xi, |t, start| {
                        add_product(&mut acc[t * g.c..(t + 1) * g.c], &x[start..start + g.c], gp);
                    });
                    for (a, &gv) in acc[n_taps * g.c..].iter_mut().zip(gp) {
                        *a += gv;
                    }
                }
            }
            acc
        })
        .collect();
    let mut sums = vec![T::zero(); (n_taps + 1) * g.c];
    for partial in partials {
        for (s, p) in sums.iter_mut().zip(partial) {
            *s += p;
        }
    }
    let dtaps = sums[..n_taps * g.c].to_vec();
    let dbias = sums[n_taps * g.c..].to_vec();
    (dx, dtaps, dbias)
}

/// The GLU-gated conv: with d = conv(s) + bias split along the channels into h and gate, out (B, H, W, C/2)
/// = h ⊙ silu(gate), each step as the tensor ops round it.
fn gated_conv_into<T: Real>(g: &Geometry, s: &[T], taps: &[T], bias: &[T], out: &mut [T]) {
    let half = g.c / 2;
    out.par_chunks_mut(g.w * half)
        .enumerate()
        .for_each(|(r, row)| {
            let (bi, y) = (r / g.h, r % g.h);
            let mut d = vec![T::zero(); g.c];
            for (x, out) in row.chunks_mut(half).enumerate() {
                conv_pixel(g, s, taps, bi, y, x, &mut d);
                for (v, &b) in d.iter_mut().zip(bias) {
                    *v += b;
                }
                let (h, gate) = d.split_at(half);
                for ((o, &h), &gate) in out.iter_mut().zip(h).zip(gate) {
                    *o = h * silu(gate);
                }
            }
        });
}

/// The GLU gate's backward on the recomputed conv: with d = conv(s) + bias split along the channels into
/// h and gate, out = h ⊙ silu(gate); returns ∂out/∂d given the output gradient (B, H, W, C/2):
/// dh = g ⊙ silu(gate), dgate = g ⊙ h ⊙ σ(gate)·(1 + gate·(1 − σ(gate))).
fn glu_grad_into<T: Real>(g: &Geometry, s: &[T], taps: &[T], bias: &[T], grad: &[T]) -> Vec<T> {
    let half = g.c / 2;
    let one = T::one();
    let mut dd = vec![T::zero(); s.len()];
    dd.par_chunks_mut(g.row_len())
        .enumerate()
        .for_each(|(r, row)| {
            let (bi, y) = (r / g.h, r % g.h);
            let mut d = vec![T::zero(); g.c];
            for (x, out) in row.chunks_mut(g.c).enumerate() {
                conv_pixel(g, s, taps, bi, y, x, &mut d);
                for (v, &b) in d.iter_mut().zip(bias) {
                    *v += b;
                }
                let gp = &grad[(r * g.w + x) * half..(r * g.w + x + 1) * half];
                let (dh, dgate) = out.split_at_mut(half);
                for i in 0..half {
                    let (h, gate, gv) = (d[i], d[half + i], gp[i]);
                    let denom = one + (-gate).exp();
                    let sig = one / denom;
                    dh[i] = gv * (gate / denom);
                    dgate[i] = gv * h * (sig * (gate * (one - sig) + one));
                }
            }
        });
    dd
}

/// ds ⊙ silu'(p) in place: the gradient through s = silu(p), silu'(p) = σ(p)·(1 + p·(1 − σ(p))).
fn silu_backward_in_place<T: Real>(ds: &mut [T], p: &[T]) {
    let one = T::one();
    ds.par_iter_mut().zip(p).for_each(|(d, &v)| {
        let sig = one / (one + (-v).exp());
        *d *= sig * (one + v * (one - sig));
    });
}

/// A contiguous tensor's elements, if it lives on the CPU with element type T.
fn cpu_slice<'s, T: WithDType>(storage: &'s Storage, layout: &Layout) -> Result<&'s [T]> {
    let Storage::Cpu(cpu) = storage else {
        candle_core::bail!("depthwise CPU kernel: tensor is not on the CPU")
    };
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg("depthwise CPU kernel: tensor not contiguous".into())
    })?;
    Ok(&cpu.as_slice::<T>()?[start..end])
}

/// Whether the kernels serve `t` (and the others, which are brought to its dtype).
fn served(t: &Tensor) -> bool {
    #[cfg(test)]
    if tests::TENSOR_OPS_ONLY.with(|c| c.get()) {
        return false;
    }
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// The channels-last depthwise conv of t (B, H, W, C) with taps (kh·kw, C), no bias; `None` where these
/// kernels do not serve t.
pub(crate) fn conv(t: &Tensor, taps: &Tensor, kh: usize, kw: usize) -> Result<Option<Tensor>> {
    if !served(t) {
        return Ok(None);
    }
    let g = Geometry::new(t.dims4()?, kh, kw);
    fn run<T: Real>(g: &Geometry, v: &[&[T]]) -> Vec<Vec<T>> {
        let mut out = vec![T::zero(); v[0].len()];
        conv_into(g, v[0], v[1], &mut out);
        vec![out]
    }
    let out = dispatch(t.dtype(), &[t, taps], |s| match s {
        Slices::F32(v) => Outputs::F32(run(&g, &v)),
        Slices::F64(v) => Outputs::F64(run(&g, &v)),
    })?;
    let [out] = out.into_tensors([t.shape().clone()])?;
    Ok(Some(out))
}

/// The conv's gradients (dx (B, H, W, C), dtaps (kh·kw, C)) given the output gradient; `None` where these
/// kernels do not serve x.
pub(crate) fn conv_grads(
    x: &Tensor,
    taps: &Tensor,
    grad: &Tensor,
    kh: usize,
    kw: usize,
) -> Result<Option<(Tensor, Tensor)>> {
    if !served(x) {
        return Ok(None);
    }
    let g = Geometry::new(x.dims4()?, kh, kw);
    fn run<T: Real>(g: &Geometry, v: &[&[T]]) -> Vec<Vec<T>> {
        let (dx, dtaps, _) = conv_grads_into(g, v[0], v[1], v[2]);
        vec![dx, dtaps]
    }
    let out = dispatch(x.dtype(), &[x, taps, grad], |s| match s {
        Slices::F32(v) => Outputs::F32(run(&g, &v)),
        Slices::F64(v) => Outputs::F64(run(&g, &v)),
    })?;
    let [dx, dtaps] = out.into_tensors([x.shape().clone(), taps.shape().clone()])?;
    Ok(Some((dx, dtaps)))
}

/// GLUMBConv's middle on channels-last p (B, H, W, 2C), the inverted conv's output: s = silu(p),
/// [h, gate] = conv(s) + bias, out = h ⊙ silu(gate) (B, H, W, C); `None` where these kernels do not serve p.
pub(crate) fn silu_gated_conv(
    p: &Tensor,
    taps: &Tensor,
    bias: &Tensor,
    kh: usize,
    kw: usize,
) -> Result<Option<Tensor>> {
    if !served(p) {
        return Ok(None);
    }
    let g = Geometry::new(p.dims4()?, kh, kw);
    fn run<T: Real>(g: &Geometry, v: &[&[T]]) -> Vec<Vec<T>> {
        let mut out = vec![T::zero(); v[0].len() / 2];
        gated_conv_into(g, &silu_all(v[0]), v[1], v[2], &mut out);
        vec![out]
    }
    let out = dispatch(p.dtype(), &[p, taps, bias], |s| match s {
        Slices::F32(v) => Outputs::F32(run(&g, &v)),
        Slices::F64(v) => Outputs::F64(run(&g, &v)),
    })?;
    let (b, h, w, c) = p.dims4()?;
    let [out] = out.into_tensors([(b, h, w, c / 2).into()])?;
    Ok(Some(out))
}

/// The backward of [`silu_gated_conv`]: gradients of p (B, H, W, 2C), the taps (kh·kw, 2C) and the bias (2C,)
/// given the output's gradient (B, H, W, C), recomputing silu(p) and the conv; `None` where these kernels do
/// not serve p.
pub(crate) fn silu_gated_conv_backward(
    p: &Tensor,
    taps: &Tensor,
    bias: &Tensor,
    grad: &Tensor,
    kh: usize,
    kw: usize,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    if !served(p) {
        return Ok(None);
    }
    let g = Geometry::new(p.dims4()?, kh, kw);
    fn run<T: Real>(g: &Geometry, v: &[&[T]]) -> Vec<Vec<T>> {
        let s = silu_all(v[0]);
        let dd = glu_grad_into(g, &s, v[1], v[2], v[3]);
        let (mut dp, dtaps, dbias) = conv_grads_into(g, &s, v[1], &dd);
        drop((s, dd));
        silu_backward_in_place(&mut dp, v[0]);
        vec![dp, dtaps, dbias]
    }
    let out = dispatch(p.dtype(), &[p, taps, bias, grad], |v| match v {
        Slices::F32(v) => Outputs::F32(run(&g, &v)),
        Slices::F64(v) => Outputs::F64(run(&g, &v)),
    })?;
    let [dp, dtaps, dbias] = out.into_tensors([
        p.shape().clone(),
        taps.shape().clone(),
        bias.shape().clone(),
    ])?;
    Ok(Some((dp, dtaps, dbias)))
}

/// The elements of a kernel's input tensors, in one of the served dtypes.
enum Slices<'s> {
    F32(Vec<&'s [f32]>),
    F64(Vec<&'s [f64]>),
}

/// A kernel's outputs, in its input's dtype.
enum Outputs {
    F32(Vec<Vec<f32>>),
    F64(Vec<Vec<f64>>),
}

impl Outputs {
    fn into_tensors<const N: usize>(self, shapes: [candle_core::Shape; N]) -> Result<[Tensor; N]> {
        let tensors = match self {
            Outputs::F32(v) => v
                .into_iter()
                .zip(shapes)
                .map(|(v, s)| Tensor::from_vec(v, s, &Device::Cpu))
                .collect::<Result<Vec<_>>>()?,
            Outputs::F64(v) => v
                .into_iter()
                .zip(shapes)
                .map(|(v, s)| Tensor::from_vec(v, s, &Device::Cpu))
                .collect::<Result<Vec<_>>>()?,
        };
        Ok(tensors.try_into().expect("one tensor per output shape"))
    }
}

/// Runs `kernel` on the elements of `tensors`, each brought to `dtype` (f32 or f64) and made contiguous.
fn dispatch(
    dtype: DType,
    tensors: &[&Tensor],
    kernel: impl FnOnce(Slices) -> Outputs,
) -> Result<Outputs> {
    let owned = tensors
        .iter()
        .map(|t| t.to_dtype(dtype)?.contiguous())
        .collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = owned.iter().map(|t| t.storage_and_layout()).collect();
    Ok(match dtype {
        DType::F32 => kernel(Slices::F32(
            guards
                .iter()
                .map(|(s, l)| cpu_slice::<f32>(s, l))
                .collect::<Result<_>>()?,
        )),
        DType::F64 => kernel(Slices::F64(
            guards
                .iter()
                .map(|(s, l)| cpu_slice::<f64>(s, l))
                .collect::<Result<_>>()?,
        )),
        other => candle_core::bail!("depthwise CPU kernel: {other:?} is not served"),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use std::cell::Cell;

    thread_local! {
        /// Set by a test on its own thread: the kernels decline, so that the tensor-op path (the one a GPU
        /// runs) is what gets measured.
        pub(crate) static TENSOR_OPS_ONLY: Cell<bool> = const { Cell::new(false) };
    }

    use super::*;

    /// The weight gradients are sums over every pixel: their rounding must not depend on how many threads
    /// share the work (a resumed run reproduces the uninterrupted one bit for bit, on any machine).
    #[test]
    fn gradients_do_not_depend_on_the_number_of_threads() -> Result<()> {
        let dev = Device::Cpu;
        let p = Tensor::randn(0f32, 1., (2, 9, 5, 16), &dev)?;
        let taps = Tensor::randn(0f32, 1., (9, 16), &dev)?;
        let bias = Tensor::randn(0f32, 1., 16, &dev)?;
        let grad = Tensor::randn(0f32, 1., (2, 9, 5, 8), &dev)?;
        let run = |threads: usize| -> Vec<Vec<u32>> {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("a thread pool");
            let (dp, dtaps, dbias) = pool
                .install(|| silu_gated_conv_backward(&p, &taps, &bias, &grad, 3, 3))
                .expect("backward")
                .expect("f32 on the CPU is served");
            [dp, dtaps, dbias]
                .iter()
                .map(|t| {
                    let v: Vec<f32> = t.flatten_all().and_then(|t| t.to_vec1()).expect("values");
                    v.into_iter().map(f32::to_bits).collect()
                })
                .collect()
        };
        let one = run(1);
        for threads in [2, 3, 5] {
            assert!(
                run(threads) == one,
                "{threads} threads round differently from one"
            );
        }
        Ok(())
    }

    /// Runs `f` with the kernels declined on this thread.
    pub(crate) fn with_tensor_ops_only<R>(f: impl FnOnce() -> R) -> R {
        TENSOR_OPS_ONLY.with(|c| c.set(true));
        let out = f();
        TENSOR_OPS_ONLY.with(|c| c.set(false));
        out
    }
}
