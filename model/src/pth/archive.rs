//! The container `torch.save` writes, read and written without PyTorch.
//!
//! A zip archive (entries stored, no compression) whose entries all sit under one folder
//! (`archive/` for ours): `data.pkl` is a pickle (protocol 2) of the saved object in which every
//! tensor is a call `torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
//! requires_grad, hooks)`; `storage` is a persistent id `('storage', torch.FloatStorage, key,
//! 'cpu', numel)` whose bytes are the entry `data/<key>` (raw little-endian values). `version`
//! holds the format version, `byteorder` says `little`.
//!
//! Reading parses the pickle with candle's pickle machine (`candle_core::pickle::Stack`) and turns
//! its object tree into [`Value`]s; tensor bytes are read lazily, one entry per tensor. Writing
//! emits only the opcodes `torch.load(..., weights_only=True)` accepts.

use std::io::{Cursor, Read, Write};

use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipArchive, ZipWriter};

use crate::ModelError;

/// A pickled value, with tensors kept as references into the archive.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// Key/value pairs. Not necessarily in file order: candle's pickle machine reverses each
    /// SETITEMS batch, so look entries up by key.
    Dict(Vec<(Value, Value)>),
    Tensor(StoredTensor),
    /// An object this reader does not interpret (class instances, bytes…), described.
    Other(String),
}

impl Value {
    /// Entries of a dict, or None for any other value.
    pub(crate) fn as_dict(&self) -> Option<&[(Value, Value)]> {
        match self {
            Value::Dict(kv) => Some(kv),
            _ => None,
        }
    }

    /// The value under string key `key` of a dict.
    pub(crate) fn get(&self, key: &str) -> Option<&Value> {
        self.as_dict()?
            .iter()
            .find(|(k, _)| matches!(k, Value::Str(s) if s == key))
            .map(|(_, v)| v)
    }

    /// Integer value (ints, and floats holding an integer, as older torch saved `step`).
    pub(crate) fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Int(i) => u64::try_from(*i).ok(),
            Value::Float(f) if f.is_finite() && *f >= 0.0 && f.fract() == 0.0 => Some(*f as u64),
            _ => None,
        }
    }

    /// Float value (ints too).
    pub(crate) fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            _ => None,
        }
    }

    /// Short description for error messages.
    pub(crate) fn kind(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(_) => "bool".into(),
            Value::Int(_) => "int".into(),
            Value::Float(_) => "float".into(),
            Value::Str(_) => "str".into(),
            Value::Tuple(_) => "tuple".into(),
            Value::List(_) => "list".into(),
            Value::Dict(_) => "dict".into(),
            Value::Tensor(t) => format!("tensor {:?}", t.shape),
            Value::Other(d) => d.clone(),
        }
    }
}

/// Element type of a storage, from its pickled class name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StorageKind {
    F32,
    F64,
    F16,
    BF16,
    I64,
}

impl StorageKind {
    fn from_class(name: &str) -> Option<Self> {
        Some(match name {
            "FloatStorage" => Self::F32,
            "DoubleStorage" => Self::F64,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            "LongStorage" => Self::I64,
            _ => return None,
        })
    }

    fn class(self) -> &'static str {
        match self {
            Self::F32 => "FloatStorage",
            Self::F64 => "DoubleStorage",
            Self::F16 => "HalfStorage",
            Self::BF16 => "BFloat16Storage",
            Self::I64 => "LongStorage",
        }
    }

    fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F64 => DType::F64,
            Self::F16 => DType::F16,
            Self::BF16 => DType::BF16,
            Self::I64 => DType::I64,
        }
    }

    fn size(self) -> usize {
        self.dtype().size_in_bytes()
    }
}

/// A tensor as pickled: a strided view into a storage entry of the archive.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct StoredTensor {
    /// Storage key (entry `data/<key>`).
    pub storage: String,
    pub kind: StorageKind,
    /// Elements in the storage, as the persistent id declares.
    pub storage_numel: usize,
    /// Offset of the first element, in elements.
    pub offset: usize,
    pub shape: Vec<usize>,
    /// Strides in elements.
    pub stride: Vec<usize>,
}

