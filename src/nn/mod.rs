//! Building blocks candle lacks (see SPEC §10).

pub mod checkpoint; // gradient checkpointing: recompute blocks in backward
pub mod conv; // depthwise conv as shifted sums, grouped 1x1 conv, pixel (un)shuffle
pub mod dual; // Dual (primal + tangent) tensors: one forward path for plain and JVP passes
pub mod frozen;
pub mod rng; // seedable SplitMix64 / Box–Muller generator for weight initialisation // matmul with a frozen weight: backward skips the weight gradient
