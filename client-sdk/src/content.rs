//! Text features of items (genres, tags) turned into vectors on the device, for the hybrid recommender.
//!
//! Each item carries a small set of tags. Tags are normalised (trimmed, lower-cased), mapped to
//! a vocabulary, and weighted by smoothed inverse document frequency
//! `idf(t) = ln((1 + N) / (1 + df(t))) + 1`, where `N` is the number of tagged items and
//! `df(t)` the number of items carrying `t` (tags are a set per item, so term frequency is 1).
//! Every item's vector is L2-normalised, so the cosine of two items is a plain dot product.
//!
//! Vectors are sparse (a few tags per item, catalogues of 10⁵ items) and stored in one
//! compressed-row array. Since one item's tags change every other item's IDF weights, the
//! array is rebuilt lazily, once after a batch of [`ContentIndex::set_tags`] calls, at the
//! first read.

use std::collections::HashMap;
use std::sync::OnceLock;

/// Longest tag, in bytes after normalisation.
pub const MAX_TAG_LEN: usize = 64;
/// Most tags on one item.
pub const MAX_TAGS_PER_ITEM: usize = 32;
/// Most distinct tags in the vocabulary (tags are never removed from it, only unused).
pub const MAX_VOCABULARY: usize = 65_536;

/// Why tags were refused. Messages never contain the tags themselves.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ContentError {
    /// The item is outside the catalogue.
    #[error("an item id is outside the catalogue of {n_items} items")]
    ItemOutOfRange {
        /// Catalogue size.
        n_items: usize,
    },
    /// More tags than [`MAX_TAGS_PER_ITEM`] for one item.
    #[error("an item may carry at most {max} tags")]
    TooManyTags {
        /// The bound.
        max: usize,
    },
    /// A tag longer than [`MAX_TAG_LEN`] bytes.
    #[error("a tag may be at most {max} bytes long")]
    TagTooLong {
        /// The bound.
        max: usize,
    },
    /// A tag that is empty after trimming.
    #[error("a tag is empty")]
    EmptyTag,
    /// The vocabulary reached [`MAX_VOCABULARY`] distinct tags.
    #[error("the tag vocabulary is full ({max} distinct tags)")]
    VocabularyFull {
        /// The bound.
        max: usize,
    },
}

/// Tag vocabulary plus per-item tag sets, and their L2-normalised TF-IDF vectors.
#[derive(Debug, Clone, Default)]
pub struct ContentIndex {
    n_items: usize,
    vocab: HashMap<String, u32>,
    names: Vec<String>,
    /// Per item: sorted, unique tag ids.
    tags: Vec<Vec<u32>>,
    /// Per tag: number of items carrying it.
    doc_freq: Vec<u32>,
    /// Number of items with at least one tag.
    n_tagged: usize,
    vectors: OnceLock<ContentVectors>,
}

/// Every item's TF-IDF vector in compressed-row form (`(tag id, weight)` pairs sorted by tag
/// id), and the same matrix by tag (`(item, weight)` lists), for scoring a whole catalogue.
#[derive(Debug, Clone)]
pub struct ContentVectors {
    offsets: Vec<usize>,
    entries: Vec<(u32, f32)>,
    tag_offsets: Vec<usize>,
    postings: Vec<(u32, f32)>,
}

impl ContentVectors {
    /// The sparse unit vector of `item` (empty if it has no tags).
    ///
    /// # Panics
    /// If `item` is outside the catalogue (callers check it once per request).
    #[inline]
    pub fn row(&self, item: usize) -> &[(u32, f32)] {
        &self.entries[self.offsets[item]..self.offsets[item + 1]]
    }

    /// Dot product of `item`'s vector with a dense vector over the vocabulary.
    #[inline]
    pub fn dot_dense(&self, item: usize, dense: &[f32]) -> f32 {
        self.row(item).iter().map(|&(t, w)| dense.get(t as usize).map_or(0.0, |p| p * w)).sum()
    }

    /// Adds every item's dot product with `dense` (over the vocabulary) to `out[item]`.
    ///
    /// It walks the tags rather than the items: the inner loops are long and branch-free,
    /// where a loop over each item's one to a few tags mispredicts its exit at every item.
    ///
    /// # Panics
    /// If `out` is shorter than the catalogue.
    pub fn add_dots_to(&self, dense: &[f32], out: &mut [f32]) {
        for (t, &p) in dense.iter().enumerate().take(self.tag_offsets.len().saturating_sub(1)) {
            if p != 0.0 {
                for &(item, w) in &self.postings[self.tag_offsets[t]..self.tag_offsets[t + 1]] {
                    out[item as usize] += p * w;
                }
            }
        }
    }

    /// Cosine of two items (their vectors are unit or empty).
    pub fn cosine(&self, a: usize, b: usize) -> f32 {
        let (mut x, mut y) = (self.row(a).iter().peekable(), self.row(b).iter().peekable());
        let mut s = 0.0;
        while let (Some(&&(ta, wa)), Some(&&(tb, wb))) = (x.peek(), y.peek()) {
            match ta.cmp(&tb) {
                std::cmp::Ordering::Less => {
                    x.next();
                }
                std::cmp::Ordering::Greater => {
                    y.next();
                }
                std::cmp::Ordering::Equal => {
                    s += wa * wb;
                    x.next();
                    y.next();
                }
            }
        }
        s
    }
}

