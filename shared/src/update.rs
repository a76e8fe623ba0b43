//! Clipping: the only way to build what a device may upload is to clip it to L2 norm `C`.

use crate::error::UpdateError;
use crate::linalg::norm_sq_f64;
use crate::model::UpdateLayout;

/// Devices clip to `C · (1 − CLIP_MARGIN)`. The measured norm may be off by `1e-6`
/// (relative) and scaling rounds each value by `2⁻²⁴`, so this keeps the true norm strictly
/// below `C` for any input.
const CLIP_MARGIN: f64 = 1e-5;
/// The coordinator accepts a measured norm up to `C · (1 − VERIFY_MARGIN)`: with the
/// measurement error above, the true norm of anything accepted is at most `C`.
const VERIFY_MARGIN: f64 = 2e-6;

/// One device's update: a single vector in the [`UpdateLayout`]'s order.
///
/// In memory the item part may hold only the rows that can be non-zero (`rows`); every
/// other row is exactly zero. This is a storage choice, not a protocol one: the vector is
/// the same, and encoders for the network always write it densely, so that what a device
/// sends never depends on which items it touched.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateVector {
    layout: UpdateLayout,
    /// Item rows stored, ascending and unique; `None` means every item.
    rows: Option<Vec<u32>>,
    /// `stored rows × d` factor values.
    factors: Vec<f32>,
    /// One bias value per stored row.
    bias: Vec<f32>,
    /// Global mean, centroid sums and centroid counts, as in the layout.
    tail: Vec<f32>,
}

impl UpdateVector {
    /// All zeros, every item row stored.
    pub fn zeros_dense(layout: UpdateLayout) -> Self {
        let shape = layout.shape();
        Self {
            layout,
            rows: None,
            factors: vec![0.0; shape.n_items * shape.dim],
            bias: vec![0.0; shape.n_items],
            tail: vec![0.0; layout.len() - layout.centroid_sums().start + 1],
        }
    }

    /// All zeros, storing only the given item rows (ascending, unique, in range).
    pub fn zeros_rows(layout: UpdateLayout, rows: Vec<u32>) -> Result<Self, UpdateError> {
        let shape = layout.shape();
        if rows.windows(2).any(|w| w[0] >= w[1]) || rows.last().is_some_and(|&r| r as usize >= shape.n_items)
        {
            return Err(UpdateError::BadRows);
        }
        let n = rows.len();
        Ok(Self {
            layout,
            rows: Some(rows),
            factors: vec![0.0; n * shape.dim],
            bias: vec![0.0; n],
            tail: vec![0.0; layout.len() - layout.centroid_sums().start + 1],
        })
    }

    /// A dense vector in layout order (as decoded from the network).
    pub fn from_dense(layout: UpdateLayout, data: &[f32]) -> Result<Self, UpdateError> {
        if data.len() != layout.len() {
            return Err(UpdateError::WrongLength { expected: layout.len(), got: data.len() });
        }
        Ok(Self {
            layout,
            rows: None,
            factors: data[layout.item_factors()].to_vec(),
            bias: data[layout.item_bias()].to_vec(),
            tail: data[layout.global_mean()..].to_vec(),
        })
    }

    /// The whole vector in layout order, zeros included.
    pub fn to_dense(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.layout.len()];
        self.add_to(&mut out);
        out
    }

    /// Adds this vector to a dense vector in layout order.
    pub fn add_to(&self, out: &mut [f32]) {
        let l = self.layout;
        let d = l.shape().dim;
        assert_eq!(out.len(), l.len(), "dense target must have the layout's length");
        let (fac, rest) = out.split_at_mut(l.item_bias().start);
        let (bias, tail) = rest.split_at_mut(l.shape().n_items);
        match &self.rows {
            None => {
                add_assign(fac, &self.factors);
                add_assign(bias, &self.bias);
            }
            Some(rows) => {
                for (k, &r) in rows.iter().enumerate() {
                    let r = r as usize;
                    add_assign(&mut fac[r * d..(r + 1) * d], &self.factors[k * d..(k + 1) * d]);
                    bias[r] += self.bias[k];
                }
            }
        }
        add_assign(tail, &self.tail);
    }

    /// The layout.
    pub fn layout(&self) -> &UpdateLayout {
        &self.layout
    }

    /// The stored item rows, or `None` if every row is stored.
    pub fn rows(&self) -> Option<&[u32]> {
        self.rows.as_deref()
    }

    /// Factor values of the stored rows (`stored × d`), bias values of the stored rows,
    /// and the tail (global mean, centroid sums, centroid counts), for writing.
    pub fn parts_mut(&mut self) -> (&mut [f32], &mut [f32], &mut [f32]) {
        (&mut self.factors, &mut self.bias, &mut self.tail)
    }

    /// The same, for reading.
    pub fn parts(&self) -> (&[f32], &[f32], &[f32]) {
        (&self.factors, &self.bias, &self.tail)
    }

    /// Squared L2 norm (see [`norm_sq_f64`] for its accuracy).
    pub fn norm_sq(&self) -> f64 {
        norm_sq_f64(&self.factors) + norm_sq_f64(&self.bias) + norm_sq_f64(&self.tail)
    }

    fn all_finite(&self) -> bool {
        [&self.factors, &self.bias, &self.tail].iter().all(|p| p.iter().all(|x| x.is_finite()))
    }

    fn scale(&mut self, factor: f32) {
        for part in [&mut self.factors, &mut self.bias, &mut self.tail] {
            for x in part.iter_mut() {
                *x *= factor;
            }
        }
    }
}

