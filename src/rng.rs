//! The one seedable generator of the project: SplitMix64 for integers and uniforms, Box–Muller for normals.
//! It initialises weights (candle's CPU generator cannot be seeded), draws every per-batch random input of a
//! training step and shuffles the store each epoch. Reproducible across runs and platforms; not for cryptography.

use candle_core::{Device, Result, Shape, Tensor};

/// SplitMix64 state; the same seed always yields the same sequence.
#[derive(Clone, Debug)]
pub struct SeededRng(u64);

impl SeededRng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// A generator for one named tensor, seeded from `seed` and the FNV-1a hash of `name`, so that a tensor's
    /// initial value does not depend on the order in which a model asks for its tensors.
    pub fn for_name(seed: u64, name: &str) -> Self {
        let hash = name.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
        });
        let mut mixer = Self(seed ^ hash);
        Self(mixer.next_u64())
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// `n` draws from U(−bound, bound).
    pub fn uniform(&mut self, n: usize, bound: f64) -> Vec<f32> {
        (0..n)
            .map(|_| ((2.0 * self.unit() - 1.0) * bound) as f32)
            .collect()
    }

    /// `n` draws from N(0, 1).
    pub fn normal(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let u1 = 1.0 - self.unit();
                let u2 = self.unit();
                ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
            })
            .collect()
    }

    /// An f32 tensor of U(−bound, bound) draws.
    pub fn uniform_tensor<S: Into<Shape>>(
        &mut self,
        shape: S,
        bound: f64,
        device: &Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        Tensor::from_vec(self.uniform(shape.elem_count(), bound), shape, device)
    }

    /// An f32 tensor of N(mean, std²) draws.
    pub fn normal_tensor<S: Into<Shape>>(
        &mut self,
        shape: S,
        mean: f64,
        std: f64,
        device: &Device,
    ) -> Result<Tensor> {
        let shape = shape.into();
        Tensor::from_vec(self.normal(shape.elem_count()), shape, device)?.affine(std, mean)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mean_std(v: &[f32]) -> (f64, f64) {
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        (mean, var.sqrt())
    }

    #[test]
    fn same_seed_same_sequence_and_names_are_independent_streams() {
        assert_eq!(SeededRng::new(3).normal(64), SeededRng::new(3).normal(64));
        assert_ne!(SeededRng::new(3).normal(64), SeededRng::new(4).normal(64));
        assert_eq!(
            SeededRng::for_name(1, "a.weight").uniform(8, 1.0),
            SeededRng::for_name(1, "a.weight").uniform(8, 1.0)
        );
        assert_ne!(
            SeededRng::for_name(1, "a.weight").uniform(8, 1.0),
            SeededRng::for_name(1, "b.weight").uniform(8, 1.0)
        );
    }

    #[test]
    fn draws_have_the_requested_distribution() {
        let mut rng = SeededRng::new(0);
        let (mean, std) = mean_std(&rng.normal(200_000));
        assert!(
            mean.abs() < 0.01 && (std - 1.0).abs() < 0.01,
            "N(0,1): mean {mean}, std {std}"
        );
        let u = rng.uniform(200_000, 0.5);
        assert!(u.iter().all(|x| x.abs() <= 0.5));
        let (mean, std) = mean_std(&u);
        let want = 0.5 / 3f64.sqrt();
        assert!(
            mean.abs() < 0.01 && (std - want).abs() < 0.01,
            "U(±0.5): mean {mean}, std {std}"
        );
        let t = rng
            .normal_tensor((100, 100), 1.0, 0.02, &Device::Cpu)
            .unwrap();
        let (mean, std) = mean_std(&t.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert!((mean - 1.0).abs() < 1e-3 && (std - 0.02).abs() < 1e-3);
    }
}
