//! Summing clipped updates and releasing the sum with Gaussian noise: only a [`NoisedSum`] can reach the server optimizer.

use rand::{CryptoRng, Rng};
use rand_distr::{Distribution, StandardNormal};

use crate::error::UpdateError;
use crate::model::UpdateLayout;
use crate::update::ClippedUpdate;

/// Running sum of the clipped updates received in one round.
#[derive(Debug, Clone)]
pub struct Aggregator {
    layout: UpdateLayout,
    clip_norm: f32,
    sum: Vec<f32>,
    n_updates: usize,
}

impl Aggregator {
    /// An empty sum for updates of `layout`, each bounded by `clip_norm`.
    pub fn new(layout: UpdateLayout, clip_norm: f32) -> Self {
        Self { layout, clip_norm, sum: vec![0.0; layout.len()], n_updates: 0 }
    }

    /// Adds one update. Fails if its shape or bound does not match this round's.
    pub fn add(&mut self, update: &ClippedUpdate) -> Result<(), UpdateError> {
        let v = update.vector();
        if *v.layout() != self.layout {
            return Err(UpdateError::WrongLength { expected: self.layout.len(), got: v.layout().len() });
        }
        if update.clip_norm() > self.clip_norm {
            return Err(UpdateError::NormTooLarge {
                norm: f64::from(update.clip_norm()),
                clip_norm: f64::from(self.clip_norm),
            });
        }
        v.add_to(&mut self.sum);
        self.n_updates += 1;
        Ok(())
    }

    /// Number of updates summed so far.
    pub fn n_updates(&self) -> usize {
        self.n_updates
    }

    /// Releases the sum with Gaussian noise of standard deviation `noise_multiplier · C`
    /// added to every coordinate. `noise_multiplier = 0` releases the exact sum (no privacy).
    ///
    /// The RNG must be cryptographically secure: noise from a predictable generator can be
    /// subtracted. Reproducible simulations get a seeded one only through [`crate::danger`].
    pub fn release<R: Rng + CryptoRng + ?Sized>(mut self, noise_multiplier: f32, rng: &mut R) -> NoisedSum {
        let std = noise_multiplier * self.clip_norm;
        if std > 0.0 {
            for s in &mut self.sum {
                let z: f32 = StandardNormal.sample(rng);
                *s += std * z;
            }
        }
        NoisedSum { layout: self.layout, sum: self.sum, n_updates: self.n_updates, noise_std: std }
    }
}

/// A sum of clipped updates with its noise added: the only aggregate the server may use.
#[derive(Debug, Clone)]
pub struct NoisedSum {
    layout: UpdateLayout,
    sum: Vec<f32>,
    n_updates: usize,
    noise_std: f32,
}

impl NoisedSum {
    /// The noised sum.
    pub fn as_slice(&self) -> &[f32] {
        &self.sum
    }
    /// Its layout.
    pub fn layout(&self) -> &UpdateLayout {
        &self.layout
    }
    /// How many updates went into it.
    pub fn n_updates(&self) -> usize {
        self.n_updates
    }
    /// Standard deviation of the noise added to each coordinate.
    pub fn noise_std(&self) -> f32 {
        self.noise_std
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::danger;
    use crate::model::ModelShape;
    use crate::update::UpdateVector;

    #[test]
    fn sums_updates_exactly_without_noise() {
        let layout = ModelShape { n_items: 1, dim: 1, n_segments: 1 }.layout();
        let mut agg = Aggregator::new(layout, 10.0);
        for k in 0..3 {
            let v = UpdateVector::from_dense(layout, &[k as f32; 5]).expect("length");
            let u = ClippedUpdate::clip(v, 10.0).expect("finite");
            agg.add(&u).expect("same shape");
        }
        let mut rng = danger::seeded_rng(1);
        let out = agg.release(0.0, &mut rng);
        assert_eq!(out.as_slice(), &[3.0; 5]);
        assert_eq!(out.n_updates(), 3);
    }

    #[test]
    fn rejects_wrong_shape_and_looser_bound() {
        let layout = ModelShape { n_items: 1, dim: 1, n_segments: 1 }.layout();
        let mut agg = Aggregator::new(layout, 1.0);
        let other = ModelShape { n_items: 2, dim: 1, n_segments: 1 }.layout();
        let short = ClippedUpdate::clip(UpdateVector::zeros_dense(other), 1.0).expect("finite");
        assert!(matches!(agg.add(&short), Err(UpdateError::WrongLength { .. })));
        let loose = ClippedUpdate::clip(UpdateVector::zeros_dense(layout), 2.0).expect("finite");
        assert!(matches!(agg.add(&loose), Err(UpdateError::NormTooLarge { .. })));
        assert_eq!(agg.n_updates(), 0);
    }

    /// The noise added per coordinate has mean 0 and standard deviation σ·C
    /// (fixed seed; tolerance ≈ 6 standard errors of each estimate).
    #[test]
    fn noise_has_the_calibrated_scale() {
        let shape = ModelShape { n_items: 20_000, dim: 4, n_segments: 1 };
        let layout = shape.layout();
        let (sigma, clip) = (1.3f32, 0.7f32);
        let agg = Aggregator::new(layout, clip);
        let mut rng = danger::seeded_rng(42);
        let out = agg.release(sigma, &mut rng);
        let n = out.as_slice().len() as f64;
        let mean = out.as_slice().iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = out.as_slice().iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / (n - 1.0);
        let want = f64::from(sigma * clip);
        assert!(mean.abs() < 6.0 * want / n.sqrt(), "mean {mean}");
        let rel_se = (2.0 / n).sqrt();
        assert!((var.sqrt() / want - 1.0).abs() < 6.0 * rel_se, "std {} want {want}", var.sqrt());
        assert_eq!(out.noise_std(), sigma * clip);
    }
}
