//! Convolution-like ops on NCHW tensors that candle lacks or runs slowly (docs/ALGORITHM.md §10): dense conv2d, 1x1 and
//! grouped 1x1 convs, pixel (un)shuffle, channel-group means. They are composed from tensor ops (pads, views,
//! matmuls, element-wise maths), so they have a backward pass and run on every device; the one exception, the
//! CPU gather behind [`conv2d`], only serves inputs that need no gradient. The depthwise convolutions live in
//! `nn::depthwise`, the channel RMSNorm in `nn::norm`.
//!
//! All tensors are NCHW. Channel-mixing 1x1 convolutions are plain matmuls over the `(C, H·W)` view, so no
//! layout permutes are needed anywhere.

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// Zero-pads the two spatial axes of a `(B, C, H, W)` tensor.
pub fn pad2d(x: &Tensor, top: usize, bottom: usize, left: usize, right: usize) -> Result<Tensor> {
    let x = if left + right > 0 {
        x.pad_with_zeros(3, left, right)?
    } else {
        x.clone()
    };
    if top + bottom > 0 {
        x.pad_with_zeros(2, top, bottom)
    } else {
        Ok(x)
    }
}

/// 1x1 convolution (equivalently a Linear applied over the channel axis) as one matmul per batch item,
/// without permuting to channels-last. `weight`: (O, C) or (O, C, 1, 1); `bias`: (O,).
pub fn pointwise_conv(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let weight = match weight.rank() {
        2 => weight.clone(),
        4 => weight.flatten_from(1)?,
        r => bail!("pointwise_conv: weight must be (O, C) or (O, C, 1, 1), got rank {r}"),
    };
    let (o, wc) = weight.dims2()?;
    if wc != c {
        bail!(
            "pointwise_conv: weight {:?} does not fit {c} input channels",
            weight.dims()
        )
    }
    let y = weight
        .broadcast_left(b)?
        .matmul(&x.reshape((b, c, h * w))?)?;
    let y = match bias {
        Some(bias) => y.broadcast_add(&bias.reshape((1, o, 1))?)?,
        None => y,
    };
    y.reshape((b, o, h, w))
}

/// Grouped 1x1 convolution (no bias) as one batched matmul over the groups; candle's grouped `conv2d`
/// would run one convolution per group. `weight`: (O, C / groups, 1, 1).
pub fn grouped_conv1x1(x: &Tensor, weight: &Tensor, groups: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (o, in_per_group, kh, kw) = weight.dims4()?;
    if kh != 1
        || kw != 1
        || !c.is_multiple_of(groups)
        || !o.is_multiple_of(groups)
        || in_per_group * groups != c
    {
        bail!(
            "grouped_conv1x1: weight {:?} with {groups} groups does not fit {c} input channels",
            weight.dims()
        )
    }
    let out_per_group = o / groups;
    let weight = weight.reshape((groups, out_per_group, in_per_group))?;
    // A stride-0 batch axis is only accepted by matmul on the rhs, so the (small) weight is repeated per item.
    let weight = if b == 1 {
        weight
    } else {
        weight
            .unsqueeze(0)?
            .broadcast_as((b, groups, out_per_group, in_per_group))?
            .reshape((b * groups, out_per_group, in_per_group))?
    };
    let x = x.reshape((b * groups, in_per_group, h * w))?;
    weight.matmul(&x)?.reshape((b, o, h, w))
}

/// Elements of one band of stacked windows in the CPU path of [`conv2d`] (32 MiB in f32): bounds the
/// memory at any image size and keeps the matmul's operand cache-friendly.
const CONV_BAND_ELEMS: usize = 8 << 20;

