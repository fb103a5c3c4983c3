//! Model assembly: what a deployment asks to load, as a plain [`ModelPlan`], turned into
//! [`Models`] the way `tidings serve` runs them.
//!
//! A plan names the default NER model and more that requests choose by name ([`NerSpec`]),
//! where the topic encoder comes from ([`TopicSource`]: `auto` resolves to the default NER
//! model's own encoder when it was trained to serve topics too), the default taxonomy,
//! trained topic heads ([`HeadSpec`]), the topic softmax scale, the windows, the arithmetic
//! and the device. [`ModelPlan::load`] checks the NER models' names, opens the device, loads
//! the encoders, warns when the asked precision is not what runs, checks each trained head
//! against the topic encoder it was fitted on, attaches the heads and logs what was loaded. The command
//! line (`serve`, `analyze`, `eval`, `bench`, `train`) and the tests build their models
//! through it.

use super::analysis::{model_name, LabelSet, Models};
use super::{topics, WindowSpec};
use crate::model::{DeviceSpec, ModelConfig, Precision};
use anyhow::Context;
use std::path::{Path, PathBuf};

/// The topic encoder [`TopicSource::Auto`] falls back to when the NER model does not serve
/// topics (relative to the working directory, as the command line's defaults are).
pub const DEFAULT_TOPIC_MODEL: &str = "models/minilm";

/// Longest name a trained head or an extra NER model may be given (`NAME=PATH`).
const MAX_HEAD_NAME: usize = 256;

/// Least cosine between a head's [`LabelSet::encoder_probe`] and the topic encoder's own for
/// the head to count as fitted on this encoder.
const SAME_ENCODER_COSINE: f32 = 0.99;

/// Where the topic encoder comes from (`serve --topic-model`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum TopicSource {
    /// The NER model itself when its config says its encoder was trained to serve topics too
    /// ([`ModelConfig::tidings_shared_encoder`]: one forward pass per window for both tasks),
    /// otherwise [`DEFAULT_TOPIC_MODEL`].
    #[default]
    Auto,
    /// The encoder in this directory (HF format; mean-pooled embeddings), run as a model of
    /// its own unless it is the NER model's shared encoder.
    Dir(PathBuf),
    /// No topic model: topics are disabled.
    None,
}

impl TopicSource {
    /// The source a command-line value names: the words `auto` and `none`, or a directory.
    pub fn from_arg(arg: &Path) -> Self {
        match arg.to_str() {
            Some("auto") => Self::Auto,
            Some("none") => Self::None,
            _ => Self::Dir(arg.to_path_buf()),
        }
    }

    /// The topic encoder's directory, [`TopicSource::Auto`] resolved against the NER model in
    /// `ner` (its `config.json` read); `None` for no topic model.
    pub fn resolve(&self, ner: Option<&Path>) -> Option<PathBuf> {
        match self {
            Self::Dir(dir) => Some(dir.clone()),
            Self::None => None,
            Self::Auto => Some(match ner {
                Some(ner) if serves_topics(ner) => ner.to_path_buf(),
                _ => PathBuf::from(DEFAULT_TOPIC_MODEL),
            }),
        }
    }
}

/// Whether the model in `dir` says its encoder was trained to serve topics too; false when
/// its config cannot be read.
fn serves_topics(dir: &Path) -> bool {
    std::fs::read(dir.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<ModelConfig>(&b).ok())
        .is_some_and(|c| c.tidings_shared_encoder)
}

/// A trained topic head to attach (`tidings train topics` writes them): `PATH` for the
/// default topics, used when a request brings no labels, or `NAME=PATH` for a head requests
/// choose with `topic_head: NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadSpec {
    /// The name requests select it by; `None` for the default head (at most one).
    pub name: Option<String>,
    /// The head's JSON file (a [`LabelSet`]).
    pub path: PathBuf,
}

/// Why a `[NAME=]PATH` head spec was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadSpecError {
    /// The spec starts with `=`.
    #[error("--topic-head {spec:?}: the name before '=' is empty")]
    EmptyName {
        /// The spec as given (trimmed).
        spec: String,
    },
}

impl HeadSpec {
    /// Reads `[NAME=]PATH` (trimmed). Text before the first `=` is a name only when it is
    /// made of letters, digits, `_`, `-` and `.` (so `/data/run=3/head.json` is a path);
    /// an empty name is an error.
    pub fn parse(spec: &str) -> Result<Self, HeadSpecError> {
        let spec = spec.trim();
        match spec.split_once('=') {
            Some(("", _)) => Err(HeadSpecError::EmptyName { spec: spec.into() }),
            Some((name, path)) if is_head_name(name) => Ok(Self {
                name: Some(name.to_string()),
                path: PathBuf::from(path.trim()),
            }),
            _ => Ok(Self {
                name: None,
                path: PathBuf::from(spec),
            }),
        }
    }
}

