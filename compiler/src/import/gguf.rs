//! GGUF (v2/v3) reader: header, metadata, tensor infos, alignment.
//!
//! The file is memory-mapped and read through a bounds-checked cursor. No length read
//! from the file is used to allocate before it has been checked against the bytes
//! that remain, so a lying header fails with an error instead of exhausting memory.

use std::collections::BTreeMap;
use std::path::Path;

use slmc_ir::DType;

use super::{ImportError, StoredTensor};

const MAGIC: &[u8; 4] = b"GGUF";

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i64),
    UInt(u64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::UInt(v) => Some(*v),
            Value::Int(v) if *v >= 0 => Some(*v as u64),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(v) => Some(*v),
            Value::UInt(v) => Some(*v as f64),
            Value::Int(v) => Some(*v as f64),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// A parsed GGUF header: metadata and tensors (offsets absolute in the file).
pub struct GgufFile {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<(String, StoredTensor)>,
    pub alignment: u64,
    pub data_start: u64,
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// Array elements decoded so far, across all metadata (see `MAX_ARRAY_ELEMENTS`).
    elements: usize,
}

/// Most metadata array elements a file may hold in all. Each decoded element takes ~32
/// bytes however few it took in the file, so counts bounded only by the bytes that remain
/// let one edited count cost gigabytes; real models hold about a million (vocabulary,
/// scores, token types, merges).
const MAX_ARRAY_ELEMENTS: usize = 1 << 23;

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        if n > self.remaining() {
            return Err(format!(
                "{what} at byte {} needs {n} bytes but only {} remain (truncated or corrupt file)",
                self.pos,
                self.remaining()
            ));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self, what: &str) -> Result<u8, String> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().unwrap()))
    }
    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }

    /// A length-prefixed string; the length is checked against the remaining bytes first.
    fn string(&mut self, what: &str) -> Result<String, String> {
        let len = self.u64(what)?;
        let len = usize::try_from(len).ok().filter(|l| *l <= self.remaining()).ok_or_else(|| {
            format!("{what} at byte {} claims {len} bytes but only {} remain", self.pos - 8, self.remaining())
        })?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} at byte {} is not valid UTF-8", self.pos - len))
    }

    fn value(&mut self, ty: u32, what: &str, depth: usize) -> Result<Value, String> {
        Ok(match ty {
            0 => Value::UInt(self.u8(what)? as u64),
            1 => Value::Int(self.u8(what)? as i8 as i64),
            2 => Value::UInt(self.u16(what)? as u64),
            3 => Value::Int(self.u16(what)? as i16 as i64),
            4 => Value::UInt(self.u32(what)? as u64),
            5 => Value::Int(self.u32(what)? as i32 as i64),
            6 => Value::Float(f32::from_bits(self.u32(what)?) as f64),
            7 => Value::Bool(self.u8(what)? != 0),
            8 => Value::Str(self.string(what)?),
            9 => {
                if depth > 2 {
                    return Err(format!("{what}: arrays nested too deeply"));
                }
                let elem_ty = self.u32(what)?;
                let len = self.u64(what)?;
                let min_size = match elem_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10 | 11 | 12 => 8,
                    9 => 12,
                    other => return Err(format!("{what}: unknown array element type {other}")),
                };
                let len = usize::try_from(len)
                    .ok()
                    .filter(|l| l.checked_mul(min_size).is_some_and(|b| b <= self.remaining()))
                    .ok_or_else(|| {
                        format!(
                            "{what}: array of {len} elements does not fit in the {} bytes that remain",
                            self.remaining()
                        )
                    })?;
                self.elements = self.elements.saturating_add(len);
                if self.elements > MAX_ARRAY_ELEMENTS {
                    return Err(format!(
                        "{what}: metadata arrays hold more than {MAX_ARRAY_ELEMENTS} elements in all (real models hold about a million)"
                    ));
                }
                let mut items = Vec::with_capacity(len);
                for _ in 0..len {
                    items.push(self.value(elem_ty, what, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::UInt(self.u64(what)?),
            11 => Value::Int(self.u64(what)? as i64),
            12 => Value::Float(f64::from_bits(self.u64(what)?)),
            other => return Err(format!("{what}: unknown value type {other}")),
        })
    }
}

fn ggml_dtype(id: u32) -> Result<DType, String> {
    Ok(match id {
        0 => DType::F32,
        1 => DType::F16,
        2 => DType::Q4_0,
        3 => DType::Q4_1,
        8 => DType::Q8_0,
        30 => DType::BF16,
        6 => DType::Q5_0,
        7 => DType::Q5_1,
        10 => DType::Q2K,
        11 => DType::Q3K,
        12 => DType::Q4K,
        13 => DType::Q5K,
        14 => DType::Q6K,
        20 => DType::IQ4NL,
        23 => DType::IQ4XS,
        other => return Err(format!("ggml type {other} is not supported")),
    })
}

/// Parses the header of a memory-mapped GGUF file and checks every tensor against
/// the file's length.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<GgufFile, ImportError> {
    let bad = |message: String| ImportError::file(path, message);
    let mut cur = Cursor { bytes, pos: 0, elements: 0 };
    let magic = cur.take(4, "magic").map_err(&bad)?;
    if magic != MAGIC {
        return Err(bad(format!("bad magic {:02x?}: not a GGUF file", magic)));
    }
    let version = cur.u32("version").map_err(&bad)?;
    if !(2..=3).contains(&version) {
        return Err(bad(format!("GGUF version {version} is not supported (2 or 3)")));
    }
    let tensor_count = cur.u64("tensor count").map_err(&bad)?;
    let kv_count = cur.u64("metadata count").map_err(&bad)?;
    // Smallest possible records: a tensor info is 24 bytes, a key/value 13.
    if tensor_count > (cur.remaining() / 24) as u64 {
        return Err(bad(format!("tensor count {tensor_count} is absurd for a file of {} bytes", bytes.len())));
    }
    if kv_count > (cur.remaining() / 13) as u64 {
        return Err(bad(format!("metadata count {kv_count} is absurd for a file of {} bytes", bytes.len())));
    }

    let mut metadata = BTreeMap::new();
    for i in 0..kv_count {
        let key = cur.string(&format!("metadata key {i}")).map_err(&bad)?;
        let ty = cur.u32(&format!("type of `{key}`")).map_err(&bad)?;
        let value = cur.value(ty, &format!("metadata `{key}`"), 0).map_err(&bad)?;
        metadata.insert(key, value);
    }
    let alignment = match metadata.get("general.alignment") {
        None => 32,
        Some(v) => v
            .as_u64()
            .filter(|a| *a > 0 && a.is_power_of_two() && *a <= 1 << 20)
            .ok_or_else(|| bad(format!("general.alignment {v:?} is not a power of two")))?,
    };

    let mut infos = Vec::with_capacity(tensor_count as usize);
    for i in 0..tensor_count {
        let name = cur.string(&format!("name of tensor {i}")).map_err(&bad)?;
        let n_dims = cur.u32(&format!("rank of tensor `{name}`")).map_err(&bad)?;
        if n_dims == 0 || n_dims > 4 {
            return Err(bad(format!("tensor `{name}` has rank {n_dims} (1 to 4 supported)")));
        }
        let mut ne = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            ne.push(cur.u64(&format!("shape of tensor `{name}`")).map_err(&bad)?);
        }
        let type_id = cur.u32(&format!("type of tensor `{name}`")).map_err(&bad)?;
        let offset = cur.u64(&format!("offset of tensor `{name}`")).map_err(&bad)?;
        infos.push((name, ne, type_id, offset));
    }
    let data_start = (cur.pos as u64).div_ceil(alignment) * alignment;
    let file_len = bytes.len() as u64;
    if data_start > file_len && tensor_count > 0 {
        return Err(bad(format!(
            "tensor data would start at byte {data_start}, past the end of the file ({file_len} bytes)"
        )));
    }

    let mut tensors = Vec::with_capacity(infos.len());
    for (name, ne, type_id, offset) in infos {
        let dtype = ggml_dtype(type_id).map_err(|m| bad(format!("tensor `{name}`: {m}")))?;
        // GGUF lists dimensions fastest-varying first; slmc uses row-major [rows, cols].
        let shape: Vec<usize> = ne.iter().rev().map(|d| *d as usize).collect();
        let n = ne.iter().try_fold(1u64, |acc, d| acc.checked_mul(*d));
        let size = n
            .and_then(|n| usize::try_from(n).ok())
            .and_then(|n| dtype.storage_bytes(n))
            .ok_or_else(|| bad(format!("tensor `{name}`: shape {ne:?} is not a whole number of {dtype} blocks")))?;
        if ne.contains(&0) {
            return Err(bad(format!("tensor `{name}` has an empty dimension {ne:?}")));
        }
        if offset % alignment != 0 {
            return Err(bad(format!("tensor `{name}`: offset {offset} is not aligned to {alignment}")));
        }
        let start = data_start.checked_add(offset);
        let end = start.and_then(|s| s.checked_add(size as u64));
        match (start, end) {
            (Some(start), Some(end)) if end <= file_len => tensors.push((
                name,
                StoredTensor { dtype, shape, file: 0, offset: start as usize, len: size },
            )),
            _ => {
                return Err(bad(format!(
                    "tensor `{name}` ({size} bytes at data offset {offset}) runs past the end of the file ({file_len} bytes)"
                )))
            }
        }
    }
    Ok(GgufFile { version, metadata, tensors, alignment, data_start })
}