/// 2-D convolution with zero padding, as PyTorch's `Conv2d(groups=1, dilation=1)`. `weight`: (O, C, kh, kw).
///
/// On the CPU, for inputs that need no gradient, computed without a full im2col buffer: the input is split
/// into its stride² phases (x[s·i + a, s·j + b] for each (a, b); the input itself for stride 1), each
/// seen zero-padded and flattened to (C, rows·cols). For every output pixel, tap (ky, kx) then reads one
/// contiguous window of one phase, so the convolution is a matmul of the (O, kh·kw·C) weight with the
/// stacked windows. The windows of a band of output rows are gathered in one parallel pass (with a row of
/// ones carrying the bias) and multiplied band by band; the output is computed on full padded rows and
/// cropped. Elsewhere (other devices, inputs that need gradients, spatial sizes the stride does not
/// divide) candle's `conv2d` runs. On GPUs [`conv2d_taps`] runs instead (see [`DEVICE_CONV_ENV`]): candle's
/// CUDA `conv2d` without cuDNN builds the whole im2col buffer (about 39 GB for the DC-AE encoder at 1024², batch 8).
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let (_, c, h, w) = x.dims4()?;
    let (o, wc, kh, kw) = weight.dims4()?;
    if wc != c {
        bail!(
            "conv2d: weight {:?} does not fit {c} input channels",
            weight.dims()
        )
    }
    if stride == 0 || h + 2 * padding < kh || w + 2 * padding < kw {
        bail!("conv2d: kernel {kh}x{kw} with stride {stride} does not fit the padded {h}x{w} input")
    }
    if kh == 1 && kw == 1 && stride == 1 && padding == 0 {
        return pointwise_conv(x, weight, bias);
    }
    if x.device().is_cpu() && !x.track_op() && h.is_multiple_of(stride) && w.is_multiple_of(stride)
    {
        let geometry = ConvGeometry::new((h, w), (kh, kw), padding, stride);
        return conv2d_banded(x, weight, bias, &geometry, CONV_BAND_ELEMS);
    }
    if !x.device().is_cpu() && device_conv_path()? == DeviceConvPath::Taps {
        return conv2d_taps(x, weight, bias, padding, stride);
    }
    let out = x.conv2d(weight, padding, stride, 1, 1)?;
    match bias {
        Some(bias) => out.broadcast_add(&bias.reshape((1, o, 1, 1))?),
        None => Ok(out),
    }
}

/// Environment variable that picks the convolution of [`conv2d`] on GPUs: `taps` (the default, [`conv2d_taps`])
/// or `candle` (candle's own `conv2d`: im2col + one matmul, or cuDNN when built with the `cudnn` feature). Meant
/// for measuring one against the other (`sprint-bench dcae`).
pub const DEVICE_CONV_ENV: &str = "SANA_SPRINT_DEVICE_CONV";

/// The two GPU convolutions [`DEVICE_CONV_ENV`] chooses between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceConvPath {
    Taps,
    Candle,
}

/// The GPU convolution [`DEVICE_CONV_ENV`] asks for (read once per process: every convolution asks).
pub fn device_conv_path() -> Result<DeviceConvPath> {
    static PATH: std::sync::OnceLock<std::result::Result<DeviceConvPath, String>> =
        std::sync::OnceLock::new();
    PATH.get_or_init(|| match std::env::var(DEVICE_CONV_ENV).as_deref() {
        Err(_) | Ok("") | Ok("taps") => Ok(DeviceConvPath::Taps),
        Ok("candle") => Ok(DeviceConvPath::Candle),
        Ok(other) => Err(format!(
            "{DEVICE_CONV_ENV}={other:?}: expected `taps` or `candle`"
        )),
    })
    .clone()
    .map_err(candle_core::Error::Msg)
}