impl std::str::FromStr for HeadSpec {
    type Err = HeadSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Whether `name` can name a head: at most [`MAX_HEAD_NAME`] bytes of letters, digits, `_`,
/// `-` and `.`.
fn is_head_name(name: &str) -> bool {
    name.len() <= MAX_HEAD_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// A NER model loaded beside the default one, that requests choose with `ner_model: NAME`
/// (`serve --extra-ner-model NAME=DIR`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NerSpec {
    /// The name requests choose it by.
    pub name: String,
    /// Its directory (HF format, token classification).
    pub dir: PathBuf,
}

/// Why a `NAME=DIR` NER model spec was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NerSpecError {
    /// The spec has no `=`.
    #[error("--extra-ner-model {spec:?}: give NAME=DIR (the name requests choose it by)")]
    NoName {
        /// The spec as given (trimmed).
        spec: String,
    },
    /// The spec starts with `=`.
    #[error("--extra-ner-model {spec:?}: the name before '=' is empty")]
    EmptyName {
        /// The spec as given (trimmed).
        spec: String,
    },
    /// The name has other characters than letters, digits, `_`, `-` and `.`, or is too long.
    #[error(
        "--extra-ner-model {spec:?}: the name {name:?} must be at most 256 letters, digits, \
         '_', '-' or '.'"
    )]
    BadName {
        /// The spec as given (trimmed).
        spec: String,
        /// The name.
        name: String,
    },
    /// Nothing follows the `=`.
    #[error("--extra-ner-model {spec:?}: the directory after '=' is empty")]
    EmptyDir {
        /// The spec as given (trimmed).
        spec: String,
    },
}

impl NerSpec {
    /// Reads `NAME=DIR` (trimmed, and each side trimmed): NAME made of letters, digits, `_`,
    /// `-` and `.`, at most 256 bytes; DIR not empty. Whether DIR holds a model is checked
    /// when the plan is loaded.
    pub fn parse(spec: &str) -> Result<Self, NerSpecError> {
        let spec = spec.trim();
        let Some((name, dir)) = spec.split_once('=') else {
            return Err(NerSpecError::NoName { spec: spec.into() });
        };
        let (name, dir) = (name.trim(), dir.trim());
        if name.is_empty() {
            return Err(NerSpecError::EmptyName { spec: spec.into() });
        }
        if !is_head_name(name) {
            return Err(NerSpecError::BadName {
                spec: spec.into(),
                name: name.into(),
            });
        }
        if dir.is_empty() {
            return Err(NerSpecError::EmptyDir { spec: spec.into() });
        }
        Ok(Self {
            name: name.to_string(),
            dir: PathBuf::from(dir),
        })
    }
}

impl std::str::FromStr for NerSpec {
    type Err = NerSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// What to load: everything [`Models`] are assembled from. `serve`'s flags map one to one
/// onto its fields.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelPlan {
    /// The default NER model's directory (HF format, token classification), named after
    /// the directory ([`model_name`]); `None` disables entities.
    pub ner: Option<PathBuf>,
    /// More NER models, that requests choose by name; only beside a default one. Each is
    /// loaded with the same windows, precision and device as the default.
    pub extra_ner: Vec<NerSpec>,
    /// Where the topic encoder comes from.
    pub topics: TopicSource,
    /// The default topic taxonomy (JSON, see [`topics::Taxonomy`]); `None` for none.
    pub taxonomy: Option<PathBuf>,
    /// Trained topic heads to attach, in order (ignored without a topic model).
    pub heads: Vec<HeadSpec>,
    /// Multiplier of cosine similarities before the topic softmax.
    pub topic_scale: f32,
    /// How texts are cut into windows (shrunk to what each model reads).
    pub window: WindowSpec,
    /// Arithmetic of the encoders' products where it applies (the CPU's fused path).
    pub precision: Precision,
    /// Where the models run.
    pub device: DeviceSpec,
}

impl Default for ModelPlan {
    /// No models; otherwise serving's defaults: int8 products on the CPU, the default windows
    /// and topic scale, no heads.
    fn default() -> Self {
        Self {
            ner: None,
            extra_ner: Vec::new(),
            topics: TopicSource::None,
            taxonomy: None,
            heads: Vec::new(),
            topic_scale: topics::DEFAULT_SCALE,
            window: WindowSpec::default(),
            precision: Precision::Int8,
            device: DeviceSpec::Cpu,
        }
    }
}

