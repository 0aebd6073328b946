//! Building blocks candle lacks (see docs/ALGORITHM.md, "Building blocks").

pub mod checkpoint; // gradient checkpointing: recompute blocks in backward
pub mod conv; // depthwise conv as shifted sums, grouped 1x1 conv, pixel (un)shuffle
pub mod dual; // Dual (primal + tangent) tensors: one forward path for plain and JVP passes
pub mod frozen; // matmul with a frozen weight: backward skips the weight gradient
