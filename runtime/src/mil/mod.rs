//! slmc's reference interpreter for the MIL programs `slmc_backends::coreml` writes: it reads a
//! package back (`model.mlmodel` + `weight.bin`, nothing from the compiler's memory),
//! checks every operation's result against the type the program declares, and computes
//! it in f32 with fp16 results rounded to fp16 (the precision the Neural Engine stores).
//! Core ML itself runs only on Apple systems; this is how Linux checks the numerics.
//!
//! It covers the operations the emitter uses, with MIL's semantics (iOS 15-18 op
//! definitions in coremltools); anything else is an error naming the op. This file loads
//! a package and runs its program; `ops` computes each operation; `host` drives steps
//! the way a Core ML host does and is the `Executor`.

use std::collections::HashMap;
use std::rc::Rc;

use slmc_targets::coreml::proto::{self, binding, tensor_value, value, value_type};
use slmc_targets::coreml::{blob, Dt, MilOp, MODEL_FILE, WEIGHTS_FILE};

mod host;
mod ops;

pub use host::{CoremlReference, MilReferenceExecutor};
use ops::run_step;

#[derive(Debug, thiserror::Error)]
pub enum MilError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("op `{op}` ({name}): {message}")]
    Op { op: String, name: String, message: String },
    #[error("{0}")]
    Usage(String),
}

/// A tensor; integers and booleans are held as exact f32 values.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub dt: Dt,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn new(dt: Dt, shape: Vec<usize>, data: Vec<f32>) -> Tensor {
        let mut t = Tensor { dt, shape, data };
        t.round();
        t
    }

    fn round(&mut self) {
        if self.dt == Dt::F16 {
            for v in &mut self.data {
                *v = half::f16::from_f32(*v).to_f32();
            }
        }
    }

    fn strides(&self) -> Vec<usize> {
        strides(&self.shape)
    }
}

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

enum Arg {
    Name(String),
    Literal(Tensor),
}

struct Step {
    ty: MilOp,
    name: String,
    inputs: HashMap<String, Vec<Arg>>,
    outputs: Vec<(String, Dt, Vec<usize>)>,
}

pub struct InputDecl {
    pub name: String,
    pub dt: Dt,
    pub shape: Vec<usize>,
    pub is_state: bool,
}

/// A loaded program: constants evaluated once, states held between calls.
pub struct MilProgram {
    steps: Vec<Step>,
    consts: HashMap<String, Tensor>,
    pub inputs: Vec<InputDecl>,
    pub outputs: Vec<String>,
    states: HashMap<String, Rc<Tensor>>,
    pub specification_version: i32,
}

fn type_of(t: &Option<proto::ValueType>) -> Option<(Dt, Vec<usize>, bool)> {
    match t.as_ref()?.r#type.as_ref()? {
        value_type::Type::TensorType(tt) => Some((
            Dt::from_code(tt.data_type)?,
            tt.dimensions.iter().map(|d| d.constant.as_ref().map(|c| c.size as usize)).collect::<Option<Vec<_>>>()?,
            false,
        )),
        value_type::Type::StateType(st) => {
            let (dt, shape, _) = type_of(&st.wrapped_type.as_deref().cloned())?;
            Some((dt, shape, true))
        }
    }
}

/// The number of elements of `shape`, or None where it overflows.
pub(crate) fn elements(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, d| n.checked_mul(*d))
}

/// A zeroed tensor of a shape the program declares (states, caches): allocated only when
/// the program runs, and refused, not attempted, past this machine's memory.
pub(crate) fn zeros(name: &str, dt: Dt, shape: &[usize]) -> Result<Tensor, MilError> {
    let n = elements(shape).ok_or_else(|| too_big(name, shape))?;
    Ok(Tensor { dt, shape: shape.to_vec(), data: filled(name, shape, n, 0.0)? })
}

fn too_big(name: &str, shape: &[usize]) -> MilError {
    MilError::Usage(format!("`{name}` is declared {shape:?}: more than this machine's memory"))
}

