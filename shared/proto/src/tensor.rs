//! `sd.v1.Tensor` <-> `candle_core::Tensor`.
//!
//! Bytes are little-endian and row-major. Each direction copies once, where candle's storage
//! must be owned and aligned: encoding takes the values out of the tensor and hands that
//! buffer to the message as is (f32 on little-endian machines); decoding copies the message's
//! bytes (a slice of the received buffer) into the typed Vec that candle then owns. A byte
//! length that does not match shape x dtype is rejected.

use crate::v1;
use candle_core::{DType, Device, Tensor};

/// Upper bound on elements in one wire tensor (4 GiB of f32), far above any legitimate
/// Stable Diffusion tensor; guards shape arithmetic against absurd values.
pub const MAX_TENSOR_ELEMENTS: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum TensorError {
    #[error("{name}: tensor is missing")]
    Missing { name: String },
    #[error("{name}: unsupported dtype {dtype} (allowed: F32, F16, BF16, I64, U8)")]
    UnsupportedDType { name: String, dtype: i32 },
    #[error("{name}: shape {shape:?} has more than {MAX_TENSOR_ELEMENTS} elements")]
    TooLarge { name: String, shape: Vec<u64> },
    #[error("{name}: {len} bytes do not match shape {shape:?} of {dtype:?} ({expected} bytes expected)")]
    ByteLength { name: String, len: usize, shape: Vec<u64>, dtype: DType, expected: u64 },
    #[error("{name}: {source}")]
    Candle { name: String, source: candle_core::Error },
}

impl From<TensorError> for tonic::Status {
    fn from(e: TensorError) -> Self {
        match e {
            TensorError::Candle { .. } => tonic::Status::internal(e.to_string()),
            _ => tonic::Status::invalid_argument(e.to_string()),
        }
    }
}

fn to_wire_dtype(dtype: DType) -> Option<v1::Dtype> {
    Some(match dtype {
        DType::F32 => v1::Dtype::F32,
        DType::F16 => v1::Dtype::F16,
        DType::BF16 => v1::Dtype::Bf16,
        DType::I64 => v1::Dtype::I64,
        DType::U8 => v1::Dtype::U8,
        _ => return None,
    })
}

fn from_wire_dtype(dtype: i32) -> Option<DType> {
    Some(match v1::Dtype::try_from(dtype).ok()? {
        v1::Dtype::F32 => DType::F32,
        v1::Dtype::F16 => DType::F16,
        v1::Dtype::Bf16 => DType::BF16,
        v1::Dtype::I64 => DType::I64,
        v1::Dtype::U8 => DType::U8,
        v1::Dtype::Unspecified => return None,
    })
}

fn le_chunks<const N: usize>(data: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
    data.chunks_exact(N).map(|c| {
        let mut a = [0u8; N];
        a.copy_from_slice(c);
        a
    })
}

/// f32 values as little-endian bytes, without copying on little-endian machines.
fn f32_bytes(values: Vec<f32>) -> bytes::Bytes {
    #[cfg(target_endian = "little")]
    {
        struct AsBytes(Vec<f32>);
        impl AsRef<[u8]> for AsBytes {
            fn as_ref(&self) -> &[u8] {
                bytemuck::cast_slice(&self.0)
            }
        }
        bytes::Bytes::from_owner(AsBytes(values))
    }
    #[cfg(not(target_endian = "little"))]
    {
        values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>().into()
    }
}

/// Little-endian bytes (any alignment) as f32 values: one copy.
fn f32_values(data: &[u8]) -> Vec<f32> {
    #[cfg(target_endian = "little")]
    {
        bytemuck::pod_collect_to_vec(data)
    }
    #[cfg(not(target_endian = "little"))]
    {
        le_chunks(data).map(f32::from_le_bytes).collect()
    }
}

impl v1::Tensor {
    /// Encodes a candle tensor (any device) for the wire.
    pub fn from_candle(t: &Tensor) -> Result<Self, TensorError> {
        let err = |source| TensorError::Candle { name: "tensor".into(), source };
        let dtype =
            to_wire_dtype(t.dtype()).ok_or(TensorError::UnsupportedDType { name: "tensor".into(), dtype: -1 })?;
        let shape = t.dims().iter().map(|&d| d as u64).collect();
        let flat = t.flatten_all().map_err(err)?;
        let data: Vec<u8> = match t.dtype() {
            DType::F32 => {
                return Ok(Self { dtype: dtype as i32, shape, data: f32_bytes(flat.to_vec1::<f32>().map_err(err)?) })
            }
            DType::F16 => flat.to_vec1::<half::f16>().map_err(err)?.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::BF16 => flat.to_vec1::<half::bf16>().map_err(err)?.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::I64 => flat.to_vec1::<i64>().map_err(err)?.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::U8 => flat.to_vec1::<u8>().map_err(err)?,
            _ => unreachable!("checked by to_wire_dtype"),
        };
        Ok(Self { dtype: dtype as i32, shape, data: data.into() })
    }

