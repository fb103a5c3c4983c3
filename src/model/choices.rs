//! Kernel and profiling choices given as flags (`--sgemm`, `--qgemm`, `--profile` of the
//! `tidings` command, each with its environment variable as fallback: `TIDINGS_SGEMM`,
//! `TIDINGS_QGEMM`, `TIDINGS_PROFILE`). A program sets them once, before the first model
//! loads; a library user who does not reads the environment variables as before.

use std::sync::OnceLock;

static SGEMM: OnceLock<Option<String>> = OnceLock::new();
static QGEMM: OnceLock<Option<String>> = OnceLock::new();
static PROFILE: OnceLock<bool> = OnceLock::new();

/// The choices; `None` leaves each to its environment variable.
#[derive(Debug, Clone, Default)]
pub struct Choices {
    /// The f32 kernel (`avx2`, `avx512`, or `gemm` for gemm's own).
    pub sgemm: Option<String>,
    /// The int8 kernel (`avx2`, `avxvnni`, `avx512vnni-ymm`, `avx512vnni`, `amx`).
    pub qgemm: Option<String>,
    /// Time the phases of each fused layer (`tidings bench` prints them).
    pub profile: Option<bool>,
}

/// Sets the choices; fails when a kernel was already picked (a model loaded before).
pub fn set(c: Choices) -> Result<(), &'static str> {
    let ok = SGEMM.set(c.sgemm).is_ok() & QGEMM.set(c.qgemm).is_ok();
    let ok = ok & c.profile.is_none_or(|p| PROFILE.set(p).is_ok());
    ok.then_some(())
        .ok_or("kernel choices are set once, before the first model loads")
}

/// The kernel named for `var` (`TIDINGS_SGEMM` or `TIDINGS_QGEMM`): the flag's, else the
/// environment's.
pub(crate) fn named(var: &str) -> Option<String> {
    let flag = match var {
        "TIDINGS_SGEMM" => SGEMM.get(),
        "TIDINGS_QGEMM" => QGEMM.get(),
        _ => None,
    };
    flag.cloned().flatten().or_else(|| std::env::var(var).ok())
}

/// Whether profiling is on: the flag's, else whether `TIDINGS_PROFILE` is set.
pub(crate) fn profile() -> bool {
    PROFILE
        .get()
        .copied()
        .unwrap_or_else(|| std::env::var_os("TIDINGS_PROFILE").is_some())
}