/// `n` copies of `value` for what the program declares as `name` of `shape`, refused when
/// more than this machine's memory (sizes come from the file).
pub(crate) fn filled<T: Clone>(name: &str, shape: &[usize], n: usize, value: T) -> Result<Vec<T>, MilError> {
    let bytes = n.checked_mul(std::mem::size_of::<T>()).ok_or_else(|| too_big(name, shape))? as u64;
    if crate::physical_memory_bytes().is_some_and(|m| bytes > m) {
        return Err(too_big(name, shape));
    }
    let mut data = Vec::new();
    data.try_reserve_exact(n).map_err(|_| too_big(name, shape))?;
    data.resize(n, value);
    Ok(data)
}

fn value_tensor(v: &proto::Value, weights: &[u8]) -> Result<Tensor, String> {
    let (dt, shape, _) = type_of(&v.r#type).ok_or("a value without a static tensor type")?;
    let n = elements(&shape).ok_or_else(|| format!("shape {shape:?} has more elements than memory can hold"))?;
    let data: Vec<f32> = match &v.value {
        Some(value::Value::BlobFileValue(b)) => {
            let blob = blob::read(weights, b.offset).map_err(|e| e.to_string())?;
            let expected = match dt {
                Dt::F16 => blob::BlobType::Float16,
                Dt::F32 => blob::BlobType::Float32,
                Dt::U8 => blob::BlobType::UInt8,
                Dt::I8 => blob::BlobType::Int8,
                Dt::U4 => blob::BlobType::UInt4,
                other => return Err(format!("no blob storage for {other:?}")),
            };
            if blob.ty != expected {
                return Err(format!("blob at {} holds {:?}, the program says {:?}", b.offset, blob.ty, dt));
            }
            blob.to_f32(n).map_err(|e| e.to_string())?
        }
        Some(value::Value::ImmediateValue(iv)) => match iv.tensor.as_ref().and_then(|t| t.value.as_ref()) {
            Some(tensor_value::Value::Floats(f)) => f.values.clone(),
            Some(tensor_value::Value::Ints(f)) => f.values.iter().map(|v| *v as f32).collect(),
            Some(tensor_value::Value::LongInts(f)) => f.values.iter().map(|v| *v as f32).collect(),
            Some(tensor_value::Value::Bools(f)) => f.values.iter().map(|v| *v as u8 as f32).collect(),
            Some(tensor_value::Value::Bytes(b)) if dt == Dt::F16 => {
                b.values.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
            }
            // Strings carry no numbers; one placeholder per string present (never sized by
            // the declared shape alone).
            Some(tensor_value::Value::Strings(s)) => vec![0.0; s.values.len()],
            _ => return Err("an immediate value of an unsupported kind".into()),
        },
        None => return Err("a value without contents".into()),
    };
    if data.len() != n {
        return Err(format!("{} values for shape {shape:?}", data.len()));
    }
    Ok(Tensor { dt, shape, data })
}

impl MilProgram {
    /// Loads `model.mlpackage` from an artifact's checked files.
    pub fn load_package(files: &crate::files::ArtifactFiles) -> Result<MilProgram, MilError> {
        let read = |rel: &str| {
            files.bytes(rel).map_err(|(p, message)| MilError::File { path: p.display().to_string(), message })
        };
        let model = read(MODEL_FILE)?;
        let weights = read(WEIGHTS_FILE)?;
        Self::load(model, weights).map_err(|e| match e {
            MilError::Usage(m) => MilError::File { path: files.path(MODEL_FILE).display().to_string(), message: m },
            other => other,
        })
    }

    pub fn load(model_bytes: &[u8], weights: &[u8]) -> Result<MilProgram, MilError> {
        let usage = |m: String| MilError::Usage(m);
        let model = slmc_targets::coreml::decode_model(model_bytes)
            .map_err(|e| usage(format!("not a Core ML model spec: {e}")))?;
        let program = model.ml_program.as_ref().ok_or_else(|| usage("the model holds no ML program".into()))?;
        let f = program.functions.get("main").ok_or_else(|| usage("the program has no function `main`".into()))?;
        let block = f
            .block_specializations
            .get(&f.opset)
            .ok_or_else(|| usage(format!("function `main` has no block for its opset {}", f.opset)))?;
        let mut inputs = Vec::new();
        for i in &f.inputs {
            let (dt, shape, is_state) =
                type_of(&i.r#type).ok_or_else(|| usage(format!("input `{}` has no static type", i.name)))?;
            inputs.push(InputDecl { name: i.name.clone(), dt, shape, is_state });
        }
        let mut consts = HashMap::new();
        let mut steps = Vec::new();
        for op in &block.operations {
            let name =
                op.outputs.first().map(|o| o.name.clone()).unwrap_or_else(|| format!("{} (no outputs)", op.r#type));
            let op_err = |m: String| MilError::Op { op: op.r#type.clone(), name: name.clone(), message: m };
            let attr = |k: &str| -> Result<Tensor, MilError> {
                let v = op.attributes.get(k).ok_or_else(|| op_err(format!("missing attribute `{k}`")))?;
                value_tensor(v, weights).map_err(|m| op_err(format!("attribute `{k}`: {m}")))
            };
            let declared = |i: usize| -> Result<(String, Dt, Vec<usize>), MilError> {
                let o = op.outputs.get(i).ok_or_else(|| op_err("missing output".into()))?;
                let (dt, shape, _) = type_of(&o.r#type).ok_or_else(|| op_err("output without a static type".into()))?;
                Ok((o.name.clone(), dt, shape))
            };
            let mut args: HashMap<String, Vec<Arg>> = HashMap::new();
            for (k, a) in &op.inputs {
                let mut list = Vec::new();
                for b in &a.arguments {
                    list.push(match &b.binding {
                        Some(binding::Binding::Name(n)) => Arg::Name(n.clone()),
                        Some(binding::Binding::Value(v)) => {
                            Arg::Literal(value_tensor(v, weights).map_err(|m| op_err(format!("input `{k}`: {m}")))?)
                        }
                        None => return Err(op_err(format!("input `{k}` binds nothing"))),
                    });
                }
                args.insert(k.clone(), list);
            }
            let ty = MilOp::from_name(&op.r#type)
                .ok_or_else(|| op_err(format!("MIL op `{}` is not one the reference interpreter knows", op.r#type)))?;
            match ty {
                MilOp::Const => {
                    let (out, dt, shape) = declared(0)?;
                    let v = attr("val")?;
                    if v.dt != dt || v.shape != shape {
                        return Err(op_err(format!("value is {:?}{:?}, declared {dt:?}{shape:?}", v.dt, v.shape)));
                    }
                    consts.insert(out, v);
                }
                MilOp::ConstexprBlockwiseShiftScale => {
                    let (out, dt, shape) = declared(0)?;
                    let get = |k: &str| -> Result<Option<Tensor>, MilError> {
                        match args.get(k).and_then(|l| l.first()) {
                            None => Ok(None),
                            Some(Arg::Literal(t)) => Ok(Some(t.clone())),
                            Some(Arg::Name(n)) => consts
                                .get(n)
                                .cloned()
                                .map(Some)
                                .ok_or_else(|| op_err(format!("input `{k}` names `{n}`, not a constant"))),
                        }
                    };
                    let data = get("data")?.ok_or_else(|| op_err("missing `data`".into()))?;
                    let scale = get("scale")?.ok_or_else(|| op_err("missing `scale`".into()))?;
                    let offset = get("offset")?;
                    if data.shape != shape || scale.shape.len() != shape.len() || dt != scale.dt {
                        return Err(op_err(format!(
                            "data {:?} / scale {:?} do not give the declared {dt:?}{shape:?}",
                            data.shape, scale.shape
                        )));
                    }
                    if offset.as_ref().is_some_and(|o| o.shape != scale.shape) {
                        return Err(op_err("offset and scale shapes differ".into()));
                    }
                    let block: Vec<usize> = shape.iter().zip(&scale.shape).map(|(d, s)| d / s.max(&1)).collect();
                    if shape.iter().zip(&scale.shape).any(|(d, s)| *s == 0 || d % s != 0) {
                        return Err(op_err("scale's shape does not divide the data's".into()));
                    }
                    let (ds, ss) = (strides(&shape), strides(&scale.shape));
                    let mut outv = vec![0.0f32; data.data.len()];
                    for (i, o) in outv.iter_mut().enumerate() {
                        let mut si = 0;
                        for ax in 0..shape.len() {
                            si += (i / ds[ax] % shape[ax]) / block[ax] * ss[ax];
                        }
                        let off = offset.as_ref().map(|o| o.data[si]).unwrap_or(0.0);
                        *o = scale.data[si] * (data.data[i] - off);
                    }
                    consts.insert(out, Tensor::new(dt, shape, outv));
                }
                MilOp::ConstexprAffineDequantize => {
                    let (out, dt, shape) = declared(0)?;
                    let data = attr("quantized_data")?;
                    let zero = attr("zero_point")?;
                    let scale = attr("scale")?;
                    let axis = attr("axis")?.data.first().copied().ok_or_else(|| op_err("empty `axis`".into()))?;
                    let axis = axis as usize;
                    if data.shape != shape || axis >= shape.len() {
                        return Err(op_err("quantized data does not have the declared shape".into()));
                    }
                    if [&scale, &zero].iter().any(|t| t.data.len() != 1 && t.data.len() != shape[axis]) {
                        return Err(op_err("scale / zero point are neither scalars nor one per channel".into()));
                    }
                    let st = strides(&shape);
                    let pick = |t: &Tensor, c: usize| if t.data.len() == 1 { t.data[0] } else { t.data[c] };
                    let outv = (0..data.data.len())
                        .map(|i| {
                            let c = i / st[axis] % shape[axis];
                            pick(&scale, c) * (data.data[i] - pick(&zero, c))
                        })
                        .collect();
                    consts.insert(out, Tensor::new(dt, shape, outv));
                }
                _ => {
                    let outputs = (0..op.outputs.len()).map(declared).collect::<Result<Vec<_>, _>>()?;
                    steps.push(Step { ty, name, inputs: args, outputs });
                }
            }
        }
        let mut p = MilProgram {
            steps,
            consts,
            inputs,
            outputs: block.outputs.clone(),
            states: HashMap::new(),
            specification_version: model.specification_version,
        };
        p.reset_states();
        Ok(p)
    }

    /// Zeroes every state (a fresh `MLState`); the zeros are made when the program next runs.
    pub fn reset_states(&mut self) {
        self.states.clear();
    }

    pub fn input(&self, name: &str) -> Option<&InputDecl> {
        self.inputs.iter().find(|i| i.name == name)
    }

    /// Runs `main` once on `feed` (every non-state input); returns the block's outputs.
    pub fn predict(&mut self, feed: HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>, MilError> {
        for i in self.inputs.iter().filter(|i| !i.is_state) {
            let t = feed.get(&i.name).ok_or_else(|| MilError::Usage(format!("input `{}` is missing", i.name)))?;
            if t.shape != i.shape {
                return Err(MilError::Usage(format!(
                    "input `{}` has shape {:?}, the model takes {:?}",
                    i.name, t.shape, i.shape
                )));
            }
        }
        for i in self.inputs.iter().filter(|i| i.is_state) {
            if !self.states.contains_key(&i.name) {
                self.states.insert(i.name.clone(), Rc::new(zeros(&i.name, i.dt, &i.shape)?));
            }
        }
        let mut env: HashMap<String, Rc<Tensor>> = feed.into_iter().map(|(k, v)| (k, Rc::new(v))).collect();
        for step in &self.steps {
            let results = run_step(step, &env, &self.consts, &mut self.states)?;
            // Ops that only move values keep them as they are (already of the result type).
            let moves = step.ty.moves_values();
            for ((name, dt, shape), mut t) in step.outputs.iter().zip(results) {
                if t.shape != *shape {
                    return Err(MilError::Op {
                        op: step.ty.name().to_string(),
                        name: step.name.clone(),
                        message: format!("computes shape {:?}, the program declares {shape:?}", t.shape),
                    });
                }
                if t.dt != *dt || !moves {
                    let m = Rc::make_mut(&mut t);
                    m.dt = *dt;
                    m.round();
                }
                // Infinities are legitimate (additive masks); a NaN is never, and would
                // otherwise surface far away as a wrong token.
                if t.data.iter().any(|v| v.is_nan()) {
                    return Err(MilError::Op {
                        op: step.ty.name().to_string(),
                        name: name.clone(),
                        message: "produces NaN".into(),
                    });
                }
                env.insert(name.clone(), t);
            }
        }
        let mut out = HashMap::new();
        for o in &self.outputs {
            let t = env.remove(o).ok_or_else(|| MilError::Usage(format!("output `{o}` was never computed")))?;
            out.insert(o.clone(), Rc::unwrap_or_clone(t));
        }
        Ok(out)
    }
}