impl ModelPlan {
    /// The topic encoder's directory, [`TopicSource::Auto`] resolved; `None` for none.
    pub fn topic_dir(&self) -> Option<PathBuf> {
        self.topics.resolve(self.ner.as_deref())
    }

    /// Loads the models: see [`ModelPlan::load_then`].
    pub fn load(&self) -> anyhow::Result<Models> {
        self.load_then(|| {})
    }

    /// Checks the NER models' names and directories ([`ModelPlan::check_ner`]), opens the
    /// device, loads the encoders ([`Models::load_on`], then the extra NER models) and calls
    /// `encoders_loaded` (where a binary hands the memory that loading freed back to the OS),
    /// then warns when the asked precision is not the one that runs, checks and attaches the
    /// trained heads, sets the topic scale, and logs `models loaded`.
    pub fn load_then(&self, encoders_loaded: impl FnOnce()) -> anyhow::Result<Models> {
        let started = std::time::Instant::now();
        self.check_ner()?;
        let topic_dir = self.topic_dir();
        let device = self
            .device
            .open()
            .with_context(|| format!("--device {}", self.device))?;
        let mut models = Models::load_on(
            self.ner.as_deref(),
            topic_dir.as_deref(),
            self.taxonomy.as_deref(),
            self.window,
            self.precision,
            device,
        )?;
        for spec in &self.extra_ner {
            models
                .add_ner(&spec.name, &spec.dir, self.window, self.precision)
                .with_context(|| {
                    format!("--extra-ner-model {}={}", spec.name, spec.dir.display())
                })?;
        }
        encoders_loaded();
        self.warn_of_fallback(&models);
        self.attach_heads(&mut models)?;
        self.log_loaded(&models, topic_dir.as_deref(), started);
        Ok(models)
    }

    /// Before anything is loaded: the extra NER models come with a default one, their
    /// names differ from each other and from the default's, and their directories exist.
    fn check_ner(&self) -> anyhow::Result<()> {
        let Some(first) = self.extra_ner.first() else {
            return Ok(());
        };
        let Some(default) = &self.ner else {
            anyhow::bail!(
                "--extra-ner-model {}={}: extra NER models need a default one (--ner-model \
                 is none)",
                first.name,
                first.dir.display()
            );
        };
        let default_name = model_name(default);
        let mut names = vec![default_name.as_str()];
        for spec in &self.extra_ner {
            let shown = format!("--extra-ner-model {}={}", spec.name, spec.dir.display());
            if spec.name == default_name {
                anyhow::bail!(
                    "{shown}: the name {:?} is the default NER model's (--ner-model {}); \
                     give another",
                    spec.name,
                    default.display()
                );
            }
            if names.contains(&spec.name.as_str()) {
                anyhow::bail!("{shown}: the name {:?} is given twice", spec.name);
            }
            names.push(&spec.name);
            if !spec.dir.is_dir() {
                anyhow::bail!("{shown}: {} is not a directory", spec.dir.display());
            }
        }
        Ok(())
    }

    /// Warns when a model on the CPU runs other products than [`ModelPlan::precision`] (int8
    /// where the CPU or the model path has none).
    fn warn_of_fallback(&self, models: &Models) {
        let topics = models.topics.as_ref().map(|t| t.model.precision());
        if models.device.is_cpu()
            && models
                .ner_models()
                .map(|n| n.model.precision())
                .chain(topics)
                .any(|p| p != self.precision)
        {
            tracing::warn!(
                asked = %self.precision,
                "--precision {} is not available on this CPU or model path; running f32",
                self.precision
            );
        }
    }

    /// Sets the topic scale and attaches [`ModelPlan::heads`] to the topic model, each
    /// checked against its width and (a warning) against the encoder it was fitted on.
    fn attach_heads(&self, models: &mut Models) -> anyhow::Result<()> {
        // What this topic encoder makes of the probe sentence, to check trained heads
        // against the encoder they were fitted on (see `LabelSet::encoder_probe`).
        let own_probe = if self.heads.is_empty() {
            Vec::new()
        } else {
            models.encoder_probe()?.unwrap_or_default()
        };
        let Some(t) = models.topics.as_mut() else {
            return Ok(());
        };
        t.scale = self.topic_scale;
        for spec in &self.heads {
            let head = read_head(&spec.path, t.model.dim())?;
            warn_if_fitted_elsewhere(spec, &head, &own_probe);
            match &spec.name {
                Some(n) if t.heads.iter().any(|(k, _)| k == n) => {
                    anyhow::bail!("--topic-head: the name {n:?} is given twice")
                }
                Some(n) => t.heads.push((n.clone(), head)),
                None if t.head.is_some() => {
                    anyhow::bail!(
                        "--topic-head: more than one default head (give names: NAME=PATH)"
                    )
                }
                None => t.head = Some(head),
            }
        }
        Ok(())
    }