fn add_assign(out: &mut [f32], x: &[f32]) {
    for (o, v) in out.iter_mut().zip(x) {
        *o += v;
    }
}

/// An update whose L2 norm is at most the clip norm. The fields are private: the only
/// constructors are [`ClippedUpdate::clip`] (on the device) and
/// [`ClippedUpdate::verify_received`] (on the coordinator, for a vector from a peer).
#[derive(Debug, Clone, PartialEq)]
pub struct ClippedUpdate {
    vector: UpdateVector,
    clip_norm: f32,
    was_clipped: bool,
}

impl ClippedUpdate {
    /// Scales `vector` down (if needed) so that its L2 norm is at most `clip_norm`.
    ///
    /// Fails only on non-finite input, which a correct device never produces.
    pub fn clip(mut vector: UpdateVector, clip_norm: f32) -> Result<Self, UpdateError> {
        assert!(clip_norm.is_finite() && clip_norm > 0.0, "clip norm is validated by the round config");
        let norm = vector.norm_sq().sqrt();
        if !norm.is_finite() {
            return Err(UpdateError::NonFinite);
        }
        let bound = f64::from(clip_norm) * (1.0 - CLIP_MARGIN);
        let was_clipped = norm > bound;
        if was_clipped {
            vector.scale((bound / norm) as f32);
        }
        Ok(Self { vector, clip_norm, was_clipped })
    }

    /// Checks a vector a peer sent: the expected layout, finite, and within the clip norm.
    pub fn verify_received(
        vector: UpdateVector,
        layout: &UpdateLayout,
        clip_norm: f32,
    ) -> Result<Self, UpdateError> {
        if vector.layout() != layout {
            return Err(UpdateError::WrongLength { expected: layout.len(), got: vector.layout().len() });
        }
        if !vector.all_finite() {
            return Err(UpdateError::NonFinite);
        }
        let norm = vector.norm_sq().sqrt();
        if norm.is_nan() || norm > f64::from(clip_norm) * (1.0 - VERIFY_MARGIN) {
            return Err(UpdateError::NormTooLarge { norm, clip_norm: f64::from(clip_norm) });
        }
        Ok(Self { vector, clip_norm, was_clipped: false })
    }

    /// The clipped vector.
    pub fn vector(&self) -> &UpdateVector {
        &self.vector
    }

    /// The bound this update respects.
    pub fn clip_norm(&self) -> f32 {
        self.clip_norm
    }

