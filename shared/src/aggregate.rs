//! Summing clipped updates and releasing the sum with exact discrete Gaussian noise on a fixed-point grid: only a [`NoisedSum`] can reach the server optimizer.
//!
//! Each update is rounded to the grid of [`Grid::for_sum`] as it is added, the integer sum gets
//! discrete Gaussian noise of parameter `z · Δ` per coordinate (`Δ` the sum's L2 sensitivity in
//! grid units), and the result is scaled back by the grid step. The mechanism, its bounds and
//! what the accountant relies on are written down in [`crate::privacy::discrete`].

use rand::{CryptoRng, Rng};

use crate::error::UpdateError;
use crate::model::UpdateLayout;
use crate::privacy::discrete::{DiscreteNoiseError, Grid, count_noise};
use crate::update::{ClippedUpdate, UpdateVector};

/// Running sum of the clipped updates received in one round.
#[derive(Debug, Clone)]
pub struct Aggregator {
    layout: UpdateLayout,
    clip_norm: f32,
    /// The exact `f32` sum: released only without noise (no privacy).
    sum: Vec<f32>,
    /// This round's grid, or why there is none (a clip norm that is not positive and finite).
    grid: Result<Grid, DiscreteNoiseError>,
    /// The sum of the updates rounded to the grid, in grid units, exact.
    grid_sum: Vec<i64>,
    n_updates: usize,
    /// Whether updates are also rounded onto the grid (not for a sum released without noise).
    track_grid: bool,
}

impl Aggregator {
    /// An empty sum for updates of `layout`, each bounded by `clip_norm`.
    pub fn new(layout: UpdateLayout, clip_norm: f32) -> Self {
        Self {
            layout,
            clip_norm,
            sum: vec![0.0; layout.len()],
            grid: Grid::for_sum(clip_norm, layout.len()),
            grid_sum: vec![0; layout.len()],
            n_updates: 0,
            track_grid: true,
        }
    }

    /// An empty sum that will be released without noise: it keeps only the exact `f32` sum
    /// (rounding every coordinate onto the grid is most of the cost of [`Aggregator::add`]).
    /// Released with a noise multiplier above 0 it fails like a sum without a grid
    /// ([`Aggregator::release`] then releases zeros).
    pub fn without_noise(layout: UpdateLayout, clip_norm: f32) -> Self {
        Self { grid_sum: Vec::new(), track_grid: false, ..Self::new(layout, clip_norm) }
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
        if self.track_grid {
            self.add_to_grid(v);
        }
        self.n_updates += 1;
        Ok(())
    }

    /// Rounds `v` to the grid coordinate by coordinate and adds it to the integer sum. Zero
    /// rows (not stored) round to zero and are skipped.
    fn add_to_grid(&mut self, v: &UpdateVector) {
        let Ok(grid) = &self.grid else { return };
        let l = self.layout;
        let d = l.shape().dim;
        let bias_start = l.item_bias().start;
        let tail_start = l.global_mean();
        let (factors, bias, tail) = v.parts();
        let sum = &mut self.grid_sum;
        // Saturation needs more than 2⁶³ / (G + 1) updates (about 10¹³ for a million
        // coordinates); it would also only shrink a device's effect on the sum.
        let mut put = |idx: usize, x: f32| sum[idx] = sum[idx].saturating_add(grid.to_grid(x));
        match v.rows() {
            None => {
                for (i, &x) in factors.iter().enumerate() {
                    put(i, x);
                }
                for (i, &x) in bias.iter().enumerate() {
                    put(bias_start + i, x);
                }
            }
            Some(rows) => {
                for (k, &r) in rows.iter().enumerate() {
                    let r = r as usize;
                    for (j, &x) in factors[k * d..(k + 1) * d].iter().enumerate() {
                        put(r * d + j, x);
                    }
                    put(bias_start + r, bias[k]);
                }
            }
        }
        for (i, &x) in tail.iter().enumerate() {
            put(tail_start + i, x);
        }
    }

    /// A sum already on a grid: the integer `grid_sum` of `n_updates` updates of `layout`,
    /// each rounded to `grid` (as the secure-aggregation phases deliver it, on
    /// [`Grid::for_secure_sum`]).
    /// Released like a sum built by [`Aggregator::add`], except that without noise the
    /// released value is the grid sum times the step (the exact `f32` sum was never seen).
    /// A `grid_sum` of the wrong length is treated as zeros.
    pub fn from_grid_sum(layout: UpdateLayout, grid: Grid, grid_sum: Vec<i64>, n_updates: usize) -> Self {
        let clip_norm = (grid.step() * grid.steps_per_clip()) as f32;
        let grid: Result<Grid, DiscreteNoiseError> = Ok(grid);
        let grid_sum = if grid_sum.len() == layout.len() { grid_sum } else { vec![0; layout.len()] };
        let sum = match &grid {
            Ok(g) => grid_sum.iter().map(|&k| (k as f64 * g.step()) as f32).collect(),
            Err(_) => vec![0.0; layout.len()],
        };
        Self { layout, clip_norm, sum, grid, grid_sum, n_updates, track_grid: true }
    }