    /// Logs `models loaded` with what was loaded, how, and in how long since `started`.
    fn log_loaded(&self, models: &Models, topic_dir: Option<&Path>, started: std::time::Instant) {
        let (ner_precision, topic_precision) = precisions(models);
        let cpu = models.device.is_cpu();
        tracing::info!(
            ner = models.ner.is_some(),
            ner_models = %models.ner_names(),
            topics = models.topics.is_some(),
            shared_tokenizer = models.shared_tokenizer,
            shared_encoder = models.shared_encoder,
            topic_model = topic_dir.map(|d| d.display().to_string()),
            ner_precision = ner_precision.map(|p| p.to_string()),
            topic_precision = topic_precision.map(|p| p.to_string()),
            device = %self.device,
            int8_kernel = crate::model::qgemm::kernel()
                .filter(|_| cpu && ner_precision.or(topic_precision) == Some(Precision::Int8))
                .map(|k| k.name()),
            // Attention's products, and the others at f32; `gemm` where no kernel of ours runs.
            f32_kernel = cpu.then(|| crate::model::sgemm::kernel().map_or("gemm", |k| k.name())),
            ms = started.elapsed().as_millis() as u64,
            "models loaded"
        );
    }
}

/// The products the NER model and the topic encoder run (`None` for one not loaded).
fn precisions(models: &Models) -> (Option<Precision>, Option<Precision>) {
    (
        models.ner.as_ref().map(|n| n.model.precision()),
        models.topics.as_ref().map(|t| t.model.precision()),
    )
}

/// A trained topic head file, checked against the topic encoder's width `dim`.
fn read_head(p: &Path, dim: usize) -> anyhow::Result<LabelSet> {
    let head: LabelSet = serde_json::from_slice(
        &std::fs::read(p).with_context(|| format!("reading topic head {}", p.display()))?,
    )
    .with_context(|| format!("parsing topic head {}", p.display()))?;
    let memory_fits = head
        .memory
        .as_ref()
        .is_none_or(|m| m.fits(dim, head.names.len()));
    if head.weights.iter().any(|w| w.len() != dim)
        || head.bias.len() != head.names.len()
        || head.weights.len() != head.names.len()
        || !memory_fits
    {
        anyhow::bail!(
            "topic head {} does not fit the {dim}-wide topic encoder",
            p.display()
        );
    }
    Ok(head)
}

