//! The global model the coordinator trains (item embeddings, item biases, global mean, segment centroids) and its layout as one flat update vector.

pub mod compact;
pub mod subset;

use std::ops::Range;
use std::sync::{Arc, OnceLock};

use ndarray::{Array1, Array2};
use rand::Rng;
use rand_distr::{Distribution, Normal};

use crate::error::ParamError;
use crate::linalg;
use compact::{DownloadEncoding, Int8Rows};
use subset::ItemSubset;

/// The dimensions of a model: every party must agree on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShape {
    /// Number of items in the catalogue.
    pub n_items: usize,
    /// Embedding dimension `d`.
    pub dim: usize,
    /// Number of user segments (k-means centroids).
    pub n_segments: usize,
}

impl ModelShape {
    /// Checks that the shape is usable.
    pub fn validate(&self) -> Result<(), ParamError> {
        if self.n_items == 0 {
            return Err(ParamError::new("n_items", "must be at least 1"));
        }
        if self.dim == 0 || self.dim > 1024 {
            return Err(ParamError::new("dim", "must be in 1..=1024"));
        }
        if self.n_segments == 0 || self.n_segments > 4096 {
            return Err(ParamError::new("n_segments", "must be in 1..=4096"));
        }
        Ok(())
    }

    /// The layout of one client update for this shape.
    pub fn layout(&self) -> UpdateLayout {
        UpdateLayout { shape: *self }
    }
}

/// Where each part of the model lives in a flat update vector.
///
/// `[ item factors (n_items·d) | item biases (n_items) | global mean (1) |
///    centroid sums (n_segments·d) | centroid counts (n_segments) ]`
///
/// The first three parts are the gradient of the device's loss; the last two are its
/// federated k-means statistics. The whole vector is clipped as one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpdateLayout {
    shape: ModelShape,
}

impl UpdateLayout {
    /// The model shape behind this layout.
    pub fn shape(&self) -> ModelShape {
        self.shape
    }
    /// Item factor gradient, row-major `n_items × d`.
    pub fn item_factors(&self) -> Range<usize> {
        0..self.shape.n_items * self.shape.dim
    }
    /// Item bias gradient.
    pub fn item_bias(&self) -> Range<usize> {
        let s = self.item_factors().end;
        s..s + self.shape.n_items
    }
    /// Global mean gradient (one value).
    pub fn global_mean(&self) -> usize {
        self.item_bias().end
    }
    /// The parameters the server optimizer updates: factors, biases and the global mean.
    pub fn trainable(&self) -> Range<usize> {
        0..self.global_mean() + 1
    }
    /// Per-segment sums of user vectors, row-major `n_segments × d`.
    pub fn centroid_sums(&self) -> Range<usize> {
        let s = self.global_mean() + 1;
        s..s + self.shape.n_segments * self.shape.dim
    }
    /// Per-segment counts.
    pub fn centroid_counts(&self) -> Range<usize> {
        let s = self.centroid_sums().end;
        s..s + self.shape.n_segments
    }
    /// Total length of an update vector.
    pub fn len(&self) -> usize {
        self.centroid_counts().end
    }
    /// Never true for a validated shape; present for API completeness.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How a fresh model is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelInit {
    /// Standard deviation of the initial item factors.
    pub factor_std: f32,
    /// Initial global mean: a prior the operator knows without data (e.g. the middle of a
    /// 1–5 star scale), or 0 for implicit feedback.
    pub global_mean: f32,
    /// Norm of the initial centroids. Tiny random centroids make the first assignment a
    /// random-direction partition of the user vectors, so k-means starts from data-driven
    /// groups without the server ever seeing a user vector.
    pub centroid_scale: f32,
}

impl Default for ModelInit {
    fn default() -> Self {
        Self { factor_std: 0.1, global_mean: 0.0, centroid_scale: 1e-3 }
    }
}

/// The global model: everything the coordinator trains and publishes.
#[derive(Debug, Clone, PartialEq)]
pub struct GlobalModel {
    /// Item embeddings `V`, `n_items × d`, standard layout.
    pub item_factors: Array2<f32>,
    /// Item biases `b`.
    pub item_bias: Array1<f32>,
    /// Global mean `μ` of explicit ratings (0 for implicit feedback).
    pub global_mean: f32,
    /// Segment centroids `K`, `n_segments × d`, standard layout.
    pub centroids: Array2<f32>,
}

impl GlobalModel {
    /// A freshly initialised model with random item factors and tiny random centroids.
    pub fn init<R: Rng + ?Sized>(
        shape: ModelShape,
        init: ModelInit,
        rng: &mut R,
    ) -> Result<Self, ParamError> {
        shape.validate()?;
        let factor =
            Normal::new(0.0f32, init.factor_std).map_err(|e| ParamError::new("factor_std", e.to_string()))?;
        let item_factors = Array2::from_shape_simple_fn((shape.n_items, shape.dim), || factor.sample(rng));
        let unit = Normal::new(0.0f32, 1.0).map_err(|e| ParamError::new("centroid_scale", e.to_string()))?;
        let mut centroids = Array2::from_shape_simple_fn((shape.n_segments, shape.dim), || unit.sample(rng));
        for mut row in centroids.rows_mut() {
            let n = row.dot(&row).sqrt().max(f32::MIN_POSITIVE);
            row.mapv_inplace(|x| x / n * init.centroid_scale);
        }
        Ok(Self {
            item_factors,
            item_bias: Array1::zeros(shape.n_items),
            global_mean: init.global_mean,
            centroids,
        })
    }