    /// Number of updates summed so far.
    pub fn n_updates(&self) -> usize {
        self.n_updates
    }

    /// The grid this round's updates are rounded to (fails only for a clip norm that is not
    /// positive and finite).
    pub fn grid(&self) -> Result<Grid, DiscreteNoiseError> {
        self.grid.clone()
    }

    /// Releases the sum with exact discrete Gaussian noise: every coordinate of the integer
    /// grid sum gets independent `N_Z(0, σ_z²)` with `σ_z ≥ noise_multiplier · Δ` (`Δ` the
    /// grid sensitivity, see [`Grid::sensitivity`]), and is then multiplied by the grid step
    /// `γ`. The noise standard deviation in real units is `γ σ_z ≈ 1.01 · noise_multiplier · C`.
    /// `noise_multiplier = 0` releases the exact `f32` sum (no privacy).
    ///
    /// Fails for a negative or non-finite multiplier, a clip norm that is not positive and
    /// finite, or a noise scale beyond the exact sampler's range
    /// ([`crate::privacy::discrete::MAX_SIGMA`] in grid units).
    ///
    /// The RNG must be cryptographically secure: noise from a predictable generator can be
    /// subtracted. Reproducible simulations get a seeded one only through [`crate::danger`].
    pub fn release_checked<R: Rng + CryptoRng + ?Sized>(
        self,
        noise_multiplier: f32,
        rng: &mut R,
    ) -> Result<NoisedSum, DiscreteNoiseError> {
        let z = f64::from(noise_multiplier);
        if !(z >= 0.0 && z.is_finite()) {
            return Err(DiscreteNoiseError::NoiseMultiplier(z));
        }
        let exact = |sum| NoisedSum {
            layout: self.layout,
            sum,
            n_updates: self.n_updates,
            noise_std: 0.0,
            grid: None,
        };
        if z == 0.0 {
            return Ok(exact(self.sum));
        }
        if !self.track_grid {
            return Err(DiscreteNoiseError::NoiseMultiplier(z));
        }
        let grid = self.grid?;
        let Some(noise) = grid.noise(z)? else { return Ok(exact(self.sum)) };
        let step = grid.step();
        // Keep in step with Grid::noise_std, which reports this value ahead of a release.
        let sum = self
            .grid_sum
            .iter()
            .map(|&k| ((i128::from(k) + noise.sample(rng)) as f64 * step) as f32)
            .collect();
        Ok(NoisedSum {
            layout: self.layout,
            sum,
            n_updates: self.n_updates,
            noise_std: (noise.sigma() * step) as f32,
            grid: Some(grid),
        })
    }

    /// [`Aggregator::release_checked`] for callers that cannot handle its refusal: parameters
    /// it refuses release a sum of zeros with an infinite [`NoisedSum::noise_std`]. A
    /// constant carries no information, so this stays private whatever the round was
    /// charged; coordinator configuration should refuse such parameters up front
    /// (`Grid::for_sum(C, d)?.noise(z)?`).
    pub fn release<R: Rng + CryptoRng + ?Sized>(self, noise_multiplier: f32, rng: &mut R) -> NoisedSum {
        let (layout, n_updates) = (self.layout, self.n_updates);
        self.release_checked(noise_multiplier, rng).unwrap_or_else(|_| NoisedSum {
            layout,
            sum: vec![0.0; layout.len()],
            n_updates,
            noise_std: f32::INFINITY,
            grid: None,
        })
    }
}

/// Releases a count whose sensitivity is 1 (one device adds 0 or 1), such as the number of
/// updates that were not clipped in adaptive clipping: `count + N_Z(0, σ²)` with
/// `σ ≥ noise_multiplier`, exact integer noise. `noise_multiplier = 0` returns the count.
pub fn release_count<R: Rng + CryptoRng + ?Sized>(
    count: u64,
    noise_multiplier: f32,
    rng: &mut R,
) -> Result<f64, DiscreteNoiseError> {
    let noise = count_noise(f64::from(noise_multiplier))?.map_or(0, |dg| dg.sample(rng));
    Ok((i128::from(count) + noise) as f64)
}

/// A sum of clipped updates with its noise added: the only aggregate the server may use.
#[derive(Debug, Clone)]
pub struct NoisedSum {
    layout: UpdateLayout,
    sum: Vec<f32>,
    n_updates: usize,
    noise_std: f32,
    grid: Option<Grid>,
}