    /// Content digest: BLAKE3 of dtype, shape and bytes, hex. Equal digests, equal tensors.
    pub fn digest(&self) -> String {
        let mut h = blake3::Hasher::new();
        h.update(&self.dtype.to_le_bytes()).update(&(self.shape.len() as u64).to_le_bytes());
        for d in &self.shape {
            h.update(&d.to_le_bytes());
        }
        h.update(&self.data);
        h.finalize().to_hex().to_string()
    }

    /// Decodes onto `device`, checking the byte length against shape x dtype.
    /// `name` says which field was wrong in error messages.
    pub fn to_candle(&self, name: &str, device: &Device) -> Result<Tensor, TensorError> {
        let dtype = from_wire_dtype(self.dtype)
            .ok_or_else(|| TensorError::UnsupportedDType { name: name.into(), dtype: self.dtype })?;
        let elements = self
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= MAX_TENSOR_ELEMENTS)
            .ok_or_else(|| TensorError::TooLarge { name: name.into(), shape: self.shape.clone() })?;
        let expected = elements * dtype.size_in_bytes() as u64;
        if self.data.len() as u64 != expected {
            return Err(TensorError::ByteLength {
                name: name.into(),
                len: self.data.len(),
                shape: self.shape.clone(),
                dtype,
                expected,
            });
        }
        let shape: Vec<usize> = self.shape.iter().map(|&d| d as usize).collect();
        let d = &self.data;
        let t = match dtype {
            DType::F32 => Tensor::from_vec(f32_values(d), shape, device),
            DType::F16 => {
                Tensor::from_vec(le_chunks(d).map(half::f16::from_le_bytes).collect::<Vec<_>>(), shape, device)
            }
            DType::BF16 => {
                Tensor::from_vec(le_chunks(d).map(half::bf16::from_le_bytes).collect::<Vec<_>>(), shape, device)
            }
            DType::I64 => Tensor::from_vec(le_chunks(d).map(i64::from_le_bytes).collect::<Vec<_>>(), shape, device),
            DType::U8 => Tensor::from_vec(d.to_vec(), shape, device),
            _ => unreachable!("checked by from_wire_dtype"),
        };
        t.map_err(|source| TensorError::Candle { name: name.into(), source })
    }
}

/// Decodes an optional message field, naming it when it is absent.
pub fn required<'a>(t: &'a Option<v1::Tensor>, name: &str) -> Result<&'a v1::Tensor, TensorError> {
    t.as_ref().ok_or_else(|| TensorError::Missing { name: name.into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_dtype() {
        let base = Tensor::arange(0f32, 24., &Device::Cpu).unwrap().reshape((2, 3, 4)).unwrap();
        for dtype in [DType::F32, DType::F16, DType::BF16, DType::I64, DType::U8] {
            let t = base.to_dtype(dtype).unwrap();
            let wire = v1::Tensor::from_candle(&t).unwrap();
            assert_eq!(wire.shape, vec![2, 3, 4]);
            assert_eq!(wire.data.len(), 24 * dtype.size_in_bytes());
            let back = wire.to_candle("x", &Device::Cpu).unwrap();
            assert_eq!(back.dtype(), dtype);
            let diff = (back.to_dtype(DType::F32).unwrap() - &base).unwrap().abs().unwrap();
            assert_eq!(diff.max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        }
    }

    #[test]
    fn bytes_are_little_endian_row_major() {
        let t = Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu).unwrap();
        let wire = v1::Tensor::from_candle(&t).unwrap();
        assert_eq!(&wire.data[4..8], &2f32.to_le_bytes());
        assert_eq!(&wire.data[8..12], &3f32.to_le_bytes());
    }

    #[test]
    fn rejects_mismatched_byte_length() {
        let wire = v1::Tensor { dtype: v1::Dtype::F32 as i32, shape: vec![2, 2], data: vec![0; 15].into() };
        let err = wire.to_candle("latents", &Device::Cpu).unwrap_err();
        assert!(matches!(err, TensorError::ByteLength { expected: 16, len: 15, .. }), "{err}");
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("latents"), "{}", status.message());
    }

    #[test]
    fn rejects_unspecified_dtype_and_overflowing_shapes() {
        let wire = v1::Tensor { dtype: 0, shape: vec![1], data: vec![0; 4].into() };
        assert!(matches!(wire.to_candle("t", &Device::Cpu), Err(TensorError::UnsupportedDType { .. })));
        let wire = v1::Tensor { dtype: 1, shape: vec![u64::MAX, 4], data: Default::default() };
        assert!(matches!(wire.to_candle("t", &Device::Cpu), Err(TensorError::TooLarge { .. })));
        let wire = v1::Tensor { dtype: 1, shape: vec![1 << 20, 1 << 20], data: Default::default() };
        assert!(matches!(wire.to_candle("t", &Device::Cpu), Err(TensorError::TooLarge { .. })));
    }
}
