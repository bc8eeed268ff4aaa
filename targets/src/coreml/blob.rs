//! Core ML's weight blob file (`weights/weight.bin`, MIL blob storage version 2): a
//! 64-byte header (u32 blob count, u32 version 2, zeros), then per blob a 64-byte metadata
//! record at a 64-byte boundary (u32 sentinel 0xDEADBEEF, u32 data type, u64 byte size,
//! u64 absolute data offset, u64 unused bits in the last byte, zeros) followed by the data.
//! A MIL `BlobFileValue` names the metadata record's offset. Sub-byte values are packed
//! from the least significant bit up (element 0 in the low nibble). All little-endian.

use crate::weight_file::{WeightContents, WeightFile};

const HEADER_BYTES: usize = 64;
const METADATA_BYTES: usize = 64;
const ALIGN: usize = 64;
const VERSION: u32 = 2;
const SENTINEL: u32 = 0xDEAD_BEEF;

/// Blob data types (`BlobDataType` in coremltools' MILBlob).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobType {
    Float16,
    Float32,
    UInt8,
    Int8,
    UInt4,
}

impl BlobType {
    pub fn code(self) -> u32 {
        match self {
            BlobType::Float16 => 1,
            BlobType::Float32 => 2,
            BlobType::UInt8 => 3,
            BlobType::Int8 => 4,
            BlobType::UInt4 => 11,
        }
    }

    fn from_code(code: u32) -> Option<BlobType> {
        [BlobType::Float16, BlobType::Float32, BlobType::UInt8, BlobType::Int8, BlobType::UInt4]
            .into_iter()
            .find(|t| t.code() == code)
    }