fn bad_pickle(what: impl std::fmt::Display) -> ModelError {
    ModelError::Checkpoint(format!("data.pkl: {what}"))
}

fn zip_error(e: zip::result::ZipError) -> ModelError {
    ModelError::Checkpoint(format!("not a PyTorch zip checkpoint: {e}"))
}

/// An opened archive: the folder prefix of its entries and the zip for lazy tensor reads.
pub(crate) struct TorchArchive<'a> {
    zip: ZipArchive<Cursor<&'a [u8]>>,
    prefix: String,
}

impl<'a> TorchArchive<'a> {
    /// Opens `bytes` and unpickles `data.pkl`.
    pub(crate) fn open(bytes: &'a [u8]) -> Result<(Self, Value), ModelError> {
        let mut zip = ZipArchive::new(Cursor::new(bytes)).map_err(zip_error)?;
        let pkl = zip
            .file_names()
            .filter_map(Result::ok)
            .find(|n| n == "data.pkl" || n.ends_with("/data.pkl"))
            .map(|n| n.into_owned())
            .ok_or_else(|| {
                ModelError::Checkpoint("not a PyTorch zip checkpoint: no data.pkl entry".into())
            })?;
        let prefix = pkl[..pkl.len() - "data.pkl".len()].to_string();
        let mut data = Vec::new();
        zip.by_name(&pkl)
            .map_err(zip_error)?
            .read_to_end(&mut data)
            .map_err(|e| ModelError::Checkpoint(format!("reading {pkl}: {e}")))?;
        let mut stack = Stack::empty();
        stack.read_loop(&mut data.as_slice()).map_err(bad_pickle)?;
        let root = convert(stack.finalize().map_err(bad_pickle)?)?;
        Ok((Self { zip, prefix }, root))
    }

    /// The tensor's values as an f32 tensor on `device`; `name` is used in errors.
    pub(crate) fn load(
        &mut self,
        name: &str,
        t: &StoredTensor,
        device: &Device,
    ) -> Result<Tensor, ModelError> {
        let bad = |m: String| ModelError::Checkpoint(format!("tensor `{name}`: {m}"));
        let entry = format!("{}data/{}", self.prefix, t.storage);
        let mut raw = Vec::new();
        self.zip
            .by_name(&entry)
            .map_err(|e| bad(format!("storage entry {entry}: {e}")))?
            .read_to_end(&mut raw)
            .map_err(|e| bad(format!("reading {entry}: {e}")))?;
        let es = t.kind.size();
        let available = (raw.len() / es).min(t.storage_numel);
        if t.stride.len() != t.shape.len() {
            return Err(bad(format!(
                "{} strides for {} dims",
                t.stride.len(),
                t.shape.len()
            )));
        }
        let numel: usize = t.shape.iter().product();
        let mut buf = Vec::with_capacity(numel * es);
        if numel > 0 {
            let last = t.offset
                + t.shape
                    .iter()
                    .zip(&t.stride)
                    .map(|(d, s)| (d - 1) * s)
                    .sum::<usize>();
            if last >= available {
                return Err(bad(format!(
                    "view reaches element {last} of a storage with {available}"
                )));
            }
            if t.stride == contiguous_strides(&t.shape) {
                buf.extend_from_slice(&raw[t.offset * es..(t.offset + numel) * es]);
            } else {
                // Strided view: walk the indices in row-major order.
                let mut idx = vec![0usize; t.shape.len()];
                for _ in 0..numel {
                    let e = t.offset + idx.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
                    buf.extend_from_slice(&raw[e * es..(e + 1) * es]);
                    for d in (0..idx.len()).rev() {
                        idx[d] += 1;
                        if idx[d] < t.shape[d] {
                            break;
                        }
                        idx[d] = 0;
                    }
                }
            }
        }
        let tensor =
            Tensor::from_raw_buffer(&buf, t.kind.dtype(), t.shape.as_slice(), &Device::Cpu)?;
        Ok(tensor.to_dtype(DType::F32)?.to_device(device)?)
    }
}

fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        s[d] = s[d + 1] * shape[d + 1];
    }
    s
}

/// candle's pickle object tree → [`Value`].
fn convert(obj: Object) -> Result<Value, ModelError> {
    Ok(match obj {
        Object::Int(i) => Value::Int(i.into()),
        Object::Long(i) => Value::Int(i),
        Object::Float(f) => Value::Float(f),
        Object::Unicode(s) => Value::Str(s),
        Object::Bool(b) => Value::Bool(b),
        Object::None => Value::None,
        Object::Tuple(v) => Value::Tuple(v.into_iter().map(convert).collect::<Result<_, _>>()?),
        Object::List(v) => Value::List(v.into_iter().map(convert).collect::<Result<_, _>>()?),
        Object::Dict(kv) => Value::Dict(
            kv.into_iter()
                .map(|(k, v)| Ok((convert(k)?, convert(v)?)))
                .collect::<Result<_, ModelError>>()?,
        ),
        Object::Reduce { callable, args } => convert_call(*callable, *args)?,
        // BUILD on a tensor sets Python-side attributes; the data is the tensor's.
        Object::Build { callable, .. } => match convert(*callable)? {
            t @ Value::Tensor(_) => t,
            other => Value::Other(format!("object built from {}", other.kind())),
        },
        Object::Class {
            module_name,
            class_name,
        } => Value::Other(format!("class {module_name}.{class_name}")),
        Object::PersistentLoad(_) => Value::Other("persistent id".into()),
        Object::Mark => return Err(bad_pickle("stray MARK")),
    })
}

/// A REDUCE: tensor rebuild functions become tensors, anything else stays opaque.
fn convert_call(callable: Object, args: Object) -> Result<Value, ModelError> {
    let Object::Class {
        module_name,
        class_name,
    } = &callable
    else {
        return Ok(Value::Other("call of a computed callable".into()));
    };
    let mut args = match args {
        Object::Tuple(a) => a,
        _ => return Ok(Value::Other(format!("{module_name}.{class_name}(…)"))),
    };
    match (module_name.as_str(), class_name.as_str()) {
        ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => {
            Ok(Value::Tensor(rebuild_tensor(args)?))
        }
        // nn.Parameter(tensor, requires_grad, hooks[, state]): the tensor is the first argument.
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state")
            if !args.is_empty() =>
        {
            convert(args.swap_remove(0))
        }
        // Tensor subclasses: (func, type, func_args, state); the data is func(*func_args).
        ("torch._tensor", "_rebuild_from_type_v2") if args.len() >= 3 => {
            let func_args = args.swap_remove(2);
            let func = args.swap_remove(0);
            convert_call(func, func_args)
        }
        _ => Ok(Value::Other(format!("{module_name}.{class_name}(…)"))),
    }
}

fn usize_of(o: &Object, what: &str) -> Result<usize, ModelError> {
    match o {
        Object::Int(i) if *i >= 0 => Ok(*i as usize),
        Object::Long(i) if *i >= 0 => Ok(*i as usize),
        other => Err(bad_pickle(format!(
            "tensor {what}: expected a non-negative int, got {other:?}"
        ))),
    }
}

fn usizes_of(o: &Object, what: &str) -> Result<Vec<usize>, ModelError> {
    match o {
        Object::Tuple(v) => v.iter().map(|x| usize_of(x, what)).collect(),
        other => Err(bad_pickle(format!(
            "tensor {what}: expected a tuple, got {other:?}"
        ))),
    }
}