/// 2-D convolution as one matmul per kernel row, accumulated: for each row `ky` of the kernel, the `kw` shifted
/// (and, with a stride, subsampled) views of the zero-padded input are stacked along the channels into a
/// `(B, kw·C, Ho·Wo)` operand and multiplied by that row's `(O, kw·C)` weights. The extra memory is `kw` copies
/// of the input instead of the `kh·kw` of a full im2col, the matmuls are large enough for a GPU's tensor cores,
/// and everything is made of tensor ops, so it has a backward pass on every device. Same contract as [`conv2d`].
pub fn conv2d_taps(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (o, wc, kh, kw) = weight.dims4()?;
    if wc != c || stride == 0 || h + 2 * padding < kh || w + 2 * padding < kw {
        bail!(
            "conv2d_taps: weight {:?} with padding {padding} and stride {stride} does not fit a {c}x{h}x{w} input",
            weight.dims()
        )
    }
    let (ho, wo) = (
        (h + 2 * padding - kh) / stride + 1,
        (w + 2 * padding - kw) / stride + 1,
    );
    // zero padding, plus up to `stride` extra rows / columns so that every tap's window spans whole
    // groups of `stride` elements (only the first of each group is read)
    let (hp, wp) = (ho * stride + kh - 1, wo * stride + kw - 1);
    let xp = pad2d(
        x,
        padding,
        (hp - h - padding).max(padding),
        padding,
        (wp - w - padding).max(padding),
    )?;
    let tap = |ky: usize, kx: usize| -> Result<Tensor> {
        let v = xp.narrow(2, ky, ho * stride)?.narrow(3, kx, wo * stride)?;
        let v = if stride == 1 {
            v
        } else {
            v.contiguous()?
                .reshape((b, c, ho, stride, wo, stride))?
                .narrow(3, 0, 1)?
                .narrow(5, 0, 1)?
        };
        v.contiguous()?.reshape((b, c, ho * wo))
    };
    // weight rows: (kh, O, kw·C) with the kw taps' channels in the order they are stacked
    let rows = weight
        .permute((2, 0, 3, 1))?
        .contiguous()?
        .reshape((kh, o, kw * c))?;
    let mut y: Option<Tensor> = None;
    for ky in 0..kh {
        let taps = (0..kw).map(|kx| tap(ky, kx)).collect::<Result<Vec<_>>>()?;
        let stacked = if kw == 1 {
            taps[0].clone()
        } else {
            Tensor::cat(&taps, 1)?
        };
        let part = rows.get(ky)?.broadcast_left(b)?.matmul(&stacked)?;
        y = Some(match y {
            Some(y) => (y + part)?,
            None => part,
        });
    }
    let y = y.expect("a kernel has at least one row");
    let y = match bias {
        Some(bias) => y.broadcast_add(&bias.reshape((1, o, 1))?)?,
        None => y,
    };
    y.reshape((b, o, ho, wo))
}

/// Where each tap of a strided, zero-padded convolution reads in the padded, flattened phase images.
struct ConvGeometry {
    padding: usize,
    stride: usize,
    out: (usize, usize),
    /// Zero rows / columns before each phase image's data.
    top: usize,
    left: usize,
    /// Padded row length: enough zero columns after the data for every tap of every output column.
    cols: usize,
}

impl ConvGeometry {
    fn new(input: (usize, usize), kernel: (usize, usize), padding: usize, stride: usize) -> Self {
        let out = (
            (input.0 + 2 * padding - kernel.0) / stride + 1,
            (input.1 + 2 * padding - kernel.1) / stride + 1,
        );
        let mut g = Self {
            padding,
            stride,
            out,
            top: 0,
            left: 0,
            cols: 0,
        };
        g.top = (-g.shift(0)).max(0) as usize;
        g.left = g.top;
        let phase_w = input.1 / stride;
        let right = (out.1 as isize + g.shift(kernel.1 - 1) - phase_w as isize).max(0) as usize;
        g.cols = g.left + phase_w + right;
        g
    }

    /// Tap t reads input row stride·(y + shift(t)) + phase_of(t) for output row y (columns alike).
    fn shift(&self, t: usize) -> isize {
        (t as isize - self.padding as isize).div_euclid(self.stride as isize)
    }

    fn phase_of(&self, t: usize) -> usize {
        (t as isize - self.padding as isize).rem_euclid(self.stride as isize) as usize
    }

    /// Flat offset of tap (ky, kx)'s window for output pixel (0, 0).
    fn tap_offset(&self, ky: usize, kx: usize) -> usize {
        (self.shift(ky) + self.top as isize) as usize * self.cols
            + (self.shift(kx) + self.left as isize) as usize
    }
}

