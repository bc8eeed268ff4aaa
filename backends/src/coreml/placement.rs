//! Where Core ML is expected to run each operation: the Neural Engine (NE) or the
//! GPU/CPU. Core ML decides at load time and publishes no rule list, so this is an
//! estimate by the rules below, each with its reason; the bundle manifest reports it as
//! the NPU-support field. Constants and constexpr (load-time) ops are not counted.

use super::mil::Dt;
use super::proto::{self, value_type};
use slmc_targets::coreml::{MilOp, NeRule};

/// Largest tensor dimension the estimate lets the NE take. Apple publishes no limit;
/// reports from Core ML users (e.g. LM heads over large vocabularies falling back to the
/// GPU) put it at 16384 per axis. An assumption, stated as one.
pub const NE_MAX_DIM: u64 = 16384;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    NeuralEngine,
    GpuOrCpu,
}

pub use slmc_targets::artifact::{NePlacement as Placement, OpCount};

fn tensor_of(t: &Option<proto::ValueType>) -> Option<&proto::TensorType> {
    match t.as_ref()?.r#type.as_ref()? {
        value_type::Type::TensorType(tt) => Some(tt),
        _ => None,
    }
}

/// The rule that places one op, with the reason when it is not the NE.
pub fn place(op: &proto::Operation) -> (Unit, Option<&'static str>) {
    match MilOp::from_name(&op.r#type).map(MilOp::ne_rule) {
        Some(NeRule::NeuralEngine | NeRule::LoadTime) => {}
        Some(NeRule::Off(reason)) => return (Unit::GpuOrCpu, Some(reason)),
        None => return (Unit::GpuOrCpu, Some("op type not on the NE list")),
    }
    for o in &op.outputs {
        if let Some(t) = tensor_of(&o.r#type) {
            if t.data_type == Dt::F32.code() {
                return (Unit::GpuOrCpu, Some("fp32 result (a residual stream beyond the fp16 range)"));
            }
            if t.data_type != Dt::F16.code() {
                return (Unit::GpuOrCpu, Some("non-fp16 result (index arithmetic)"));
            }
            if t.dimensions.iter().any(|d| d.constant.as_ref().is_some_and(|c| c.size > NE_MAX_DIM)) {
                return (Unit::GpuOrCpu, Some("a dimension above 16384 (the LM head's vocabulary)"));
            }
        }
    }
    (Unit::NeuralEngine, None)
}

pub fn estimate(program: &proto::Program) -> Placement {
    let mut p = Placement::default();
    for f in program.functions.values() {
        for block in f.block_specializations.values() {
            for op in &block.operations {
                if MilOp::from_name(&op.r#type).map(MilOp::ne_rule) == Some(NeRule::LoadTime) {
                    continue;
                }
                let (unit, reason) = place(op);
                let entry = p.by_op.entry(op.r#type.clone()).or_default();
                entry.total += 1;
                p.ops_total += 1;
                if unit == Unit::NeuralEngine {
                    entry.neural_engine += 1;
                    p.ops_on_neural_engine += 1;
                } else if let Some(r) = reason {
                    *p.off_neural_engine.entry(r.to_string()).or_default() += 1;
                }
            }
        }
    }
    p
}
