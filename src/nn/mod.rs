//! Building blocks candle lacks (docs/ALGORITHM.md §10 "Ops candle lacks"; the layer maths they serve: §3).

pub mod attention; // softmax, softmax attention, ReLU linear attention (Dual ops)
pub mod checkpoint; // gradient checkpointing: recompute blocks in backward
pub mod conv; // NCHW conv2d, 1x1 and grouped 1x1 convs, pixel (un)shuffle, channel-group means
pub mod depthwise; // the two depthwise convs: channels-last (Dual, custom backward) and NCHW
mod depthwise_cpu; // CPU kernels of the channels-last depthwise conv and of the GLUMBConv gate's backward
pub mod dual; // Dual (primal + tangent) tensors, their elementwise rules, Linear, timestep features
pub mod frozen; // matmul with a frozen weight: backward skips the weight gradient
pub mod fused; // one graph node for a chain of ops (keeps its output only): the training forward's memory diet
pub mod norm; // LayerNorm, RMSNorm (Dual, last dim) and channel RMSNorm (NCHW)

/// Helpers shared by the unit tests of this module's files.
#[cfg(test)]
pub(crate) mod test_util {
    use candle_core::Tensor;

    /// Largest |a − b| of two f32 tensors of one shape.
    pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }
}