/// CPU path of [`conv2d`]: per band of at most `band_elems` gathered elements, one parallel gather of all
/// kh·kw windows and one matmul.
fn conv2d_banded(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    g: &ConvGeometry,
    band_elems: usize,
) -> Result<Tensor> {
    let (b, _, _, _) = x.dims4()?;
    let (o, _, kh, kw) = weight.dims4()?;
    let (out_h, out_w) = g.out;
    let x = x.contiguous()?;
    // (O, C, kh, kw) -> (O, kh·kw·C): contraction rows ordered (ky, kx, c), then the bias column.
    let weight = weight
        .permute((0, 2, 3, 1))?
        .contiguous()?
        .flatten_from(1)?;
    let weight = match bias {
        Some(bias) => Tensor::cat(&[&weight, &bias.reshape((o, 1))?], 1)?,
        None => weight,
    };
    let band_rows = (band_elems / (b * weight.dim(1)? * g.cols)).clamp(1, out_h);
    let weight = weight.broadcast_left(b)?;
    let bands = (0..out_h)
        .step_by(band_rows)
        .map(|first| {
            let n_rows = band_rows.min(out_h - first);
            let windows = ShiftedWindows {
                stride: g.stride,
                blocks: (0..kh)
                    .flat_map(|ky| (0..kw).map(move |kx| (ky, kx)))
                    .map(|(ky, kx)| {
                        let start = first * g.cols + g.tap_offset(ky, kx);
                        (g.phase_of(ky), g.phase_of(kx), start)
                    })
                    .collect(),
                ones_row: bias.is_some(),
                top: g.top,
                left: g.left,
                cols: g.cols,
                window: n_rows * g.cols,
            };
            weight
                .matmul(&x.apply_op1_no_bwd(&windows)?)?
                .reshape((b, o, n_rows, g.cols))?
                .narrow(3, 0, out_w)
        })
        .collect::<Result<Vec<_>>>()?;
    if bands.len() == 1 {
        bands[0].contiguous()
    } else {
        Tensor::cat(&bands, 2)
    }
}

/// The stacked windows of the CPU path of [`conv2d`], gathered in one parallel pass: block k of the output
/// holds, for every channel, `window` consecutive elements from flat offset `start` of the phase image
/// (a, b) zero-padded to `cols` columns (`top` rows and `left` columns of zeros before the data, zeros
/// after); an optional last row of ones carries the bias. Output (B, blocks·C (+1), window).
struct ShiftedWindows {
    stride: usize,
    /// (row phase a, column phase b, flat start) of each block.
    blocks: Vec<(usize, usize, usize)>,
    ones_row: bool,
    top: usize,
    left: usize,
    cols: usize,
    window: usize,
}

impl ShiftedWindows {
    fn rows(&self, channels: usize) -> usize {
        self.blocks.len() * channels + usize::from(self.ones_row)
    }

    fn gather<T: WithDType>(&self, x: &[T], dims: (usize, usize, usize, usize)) -> Vec<T> {
        let (b, c, h, w) = dims;
        let (s, window, cols) = (self.stride, self.window, self.cols);
        let (phase_h, phase_w) = (h / s, w / s);
        let rows = self.rows(c);
        let mut out = vec![T::zero(); b * rows * window];
        out.par_chunks_mut(window)
            .enumerate()
            .for_each(|(row, dst)| {
                let (item, row) = (row / rows, row % rows);
                if row == self.blocks.len() * c {
                    dst.fill(T::one());
                    return;
                }
                let (a, phase_b, start) = self.blocks[row / c];
                let plane = &x[(item * c + row % c) * h * w..][..h * w];
                let mut n = 0;
                while n < window {
                    let (r, q) = ((start + n) / cols, (start + n) % cols);
                    let run = (cols - q).min(window - n);
                    if r >= self.top && r - self.top < phase_h {
                        let src_row = &plane[(s * (r - self.top) + a) * w..][..w];
                        let (lo, hi) = (q.max(self.left), (q + run).min(self.left + phase_w));
                        if lo < hi {
                            let dst = &mut dst[n + lo - q..n + hi - q];
                            if s == 1 {
                                dst.copy_from_slice(&src_row[lo - self.left..hi - self.left]);
                            } else {
                                for (d, j) in dst.iter_mut().zip(lo - self.left..) {
                                    *d = src_row[s * j + phase_b];
                                }
                            }
                        }
                    }
                    n += run;
                }
            });
        out
    }
}

impl CustomOp1 for ShiftedWindows {
    fn name(&self) -> &'static str {
        "shifted-windows"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = layout.shape().dims4()?;
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("shifted-windows: the input must be contiguous")
        };
        let out = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(self.gather(&v[start..end], dims)),
            CpuStorage::F64(v) => CpuStorage::F64(self.gather(&v[start..end], dims)),
            CpuStorage::F16(v) => CpuStorage::F16(self.gather(&v[start..end], dims)),
            CpuStorage::BF16(v) => CpuStorage::BF16(self.gather(&v[start..end], dims)),
            other => bail!(
                "shifted-windows: unsupported dtype {:?}",
                candle_core::backend::BackendStorage::dtype(other)
            ),
        };
        let (b, c, _, _) = dims;
        Ok((out, Shape::from((b, self.rows(c), self.window))))
    }
}

