//! The `.mlpackage` around the program: model description features and the program
//! container.

use std::collections::BTreeMap;

use super::mil::Dt;
use super::*;

pub(super) fn feature(name: &str, ty: proto::feature_type::Type) -> proto::FeatureDescription {
    proto::FeatureDescription {
        name: name.into(),
        short_description: String::new(),
        r#type: Some(proto::FeatureType { r#type: Some(ty) }),
    }
}

pub(super) fn array(dt: Dt, shape: &[usize]) -> proto::ArrayFeatureType {
    let data_type = match dt {
        Dt::F16 => proto::array_data_type::FLOAT16,
        Dt::I32 => proto::array_data_type::INT32,
        _ => proto::array_data_type::FLOAT32,
    };
    proto::ArrayFeatureType { shape: shape.iter().map(|d| *d as i64).collect(), data_type }
}

/// A UUID-shaped identifier derived from the package's bytes, so packages are reproducible.
pub(super) fn stable_uuid(seed: &[u8], n: u8) -> String {
    let h = slmc_targets::artifact::sha256_hex(&[seed, &[n]].concat()).to_uppercase();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// A program with one function `main` holding `block` for `opset`.
pub(super) fn main_program(opset: &str, inputs: Vec<proto::NamedValueType>, block: proto::Block) -> proto::Program {
    let function = proto::Function {
        inputs,
        opset: opset.to_string(),
        block_specializations: [(opset.to_string(), block)].into_iter().collect(),
        attributes: BTreeMap::new(),
    };
    proto::Program {
        version: 1,
        functions: [("main".to_string(), function)].into_iter().collect(),
        doc_string: String::new(),
        attributes: BTreeMap::new(),
    }
}