    /// Whether clipping changed the vector (known only on the device that clipped it).
    pub fn was_clipped(&self) -> bool {
        self.was_clipped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelShape;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn clipped_norm_never_exceeds_bound(
            n_items in 1usize..40,
            dim in 1usize..6,
            scale in prop::sample::select(vec![1e-3f32, 1.0, 1e3, 1e30]),
            seed in any::<u64>(),
            clip in 1e-6f32..1e6f32,
            sparse in any::<bool>(),
        ) {
            let layout = ModelShape { n_items, dim, n_segments: 2 }.layout();
            let mut rng = crate::danger::seeded_rng(seed);
            let data: Vec<f32> = (0..layout.len()).map(|_| scale * (rand::Rng::random::<f32>(&mut rng) - 0.5)).collect();
            let v = if sparse {
                // Keep rows 0 and the last one, as a device that rated two items would.
                let rows: Vec<u32> = if n_items > 1 { vec![0, n_items as u32 - 1] } else { vec![0] };
                let mut v = UpdateVector::zeros_rows(layout, rows.clone()).expect("valid rows");
                let dense = UpdateVector::from_dense(layout, &data).expect("length");
                let (df, db, dt) = dense.parts();
                let (f, b, t) = v.parts_mut();
                for (k, &r) in rows.iter().enumerate() {
                    let r = r as usize;
                    f[k * dim..(k + 1) * dim].copy_from_slice(&df[r * dim..(r + 1) * dim]);
                    b[k] = db[r];
                }
                t.copy_from_slice(dt);
                v
            } else {
                UpdateVector::from_dense(layout, &data).expect("length")
            };
            let before = v.to_dense();
            let c = ClippedUpdate::clip(v, clip).expect("finite input");
            let after = c.vector().to_dense();
            let exact = after.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt();
            prop_assert!(exact <= f64::from(clip), "norm {exact} > clip {clip}");
            // The coordinator accepts what an honest device clipped, densely re-encoded.
            let received = UpdateVector::from_dense(layout, &after).expect("length");
            prop_assert!(ClippedUpdate::verify_received(received, &layout, clip).is_ok());
            // Unclipped vectors are untouched; clipped ones keep their direction.
            let orig = before.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt();
            if orig <= f64::from(clip) * 0.9999 {
                prop_assert_eq!(&after, &before);
            } else {
                let k = exact / orig;
                for (a, b) in after.iter().zip(&before) {
                    prop_assert!((f64::from(*a) - k * f64::from(*b)).abs() <= 1e-5 * f64::from(b.abs()).max(1e-30) + 1e-37);
                }
            }
        }
    }

    fn tiny() -> UpdateLayout {
        ModelShape { n_items: 1, dim: 1, n_segments: 1 }.layout()
    }

    fn dense(data: &[f32]) -> UpdateVector {
        UpdateVector::from_dense(tiny(), data).expect("length 5")
    }

    #[test]
    fn clip_rejects_non_finite() {
        assert_eq!(
            ClippedUpdate::clip(dense(&[1.0, f32::NAN, 0.0, 0.0, 0.0]), 1.0),
            Err(UpdateError::NonFinite)
        );
        assert_eq!(
            ClippedUpdate::clip(dense(&[f32::INFINITY, 0.0, 0.0, 0.0, 0.0]), 1.0),
            Err(UpdateError::NonFinite)
        );
    }

    #[test]
    fn clip_scales_to_the_bound() {
        let c = ClippedUpdate::clip(dense(&[3.0, 4.0, 0.0, 0.0, 0.0]), 1.0).expect("finite");
        assert!(c.was_clipped());
        let v = c.vector().to_dense();
        let n = norm_sq_f64(&v).sqrt();
        assert!(n <= 1.0 && n > 0.9999, "{n}");
        assert!((v[0] / v[1] - 0.75).abs() < 1e-6);
    }

    #[test]
    fn sparse_rows_must_be_sorted_unique_and_in_range() {
        let l = ModelShape { n_items: 3, dim: 2, n_segments: 1 }.layout();
        assert!(UpdateVector::zeros_rows(l, vec![0, 2]).is_ok());
        assert_eq!(UpdateVector::zeros_rows(l, vec![2, 0]), Err(UpdateError::BadRows));
        assert_eq!(UpdateVector::zeros_rows(l, vec![1, 1]), Err(UpdateError::BadRows));
        assert_eq!(UpdateVector::zeros_rows(l, vec![3]), Err(UpdateError::BadRows));
    }

    #[test]
    fn verify_received_checks_shape_values_and_norm() {
        let layout = tiny();
        assert_eq!(layout.len(), 5);
        assert!(matches!(
            UpdateVector::from_dense(layout, &[0.0; 4]),
            Err(UpdateError::WrongLength { expected: 5, got: 4 })
        ));
        let other = ModelShape { n_items: 2, dim: 1, n_segments: 1 }.layout();
        assert!(matches!(
            ClippedUpdate::verify_received(UpdateVector::zeros_dense(other), &layout, 1.0),
            Err(UpdateError::WrongLength { .. })
        ));
        assert_eq!(
            ClippedUpdate::verify_received(dense(&[0.0, f32::NAN, 0.0, 0.0, 0.0]), &layout, 1.0),
            Err(UpdateError::NonFinite)
        );
        assert!(matches!(
            ClippedUpdate::verify_received(dense(&[1.0, 1.0, 0.0, 0.0, 0.0]), &layout, 1.0),
            Err(UpdateError::NormTooLarge { .. })
        ));
        assert!(ClippedUpdate::verify_received(dense(&[0.5, 0.5, 0.0, 0.0, 0.0]), &layout, 1.0).is_ok());
    }
}
