//! Building MIL programs: typed variables, constants (inline or in the weight blob file),
//! operations, and the one textual form slmc prints them in (for reading and snapshots).

use std::collections::BTreeMap;

use super::blob::{BlobType, BlobWriter};
use super::proto::{self, binding, value, value_type, Binding};
pub use slmc_targets::coreml::{Dt, MilOp};

pub const WEIGHT_FILE_REF: &str = "@model_path/weights/weight.bin";

/// A named SSA value with its static type.
#[derive(Debug, Clone, PartialEq)]
pub struct Var {
    pub name: String,
    pub dt: Dt,
    pub shape: Vec<usize>,
}

pub fn tensor_type(dt: Dt, shape: &[usize]) -> proto::ValueType {
    proto::ValueType {
        r#type: Some(value_type::Type::TensorType(proto::TensorType {
            data_type: dt.code(),
            rank: shape.len() as i64,
            dimensions: shape
                .iter()
                .map(|d| proto::Dimension { constant: Some(proto::ConstantDimension { size: *d as u64 }) })
                .collect(),
        })),
    }
}

pub fn state_type(dt: Dt, shape: &[usize]) -> proto::ValueType {
    proto::ValueType {
        r#type: Some(value_type::Type::StateType(Box::new(proto::StateType {
            wrapped_type: Some(Box::new(tensor_type(dt, shape))),
        }))),
    }
}

fn immediate(dt: Dt, shape: &[usize], v: proto::tensor_value::Value) -> proto::Value {
    proto::Value {
        doc_string: String::new(),
        r#type: Some(tensor_type(dt, shape)),
        value: Some(value::Value::ImmediateValue(proto::ImmediateValue {
            tensor: Some(proto::TensorValue { value: Some(v) }),
        })),
    }
}

pub fn string_value(s: &str) -> proto::Value {
    immediate(Dt::Str, &[], proto::tensor_value::Value::Strings(proto::RepeatedStrings { values: vec![s.into()] }))
}

pub fn i32_value(shape: &[usize], values: &[i32]) -> proto::Value {
    immediate(Dt::I32, shape, proto::tensor_value::Value::Ints(proto::RepeatedInts { values: values.to_vec() }))
}

pub fn bool_value(shape: &[usize], values: &[bool]) -> proto::Value {
    immediate(Dt::Bool, shape, proto::tensor_value::Value::Bools(proto::RepeatedBools { values: values.to_vec() }))
}

fn blob_value(dt: Dt, shape: &[usize], offset: u64) -> proto::Value {
    proto::Value {
        doc_string: String::new(),
        r#type: Some(tensor_type(dt, shape)),
        value: Some(value::Value::BlobFileValue(proto::BlobFileValue { file_name: WEIGHT_FILE_REF.into(), offset })),
    }
}