impl ContentIndex {
    /// An empty index for a catalogue of `n_items` items.
    pub fn new(n_items: usize) -> Self {
        Self { n_items, tags: vec![Vec::new(); n_items], ..Self::default() }
    }

    /// Catalogue size.
    pub fn n_items(&self) -> usize {
        self.n_items
    }

    /// Number of distinct tags ever seen (the vocabulary size).
    pub fn n_tags(&self) -> usize {
        self.names.len()
    }

    /// Sets (replaces) the tags of `item`. Tags are trimmed and lower-cased; duplicates after
    /// that count once; an empty list clears the item. On error nothing changes.
    pub fn set_tags(&mut self, item: u32, tags: &[&str]) -> Result<(), ContentError> {
        let idx = self.check_item(item)?;
        if tags.len() > MAX_TAGS_PER_ITEM {
            return Err(ContentError::TooManyTags { max: MAX_TAGS_PER_ITEM });
        }
        let normalised = tags
            .iter()
            .map(|t| {
                let t = t.trim().to_lowercase();
                match t.len() {
                    0 => Err(ContentError::EmptyTag),
                    n if n > MAX_TAG_LEN => Err(ContentError::TagTooLong { max: MAX_TAG_LEN }),
                    _ => Ok(t),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let new_words = normalised.iter().filter(|t| !self.vocab.contains_key(t.as_str())).count();
        if self.names.len() + new_words > MAX_VOCABULARY {
            return Err(ContentError::VocabularyFull { max: MAX_VOCABULARY });
        }
        let mut ids: Vec<u32> = normalised.into_iter().map(|t| self.intern(t)).collect();
        ids.sort_unstable();
        ids.dedup();
        let old = std::mem::replace(&mut self.tags[idx], ids);
        for &t in &old {
            self.doc_freq[t as usize] -= 1;
        }
        for &t in &self.tags[idx] {
            self.doc_freq[t as usize] += 1;
        }
        self.n_tagged =
            self.n_tagged + usize::from(!self.tags[idx].is_empty()) - usize::from(!old.is_empty());
        self.vectors = OnceLock::new();
        Ok(())
    }

    /// The normalised tags of `item`, in vocabulary order.
    pub fn tags(&self, item: u32) -> Result<Vec<&str>, ContentError> {
        let idx = self.check_item(item)?;
        Ok(self.tags[idx].iter().map(|&t| self.names[t as usize].as_str()).collect())
    }

    /// Every item's TF-IDF vector, rebuilt here if tags changed since the last read.
    pub fn vectors(&self) -> &ContentVectors {
        self.vectors.get_or_init(|| self.build())
    }

    fn check_item(&self, item: u32) -> Result<usize, ContentError> {
        let idx = item as usize;
        if idx < self.n_items { Ok(idx) } else { Err(ContentError::ItemOutOfRange { n_items: self.n_items }) }
    }

    fn intern(&mut self, tag: String) -> u32 {
        if let Some(&id) = self.vocab.get(&tag) {
            return id;
        }
        let id = u32::try_from(self.names.len()).expect("the vocabulary is bounded by MAX_VOCABULARY");
        self.names.push(tag.clone());
        self.vocab.insert(tag, id);
        self.doc_freq.push(0);
        id
    }

    fn build(&self) -> ContentVectors {
        let n = self.n_tagged as f64;
        let idf: Vec<f32> =
            self.doc_freq.iter().map(|&df| (((1.0 + n) / (1.0 + f64::from(df))).ln() + 1.0) as f32).collect();
        let mut offsets = Vec::with_capacity(self.n_items + 1);
        let mut entries = Vec::with_capacity(self.tags.iter().map(Vec::len).sum());
        offsets.push(0);
        for tags in &self.tags {
            let norm = tags.iter().map(|&t| idf[t as usize].powi(2)).sum::<f32>().sqrt();
            entries.extend(tags.iter().map(|&t| (t, idf[t as usize] / norm)));
            offsets.push(entries.len());
        }
        // The transpose, by counting sort on the tag.
        let mut tag_offsets = vec![0usize; self.names.len() + 1];
        for &(t, _) in &entries {
            tag_offsets[t as usize + 1] += 1;
        }
        for t in 0..self.names.len() {
            tag_offsets[t + 1] += tag_offsets[t];
        }
        let mut next = tag_offsets.clone();
        let mut postings = vec![(0u32, 0.0f32); entries.len()];
        for (item, start) in (0u32..).zip(&offsets[..self.n_items]) {
            for &(t, w) in &entries[*start..offsets[item as usize + 1]] {
                postings[next[t as usize]] = (item, w);
                next[t as usize] += 1;
            }
        }
        ContentVectors { offsets, entries, tag_offsets, postings }
    }
}
