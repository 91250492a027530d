//! GGUF metadata values: the thirteen scalar, string and array types of the format, with the few
//! typed reads the importer needs (any integer type where a count is expected, as writers differ).

/// Value type ids as they appear in the file.
pub mod ty {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(MetaArray),
}

/// Arrays are homogeneous; the common element types get compact storage (a 150k-entry vocabulary
/// of token types is 600 KB, not 150k enum values).
#[derive(Clone, Debug, PartialEq)]
pub enum MetaArray {
    /// Every integer element type, widened.
    Int(Vec<i64>),
    /// u64 elements that do not fit i64 keep their type.
    U64(Vec<u64>),
    Float(Vec<f64>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<MetaArray>),
}

impl MetaArray {
    pub fn len(&self) -> usize {
        match self {
            MetaArray::Int(v) => v.len(),
            MetaArray::U64(v) => v.len(),
            MetaArray::Float(v) => v.len(),
            MetaArray::Bool(v) => v.len(),
            MetaArray::String(v) => v.len(),
            MetaArray::Array(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl MetaValue {
    /// Any non-negative integer value.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_strings(&self) -> Option<&[String]> {
        match self {
            MetaValue::Array(MetaArray::String(v)) => Some(v),
            _ => None,
        }
    }

    pub fn as_ints(&self) -> Option<&[i64]> {
        match self {
            MetaValue::Array(MetaArray::Int(v)) => Some(v),
            _ => None,
        }
    }

    pub fn as_floats(&self) -> Option<&[f64]> {
        match self {
            MetaValue::Array(MetaArray::Float(v)) => Some(v),
            _ => None,
        }
    }

    /// A short rendering for `inspect`: scalars in full, strings and arrays abbreviated.
    pub fn summary(&self, max: usize) -> String {
        let cut = |s: String| {
            if s.chars().count() > max {
                format!("{}…", s.chars().take(max).collect::<String>())
            } else {
                s
            }
        };
        match self {
            MetaValue::String(s) => cut(format!("{s:?}")),
            MetaValue::Array(a) => {
                let kind = match a {
                    MetaArray::Int(_) | MetaArray::U64(_) => "int",
                    MetaArray::Float(_) => "float",
                    MetaArray::Bool(_) => "bool",
                    MetaArray::String(_) => "string",
                    MetaArray::Array(_) => "array",
                };
                let head = match a {
                    MetaArray::String(v) => format!("{:?}", &v[..v.len().min(4)]),
                    MetaArray::Int(v) => format!("{:?}", &v[..v.len().min(8)]),
                    MetaArray::Float(v) => format!("{:?}", &v[..v.len().min(8)]),
                    _ => String::new(),
                };
                cut(format!("[{kind}; {}] {head}", a.len()))
            }
            other => format!("{other:?}")
                .split_once('(')
                .map(|(_, v)| v.trim_end_matches(')').to_string())
                .unwrap_or_default(),
        }
    }
}
