//! Where weight bytes come from. Graphs name weights; a [`WeightSource`] resolves names.
//! Importers provide memory-mapped stores; passes that derive new weights (fused
//! projections, requantized matrices) put them in [`OwnedWeights`], layered over the
//! imported store with [`Layered`].

use std::collections::BTreeMap;

use crate::dtype::DType;

/// Raw bytes of one stored weight (usually memory-mapped).
pub struct WeightView<'a> {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: &'a [u8],
}

/// Where the interpreter and the passes find weights by name.
pub trait WeightSource: Sync {
    fn view(&self, name: &str) -> Option<WeightView<'_>>;

    /// A whole weight dequantized to f32, or `None` when it is missing.
    fn to_f32(&self, name: &str) -> Option<Vec<f32>> {
        let view = self.view(name)?;
        let n: usize = view.shape.iter().product();
        if view.dtype.storage_bytes(n) != Some(view.bytes.len()) {
            return None;
        }
        let mut out = vec![0.0; n];
        crate::dtype::dequantize_into(view.dtype, view.bytes, &mut out);
        Some(out)
    }
}

/// One derived weight held in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct OwnedWeight {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// Weights created by passes, by name (sorted, so iteration is deterministic).
#[derive(Debug, Clone, Default)]
pub struct OwnedWeights {
    weights: BTreeMap<String, OwnedWeight>,
}

impl OwnedWeights {
    pub fn insert(&mut self, name: String, weight: OwnedWeight) {
        self.weights.insert(name, weight);
    }

    pub fn get(&self, name: &str) -> Option<&OwnedWeight> {
        self.weights.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &OwnedWeight)> {
        self.weights.iter()
    }

    pub fn len(&self) -> usize {
        self.weights.len()
    }

    /// Drops the weights `keep` says no to (intermediates a later step superseded).
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.weights.retain(|name, _| keep(name));
    }

    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }
}

impl WeightSource for OwnedWeights {
    fn view(&self, name: &str) -> Option<WeightView<'_>> {
        self.weights.get(name).map(|w| WeightView { dtype: w.dtype, shape: w.shape.clone(), bytes: &w.bytes })
    }
}

/// Derived weights first, then the imported store.
pub struct Layered<'a> {
    pub top: &'a OwnedWeights,
    pub base: &'a dyn WeightSource,
}

impl WeightSource for Layered<'_> {
    fn view(&self, name: &str) -> Option<WeightView<'_>> {
        self.top.view(name).or_else(|| self.base.view(name))
    }
}
