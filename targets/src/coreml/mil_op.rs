//! The MIL operations slmc writes, declared once: their names in the program, and where
//! the placement estimate expects Core ML to run them. The emitter builds operations from
//! these values, the reference interpreter parses names into them and matches on them, so
//! a new MIL op is a new line here and a compile error wherever it must be handled.

/// Where the placement estimate expects Core ML to run an op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NeRule {
    /// An op type the Neural Engine executes in fp16 (Apple's ANE transformer guidance:
    /// elementwise, reduction, matrix, shape and attention ops), subject to the shape and
    /// dtype checks of the estimate.
    NeuralEngine,
    /// Off the Neural Engine, for this reason.
    Off(&'static str),
    /// Constants and load-time (constexpr) ops: not counted.
    LoadTime,
}

macro_rules! mil_ops {
    ($($variant:ident = $name:literal, $rule:expr;)*) => {
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum MilOp {
            $($variant,)*
        }

        impl MilOp {
            /// The op's name in a MIL program.
            pub fn name(self) -> &'static str {
                match self { $(MilOp::$variant => $name,)* }
            }

            pub fn from_name(name: &str) -> Option<MilOp> {
                match name { $($name => Some(MilOp::$variant),)* _ => None }
            }

            pub fn ne_rule(self) -> NeRule {
                use NeRule::*;
                match self { $(MilOp::$variant => $rule,)* }
            }
        }
    };
}

const RUNTIME_STATE: &str = "KV-cache state access at a runtime position";

mil_ops! {
    Const = "const", LoadTime;
    ConstexprBlockwiseShiftScale = "constexpr_blockwise_shift_scale", LoadTime;
    ConstexprAffineDequantize = "constexpr_affine_dequantize", LoadTime;
    Linear = "linear", NeuralEngine;
    Matmul = "matmul", NeuralEngine;
    Add = "add", NeuralEngine;
    Sub = "sub", NeuralEngine;
    Mul = "mul", NeuralEngine;
    RealDiv = "real_div", NeuralEngine;
    Maximum = "maximum", NeuralEngine;
    Abs = "abs", NeuralEngine;
    Rsqrt = "rsqrt", NeuralEngine;
    Silu = "silu", NeuralEngine;
    Sigmoid = "sigmoid", NeuralEngine;
    Tanh = "tanh", NeuralEngine;
    Cast = "cast", NeuralEngine;
    Softmax = "softmax", NeuralEngine;
    ReduceMean = "reduce_mean", NeuralEngine;
    ReduceMax = "reduce_max", NeuralEngine;
    Reshape = "reshape", NeuralEngine;
    Transpose = "transpose", NeuralEngine;
    SliceByIndex = "slice_by_index", NeuralEngine;
    Concat = "concat", NeuralEngine;
    Tile = "tile", NeuralEngine;
    ScaledDotProductAttention = "scaled_dot_product_attention", NeuralEngine;
    Gather = "gather", Off("gather at runtime indices (embedding lookup) is not an NE op");
    SliceUpdate = "slice_update", Off(RUNTIME_STATE);
    ReadState = "read_state", Off(RUNTIME_STATE);
    WriteState = "write_state", Off(RUNTIME_STATE);
}

impl MilOp {
    /// Ops whose results are some of their inputs' values, moved (the interpreter keeps
    /// their dtype instead of rounding).
    pub fn moves_values(self) -> bool {
        matches!(
            self,
            MilOp::Reshape
                | MilOp::Transpose
                | MilOp::SliceByIndex
                | MilOp::SliceUpdate
                | MilOp::Concat
                | MilOp::Tile
                | MilOp::Gather
                | MilOp::ReadState
        )
    }
}