/// `_rebuild_tensor_v2(storage, storage_offset, size, stride, …)`.
fn rebuild_tensor(args: Vec<Object>) -> Result<StoredTensor, ModelError> {
    if args.len() < 4 {
        return Err(bad_pickle(format!(
            "tensor rebuild with {} arguments",
            args.len()
        )));
    }
    let Object::PersistentLoad(pid) = &args[0] else {
        return Err(bad_pickle("tensor storage is not a persistent id"));
    };
    let Object::Tuple(pid) = pid.as_ref() else {
        return Err(bad_pickle("storage persistent id is not a tuple"));
    };
    let (kind, storage, storage_numel) = match pid.as_slice() {
        [
            Object::Unicode(tag),
            Object::Class { class_name, .. },
            Object::Unicode(key),
            _location,
            numel,
        ] if tag == "storage" => {
            let kind = StorageKind::from_class(class_name).ok_or_else(|| {
                ModelError::Unsupported(format!("tensor storage type {class_name}"))
            })?;
            (kind, key.clone(), usize_of(numel, "storage size")?)
        }
        other => {
            return Err(bad_pickle(format!(
                "unexpected storage persistent id {other:?}"
            )));
        }
    };
    Ok(StoredTensor {
        storage,
        kind,
        storage_numel,
        offset: usize_of(&args[1], "offset")?,
        shape: usizes_of(&args[2], "size")?,
        stride: usizes_of(&args[3], "stride")?,
    })
}

/// Collects tensor storages while a [`Value`] tree is built, then writes the archive.
pub(crate) struct TorchWriter {
    storages: Vec<Vec<u8>>,
}

impl TorchWriter {
    pub(crate) fn new() -> Self {
        Self {
            storages: Vec::new(),
        }
    }