/// PyTorch `pixel_unshuffle`: (B, C, H·r, W·r) -> (B, C·r², H, W) with out[c·r² + i·r + j, h, w] =
/// in[c, h·r + i, w·r + j].
pub fn pixel_unshuffle(x: &Tensor, r: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if !h.is_multiple_of(r) || !w.is_multiple_of(r) {
        bail!("pixel_unshuffle: spatial size {h}x{w} is not divisible by {r}")
    }
    let (oh, ow) = (h / r, w / r);
    x.reshape((b * c, oh, r, ow, r))?
        .permute((0, 2, 4, 1, 3))?
        .reshape((b, c * r * r, oh, ow))
}

/// PyTorch `pixel_shuffle`, the inverse of [`pixel_unshuffle`]: (B, C·r², H, W) -> (B, C, H·r, W·r).
pub fn pixel_shuffle(x: &Tensor, r: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if !c.is_multiple_of(r * r) {
        bail!("pixel_shuffle: {c} channels are not divisible by {}", r * r)
    }
    let oc = c / (r * r);
    x.reshape((b * oc, r, r, h, w))?
        .permute((0, 3, 1, 4, 2))?
        .reshape((b, oc, h * r, w * r))
}

/// Mean over consecutive groups of `group` channels: out[o] = mean(in[o·g .. o·g + g]).
pub fn channel_group_mean(x: &Tensor, group: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if group == 0 || !c.is_multiple_of(group) {
        bail!("channel_group_mean: {c} channels are not divisible into groups of {group}")
    }
    if group == 1 {
        return Ok(x.clone());
    }
    // Summing the `group` strided slices keeps every pass contiguous over H·W (a reduction over a middle
    // axis would index element by element).
    let grouped = x.reshape((b, c / group, group, h * w))?;
    let mut sum = grouped.narrow(2, 0, 1)?;
    for j in 1..group {
        sum = (sum + grouped.narrow(2, j, 1)?)?;
    }
    (sum * (1.0 / group as f64))?.reshape((b, c / group, h, w))
}

/// `channel_group_mean(pixel_unshuffle(x, 2), group)` without materialising the unshuffled tensor when
/// possible: groups of 2 unshuffled channels are horizontal pixel pairs of one input channel, groups of 4k
/// are 2x2 blocks of k input channels.
pub fn pixel_unshuffle_group_mean(x: &Tensor, group: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if !h.is_multiple_of(2) || !w.is_multiple_of(2) {
        bail!("pixel_unshuffle_group_mean: spatial size {h}x{w} is not divisible by 2")
    }
    match group {
        2 => x
            .avg_pool2d_with_stride((1, 2), (1, 2))?
            .reshape((b, c, h / 2, 2, w / 2))?
            .permute((0, 1, 3, 2, 4))?
            .reshape((b, 2 * c, h / 2, w / 2)),
        g if g.is_multiple_of(4) => channel_group_mean(&x.avg_pool2d(2)?, g / 4),
        g => channel_group_mean(&pixel_unshuffle(x, 2)?, g),
    }
}

