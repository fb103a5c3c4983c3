//! The arithmetic of an encoder's products: its own module, so that the encoder and the
//! fused kernels both use it without importing each other (issue #29).

/// Arithmetic of the fused CPU path's matrix products (the four per layer; attention,
/// layer norms and activations stay f32). The library's default is f32; `tidings`'
/// `--precision` flag defaults to int8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 weights and activations.
    #[default]
    F32,
    /// int8 products: weights per output column (7 bits, quantized at load), activations
    /// per row (8 bits, at each product), exact integer sums, f32 results:
    /// [`super::qgemm`].
    Int8,
}

impl std::str::FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" => Ok(Self::F32),
            "int8" | "i8" => Ok(Self::Int8),
            other => Err(format!("unknown precision {other:?} (f32 or int8)")),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Int8 => "int8",
        })
    }
}