    /// A model from flat row-major arrays (as stored or sent), checking the shape, every
    /// array's length and that every value is finite.
    pub fn from_flat(
        shape: ModelShape,
        item_factors: Vec<f32>,
        item_bias: Vec<f32>,
        global_mean: f32,
        centroids: Vec<f32>,
    ) -> Result<Self, ParamError> {
        shape.validate()?;
        let len = |name: &'static str, got: usize, want: Option<usize>| {
            if Some(got) == want {
                Ok(())
            } else {
                Err(ParamError::new(name, format!("has {got} values, the shape needs {want:?}")))
            }
        };
        len("item_factors", item_factors.len(), shape.n_items.checked_mul(shape.dim))?;
        len("item_bias", item_bias.len(), Some(shape.n_items))?;
        len("centroids", centroids.len(), shape.n_segments.checked_mul(shape.dim))?;
        let finite = |v: &[f32]| v.iter().all(|x| x.is_finite());
        if !(finite(&item_factors) && finite(&item_bias) && global_mean.is_finite() && finite(&centroids)) {
            return Err(ParamError::new("model", "holds a non-finite value"));
        }
        let shape_err = |e: ndarray::ShapeError| ParamError::new("model", e.to_string());
        Ok(Self {
            item_factors: Array2::from_shape_vec((shape.n_items, shape.dim), item_factors)
                .map_err(shape_err)?,
            item_bias: Array1::from_vec(item_bias),
            global_mean,
            centroids: Array2::from_shape_vec((shape.n_segments, shape.dim), centroids).map_err(shape_err)?,
        })
    }

    /// The model's shape.
    pub fn shape(&self) -> ModelShape {
        ModelShape {
            n_items: self.item_factors.nrows(),
            dim: self.item_factors.ncols(),
            n_segments: self.centroids.nrows(),
        }
    }

    /// Item factors as a row-major slice.
    pub fn factors_slice(&self) -> &[f32] {
        self.item_factors.as_slice().expect("item factors are kept in standard layout")
    }

    /// Centroids as a row-major slice.
    pub fn centroids_slice(&self) -> &[f32] {
        self.centroids.as_slice().expect("centroids are kept in standard layout")
    }

    /// Row `item` of the item factors.
    #[inline]
    pub fn item_row(&self, item: usize) -> &[f32] {
        let d = self.item_factors.ncols();
        &self.factors_slice()[item * d..(item + 1) * d]
    }

    /// The model restricted to `items` (ascending, in range): their factor rows and biases,
    /// the global mean and the centroids.
    pub fn select_items(&self, items: &[u32]) -> Self {
        let d = self.item_factors.ncols();
        let mut factors = Vec::with_capacity(items.len() * d);
        for &i in items {
            factors.extend_from_slice(self.item_row(i as usize));
        }
        let bias = items.iter().map(|&i| self.item_bias[i as usize]).collect::<Vec<_>>();
        Self {
            item_factors: Array2::from_shape_vec((items.len(), d), factors)
                .expect("one row of d factors per selected item"),
            item_bias: Array1::from_vec(bias),
            global_mean: self.global_mean,
            centroids: self.centroids.clone(),
        }
    }

    /// Index and squared distance of the centroid nearest to `u`.
    pub fn nearest_segment(&self, u: &[f32]) -> (usize, f32) {
        let d = self.centroids.ncols();
        let mut best = (0, f32::INFINITY);
        for (j, c) in self.centroids_slice().chunks_exact(d).enumerate() {
            let dist: f32 = c.iter().zip(u).map(|(a, b)| (a - b) * (a - b)).sum();
            if dist < best.1 {
                best = (j, dist);
            }
        }
        best
    }
}

/// A model as distributed for one round: a version, the parameters, and what devices derive
/// from them once per version (the Gramian `VᵀV` the implicit objective needs).
#[derive(Debug, Clone)]
pub struct RoundModel {
    /// Monotone model version; devices cache by it.
    pub version: u64,
    /// The parameters: the whole model, or, in a round that trains an item subset, the
    /// subset's rows (row `k` is item `subset.items()[k]`), as the device decoded them.
    pub model: GlobalModel,
    gramian: OnceLock<Vec<f64>>,
    subset: Option<Arc<ItemSubset>>,
    int8: Option<Arc<Int8Rows>>,
    reference: Option<Arc<RoundModel>>,
}

impl RoundModel {
    /// Wraps a model; derived quantities are computed on first use, once per version.
    pub fn new(version: u64, model: GlobalModel) -> Self {
        Self { version, model, gramian: OnceLock::new(), subset: None, int8: None, reference: None }
    }

