//! Where the models run: `--device cpu` (the default, with the fused kernels) or
//! `--device cuda[:N]` (candle's CUDA ops, in a binary built with `--features cuda`).

use candle_core::Device;

/// A device named on the command line: `cpu`, `cuda` (or `gpu`: the first GPU) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The CPU: frozen f32 models run on the fused kernels ([`super::Precision`] applies).
    #[default]
    Cpu,
    /// The CUDA GPU of this ordinal: every layer runs as candle ops in f32.
    Cuda(usize),
}

impl DeviceSpec {
    /// Opens the device. A CUDA device fails with an error that says what is missing: a
    /// binary built without the `cuda` feature, or no such GPU or driver.
    pub fn open(self) -> Result<Device, DeviceError> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(_) if !cfg!(feature = "cuda") => Err(DeviceError::NotBuilt),
            Self::Cuda(n) => {
                Device::new_cuda(n).map_err(|source| DeviceError::Open { ordinal: n, source })
            }
        }
    }
}

/// Why a device could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The binary has no CUDA support compiled in.
    #[error("this tidings was built without CUDA: build one with scripts/build-cuda (`cargo build --release --features cuda` where the CUDA toolkit is installed), or use --device cpu")]
    NotBuilt,
    /// The driver or the GPU refused.
    #[error("cannot open CUDA device {ordinal}")]
    Open {
        /// The GPU's ordinal.
        ordinal: usize,
        /// candle's (cudarc's) error.
        #[source]
        source: candle_core::Error,
    },
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device {s:?} (cpu, cuda or cuda:N)")),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_the_devices() {
        for (text, spec) in [
            ("cpu", DeviceSpec::Cpu),
            (" CPU ", DeviceSpec::Cpu),
            ("cuda", DeviceSpec::Cuda(0)),
            ("gpu", DeviceSpec::Cuda(0)),
            ("cuda:3", DeviceSpec::Cuda(3)),
        ] {
            assert_eq!(text.parse::<DeviceSpec>(), Ok(spec), "{text:?}");
        }
        assert_eq!(DeviceSpec::Cuda(3).to_string(), "cuda:3");
        assert_eq!(
            "cuda:3".parse::<DeviceSpec>().unwrap().to_string(),
            "cuda:3"
        );
        for bad in ["", "tpu", "cuda:", "cuda:x", "cuda:-1", "metal"] {
            let err = bad.parse::<DeviceSpec>().unwrap_err();
            assert!(err.contains("cpu, cuda or cuda:N"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn the_cpu_opens_and_cuda_says_what_is_missing() {
        assert!(DeviceSpec::Cpu.open().unwrap().is_cpu());
        if !cfg!(feature = "cuda") {
            let err = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
            assert!(err.contains("--features cuda"), "{err}");
        }
    }
}
