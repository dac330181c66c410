//! The sd.v1 gRPC contracts and the one tensor codec every service uses.

pub mod sd {
    pub mod v1 {
        tonic::include_proto!("sd.v1");
        include!(concat!(env!("OUT_DIR"), "/sd.v1.serde.rs"));
    }
}

pub use sd::v1;

mod tensor;
pub use tensor::{required, TensorError, MAX_TENSOR_ELEMENTS};

/// Encoded `FileDescriptorSet` of every sd.v1 file, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/sd_descriptor.bin"));
