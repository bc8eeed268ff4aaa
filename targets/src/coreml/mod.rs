//! The Core ML package format slmc writes (`slmc_backends::coreml`) and reads back (the
//! runtime's reference MIL interpreter): the protobuf messages, the weight blob file,
//! MIL element types, the deployments and the package's file names.

pub mod blob;
pub mod mil_op;
pub mod proto;

use prost::Message;
use proto::data_type;

pub use mil_op::{MilOp, NeRule};

pub const PACKAGE_DIR: &str = "model.mlpackage";
pub const MODEL_FILE: &str = "model.mlpackage/Data/com.apple.CoreML/model.mlmodel";
pub const WEIGHTS_FILE: &str = "model.mlpackage/Data/com.apple.CoreML/weights/weight.bin";
pub const PACKAGE_MANIFEST: &str = "model.mlpackage/Manifest.json";
/// The MIL program's text form, beside the package.
pub const MIL_TEXT_FILE: &str = "model.mil";

/// Inputs a Core ML program with sliding-window layers takes beside `causal_mask`, each
/// named by its prefix and the window: `window_mask_<w>` (a window over a whole-context
/// cache, `[1, 1, T, width of causal_mask]`), and for a layer whose cache is a ring
/// `ring_mask_<w>` (`[1, 1, T, ring slots + T]`, a mask over the ring's slots as the host
/// tracks them) with, on iOS 18, `ring_slot_<w>` (`[1]`: the slot the step's first row is
/// written at). The host builds all of them.
pub const WINDOW_MASK_PREFIX: &str = "window_mask_";
pub const RING_MASK_PREFIX: &str = "ring_mask_";
pub const RING_SLOT_PREFIX: &str = "ring_slot_";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deployment {
    /// iOS 17 / macOS 14: specification 8, opset CoreML7.
    Ios17,
    /// iOS 18 / macOS 15: specification 9, opset CoreML8.
    Ios18,
}

impl Deployment {
    pub fn specification_version(self) -> i32 {
        match self {
            Deployment::Ios17 => 8,
            Deployment::Ios18 => 9,
        }
    }

    pub fn opset(self) -> &'static str {
        match self {
            Deployment::Ios17 => "CoreML7",
            Deployment::Ios18 => "CoreML8",
        }
    }

    /// How the KV cache crosses the model boundary.
    pub fn kv_cache(self) -> &'static str {
        match self {
            Deployment::Ios17 => "inputs-outputs",
            Deployment::Ios18 => "state",
        }
    }
}

/// Element types of MIL tensors slmc emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dt {
    F16,
    F32,
    I32,
    Bool,
    Str,
    I8,
    U8,
    U4,
}

impl Dt {
    pub fn code(self) -> i32 {
        match self {
            Dt::F16 => data_type::FLOAT16,
            Dt::F32 => data_type::FLOAT32,
            Dt::I32 => data_type::INT32,
            Dt::Bool => data_type::BOOL,
            Dt::Str => data_type::STRING,
            Dt::I8 => data_type::INT8,
            Dt::U8 => data_type::UINT8,
            Dt::U4 => data_type::UINT4,
        }
    }

    pub fn from_code(code: i32) -> Option<Dt> {
        [Dt::F16, Dt::F32, Dt::I32, Dt::Bool, Dt::Str, Dt::I8, Dt::U8, Dt::U4].into_iter().find(|d| d.code() == code)
    }

    pub fn text(self) -> &'static str {
        match self {
            Dt::F16 => "fp16",
            Dt::F32 => "fp32",
            Dt::I32 => "int32",
            Dt::Bool => "bool",
            Dt::Str => "string",
            Dt::I8 => "int8",
            Dt::U8 => "uint8",
            Dt::U4 => "uint4",
        }
    }
}

/// Shape of an elementwise result (numpy broadcasting, static shapes).
pub fn broadcast(a: &[usize], b: &[usize]) -> Vec<usize> {
    let r = a.len().max(b.len());
    (0..r)
        .map(|i| {
            let da = if i + a.len() >= r { a[i + a.len() - r] } else { 1 };
            let db = if i + b.len() >= r { b[i + b.len() - r] } else { 1 };
            da.max(db)
        })
        .collect()
}

/// Reads a package's model spec back.
pub fn decode_model(bytes: &[u8]) -> Result<proto::Model, prost::DecodeError> {
    proto::Model::decode(bytes)
}
