//! Building blocks candle lacks (docs/ALGORITHM.md §10 "Ops candle lacks"; the layer maths they serve: §3).

pub mod attention; // softmax, softmax attention, ReLU linear attention (Dual ops)
pub mod checkpoint; // gradient checkpointing: recompute blocks in backward
pub mod conv; // NCHW conv2d, 1x1 and grouped 1x1 convs, pixel (un)shuffle, channel-group means
pub mod depthwise; // the two depthwise convs: channels-last (Dual, custom backward) and NCHW
pub mod dual; // Dual (primal + tangent) tensors, their elementwise rules, Linear, timestep features
pub mod frozen; // matmul with a frozen weight: backward skips the weight gradient
pub mod norm; // LayerNorm, RMSNorm (Dual, last dim) and channel RMSNorm (NCHW)
