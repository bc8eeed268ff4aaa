//! slmc's graph IR.
//!
//! * A [`Graph`] is SSA: every node defines one value with a unique name, and operands
//!   refer to values defined elsewhere in the graph; there are no cycles.
//! * Weights are `weight "name"` nodes: the graph names them, the importer's store holds
//!   the bytes. A weight used twice (tied embeddings, shared blocks) is one node.
//! * Shapes may be symbolic: `s` is the number of tokens in this step, `p` the number of
//!   positions already cached.
//! * The only side effect is `kv_append`, which writes the KV cache of its layer.
//! * [`verify`] is the gate: printing, passes and the interpreter expect a verified graph.

pub mod blocks;
pub mod cost;
pub mod dtype;
pub mod graph;
pub mod interp;
pub mod op;
pub mod rotary;
pub mod shape;
pub mod text;
pub mod verify;
pub mod weights;

pub use dtype::DType;
pub use graph::{Graph, Node, NodeId};
pub use interp::{InterpError, Interpreter, Tensor};
pub use op::{AttnLimits, Attr, KvKind, KvQuant, Op, RopeScaling, RopeStyle, Rotary, KV_EXACT_WINDOW};
pub use shape::{Dim, TensorType};
pub use verify::{verify, GraphInfo, Verified, VerifyError};
pub use weights::{Layered, OwnedWeight, OwnedWeights, WeightSource, WeightView};
