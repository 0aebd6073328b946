//! Candle op count of one training step on the tiny config (a proxy for kernel launches per step on a GPU).
//!
//! `cargo bench --profile dev --bench op_count`
//!
//! Every input of the step (latents, prompt and negative embeddings, every random draw) is made a `Var`, so every
//! operation that depends on the data is recorded in candle's graph; the count is the number of distinct graph
//! nodes reachable from the step's outputs (the G loss, the teacher CFG velocity and the JVP tangent; the D loss
//! and both logit maps). The steps run as the trainer runs them, gradients included, but only the forward graph
//! is counted. Views (reshape, transpose, narrow) are nodes too, so this over-counts GPU launches by the views;
//! compare counts of the same code before and after a change, not with a profiler's launch count.
//! Weight-only work (casts of the weights in bf16) is not data-dependent and is not counted.

use std::collections::HashSet;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use sana_sprint::models::discriminator::{DiscHeads, DEFAULT_HEAD_BLOCK_IDS};
use sana_sprint::models::sana::SanaTransformer2DModel;
use sana_sprint::models::student::{GuidanceInit, Student};
use sana_sprint::models::trigflow::SanaTrigFlow;
use sana_sprint::rng::SeededRng;
use sana_sprint::train::step::{
    self, Batch, DiscriminatorDraws, GeneratorDraws, Models, StepSettings,
};

fn tracked(t: Tensor) -> Tensor {
    Var::from_tensor(&t).unwrap().as_tensor().clone()
}

fn count(roots: &[&Tensor]) -> usize {
    let mut seen = HashSet::new();
    for root in roots {
        for node in root.sorted_nodes() {
            seen.insert(node.id());
        }
    }
    seen.len()
}

fn main() {
    let dev = Device::Cpu;
    let teacher_dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/tiny-sana-sprint/transformer");
    let teacher =
        SanaTrigFlow::new(SanaTransformer2DModel::load(&teacher_dir, DType::F32, &dev).unwrap());
    let student = Student::from_teacher(&teacher_dir, GuidanceInit::Learnable, 0, &dev).unwrap();
    let heads = DiscHeads::new(&DEFAULT_HEAD_BLOCK_IDS, 32, 1, &dev).unwrap();
    let compute = student.compute_models(DType::F32).unwrap();
    let student_vars: Vec<Var> = student.named_vars().into_iter().map(|(_, v)| v).collect();
    let (b, l, h) = (2usize, 300usize, 8usize);
    let mut rng = SeededRng::new(3);
    let mut normal = |shape: &[usize]| {
        let n = shape.iter().product();
        tracked(Tensor::from_vec(rng.normal(n), shape, &dev).unwrap())
    };
    let mask = Tensor::ones((b, l), DType::F32, &dev).unwrap();
    let neg_mask = Tensor::zeros((b, l), DType::F32, &dev).unwrap();
    let batch = Batch {
        x0: normal(&[b, 32, h, h]),
        prompt_embeds: normal(&[b, l, 64]),
        prompt_mask: mask,
        neg_embeds: normal(&[b, l, 64]),
        neg_mask,
    };
    let settings = StepSettings {
        train_largest_timestep: true,
        misaligned_pairs_d: true,
        ..StepSettings::default()
    };
    for checkpointing in [false, true] {
        let models = Models {
            gradient_checkpointing: checkpointing,
            ..Models::new(&teacher, &compute, &heads)
        };
        let mut draw_rng = SeededRng::new(5);
        let g = GeneratorDraws::sample(&mut draw_rng, &[b, 32, h, h], &settings, &dev).unwrap();
        let g = GeneratorDraws {
            noise: tracked(g.noise),
            t_normal: g.t_normal,
            cfg: g.cfg,
            largest: g.largest,
            t_d_normal: g.t_d_normal,
            noise_d: tracked(g.noise_d),
        };
        let (_, out) =
            step::generator_grads(&models, &batch, &g, &settings, 1000, &student_vars, 1.0)
                .unwrap();
        let g_ops = count(&[&out.loss, &out.dxt_dt, &out.df]);
        let d = DiscriminatorDraws::sample(&mut draw_rng, &[b, 32, h, h], &settings, &dev).unwrap();
        let (_, out) =
            step::discriminator_grads(&models, &batch, &d, &settings, &heads.vars(), 1.0).unwrap();
        let d_ops = count(&[&out.loss]);
        println!(
            "tiny config (20 blocks), B={b}, latent {h}x{h}, L={l}, largest-timestep + misaligned pairs, \
             gradient checkpointing {checkpointing}: G step {g_ops} forward ops, D step {d_ops} forward ops"
        );
    }
}