/// Warns when `head` knows the encoder it was fitted on and that is not this one, whose
/// embedding of the probe sentence is `own_probe` (empty: unknown, nothing checked).
fn warn_if_fitted_elsewhere(spec: &HeadSpec, head: &LabelSet, own_probe: &[f32]) {
    if head.encoder_probe.is_empty() || own_probe.is_empty() {
        return;
    }
    let cosine: f32 = own_probe
        .iter()
        .zip(&head.encoder_probe)
        .map(|(a, b)| a * b)
        .sum();
    if cosine < SAME_ENCODER_COSINE {
        let path = spec.path.to_string_lossy();
        tracing::warn!(
            head = path.as_ref(),
            cosine,
            "topic head was fitted on another topic encoder than this one: \
             its scores will be off; refit it with `tidings train topics`"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: Option<&str>, path: &str) -> HeadSpec {
        HeadSpec {
            name: name.map(str::to_string),
            path: PathBuf::from(path),
        }
    }

    #[test]
    fn a_head_spec_is_a_name_and_a_path_or_a_path() {
        let parse = |s: &str| HeadSpec::parse(s).unwrap();
        assert_eq!(parse("desk=desk.json"), spec(Some("desk"), "desk.json"));
        assert_eq!(parse(" a.b_c-1 = x.json "), spec(None, "a.b_c-1 = x.json"));
        assert_eq!(parse("a.b_c-1= x.json "), spec(Some("a.b_c-1"), "x.json"));
        assert_eq!(parse("head.json"), spec(None, "head.json"));
        // Text before '=' that cannot be a name belongs to the path.
        assert_eq!(
            parse("/data/run=3/head.json"),
            spec(None, "/data/run=3/head.json")
        );
        let long = format!("{}=h.json", "n".repeat(MAX_HEAD_NAME + 1));
        assert_eq!(parse(&long), spec(None, &long));
        assert_eq!(
            "=h.json".parse::<HeadSpec>(),
            Err(HeadSpecError::EmptyName {
                spec: "=h.json".into()
            })
        );
        assert_eq!(
            HeadSpec::parse("=h.json").unwrap_err().to_string(),
            "--topic-head \"=h.json\": the name before '=' is empty"
        );
    }

    #[test]
    fn an_extra_ner_spec_is_a_name_and_a_directory() {
        let parse = |s: &str| NerSpec::parse(s);
        assert_eq!(
            parse(" multi = models/multitask "),
            Ok(NerSpec {
                name: "multi".into(),
                dir: "models/multitask".into()
            })
        );
        assert_eq!(
            parse("a=/data/run=3"),
            Ok(NerSpec {
                name: "a".into(),
                dir: "/data/run=3".into()
            })
        );
        let err = |s: &str| parse(s).unwrap_err().to_string();
        assert_eq!(
            err("=models/ner"),
            "--extra-ner-model \"=models/ner\": the name before '=' is empty"
        );
        assert!(err("models/ner").contains("give NAME=DIR"));
        assert!(err("a b=models/ner").contains("must be at most 256 letters"));
        assert!(err("multi=").contains("the directory after '=' is empty"));
    }

    #[test]
    fn extra_ner_names_are_distinct_and_need_a_default() {
        let plan = |ner: Option<&str>, extras: &[(&str, &str)]| ModelPlan {
            ner: ner.map(PathBuf::from),
            extra_ner: extras
                .iter()
                .map(|(n, d)| NerSpec {
                    name: n.to_string(),
                    dir: PathBuf::from(d),
                })
                .collect(),
            ..ModelPlan::default()
        };
        let dir = env!("CARGO_MANIFEST_DIR");
        let err = |p: ModelPlan| p.check_ner().unwrap_err().to_string();
        assert!(plan(Some("models/ner"), &[("a", dir), ("b", dir)])
            .check_ner()
            .is_ok());
        assert!(err(plan(Some("models/ner"), &[("a", dir), ("a", dir)])).contains("given twice"));
        assert!(err(plan(Some("models/ner"), &[("ner", dir)])).contains("default NER model's"));
        assert!(err(plan(None, &[("a", dir)])).contains("need a default one"));
        assert!(err(plan(Some("models/ner"), &[("a", "/no/such/dir")]))
            .contains("/no/such/dir is not a directory"));
    }

    #[test]
    fn topic_sources_read_the_flags_words() {
        assert_eq!(TopicSource::from_arg(Path::new("auto")), TopicSource::Auto);
        assert_eq!(TopicSource::from_arg(Path::new("none")), TopicSource::None);
        assert_eq!(
            TopicSource::from_arg(Path::new("models/minilm")),
            TopicSource::Dir("models/minilm".into())
        );
        assert_eq!(TopicSource::None.resolve(Some(Path::new("x"))), None);
        assert_eq!(
            TopicSource::Dir("d".into()).resolve(None),
            Some(PathBuf::from("d"))
        );
    }

    #[test]
    fn auto_is_the_ner_model_only_when_it_serves_topics() {
        let tmp = std::env::temp_dir().join(format!("tidings-assembly-{}", std::process::id()));
        let (shared, plain) = (tmp.join("shared"), tmp.join("plain"));
        std::fs::create_dir_all(&shared).unwrap();
        std::fs::create_dir_all(&plain).unwrap();
        let config = |flag: bool| {
            serde_json::json!({
                "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
                "intermediate_size": 16, "vocab_size": 10, "max_position_embeddings": 16,
                "tidings_shared_encoder": flag,
            })
            .to_string()
        };
        std::fs::write(shared.join("config.json"), config(true)).unwrap();
        std::fs::write(plain.join("config.json"), config(false)).unwrap();
        let auto = |ner: Option<&Path>| TopicSource::Auto.resolve(ner);
        let fallback = Some(PathBuf::from(DEFAULT_TOPIC_MODEL));
        assert_eq!(auto(Some(&shared)), Some(shared.clone()));
        assert_eq!(auto(Some(&plain)), fallback);
        assert_eq!(auto(Some(&tmp.join("missing"))), fallback);
        assert_eq!(auto(None), fallback);
        let plan = ModelPlan {
            ner: Some(shared.clone()),
            topics: TopicSource::Auto,
            ..ModelPlan::default()
        };
        assert_eq!(plan.topic_dir(), Some(shared));
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