    /// What the devices of one round get from the global model `full` at `version`: the rows
    /// of `subset` (all rows without one), encoded as `encoding` says. With
    /// [`DownloadEncoding::Int8`] the item factors are rounded stochastically with `rng` and
    /// [`RoundModel::model`] holds exactly what a device decodes.
    pub fn for_round<R: Rng + ?Sized>(
        version: u64,
        full: &GlobalModel,
        subset: Option<ItemSubset>,
        encoding: DownloadEncoding,
        rng: &mut R,
    ) -> Self {
        let mut model = match &subset {
            Some(s) => full.select_items(s.items()),
            None => full.clone(),
        };
        let int8 = match encoding {
            DownloadEncoding::F32 => None,
            DownloadEncoding::Int8 => {
                let rows = Int8Rows::encode(model.factors_slice(), model.item_factors.ncols(), rng);
                let decoded = rows.decode();
                model.item_factors = Array2::from_shape_vec(model.item_factors.raw_dim(), decoded)
                    .expect("decoding keeps the shape");
                Some(Arc::new(rows))
            }
        };
        Self { version, model, gramian: OnceLock::new(), subset: subset.map(Arc::new), int8, reference: None }
    }

    /// A round model as a device decodes it: `model` holds the subset's rows when `subset` is
    /// given (their numbers must agree), and `int8`, if given, is the factors' encoding.
    pub fn from_parts(
        version: u64,
        model: GlobalModel,
        subset: Option<ItemSubset>,
        int8: Option<Int8Rows>,
    ) -> Result<Self, ParamError> {
        if let Some(s) = &subset
            && s.len() != model.shape().n_items
        {
            return Err(ParamError::new(
                "items_per_round",
                format!("the subset has {} items, the model {} rows", s.len(), model.shape().n_items),
            ));
        }
        Ok(Self {
            version,
            model,
            gramian: OnceLock::new(),
            subset: subset.map(Arc::new),
            int8: int8.map(Arc::new),
            reference: None,
        })
    }

    /// Marks an in-place change of [`RoundModel::model`]: the model is now `version`, and what
    /// was derived from the old parameters (the Gramian) is dropped. For the coordinator's own
    /// global model (no subset, no compact encoding).
    pub fn advance(&mut self, version: u64) {
        self.version = version;
        self.gramian = OnceLock::new();
        self.subset = None;
        self.int8 = None;
        self.reference = None;
    }

    /// This subset round's model together with the device's cached model of the whole
    /// catalogue, which the device then reconstructs its user vector from (all its
    /// interactions) before it computes the update over the subset. Never sent: on a device it
    /// is the model it already holds (the SDK keeps the last full model for offline
    /// recommendations); in a simulation, the coordinator's current model.
    pub fn with_reference(mut self, cached: Arc<RoundModel>) -> Self {
        self.reference = Some(cached);
        self
    }

    /// The device's cached full model, when the user vector is reconstructed from it.
    pub fn reference(&self) -> Option<&RoundModel> {
        self.reference.as_deref()
    }

    /// The round's item subset, when the round trains one ([`RoundModel::model`] then holds
    /// only its rows).
    pub fn subset(&self) -> Option<&ItemSubset> {
        self.subset.as_deref()
    }

    /// The 8-bit encoding of the item factors, when the round downloads them so.
    pub fn int8_factors(&self) -> Option<&Int8Rows> {
        self.int8.as_deref()
    }

    /// How the round's model is downloaded.
    pub fn encoding(&self) -> DownloadEncoding {
        if self.int8.is_some() { DownloadEncoding::Int8 } else { DownloadEncoding::F32 }
    }

    /// The catalogue size: the subset's catalogue, or the model's rows.
    pub fn n_catalogue_items(&self) -> usize {
        self.subset.as_ref().map_or(self.model.shape().n_items, |s| s.n_items())
    }

    /// `VᵀV` as a full row-major `d × d` matrix.
    pub fn gramian(&self) -> &[f64] {
        self.gramian
            .get_or_init(|| linalg::gramian(self.model.factors_slice(), self.model.item_factors.ncols()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_parts_tile_the_vector() {
        let l = ModelShape { n_items: 5, dim: 3, n_segments: 2 }.layout();
        assert_eq!(l.item_factors(), 0..15);
        assert_eq!(l.item_bias(), 15..20);
        assert_eq!(l.global_mean(), 20);
        assert_eq!(l.trainable(), 0..21);
        assert_eq!(l.centroid_sums(), 21..27);
        assert_eq!(l.centroid_counts(), 27..29);
        assert_eq!(l.len(), 29);
    }

    #[test]
    fn shape_validation_rejects_zero_sizes() {
        assert!(ModelShape { n_items: 0, dim: 3, n_segments: 2 }.validate().is_err());
        assert!(ModelShape { n_items: 3, dim: 0, n_segments: 2 }.validate().is_err());
        assert!(ModelShape { n_items: 3, dim: 3, n_segments: 0 }.validate().is_err());
    }
}