/// PyTorch `repeat_interleave(r, dim=1)`: channel k of the output is input channel ⌊k / r⌋.
pub fn repeat_interleave_channels(x: &Tensor, repeats: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, c, repeats, h, w))?
        .reshape((b, c * repeats, h, w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::test_util::max_abs_diff;
    use candle_core::{Device, IndexOp};

    /// (batch, in channels, out channels, height, width, kernel, padding, stride).
    type Case = (usize, usize, usize, usize, usize, usize, usize, usize);

    /// The convolution tests' cases: strides 1–3, paddings 0–2, 1x1 to 5x5 kernels, odd sizes, and 7 rows that
    /// stride 2 does not divide.
    const CASES: [Case; 13] = [
        (1, 3, 5, 7, 6, 3, 1, 1),
        (2, 4, 3, 6, 8, 3, 1, 1),
        (1, 2, 4, 8, 8, 3, 1, 2),
        (1, 3, 2, 5, 7, 5, 2, 1),
        (2, 3, 2, 5, 4, 3, 0, 1),
        (1, 4, 6, 3, 3, 1, 0, 1),
        (2, 3, 4, 8, 6, 3, 1, 2),
        (1, 2, 3, 9, 8, 3, 1, 2),
        (1, 2, 3, 8, 8, 3, 0, 2),
        (1, 2, 3, 12, 9, 5, 2, 3),
        (1, 2, 3, 6, 6, 1, 0, 2),
        (1, 2, 3, 7, 8, 3, 1, 2),
        (2, 4, 3, 6, 8, 3, 1, 2),
    ];

    /// Random input, weight (both `Var`s, for gradients) and bias of one case, and candle's convolution of them.
    fn case_with_reference(
        (b, c, o, h, w, k, pad, stride): Case,
    ) -> Result<(candle_core::Var, candle_core::Var, Tensor, Tensor)> {
        let dev = Device::Cpu;
        let x = candle_core::Var::randn(0f32, 1., (b, c, h, w), &dev)?;
        let weight = candle_core::Var::randn(0f32, 1., (o, c, k, k), &dev)?;
        let bias = Tensor::randn(0f32, 1., o, &dev)?;
        let reference = x
            .conv2d(&weight, pad, stride, 1, 1)?
            .broadcast_add(&bias.reshape((1, o, 1, 1))?)?;
        Ok((x, weight, bias, reference))
    }

    #[test]
    fn conv2d_taps_matches_candle_forward_and_backward() -> Result<()> {
        for case in CASES {
            let (_, _, _, h, w, _, pad, stride) = case;
            let (x, weight, bias, reference) = case_with_reference(case)?;
            let ours = conv2d_taps(&x, &weight, Some(&bias), pad, stride)?;
            assert_eq!(ours.dims(), reference.dims());
            let err = max_abs_diff(&ours, &reference);
            assert!(err < 1e-4, "{case:?}: {err}");
            // gradients of a weighted sum; candle's conv2d backward itself fails ("shape mismatch in add") on
            // sizes the stride does not divide, so those are compared forward only
            if h % stride != 0 || w % stride != 0 {
                continue;
            }
            let probe = Tensor::randn(0f32, 1., reference.dims(), &Device::Cpu)?;
            let g_ours = (ours * &probe)?.sum_all()?.backward()?;
            let g_ref = (reference * &probe)?.sum_all()?.backward()?;
            for v in [x.as_tensor(), weight.as_tensor()] {
                let err = max_abs_diff(g_ours.get(v).unwrap(), g_ref.get(v).unwrap());
                assert!(err < 1e-3, "grad {case:?}: {err}");
            }
        }
        Ok(())
    }

    #[test]
    fn conv2d_matches_candle() -> Result<()> {
        for case in CASES {
            let (_, _, _, _, _, _, pad, stride) = case;
            let (x, weight, bias, reference) = case_with_reference(case)?;
            // plain tensors: no gradient, so the CPU's banded path runs where the stride divides the size
            let (x, weight) = (x.as_detached_tensor(), weight.as_detached_tensor());
            let ours = conv2d(&x, &weight, Some(&bias), pad, stride)?;
            assert_eq!(ours.dims(), reference.dims());
            assert!(max_abs_diff(&ours, &reference) < 1e-4, "{case:?}");
            let no_bias = conv2d(&x, &weight, None, pad, stride)?;
            assert!(max_abs_diff(&no_bias, &x.conv2d(&weight, pad, stride, 1, 1)?) < 1e-4);
        }
        Ok(())
    }

    #[test]
    fn banded_conv2d_matches_candle_across_bands() -> Result<()> {
        let dev = Device::Cpu;
        for (stride, h) in [(1, 9), (2, 10)] {
            let x = Tensor::randn(0f32, 1., (2, 3, h, 7 * stride), &dev)?;
            let weight = Tensor::randn(0f32, 1., (4, 3, 3, 3), &dev)?;
            let bias = Tensor::randn(0f32, 1., 4, &dev)?;
            let reference = x
                .conv2d(&weight, 1, stride, 1, 1)?
                .broadcast_add(&bias.reshape((1, 4, 1, 1))?)?;
            let geometry = ConvGeometry::new((h, 7 * stride), (3, 3), 1, stride);
            // A budget of about two output rows per band: several bands, the last one shorter.
            let budget = 2 * 2 * 28 * geometry.cols;
            let banded = conv2d_banded(&x, &weight, Some(&bias), &geometry, budget)?;
            assert!(max_abs_diff(&banded, &reference) < 1e-4);
        }
        Ok(())
    }

    #[test]
    fn pointwise_and_grouped_match_conv2d() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 6, 3, 4), &dev)?;
        let weight = Tensor::randn(0f32, 1., (4, 6, 1, 1), &dev)?;
        let bias = Tensor::randn(0f32, 1., 4, &dev)?;
        let reference = x
            .conv2d(&weight, 0, 1, 1, 1)?
            .broadcast_add(&bias.reshape((1, 4, 1, 1))?)?;
        assert!(max_abs_diff(&pointwise_conv(&x, &weight, Some(&bias))?, &reference) < 1e-5);
        let grouped = Tensor::randn(0f32, 1., (9, 2, 1, 1), &dev)?;
        let reference = x.conv2d(&grouped, 0, 1, 1, 3)?;
        assert!(max_abs_diff(&grouped_conv1x1(&x, &grouped, 3)?, &reference) < 1e-5);
        Ok(())
    }

    #[test]
    fn pixel_shuffle_roundtrip_and_index_convention() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 2. * 3. * 4. * 6., &dev)?.reshape((2, 3, 4, 6))?;
        let down = pixel_unshuffle(&x, 2)?;
        assert_eq!(down.dims(), &[2, 12, 2, 3]);
        // out[c·4 + i·2 + j, h, w] = in[c, 2h + i, 2w + j]
        for (c, i, j, h, w) in [
            (0, 0, 0, 0, 0),
            (1, 1, 0, 1, 2),
            (2, 0, 1, 1, 1),
            (2, 1, 1, 0, 2),
        ] {
            let got = down.i((1, c * 4 + i * 2 + j, h, w))?.to_scalar::<f32>()?;
            let want = x.i((1, c, 2 * h + i, 2 * w + j))?.to_scalar::<f32>()?;
            assert_eq!(got, want);
        }
        assert_eq!(max_abs_diff(&pixel_shuffle(&down, 2)?, &x), 0.0);
        // By hand: a 4x4 ramp splits into its four 2x2 sub-grids, (even, even) first.
        let ramp = Tensor::arange(0f32, 16., &dev)?.reshape((1, 1, 4, 4))?;
        let expected = [
            [[0., 2.], [8., 10.]],
            [[1., 3.], [9., 11.]],
            [[4., 6.], [12., 14.]],
            [[5., 7.], [13., 15.]],
        ];
        let got = pixel_unshuffle(&ramp, 2)?.squeeze(0)?.to_vec3::<f32>()?;
        let expected: Vec<Vec<Vec<f32>>> = expected
            .iter()
            .map(|c| c.iter().map(|r| r.to_vec()).collect())
            .collect();
        assert_eq!(got, expected);
        let up = pixel_shuffle(&x.reshape((2, 12, 2, 3))?, 2)?;
        assert_eq!(
            max_abs_diff(&pixel_unshuffle(&up, 2)?, &x.reshape((2, 12, 2, 3))?),
            0.0
        );
        Ok(())
    }

    #[test]
    fn channel_mean_and_repeat() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1., (2, 6, 3, 2), &dev)?;
        let mean = channel_group_mean(&x, 3)?;
        let reference = x.reshape((2, 2, 3, 3, 2))?.mean(2)?;
        assert!(max_abs_diff(&mean, &reference) < 1e-6);
        let image = Tensor::randn(0f32, 1., (2, 4, 6, 8), &dev)?;
        for group in [1, 2, 4, 8, 16] {
            let fused = pixel_unshuffle_group_mean(&image, group)?;
            let reference = channel_group_mean(&pixel_unshuffle(&image, 2)?, group)?;
            assert_eq!(fused.dims(), reference.dims());
            assert!(max_abs_diff(&fused, &reference) < 1e-6, "group {group}");
        }
        let rep = repeat_interleave_channels(&x, 2)?;
        assert_eq!(rep.dims(), &[2, 12, 3, 2]);
        assert_eq!(max_abs_diff(&rep.i((.., 5))?, &x.i((.., 2))?), 0.0);
        Ok(())
    }
}
