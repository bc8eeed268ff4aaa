//! Code generators: `gpu` (WGSL, with MSL and SPIR-V translated by naga), `onnx` (ONNX
//! graphs for ONNX Runtime), `coreml` (`.mlpackage` ML programs for the Neural Engine,
//! with a reference interpreter for the written program).

pub mod coreml;
pub mod gpu;
pub mod lowering;
pub mod onnx;
