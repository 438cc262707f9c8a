//! Element types of Megatron's indexed datasets and their on-disk codes.

use crate::{Error, Result};

/// The element type of a `.bin` file, with the code that `.idx` stores for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// Code 1.
    U8,
    /// Code 2.
    I8,
    /// Code 3.
    I16,
    /// Code 4.
    I32,
    /// Code 5.
    I64,
    /// Code 6.
    F64,
    /// Code 7 (float32 in MMIDIDX; the legacy TNTIDX format read 7 as float64).
    F32,
    /// Code 8.
    U16,
}

impl DType {
    /// Every type, in code order.
    pub const ALL: [DType; 8] = [
        DType::U8,
        DType::I8,
        DType::I16,
        DType::I32,
        DType::I64,
        DType::F64,
        DType::F32,
        DType::U16,
    ];

    /// The MMIDIDX code.
    pub fn code(self) -> u8 {
        DType::ALL.iter().position(|&d| d == self).expect("listed") as u8 + 1
    }

    /// The type of an MMIDIDX code.
    ///
    /// # Errors
    ///
    /// `InvalidData` for a code outside 1..=8.
    pub fn from_code(code: u64) -> Result<Self> {
        (1..=8)
            .contains(&code)
            .then(|| DType::ALL[code as usize - 1])
            .ok_or_else(|| Error::InvalidData(format!("unknown dtype code {code} (valid: 1 to 8)")))
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::U8 | DType::I8 => 1,
            DType::I16 | DType::U16 => 2,
            DType::I32 | DType::F32 => 4,
            DType::I64 | DType::F64 => 8,
        }
    }

    /// The smallest type for token ids of a vocabulary, as Megatron picks it: `u16` below
    /// 65500 entries, else `i32`.
    pub fn for_vocab_size(vocab_size: usize) -> Self {
        if vocab_size < 65_500 {
            DType::U16
        } else {
            DType::I32
        }
    }

    /// Whether the elements are integers (token ids).
    pub fn is_integer(self) -> bool {
        !matches!(self, DType::F32 | DType::F64)
    }

    /// Decodes the little-endian integer element at the start of `bytes`.
    ///
    /// # Panics
    ///
    /// For a float type, or when `bytes` is shorter than [`size`](Self::size).
    pub(crate) fn decode_token(self, bytes: &[u8]) -> i64 {
        match self {
            DType::U8 => u8::read_le(bytes) as i64,
            DType::I8 => i8::read_le(bytes) as i64,
            DType::I16 => i16::read_le(bytes) as i64,
            DType::U16 => u16::read_le(bytes) as i64,
            DType::I32 => i32::read_le(bytes) as i64,
            DType::I64 => i64::read_le(bytes),
            DType::F32 | DType::F64 => panic!("{self:?} elements are not token ids"),
        }
    }

    /// Appends a token id as a little-endian element.
    ///
    /// # Errors
    ///
    /// `InvalidData` when the type is a float or the id does not fit it.
    pub(crate) fn encode_token(self, token: i64, out: &mut Vec<u8>) -> Result<()> {
        let written = match self {
            DType::U8 => u8::try_from(token).map(|v| v.write_le(out)).is_ok(),
            DType::I8 => i8::try_from(token).map(|v| v.write_le(out)).is_ok(),
            DType::I16 => i16::try_from(token).map(|v| v.write_le(out)).is_ok(),
            DType::U16 => u16::try_from(token).map(|v| v.write_le(out)).is_ok(),
            DType::I32 => i32::try_from(token).map(|v| v.write_le(out)).is_ok(),
            DType::I64 => {
                token.write_le(out);
                true
            }
            DType::F32 | DType::F64 => false,
        };
        if written {
            Ok(())
        } else {
            Err(Error::InvalidData(format!(
                "token id {token} does not fit dtype {self:?}"
            )))
        }
    }
}

/// A native type that is one of the dataset element types.
pub trait Element: Copy + Send + Sync + 'static {
    /// Its dataset type.
    const DTYPE: DType;
    /// Reads one little-endian value from the start of `bytes`.
    ///
    /// # Panics
    ///
    /// When `bytes` is shorter than the type.
    fn read_le(bytes: &[u8]) -> Self;
    /// Appends the little-endian bytes of the value.
    fn write_le(self, out: &mut Vec<u8>);
}

macro_rules! element {
    ($($native:ty => $dtype:ident),*) => {$(
        impl Element for $native {
            const DTYPE: DType = DType::$dtype;
            fn read_le(bytes: &[u8]) -> Self {
                const SIZE: usize = std::mem::size_of::<$native>();
                <$native>::from_le_bytes(bytes[..SIZE].try_into().expect("checked length"))
            }
            fn write_le(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}

element!(u8 => U8, i8 => I8, i16 => I16, i32 => I32, i64 => I64, f64 => F64, f32 => F32, u16 => U16);