    /// Registers `t` (converted to f32, contiguous) as a new storage and returns its reference.
    pub(crate) fn tensor(&mut self, t: &Tensor) -> Result<Value, ModelError> {
        let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut bytes = Vec::with_capacity(values.len() * 4);
        for v in &values {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        let key = self.storages.len().to_string();
        self.storages.push(bytes);
        let shape = t.dims().to_vec();
        Ok(Value::Tensor(StoredTensor {
            storage: key,
            kind: StorageKind::F32,
            storage_numel: values.len(),
            offset: 0,
            stride: contiguous_strides(&shape),
            shape,
        }))
    }

    /// A 0-dim f32 tensor (how torch ≥ 1.12 stores AdamW's `step`).
    pub(crate) fn scalar(&mut self, v: f32) -> Result<Value, ModelError> {
        self.tensor(&Tensor::new(v, &Device::Cpu)?)
    }

    /// The archive bytes: `archive/data.pkl`, `archive/byteorder`, the storages, `archive/version`.
    pub(crate) fn finish(self, root: &Value) -> Result<Vec<u8>, ModelError> {
        let mut pkl = vec![PROTO, 2];
        pickle(&mut pkl, root)?;
        pkl.push(STOP);
        let mut zip = ZipWriter::new(Cursor::new(Vec::new()));
        // torch aligns entry data to 64 bytes (for mmap); do the same.
        let opts = SimpleFileOptions::default()
            .compression_method(CompressionMethod::Stored)
            .with_alignment(64)
            .large_file(self.storages.iter().any(|s| s.len() >= u32::MAX as usize));
        let mut put = |name: &str, data: &[u8]| -> Result<(), ModelError> {
            zip.start_file(format!("archive/{name}"), opts)
                .map_err(zip_error)?;
            zip.write_all(data)
                .map_err(|e| ModelError::Checkpoint(format!("writing {name}: {e}")))
        };
        put("data.pkl", &pkl)?;
        put("byteorder", b"little")?;
        for (i, s) in self.storages.iter().enumerate() {
            put(&format!("data/{i}"), s)?;
        }
        put("version", b"3\n")?;
        Ok(zip.finish().map_err(zip_error)?.into_inner())
    }
}

// Pickle opcodes (protocol 2 subset).
const PROTO: u8 = 0x80;
const STOP: u8 = b'.';
const MARK: u8 = b'(';
const NONE: u8 = b'N';
const NEWTRUE: u8 = 0x88;
const NEWFALSE: u8 = 0x89;
const BININT: u8 = b'J';
const BININT1: u8 = b'K';
const BININT2: u8 = b'M';
const LONG1: u8 = 0x8a;
const BINFLOAT: u8 = b'G';
const BINUNICODE: u8 = b'X';
const EMPTY_TUPLE: u8 = b')';
const TUPLE: u8 = b't';
const EMPTY_LIST: u8 = b']';
const APPENDS: u8 = b'e';
const EMPTY_DICT: u8 = b'}';
const SETITEMS: u8 = b'u';
const GLOBAL: u8 = b'c';
const REDUCE: u8 = b'R';
const BINPERSID: u8 = b'Q';

fn pickle_global(out: &mut Vec<u8>, module: &str, name: &str) {
    out.push(GLOBAL);
    out.extend_from_slice(module.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(name.as_bytes());
    out.push(b'\n');
}

fn pickle_str(out: &mut Vec<u8>, s: &str) -> Result<(), ModelError> {
    let len = u32::try_from(s.len())
        .map_err(|_| ModelError::Checkpoint("string too long to pickle".into()))?;
    out.push(BINUNICODE);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

fn pickle_int(out: &mut Vec<u8>, i: i64) {
    if (0..256).contains(&i) {
        out.extend_from_slice(&[BININT1, i as u8]);
    } else if (0..65536).contains(&i) {
        out.push(BININT2);
        out.extend_from_slice(&(i as u16).to_le_bytes());
    } else if let Ok(v) = i32::try_from(i) {
        out.push(BININT);
        out.extend_from_slice(&v.to_le_bytes());
    } else {
        // Two's complement, little-endian, without redundant sign bytes.
        let mut bytes = i.to_le_bytes().to_vec();
        while bytes.len() > 1 {
            let top = bytes[bytes.len() - 1];
            let next_sign = bytes[bytes.len() - 2] & 0x80;
            if (top == 0 && next_sign == 0) || (top == 0xff && next_sign != 0) {
                bytes.pop();
            } else {
                break;
            }
        }
        out.extend_from_slice(&[LONG1, bytes.len() as u8]);
        out.extend_from_slice(&bytes);
    }
}

fn pickle_tuple(out: &mut Vec<u8>, items: &[Value]) -> Result<(), ModelError> {
    if items.is_empty() {
        out.push(EMPTY_TUPLE);
        return Ok(());
    }
    out.push(MARK);
    for v in items {
        pickle(out, v)?;
    }
    out.push(TUPLE);
    Ok(())
}

fn pickle(out: &mut Vec<u8>, v: &Value) -> Result<(), ModelError> {
    match v {
        Value::None => out.push(NONE),
        Value::Bool(b) => out.push(if *b { NEWTRUE } else { NEWFALSE }),
        Value::Int(i) => pickle_int(out, *i),
        Value::Float(f) => {
            out.push(BINFLOAT);
            out.extend_from_slice(&f.to_be_bytes());
        }
        Value::Str(s) => pickle_str(out, s)?,
        Value::Tuple(items) => pickle_tuple(out, items)?,
        Value::List(items) => {
            out.push(EMPTY_LIST);
            if !items.is_empty() {
                out.push(MARK);
                for v in items {
                    pickle(out, v)?;
                }
                out.push(APPENDS);
            }
        }
        Value::Dict(kv) => {
            out.push(EMPTY_DICT);
            if !kv.is_empty() {
                out.push(MARK);
                for (k, v) in kv {
                    pickle(out, k)?;
                    pickle(out, v)?;
                }
                out.push(SETITEMS);
            }
        }
        Value::Tensor(t) => {
            pickle_global(out, "torch._utils", "_rebuild_tensor_v2");
            out.push(MARK);
            // persistent id ('storage', torch.<Kind>Storage, key, 'cpu', numel)
            out.push(MARK);
            pickle_str(out, "storage")?;
            pickle_global(out, "torch", t.kind.class());
            pickle_str(out, &t.storage)?;
            pickle_str(out, "cpu")?;
            pickle_int(out, t.storage_numel as i64);
            out.push(TUPLE);
            out.push(BINPERSID);
            pickle_int(out, t.offset as i64);
            let ints = |xs: &[usize]| xs.iter().map(|&x| Value::Int(x as i64)).collect::<Vec<_>>();
            pickle_tuple(out, &ints(&t.shape))?;
            pickle_tuple(out, &ints(&t.stride))?;
            out.push(NEWFALSE); // requires_grad
            pickle_global(out, "collections", "OrderedDict"); // backward hooks: empty
            out.push(EMPTY_TUPLE);
            out.push(REDUCE);
            out.push(TUPLE);
            out.push(REDUCE);
        }
        Value::Other(d) => {
            return Err(ModelError::Checkpoint(format!("cannot pickle {d}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_tensors_round_trip() {
        let dev = Device::Cpu;
        let mut w = TorchWriter::new();
        let a = Tensor::arange(0f32, 24., &dev)
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap();
        let ta = w.tensor(&a).unwrap();
        let tb = w.scalar(7.0).unwrap();
        let root = Value::Dict(vec![
            (Value::Str("a".into()), ta),
            (Value::Int(3), tb),
            (
                Value::Str("misc".into()),
                Value::Tuple(vec![
                    Value::None,
                    Value::Bool(true),
                    Value::Bool(false),
                    Value::Int(-5),
                    Value::Int(300),
                    Value::Int(70_000),
                    // (candle's reader doesn't sign-extend LONG1, so no large negative ints.)
                    Value::Int(1 << 40),
                    Value::Float(-1.25e-7),
                    Value::List(vec![Value::Int(1), Value::Str("é".into())]),
                    Value::List(vec![]),
                    Value::Dict(vec![]),
                    Value::Tuple(vec![]),
                ]),
            ),
        ]);
        let bytes = w.finish(&root).unwrap();
        let (mut ar, back) = TorchArchive::open(&bytes).unwrap();
        assert_eq!(sorted(back.clone()), sorted(root));
        let Some(Value::Tensor(t)) = back.get("a") else {
            panic!("a is not a tensor")
        };
        let got = ar.load("a", t, &dev).unwrap();
        assert_eq!(got.dims(), &[2, 3, 4]);
        assert_eq!(
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            (0..24).map(|v| v as f32).collect::<Vec<_>>()
        );
    }

    /// Dict entries in key order, recursively (reading does not keep the file's order).
    fn sorted(v: Value) -> Value {
        match v {
            Value::Dict(kv) => {
                let mut kv: Vec<_> = kv.into_iter().map(|(k, v)| (k, sorted(v))).collect();
                kv.sort_by_key(|(k, _)| format!("{k:?}"));
                Value::Dict(kv)
            }
            Value::Tuple(xs) => Value::Tuple(xs.into_iter().map(sorted).collect()),
            Value::List(xs) => Value::List(xs.into_iter().map(sorted).collect()),
            other => other,
        }
    }

    #[test]
    fn strided_views_and_bounds() {
        let dev = Device::Cpu;
        let mut w = TorchWriter::new();
        let base = Tensor::arange(0f32, 12., &dev).unwrap();
        let Value::Tensor(mut t) = w.tensor(&base).unwrap() else {
            unreachable!()
        };
        let bytes = w.finish(&Value::None).unwrap();
        let (mut ar, _) = TorchArchive::open(&bytes).unwrap();
        // The transpose of a [3, 4] matrix starting at element 0: shape [4, 3], stride [1, 4].
        t.shape = vec![4, 3];
        t.stride = vec![1, 4];
        let got = ar.load("view", &t, &dev).unwrap();
        let want = base.reshape((3, 4)).unwrap().t().unwrap();
        assert_eq!(
            got.to_vec2::<f32>().unwrap(),
            want.to_vec2::<f32>().unwrap()
        );
        // A view past the end of its storage is refused, naming the tensor.
        t.offset = 1;
        let e = ar.load("view", &t, &dev).unwrap_err().to_string();
        assert!(e.contains("`view`") && e.contains("reaches"), "{e}");
    }

    #[test]
    fn garbage_is_an_error() {
        let e = TorchArchive::open(b"not a zip").err().unwrap().to_string();
        assert!(e.contains("not a PyTorch zip checkpoint"), "{e}");
    }
}