impl NoisedSum {
    /// A sum the devices already noised (distributed noise, `docs/ddp.md`): the coordinator's
    /// decoding of the unmasked sum of `n_updates` encodings, each carrying its share of
    /// discrete Gaussian noise; `noise_std` is the noise the round guarantees on the sum (that
    /// of `min_reports` shares). Only the round machine builds one, from
    /// [`crate::ddp::decode_centred`]'s output: the coordinator adds no noise of its own.
    pub(crate) fn from_distributed(
        layout: UpdateLayout,
        sum: Vec<f32>,
        n_updates: usize,
        noise_std: f32,
    ) -> Self {
        Self { layout, sum, n_updates, noise_std, grid: None }
    }

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
    /// Standard deviation parameter of the noise added to each coordinate, in real units
    /// (`γ σ_z`; 0 for an exact release, infinite for a release of zeros).
    pub fn noise_std(&self) -> f32 {
        self.noise_std
    }
    /// The grid the noised sum lies on (every coordinate is the `f32` nearest to the grid
    /// step times an integer), or `None` when it was released without noise.
    pub fn grid(&self) -> Option<Grid> {
        self.grid
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

    /// A sum kept without a grid releases exactly without noise and refuses (fails closed to
    /// zeros) a release with noise: it never adds noise to something it did not round.
    #[test]
    fn a_sum_without_noise_keeps_no_grid_and_refuses_noise() {
        let layout = ModelShape { n_items: 2, dim: 1, n_segments: 1 }.layout();
        let mut agg = Aggregator::without_noise(layout, 10.0);
        for k in 0..3 {
            let v = UpdateVector::from_dense(layout, &[0.25 * k as f32; 7]).expect("length");
            agg.add(&ClippedUpdate::clip(v, 10.0).expect("finite")).expect("same shape");
        }
        let mut rng = danger::seeded_rng(2);
        assert_eq!(agg.clone().release(0.0, &mut rng).as_slice(), &[0.75; 7]);
        assert!(agg.clone().release_checked(1.0, &mut rng).is_err());
        let out = agg.release(1.0, &mut rng);
        assert!(out.as_slice().iter().all(|&x| x == 0.0));
        assert_eq!(out.noise_std(), f32::INFINITY);
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

    /// The noise added per coordinate has mean 0 and standard deviation σ·Δ₂ with
    /// Δ₂ = γ·Δ ≈ 1.01·C (fixed seed; tolerance ≈ 6 standard errors of each estimate), and
    /// every released value is the grid step times an integer.
    #[test]
    fn noise_has_the_calibrated_scale() {
        let shape = ModelShape { n_items: 20_000, dim: 4, n_segments: 1 };
        let layout = shape.layout();
        let (sigma, clip) = (1.3f32, 0.7f32);
        let agg = Aggregator::new(layout, clip);
        let grid = agg.grid().expect("valid clip norm");
        let mut rng = danger::seeded_rng(42);
        let out = agg.release(sigma, &mut rng);
        let n = out.as_slice().len() as f64;
        let mean = out.as_slice().iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = out.as_slice().iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / (n - 1.0);
        let want = f64::from(sigma) * grid.sensitivity_real();
        assert!(mean.abs() < 6.0 * want / n.sqrt(), "mean {mean}");
        let rel_se = (2.0 / n).sqrt();
        assert!((var.sqrt() / want - 1.0).abs() < 6.0 * rel_se, "std {} want {want}", var.sqrt());
        assert!((f64::from(out.noise_std()) / want - 1.0).abs() < 1e-3);
        assert_eq!(out.noise_std(), grid.noise_std(f64::from(sigma)).expect("in range") as f32);
        assert_eq!(out.grid(), Some(grid));
        for &x in out.as_slice() {
            let j = (f64::from(x) / grid.step()).round();
            assert_eq!((j * grid.step()) as f32, x);
        }
    }

    #[test]
    fn out_of_range_parameters_are_refused_or_release_nothing() {
        let layout = ModelShape { n_items: 3, dim: 2, n_segments: 1 }.layout();
        let mut rng = danger::seeded_rng(3);
        for z in [-1.0f32, f32::NAN, f32::INFINITY, 1e30] {
            assert!(Aggregator::new(layout, 1.0).release_checked(z, &mut rng).is_err(), "{z}");
            let out = Aggregator::new(layout, 1.0).release(z, &mut rng);
            assert!(out.as_slice().iter().all(|&x| x == 0.0));
            assert_eq!(out.noise_std(), f32::INFINITY);
        }
        assert!(Aggregator::new(layout, f32::NAN).release_checked(1.0, &mut rng).is_err());
    }

    #[test]
    fn counts_get_integer_noise() {
        let mut rng = danger::seeded_rng(9);
        assert_eq!(release_count(17, 0.0, &mut rng), Ok(17.0));
        let draws: Vec<f64> =
            (0..4000).map(|_| release_count(17, 2.0, &mut rng).expect("in range")).collect();
        assert!(draws.iter().all(|x| x.fract() == 0.0));
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        assert!((mean - 17.0).abs() < 6.0 * 2.0 / (draws.len() as f64).sqrt(), "mean {mean}");
        assert!(release_count(1, -1.0, &mut rng).is_err());
    }
}
