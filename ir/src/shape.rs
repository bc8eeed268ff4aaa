//! Symbolic dimensions and tensor types.
//!
//! A dimension is an affine sum of named symbols plus a constant (`576`, `s`, `p+s`).
//! Symbols are bound at run time: `s` is the number of tokens fed in one step,
//! `p` the number of positions already in the KV cache.

use std::collections::BTreeMap;
use std::fmt;

use crate::dtype::DType;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Dim {
    /// Symbol name -> coefficient (never zero), sorted by name for a canonical form.
    terms: BTreeMap<String, i64>,
    constant: i64,
}

impl Dim {
    pub fn konst(n: i64) -> Dim {
        Dim { terms: BTreeMap::new(), constant: n }
    }

    pub fn sym(name: &str) -> Dim {
        let mut terms = BTreeMap::new();
        terms.insert(name.to_string(), 1);
        Dim { terms, constant: 0 }
    }

    pub fn as_const(&self) -> Option<i64> {
        self.terms.is_empty().then_some(self.constant)
    }

    pub fn is_symbolic(&self) -> bool {
        !self.terms.is_empty()
    }

    pub fn add(&self, other: &Dim) -> Dim {
        let mut terms = self.terms.clone();
        for (name, coeff) in &other.terms {
            let entry = terms.entry(name.clone()).or_insert(0);
            *entry = entry.saturating_add(*coeff);
            if *entry == 0 {
                terms.remove(name);
            }
        }
        Dim { terms, constant: self.constant.saturating_add(other.constant) }
    }

    pub fn symbols(&self) -> impl Iterator<Item = &str> {
        self.terms.keys().map(String::as_str)
    }

    /// Evaluates with every symbol bound; `None` names an unbound symbol.
    pub fn eval(&self, bind: &dyn Fn(&str) -> Option<i64>) -> Result<i64, String> {
        let mut v = self.constant;
        for (name, coeff) in &self.terms {
            let term = coeff.checked_mul(bind(name).ok_or_else(|| name.clone())?);
            v = term.and_then(|t| v.checked_add(t)).ok_or_else(|| format!("{self} overflows"))?;
        }
        Ok(v)
    }

    /// Parses `576`, `s`, `p+s`, `2*s+1`. Coefficients and constants stay within
    /// [`MAX_DIM_TERM`] (text comes from files: nothing here may overflow).
    pub fn parse(text: &str) -> Option<Dim> {
        let mut dim = Dim::konst(0);
        let bounded = |n: i64| (n.unsigned_abs() <= MAX_DIM_TERM as u64).then_some(n);
        for part in text.split('+') {
            let part = part.trim();
            if part.is_empty() {
                return None;
            }
            let (coeff, name) = match part.split_once('*') {
                Some((c, n)) => (bounded(c.trim().parse::<i64>().ok()?)?, n.trim()),
                None => (1, part),
            };
            if let Ok(n) = name.parse::<i64>() {
                dim.constant = bounded(dim.constant.checked_add(coeff.checked_mul(bounded(n)?)?)?)?;
            } else if is_symbol(name) {
                let entry = dim.terms.entry(name.to_string()).or_insert(0);
                *entry = bounded(entry.checked_add(coeff)?)?;
                if *entry == 0 {
                    dim.terms.remove(name);
                }
            } else {
                return None;
            }
        }
        Some(dim)
    }
}

/// The largest constant or coefficient a dimension's text may hold (2^40: far past any
/// model's size, far below where arithmetic on shapes could overflow).
pub const MAX_DIM_TERM: i64 = 1 << 40;

fn is_symbol(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (name, coeff) in &self.terms {
            if !first {
                f.write_str("+")?;
            }
            first = false;
            if *coeff == 1 {
                write!(f, "{name}")?;
            } else {
                write!(f, "{coeff}*{name}")?;
            }
        }
        if first {
            write!(f, "{}", self.constant)
        } else if self.constant != 0 {
            write!(f, "+{}", self.constant)
        } else {
            Ok(())
        }
    }
}

impl From<usize> for Dim {
    fn from(n: usize) -> Dim {
        Dim::konst(n as i64)
    }
}

/// A tensor's element type and (possibly symbolic) shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Vec<Dim>,
}

impl TensorType {
    pub fn new(dtype: DType, shape: Vec<Dim>) -> TensorType {
        TensorType { dtype, shape }
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// The element count split into its constant product and the multiset of
    /// symbolic factors, so `[s, 576]` and `[s, 9, 64]` compare equal.
    pub fn volume_signature(&self) -> (i64, Vec<Dim>) {
        let mut konst = 1i64;
        let mut symbolic: Vec<Dim> = Vec::new();
        for d in &self.shape {
            match d.as_const() {
                Some(c) => konst = konst.saturating_mul(c),
                None => symbolic.push(d.clone()),
            }
        }
        symbolic.sort();
        (konst, symbolic)
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[", self.dtype)?;
        for (i, d) in self.shape.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dims_print_and_parse_canonically() {
        for text in ["576", "s", "p+s", "2*s+1", "0"] {
            assert_eq!(Dim::parse(text).unwrap().to_string(), text);
        }
        assert_eq!(Dim::parse("s+p").unwrap().to_string(), "p+s");
        assert_eq!(Dim::sym("p").add(&Dim::sym("s")), Dim::parse("p+s").unwrap());
        assert!(Dim::parse("s+").is_none());
        assert!(Dim::parse("3x").is_none());
        // Found by fuzzing: sums and products past i64 used to overflow.
        for text in [
            "2*9223372036854775807",
            "9223372036854775807+9223372036854775807",
            "1099511627777",
            "1099511627776*s+1099511627776*s",
        ] {
            assert!(Dim::parse(text).is_none(), "{text}");
        }
        assert_eq!(Dim::parse("0*s+3").unwrap().to_string(), "3");
    }

    #[test]
    fn eval_binds_symbols() {
        let d = Dim::parse("p+s").unwrap();
        let bound = d.eval(&|n| match n {
            "p" => Some(5),
            "s" => Some(2),
            _ => None,
        });
        assert_eq!(bound, Ok(7));
        assert_eq!(d.eval(&|_| None), Err("p".to_string()));
    }
}