/// An operation input: a variable, a literal value, or a tuple of variables (`concat`).
pub enum Arg<'a> {
    Var(&'a Var),
    Value(proto::Value),
    Tuple(Vec<&'a Var>),
}

/// Makes MIL names out of arbitrary text: `[A-Za-z_][A-Za-z0-9_@]*`.
pub fn mil_name(text: &str) -> String {
    let mut s: String = text.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect();
    if s.is_empty() || s.starts_with(|c: char| c.is_ascii_digit()) {
        s.insert(0, '_');
    }
    s
}

/// Collects the operations of one block and the weight blob file.
pub struct Builder {
    pub ops: Vec<proto::Operation>,
    pub blobs: BlobWriter,
    used: BTreeMap<String, usize>,
}

impl Default for Builder {
    fn default() -> Self {
        Self::new()
    }
}

impl Builder {
    pub fn new() -> Self {
        Self::with_blobs(BlobWriter::new())
    }

    /// A builder writing its constants through `blobs` (in memory or into the package).
    pub fn with_blobs(blobs: BlobWriter) -> Self {
        Builder { ops: Vec::new(), blobs, used: BTreeMap::new() }
    }

    /// A fresh name from a hint (suffixed when taken).
    pub fn fresh(&mut self, hint: &str) -> String {
        let base = mil_name(hint);
        let n = self.used.entry(base.clone()).or_insert(0);
        *n += 1;
        if *n == 1 {
            base
        } else {
            format!("{base}_{}", *n - 1)
        }
    }

    /// Reserves an exact name (graph inputs and outputs).
    pub fn reserve(&mut self, name: &str) {
        self.used.insert(name.to_string(), 1);
    }

    fn push(
        &mut self,
        ty: MilOp,
        name: &str,
        inputs: BTreeMap<String, proto::Argument>,
        outputs: Vec<proto::NamedValueType>,
    ) {
        let mut attributes = BTreeMap::new();
        attributes.insert("name".to_string(), string_value(name));
        self.ops.push(proto::Operation { r#type: ty.name().into(), inputs, outputs, attributes });
    }

    /// `ty(inputs...) -> out` with the output's type given by the caller (static shapes).
    pub fn op(&mut self, ty: MilOp, hint: &str, inputs: Vec<(&str, Arg)>, dt: Dt, shape: &[usize]) -> Var {
        let name = self.fresh(hint);
        self.op_named(ty, &name, inputs, dt, shape)
    }

    pub fn op_named(&mut self, ty: MilOp, name: &str, inputs: Vec<(&str, Arg)>, dt: Dt, shape: &[usize]) -> Var {
        let args = Self::arguments(inputs);
        let out = vec![proto::NamedValueType { name: name.into(), r#type: Some(tensor_type(dt, shape)) }];
        self.push(ty, name, args, out);
        Var { name: name.into(), dt, shape: shape.to_vec() }
    }

    /// An operation without outputs (`write_state`).
    pub fn effect(&mut self, ty: MilOp, hint: &str, inputs: Vec<(&str, Arg)>) {
        let name = self.fresh(hint);
        let args = Self::arguments(inputs);
        self.push(ty, &name, args, vec![]);
    }

    fn arguments(inputs: Vec<(&str, Arg)>) -> BTreeMap<String, proto::Argument> {
        let by_name = |v: &Var| Binding { binding: Some(binding::Binding::Name(v.name.clone())) };
        inputs
            .into_iter()
            .map(|(k, a)| {
                let arguments = match a {
                    Arg::Var(v) => vec![by_name(v)],
                    Arg::Tuple(vs) => vs.into_iter().map(by_name).collect(),
                    Arg::Value(val) => vec![Binding { binding: Some(binding::Binding::Value(val)) }],
                };
                (k.to_string(), proto::Argument { arguments })
            })
            .collect()
    }

    /// A `const` op holding `val`.
    pub fn constant(&mut self, hint: &str, val: proto::Value, dt: Dt, shape: &[usize]) -> Var {
        let name = self.fresh(hint);
        let mut attributes = BTreeMap::new();
        attributes.insert("name".to_string(), string_value(&name));
        attributes.insert("val".to_string(), val);
        let outputs = vec![proto::NamedValueType { name: name.clone(), r#type: Some(tensor_type(dt, shape)) }];
        self.ops.push(proto::Operation {
            r#type: MilOp::Const.name().into(),
            inputs: BTreeMap::new(),
            outputs,
            attributes,
        });
        Var { name, dt, shape: shape.to_vec() }
    }

    pub fn const_i32(&mut self, hint: &str, shape: &[usize], values: &[i32]) -> Var {
        self.constant(hint, i32_value(shape, values), Dt::I32, shape)
    }

    pub fn const_bool(&mut self, hint: &str, shape: &[usize], values: &[bool]) -> Var {
        self.constant(hint, bool_value(shape, values), Dt::Bool, shape)
    }

    /// An fp16 constant: in the blob file from 10 elements on (as coremltools does),
    /// inline bytes below that.
    pub fn const_f16(&mut self, hint: &str, shape: &[usize], values: &[f32]) -> Var {
        let val = self.f16_value(shape, values);
        self.constant(hint, val, Dt::F16, shape)
    }

    pub fn f16_value(&mut self, shape: &[usize], values: &[f32]) -> proto::Value {
        if values.len() >= 10 {
            let offset = self.blobs.write_f16(values);
            blob_value(Dt::F16, shape, offset)
        } else {
            let bytes = values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
            immediate(Dt::F16, shape, proto::tensor_value::Value::Bytes(proto::RepeatedBytes { values: bytes }))
        }
    }

    /// A blob-file value of raw (already packed) data.
    pub fn blob(&mut self, dt: Dt, shape: &[usize], data: &[u8]) -> proto::Value {
        let n: usize = shape.iter().product();
        let ty = match dt {
            Dt::F16 => BlobType::Float16,
            Dt::F32 => BlobType::Float32,
            Dt::U8 => BlobType::UInt8,
            Dt::I8 => BlobType::Int8,
            Dt::U4 => BlobType::UInt4,
            other => panic!("no blob storage for {other:?}"),
        };
        let offset = self.blobs.write(ty, data, n);
        blob_value(dt, shape, offset)
    }

    /// A scalar f32 constant (inline).
    pub fn scalar_f32(&mut self, hint: &str, v: f32) -> Var {
        let val =
            immediate(Dt::F32, &[], proto::tensor_value::Value::Floats(proto::RepeatedFloats { values: vec![v] }));
        self.constant(hint, val, Dt::F32, &[])
    }

    /// A scalar f16 constant (inline).
    pub fn scalar_f16(&mut self, hint: &str, v: f32) -> Var {
        self.const_f16(hint, &[], &[v])
    }

    /// A `const` op (for opsets before iOS 18, constexpr parameters are attributes).
    pub fn constexpr_with_attributes(
        &mut self,
        ty: MilOp,
        hint: &str,
        attrs: Vec<(&str, proto::Value)>,
        dt: Dt,
        shape: &[usize],
    ) -> Var {
        let name = self.fresh(hint);
        let mut attributes: BTreeMap<String, proto::Value> =
            attrs.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        attributes.insert("name".to_string(), string_value(&name));
        let outputs = vec![proto::NamedValueType { name: name.clone(), r#type: Some(tensor_type(dt, shape)) }];
        self.ops.push(proto::Operation { r#type: ty.name().into(), inputs: BTreeMap::new(), outputs, attributes });
        Var { name, dt, shape: shape.to_vec() }
    }
}

// ---------------------------------------------------------------------------------------
// Text form

fn type_text(t: &proto::ValueType) -> String {
    match &t.r#type {
        Some(value_type::Type::TensorType(tt)) => {
            let dt = Dt::from_code(tt.data_type).map(Dt::text).unwrap_or("?");
            let dims: Vec<String> = tt
                .dimensions
                .iter()
                .map(|d| d.constant.as_ref().map(|c| c.size.to_string()).unwrap_or_else(|| "?".into()))
                .collect();
            format!("tensor<{dt}, [{}]>", dims.join(", "))
        }
        Some(value_type::Type::StateType(st)) => {
            format!("state<{}>", st.wrapped_type.as_deref().map(type_text).unwrap_or_default())
        }
        None => "?".into(),
    }
}

fn value_text(v: &proto::Value) -> String {
    use proto::tensor_value::Value as T;
    match &v.value {
        Some(value::Value::BlobFileValue(b)) => {
            format!("{}(BLOBFILE(offset = {}))", v.r#type.as_ref().map(type_text).unwrap_or_default(), b.offset)
        }
        Some(value::Value::ImmediateValue(iv)) => {
            let list = |items: Vec<String>| {
                if items.len() == 1 && v.r#type.as_ref().is_some_and(|t| type_text(t).ends_with("[]>")) {
                    items[0].clone()
                } else {
                    format!("[{}]", items.join(", "))
                }
            };
            match iv.tensor.as_ref().and_then(|t| t.value.as_ref()) {
                Some(T::Strings(s)) => list(s.values.iter().map(|x| format!("{x:?}")).collect()),
                Some(T::Ints(s)) => list(s.values.iter().map(|x| x.to_string()).collect()),
                Some(T::LongInts(s)) => list(s.values.iter().map(|x| x.to_string()).collect()),
                Some(T::Bools(s)) => list(s.values.iter().map(|x| x.to_string()).collect()),
                Some(T::Floats(s)) => list(s.values.iter().map(|x| format!("{x:?}")).collect()),
                Some(T::Bytes(s)) => {
                    let is_f16 = v.r#type.as_ref().is_some_and(|t| type_text(t).starts_with("tensor<fp16"));
                    if is_f16 {
                        list(
                            s.values
                                .chunks_exact(2)
                                .map(|b| format!("{:?}", half::f16::from_le_bytes([b[0], b[1]]).to_f32()))
                                .collect(),
                        )
                    } else {
                        format!("bytes({})", s.values.len())
                    }
                }
                None => "?".into(),
            }
        }
        None => "?".into(),
    }
}

/// The program's text: one line per operation, `%out: type = op(input = ..., ...)`,
/// constants with their values (blob contents by offset).
pub fn program_text(program: &proto::Program) -> String {
    let mut out = String::new();
    for (fname, f) in &program.functions {
        let inputs: Vec<String> = f
            .inputs
            .iter()
            .map(|i| format!("%{}: {}", i.name, i.r#type.as_ref().map(type_text).unwrap_or_default()))
            .collect();
        out.push_str(&format!("func {fname}<{}>({}) {{\n", f.opset, inputs.join(", ")));
        for block in f.block_specializations.values() {
            for op in &block.operations {
                let mut parts: Vec<String> = op
                    .inputs
                    .iter()
                    .map(|(k, a)| {
                        let vals: Vec<String> = a
                            .arguments
                            .iter()
                            .map(|b| match &b.binding {
                                Some(binding::Binding::Name(n)) => format!("%{n}"),
                                Some(binding::Binding::Value(v)) => value_text(v),
                                None => "?".into(),
                            })
                            .collect();
                        if vals.len() == 1 {
                            format!("{k} = {}", vals[0])
                        } else {
                            format!("{k} = ({})", vals.join(", "))
                        }
                    })
                    .collect();
                for (k, v) in &op.attributes {
                    if k != "name" {
                        parts.push(format!("{k} = {}", value_text(v)));
                    }
                }
                let lhs: Vec<String> = op
                    .outputs
                    .iter()
                    .map(|o| format!("%{}: {}", o.name, o.r#type.as_ref().map(type_text).unwrap_or_default()))
                    .collect();
                let lhs = if lhs.is_empty() { String::new() } else { format!("{} = ", lhs.join(", ")) };
                out.push_str(&format!("  {lhs}{}({})\n", op.r#type, parts.join(", ")));
            }
            out.push_str(&format!(
                "}} -> ({})\n",
                block.outputs.iter().map(|o| format!("%{o}")).collect::<Vec<_>>().join(", ")
            ));
        }
    }
    out
}