    pub fn bits(self) -> usize {
        match self {
            BlobType::Float16 => 16,
            BlobType::Float32 => 32,
            BlobType::UInt8 | BlobType::Int8 => 8,
            BlobType::UInt4 => 4,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BlobError {
    #[error("weight.bin: {0}")]
    Corrupt(String),
}

/// Appends blobs to a weight file (in memory or on disk); `finish` gives the file.
pub struct BlobWriter {
    file: WeightFile,
    count: u32,
}

impl Default for BlobWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl BlobWriter {
    pub fn new() -> Self {
        Self::with_capacity(0)
    }

    /// An in-memory writer whose file may grow to `capacity` bytes without copying itself.
    pub fn with_capacity(capacity: usize) -> Self {
        Self::into_file(WeightFile::in_memory(capacity.max(HEADER_BYTES)))
    }

    /// Blobs written into `file` (empty), in memory or on disk.
    pub fn into_file(mut file: WeightFile) -> Self {
        let mut header = [0u8; HEADER_BYTES];
        header[4..8].copy_from_slice(&VERSION.to_le_bytes());
        file.extend_from_slice(&header);
        BlobWriter { file, count: 0 }
    }

    /// Writes `data` (already packed for sub-byte types) holding `elements` values; returns
    /// the metadata offset a `BlobFileValue` refers to.
    pub fn write(&mut self, ty: BlobType, data: &[u8], elements: usize) -> u64 {
        assert_eq!(data.len(), (elements * ty.bits()).div_ceil(8), "blob data does not match its element count");
        self.file.pad_to(ALIGN);
        let meta = self.file.len();
        let padding_bits = (8 - (elements * ty.bits()) % 8) % 8;
        let mut record = [0u8; METADATA_BYTES];
        record[0..4].copy_from_slice(&SENTINEL.to_le_bytes());
        record[4..8].copy_from_slice(&ty.code().to_le_bytes());
        record[8..16].copy_from_slice(&(data.len() as u64).to_le_bytes());
        record[16..24].copy_from_slice(&((meta + METADATA_BYTES) as u64).to_le_bytes());
        record[24..32].copy_from_slice(&(padding_bits as u64).to_le_bytes());
        self.file.extend_from_slice(&record);
        self.file.extend_from_slice(data);
        self.count += 1;
        meta as u64
    }

    pub fn write_f16(&mut self, values: &[f32]) -> u64 {
        let data: Vec<u8> = values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect();
        self.write(BlobType::Float16, &data, values.len())
    }

    pub fn write_u4(&mut self, codes: &[u8]) -> u64 {
        self.write(BlobType::UInt4, &pack_u4(codes), codes.len())
    }

    /// The file, its header counting the blobs.
    pub fn finish(mut self) -> std::io::Result<WeightContents> {
        let count = self.count;
        self.file.patch(0, &count.to_le_bytes());
        self.file.finish()
    }
}

/// Packs 4-bit codes (each < 16) two per byte, element 0 in the low nibble.
pub fn pack_u4(codes: &[u8]) -> Vec<u8> {
    codes.chunks(2).map(|c| (c[0] & 0xf) | (c.get(1).copied().unwrap_or(0) << 4)).collect()
}

/// One blob as read back.
#[derive(Debug, Clone, PartialEq)]
pub struct Blob<'a> {
    pub ty: BlobType,
    pub data: &'a [u8],
}

impl Blob<'_> {
    /// Values as f32 (integers converted exactly), `elements` of them.
    pub fn to_f32(&self, elements: usize) -> Result<Vec<f32>, BlobError> {
        // `elements` comes from the program's declared shape: checked, never trusted.
        let need = elements.checked_mul(self.ty.bits()).map(|b| b.div_ceil(8));
        if need != Some(self.data.len()) {
            return Err(BlobError::Corrupt(format!(
                "a {:?} blob of {} bytes cannot hold {elements} values",
                self.ty,
                self.data.len()
            )));
        }
        let d = self.data;
        Ok(match self.ty {
            BlobType::Float16 => d.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            BlobType::Float32 => d.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
            BlobType::UInt8 => d.iter().map(|v| *v as f32).collect(),
            BlobType::Int8 => d.iter().map(|v| *v as i8 as f32).collect(),
            BlobType::UInt4 => (0..elements).map(|i| ((d[i / 2] >> (4 * (i % 2))) & 0xf) as f32).collect(),
        })
    }
}

/// Reads the blob whose metadata record sits at `offset`, checking every field.
pub fn read(file: &[u8], offset: u64) -> Result<Blob<'_>, BlobError> {
    let bad = |m: String| BlobError::Corrupt(m);
    if file.len() < HEADER_BYTES {
        return Err(bad(format!("{} bytes is shorter than the 64-byte header", file.len())));
    }
    let u32_at = |o: usize| u32::from_le_bytes(file[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(file[o..o + 8].try_into().unwrap());
    if u32_at(4) != VERSION {
        return Err(bad(format!("storage version {} (expected {VERSION})", u32_at(4))));
    }
    let meta = usize::try_from(offset).map_err(|_| bad(format!("offset {offset} is out of range")))?;
    if meta < HEADER_BYTES
        || !meta.is_multiple_of(ALIGN)
        || meta.checked_add(METADATA_BYTES).is_none_or(|end| end > file.len())
    {
        return Err(bad(format!("no blob metadata at offset {offset} (file is {} bytes)", file.len())));
    }
    if u32_at(meta) != SENTINEL {
        return Err(bad(format!("the metadata at offset {offset} lacks the 0xDEADBEEF sentinel")));
    }
    let ty = BlobType::from_code(u32_at(meta + 4))
        .ok_or_else(|| bad(format!("blob at {offset}: unsupported data type {}", u32_at(meta + 4))))?;
    let size = u64_at(meta + 8) as usize;
    let data_at = u64_at(meta + 16) as usize;
    if data_at != meta + METADATA_BYTES || data_at.checked_add(size).is_none_or(|end| end > file.len()) {
        return Err(bad(format!("blob at {offset}: data at {data_at} of {size} bytes runs past the file's end")));
    }
    Ok(Blob { ty, data: &file[data_at..data_at + size] })
}

/// The blob count in the header.
pub fn count(file: &[u8]) -> Result<u32, BlobError> {
    if file.len() < HEADER_BYTES {
        return Err(BlobError::Corrupt("shorter than the 64-byte header".into()));
    }
    Ok(u32::from_le_bytes(file[0..4].try_into().unwrap()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_round_trips() {
        let mut w = BlobWriter::new();
        let f = [0.5f32, -2.25, 1e-3, 65504.0, 0.0, 3.0, 7.5, -1.0, 2.0, 100.0, 9.0];
        let o16 = w.write_f16(&f);
        let f32_bytes: Vec<u8> = f.iter().flat_map(|v| v.to_le_bytes()).collect();
        let o32 = w.write(BlobType::Float32, &f32_bytes, f.len());
        let codes: Vec<u8> = (0..33).map(|i| (i * 7 % 16) as u8).collect();
        let o4 = w.write_u4(&codes);
        let i8s: Vec<u8> = [-128i8, -1, 0, 1, 127].iter().map(|v| *v as u8).collect();
        let oi8 = w.write(BlobType::Int8, &i8s, 5);
        let ou8 = w.write(BlobType::UInt8, &[0, 1, 255], 3);
        let Ok(WeightContents::Bytes(file)) = w.finish() else { panic!("an in-memory blob file") };
        assert_eq!(count(&file).unwrap(), 5);
        assert_eq!(o16, 64, "the first blob's metadata follows the header");
        for o in [o16, o32, o4, oi8, ou8] {
            assert_eq!(o % 64, 0);
        }
        let h = read(&file, o16).unwrap().to_f32(f.len()).unwrap();
        for (a, b) in h.iter().zip(f) {
            assert_eq!(*a, half::f16::from_f32(b).to_f32());
        }
        assert_eq!(read(&file, o32).unwrap().to_f32(f.len()).unwrap(), f);
        let b4 = read(&file, o4).unwrap();
        assert_eq!(b4.ty, BlobType::UInt4);
        assert_eq!(b4.data.len(), 17);
        assert_eq!(b4.data[0], codes[0] | (codes[1] << 4), "element 0 is the low nibble");
        assert_eq!(b4.to_f32(33).unwrap(), codes.iter().map(|c| *c as f32).collect::<Vec<_>>());
        // 33 nibbles leave 4 unused bits in the last byte.
        assert_eq!(u64::from_le_bytes(file[o4 as usize + 24..o4 as usize + 32].try_into().unwrap()), 4);
        assert_eq!(read(&file, oi8).unwrap().to_f32(5).unwrap(), vec![-128.0, -1.0, 0.0, 1.0, 127.0]);
        assert_eq!(read(&file, ou8).unwrap().to_f32(3).unwrap(), vec![0.0, 1.0, 255.0]);
    }

    #[test]
    fn damaged_files_are_refused() {
        let mut w = BlobWriter::new();
        let o = w.write_f16(&[1.0; 16]);
        let Ok(WeightContents::Bytes(file)) = w.finish() else { panic!("an in-memory blob file") };
        assert!(read(&file[..140], o).unwrap_err().to_string().contains("runs past"));
        assert!(read(&file[..100], o).unwrap_err().to_string().contains("no blob metadata"));
        assert!(read(&file, 96).is_err());
        let mut bad = file.clone();
        bad[o as usize] ^= 1;
        assert!(read(&bad, o).unwrap_err().to_string().contains("sentinel"));
        let mut v = file.clone();
        v[4] = 3;
        assert!(read(&v, o).unwrap_err().to_string().contains("version"));
        assert!(read(&file, o).unwrap().to_f32(15).is_err(), "a length mismatch is an error");
        // Offsets and element counts near the top of the address space: errors, not
        // overflow (the metadata check used to wrap past the end and index out of bounds).
        let top = u64::MAX - (u64::MAX % ALIGN as u64);
        assert!(read(&file, top).unwrap_err().to_string().contains("no blob metadata"));
        assert!(read(&file, o).unwrap().to_f32(usize::MAX / 2).is_err());
    }
}
