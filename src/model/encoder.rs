//! A BERT-family transformer encoder (BERT, RoBERTa/XLM-R, DistilBERT, MPNet) written for
//! Tidings.
//!
//! Like text-embeddings-inference, Tidings keeps its own encoder instead of candle-transformers'
//! `BertModel`, for three reasons:
//! - training: candle-nn's fast `layer_norm` and `softmax_last_dim` kernels record no backward
//!   pass, so a model built on them silently stops gradients; in training mode this encoder
//!   uses [`super::train_ops`] (one pass forward, one backward) on f32 CPU tensors and
//!   differentiable compositions elsewhere, and the fast kernels only for inference;
//! - the optional word-shape (casing) embedding that lets the uncased MiniLM see capitals;
//! - one code path for the checkpoint layouts, with the tensor names of each; MPNet adds a
//!   relative position bias ([`RelativeBias`]) to every layer's attention scores.

use super::config::ModelConfig;
use super::external::External;
use super::fused::{
    relative_bucket, FusedActivation, FusedLayer, FusedLinear, FusedNorm, PositionBias,
};
pub use super::input::EncoderInput;
pub use super::precision::Precision;
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{embedding, Embedding, VarBuilder};
use rand::{Rng, SeedableRng};

/// Number of word-shape classes of the casing embedding (see [`crate::pipeline::casing`]).
pub const NUM_CASINGS: usize = 6;

/// Tensor names of the two checkpoint layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// BERT and RoBERTa/XLM-R: `encoder.layer.N.attention.self.query`, ...
    Bert,
    /// DistilBERT: `transformer.layer.N.attention.q_lin`, ...
    DistilBert,
    /// MPNet: `encoder.layer.N.attention.attn.q`, ... and `encoder.relative_attention_bias`.
    MpNet,
}

impl Layout {
    /// The layout of `cfg`'s architecture.
    fn of(cfg: &ModelConfig) -> Result<Self> {
        Ok(match cfg.model_type.as_str() {
            "distilbert" => Layout::DistilBert,
            "bert" | "roberta" | "xlm-roberta" | "camembert" => Layout::Bert,
            "mpnet" => Layout::MpNet,
            other => candle_core::bail!(
                "model_type {other:?} is not supported (bert, roberta, xlm-roberta, \
                 camembert, distilbert, mpnet; deberta-v2 and modernbert through \
                 candle-transformers)"
            ),
        })
    }

    /// Where the layers sit: `encoder.layer` or `transformer.layer`.
    fn stack(self) -> &'static str {
        match self {
            Layout::Bert | Layout::MpNet => "encoder.layer",
            Layout::DistilBert => "transformer.layer",
        }
    }

    /// A layer's tensors under `...layer.N`: query, key, value, attention output, its norm,
    /// feed-forward in and out, output norm.
    fn layer_tensors(self) -> [&'static str; 8] {
        match self {
            Layout::Bert => [
                "attention.self.query",
                "attention.self.key",
                "attention.self.value",
                "attention.output.dense",
                "attention.output.LayerNorm",
                "intermediate.dense",
                "output.dense",
                "output.LayerNorm",
            ],
            Layout::MpNet => [
                "attention.attn.q",
                "attention.attn.k",
                "attention.attn.v",
                "attention.attn.o",
                "attention.LayerNorm",
                "intermediate.dense",
                "output.dense",
                "output.LayerNorm",
            ],
            Layout::DistilBert => [
                "attention.q_lin",
                "attention.k_lin",
                "attention.v_lin",
                "attention.out_lin",
                "sa_layer_norm",
                "ffn.lin1",
                "ffn.lin2",
                "output_layer_norm",
            ],
        }
    }
}

/// A linear layer `x W^T + b`. For inference the weight is transposed once at load time into
/// a contiguous `[in, out]` matrix: gemm then packs its right-hand side from contiguous rows,
/// which for the short rows of small batches costs as much as the multiplication itself when
/// done from the strided `W^T` view on every call. Trainable weights (candle `Var`s) keep the
/// view, so that updates are always seen.
#[derive(Debug, Clone)]
struct Dense {
    weight: Tensor,
    transposed: Option<Tensor>,
    bias: Tensor,
    /// A low-rank adapter being trained on the frozen weight (none outside training: a saved
    /// adapter is merged into the weight as the model loads, see [`super::adapter`]).
    adapter: Option<LowRank>,
}

/// A low-rank adapter (LoRA, Hu et al. 2021) on a dense layer: the layer computes
/// `x W^T + b + scale (x A^T) B^T`, with `A`: `[rank, in]` and `B`: `[out, rank]`.
#[derive(Debug, Clone)]
struct LowRank {
    a: Tensor,
    b: Tensor,
    scale: f64,
}

impl Dense {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (in_dim, lead) = match dims.split_last() {
            Some((&i, lead)) => (i, lead.iter().product::<usize>()),
            None => candle_core::bail!("dense layer on a scalar"),
        };
        let x2 = x.reshape((lead, in_dim))?;
        let y = match &self.transposed {
            // Training through a frozen weight: only the input's gradient is wanted.
            Some(wt) if x2.track_op() && super::train_ops::applies(&x2) => {
                super::train_ops::frozen_product(&x2, &self.weight, wt)?
            }
            Some(wt) => x2.matmul(wt)?,
            None => x2.matmul(&self.weight.t()?)?,
        };
        let y = y.broadcast_add(&self.bias)?;
        let y = match &self.adapter {
            Some(lr) => {
                (y + x2
                    .matmul(&lr.a.t()?)?
                    .matmul(&lr.b.t()?)?
                    .affine(lr.scale, 0.0)?)?
            }
            None => y,
        };
        let mut out_dims = dims;
        if let Some(last) = out_dims.last_mut() {
            *last = y.dim(1)?;
        }
        y.reshape(out_dims)
    }
}

/// The dense layer under `vb`, with its adapter (`lora_A`, `lora_B`) when `adapter` gives
/// one's rank and scale and `vb` holds it.
fn linear(
    in_dim: usize,
    out_dim: usize,
    vb: VarBuilder,
    adapter: Option<(usize, f64)>,
) -> Result<Dense> {
    let adapter = match adapter {
        Some((rank, scale)) if vb.contains_tensor("lora_A") => Some(LowRank {
            a: vb.get((rank, in_dim), "lora_A")?,
            b: vb.get((out_dim, rank), "lora_B")?,
            scale,
        }),
        _ => None,
    };
    let l = candle_nn::linear(in_dim, out_dim, vb)?;
    let weight = l.weight().clone();
    let bias = l
        .bias()
        .cloned()
        .ok_or_else(|| candle_core::Error::Msg("linear layer without bias".into()))?;
    let transposed = if weight.is_variable() {
        None
    } else {
        Some(weight.t()?.contiguous()?)
    };
    Ok(Dense {
        weight,
        transposed,
        bias,
        adapter,
    })
}

impl Dense {
    /// Whether training can change this layer.
    fn trainable(&self) -> bool {
        self.weight.is_variable() || self.bias.is_variable() || self.adapter.is_some()
    }
}

/// Layer norm that uses candle's fused kernel for inference and a differentiable
/// composition when training.
#[derive(Debug, Clone)]
struct Norm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl Norm {
    fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            bias: vb.get(size, "bias")?,
            eps: eps as f32,
        })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if train && super::train_ops::applies(x) {
            super::train_ops::layer_norm(x, &self.weight, &self.bias, self.eps as f64)
        } else if train {
            candle_nn::ops::layer_norm_slow(x, &self.weight, &self.bias, self.eps)
        } else {
            candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps)
        }
    }
}

/// What a forward pass needs besides the weights.
#[derive(Debug, Clone, Copy)]
pub struct Mode {
    /// Differentiable ops (for autograd) instead of the fused inference kernels.
    pub train: bool,
    /// Dropout probability on hidden states and attention weights; 0 for inference.
    pub dropout: f32,
}

impl Mode {
    /// Inference: fused kernels, no dropout.
    pub const INFERENCE: Mode = Mode {
        train: false,
        dropout: 0.0,
    };

    /// Applies dropout when training (seeded, see [`seed_dropout`]), the identity otherwise.
    pub fn drop(&self, x: Tensor) -> Result<Tensor> {
        if !(self.train && self.dropout > 0.0) {
            return Ok(x);
        }
        let keep = 1.0 - self.dropout;
        let n = x.elem_count();
        let mask: Vec<f32> = {
            let mut rng = DROPOUT_RNG.lock();
            (0..n)
                .map(|_| {
                    if rng.random::<f32>() < keep {
                        1.0 / keep
                    } else {
                        0.0
                    }
                })
                .collect()
        };
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x * mask
    }
}

/// Random source of dropout masks. candle's CPU device cannot be seeded, so Tidings draws its
/// masks on the host from this generator to make training runs repeatable.
static DROPOUT_RNG: std::sync::LazyLock<parking_lot::Mutex<rand::rngs::StdRng>> =
    std::sync::LazyLock::new(|| parking_lot::Mutex::new(rand::rngs::StdRng::seed_from_u64(0)));

/// Seeds the dropout masks of every later training step.
pub fn seed_dropout(seed: u64) {
    *DROPOUT_RNG.lock() = rand::rngs::StdRng::seed_from_u64(seed);
}

#[derive(Debug, Clone)]
struct Embeddings {
    word: Embedding,
    position: Embedding,
    token_type: Option<Embedding>,
    casing: Option<Embedding>,
    norm: Norm,
    position_offset: usize,
}

impl Embeddings {
    fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let token_type = if cfg.type_vocab_size > 0 {
            Some(embedding(
                cfg.type_vocab_size,
                h,
                vb.pp("token_type_embeddings"),
            )?)
        } else {
            None
        };
        let casing = if cfg.tidings_casing {
            Some(embedding(NUM_CASINGS, h, vb.pp("casing_embeddings"))?)
        } else {
            None
        };
        Ok(Self {
            word: embedding(cfg.vocab_size, h, vb.pp("word_embeddings"))?,
            position: embedding(cfg.max_position_embeddings, h, vb.pp("position_embeddings"))?,
            token_type,
            casing,
            norm: Norm::load(vb.pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            position_offset: cfg.position_offset(),
        })
    }

    fn forward(&self, input: &EncoderInput, mode: Mode) -> Result<Tensor> {
        let (_, seq) = input.input_ids.dims2()?;
        let dev = input.input_ids.device();
        // The word-piece table is frozen in training: it is half of MiniLM's parameters, its
        // gradient and AdamW update cost more per step than the rest of the model, and a few
        // hundred thousand CoNLL pieces are too few to move it usefully.
        let mut x = self.word.forward(&input.input_ids)?.detach();
        let positions = Tensor::arange(
            self.position_offset as u32,
            (self.position_offset + seq) as u32,
            dev,
        )?;
        x = x.broadcast_add(&self.position.forward(&positions)?)?;
        if let Some(tt) = &self.token_type {
            x = match &input.type_ids {
                Some(ids) => (x + tt.forward(ids)?)?,
                None => x.broadcast_add(&tt.embeddings().get(0)?)?,
            };
        }
        if let (Some(emb), Some(casing)) = (&self.casing, &input.casing) {
            x = (x + emb.forward(casing)?)?;
        }
        mode.drop(self.norm.forward(&x, mode.train)?)
    }
}

#[derive(Debug, Clone)]
struct Layer {
    query: Dense,
    key: Dense,
    value: Dense,
    attn_out: Dense,
    attn_norm: Norm,
    ffn_in: Dense,
    ffn_out: Dense,
    out_norm: Norm,
    heads: usize,
    head_dim: usize,
    act: Activation,
}

#[derive(Debug, Clone, Copy)]
enum Activation {
    GeluErf,
    GeluTanh,
    Relu,
}

impl Activation {
    fn parse(name: &str) -> Result<Self> {
        match name {
            "gelu" => Ok(Self::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Self::GeluTanh),
            "relu" => Ok(Self::Relu),
            other => candle_core::bail!("unsupported hidden_act {other:?}"),
        }
    }

    fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::GeluErf if super::train_ops::applies(x) => super::train_ops::gelu_erf(x),
            Self::GeluErf => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
            Self::Relu => x.relu(),
        }
    }
}

impl Layer {
    fn load(vb: VarBuilder, cfg: &ModelConfig, layout: Layout) -> Result<Self> {
        let h = cfg.hidden_size;
        let i = cfg.intermediate_size;
        let eps = cfg.layer_norm_eps;
        let act = Activation::parse(&cfg.hidden_act)?;
        let heads = cfg.num_attention_heads;
        let head_dim = h / heads;
        let [q, k, v, o, attn_norm, ffn_in, ffn_out, out_norm] = layout.layer_tensors();
        let ad = cfg.tidings_adapter.as_ref().map(|a| (a.rank, a.scale()));
        Ok(Self {
            query: linear(h, h, vb.pp(q), ad)?,
            key: linear(h, h, vb.pp(k), ad)?,
            value: linear(h, h, vb.pp(v), ad)?,
            attn_out: linear(h, h, vb.pp(o), ad)?,
            attn_norm: Norm::load(vb.pp(attn_norm), h, eps)?,
            ffn_in: linear(h, i, vb.pp(ffn_in), ad)?,
            ffn_out: linear(i, h, vb.pp(ffn_out), ad)?,
            out_norm: Norm::load(vb.pp(out_norm), h, eps)?,
            heads,
            head_dim,
            act,
        })
    }

    /// `x`: `[b, s, h]`; `bias`: additive attention bias, `[b, 1, 1, s]` (padding) or
    /// `[b, heads, s, s]` (padding and relative positions).
    fn forward(&self, x: &Tensor, bias: &Tensor, mode: Mode) -> Result<Tensor> {
        let (b, s, h) = x.dims3()?;
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, s, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.query.forward(x)?)?;
        let k = split(self.key.forward(x)?)?;
        let v = split(self.value.forward(x)?)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = ((q * scale)?.matmul(&k.t()?)?).broadcast_add(bias)?;
        let probs = if mode.train && super::train_ops::applies(&scores) {
            super::train_ops::softmax_last_dim(&scores)?
        } else if mode.train {
            candle_nn::ops::softmax(&scores, D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores)?
        };
        let ctx = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, s, h))?;
        let attn = mode.drop(self.attn_out.forward(&ctx)?)?;
        let x = self.attn_norm.forward(&(attn + x)?, mode.train)?;
        let ffn = self.act.apply(&self.ffn_in.forward(&x)?)?;
        let ffn = mode.drop(self.ffn_out.forward(&ffn)?)?;
        self.out_norm.forward(&(ffn + x)?, mode.train)
    }
}

impl Layer {
    /// Whether training can change this layer (any weight a `Var`, or an adapter).
    fn trainable(&self) -> bool {
        [
            &self.query,
            &self.key,
            &self.value,
            &self.attn_out,
            &self.ffn_in,
            &self.ffn_out,
        ]
        .iter()
        .any(|d| d.trainable())
            || self.attn_norm.weight.is_variable()
            || self.out_norm.weight.is_variable()
    }

    /// The same layer for the fused CPU inference path, its products in `precision` where
    /// it applies (see [`FusedLinear::finish`]).
    fn fuse(&self, precision: Precision) -> Result<FusedLayer> {
        let lin = |d: &Dense| FusedLinear::new(&d.weight, &d.bias);
        let finished = |d: &Dense| Ok::<_, candle_core::Error>(lin(d)?.finish(precision));
        let norm = |n: &Norm| -> Result<FusedNorm> {
            Ok(FusedNorm {
                gamma: n.weight.to_vec1::<f32>()?,
                beta: n.bias.to_vec1::<f32>()?,
                eps: n.eps,
            })
        };
        let scale = 1.0 / (self.head_dim as f32).sqrt();
        Ok(FusedLayer {
            qkv: FusedLinear::concat(&[
                (&lin(&self.query)?, scale),
                (&lin(&self.key)?, 1.0),
                (&lin(&self.value)?, 1.0),
            ])?
            .finish(precision),
            attn_out: finished(&self.attn_out)?,
            attn_norm: norm(&self.attn_norm)?,
            ffn_in: finished(&self.ffn_in)?,
            ffn_out: finished(&self.ffn_out)?,
            out_norm: norm(&self.out_norm)?,
            heads: self.heads,
            head_dim: self.head_dim,
            act: match self.act {
                Activation::GeluErf => FusedActivation::GeluErf,
                Activation::GeluTanh => FusedActivation::GeluTanh,
                Activation::Relu => FusedActivation::Relu,
            },
        })
    }
}

/// The dense layers of `cfg`'s transformer layers that take a low-rank adapter, by name under
/// the encoder's prefix (e.g. `encoder.layer.3.attention.attn.q`), with their input and
/// output widths: every attention projection and both feed-forward layers.
pub fn adaptable_layers(cfg: &ModelConfig) -> Result<Vec<(String, usize, usize)>> {
    let layout = Layout::of(cfg)?;
    let [q, k, v, o, _, ffn_in, ffn_out, _] = layout.layer_tensors();
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let dims = [
        (q, h, h),
        (k, h, h),
        (v, h, h),
        (o, h, h),
        (ffn_in, h, i),
        (ffn_out, i, h),
    ];
    Ok((0..cfg.num_hidden_layers)
        .flat_map(|l| {
            dims.iter()
                .map(move |(name, i, o)| (format!("{}.{l}.{name}", layout.stack()), *i, *o))
        })
        .collect())
}

/// How the transformer layers run.
#[derive(Debug, Clone)]
enum Stack {
    /// As candle tensor ops: differentiable, any device and dtype.
    Graph(Vec<Layer>),
    /// The fused f32 CPU kernels of [`super::fused`]: inference only. Shared, so that a
    /// clone of the encoder (one model serving two heads) holds the weights once.
    Fused(std::sync::Arc<[FusedLayer]>),
    /// A whole candle-transformers model (embeddings included), for architectures Tidings
    /// has no layers of its own for ([`super::external`]): inference only, f32.
    External(std::sync::Arc<External>),
}

/// MPNet's relative position bias: one learned value per (bucket of `key - query` position,
/// head), the same for every layer, added to the attention scores before the softmax.
#[derive(Debug, Clone)]
pub struct RelativeBias {
    /// `[buckets, heads]`.
    table: Embedding,
    heads: usize,
    buckets: usize,
}

impl RelativeBias {
    /// MPNet's maximum distance: relative positions beyond it share the last bucket.
    pub const MAX_DISTANCE: usize = 128;

    fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let (heads, buckets) = (cfg.num_attention_heads, cfg.relative_attention_num_buckets);
        Ok(Self {
            table: embedding(buckets, heads, vb)?,
            heads,
            buckets,
        })
    }

    /// The table as the fused path reads it: its values now (a few hundred floats, read per
    /// pass, so that weights trained or loaded after the encoder was built are the ones used).
    fn position_bias(&self) -> Result<PositionBias> {
        let values = self
            .table
            .embeddings()
            .to_dtype(DType::F32)?
            .flatten_all()?;
        Ok(PositionBias::new(
            values.to_vec1::<f32>()?,
            self.heads,
            self.buckets,
            Self::MAX_DISTANCE,
        ))
    }

    /// `[1, heads, s, s]`: the bias of query position `i` to key position `j` for each head
    /// (differentiable in the table).
    fn forward(&self, s: usize, device: &candle_core::Device) -> Result<Tensor> {
        let bucket = |rel: i64| relative_bucket(rel, self.buckets, Self::MAX_DISTANCE) as u32;
        let buckets: Vec<u32> = (0..s)
            .flat_map(|i| (0..s).map(move |j| bucket(j as i64 - i as i64)))
            .collect();
        let ids = Tensor::from_vec(buckets, (s, s), device)?;
        self.table.forward(&ids)?.permute((2, 0, 1))?.unsqueeze(0)
    }
}

/// The transformer body: embeddings and layers, no head.
#[derive(Debug, Clone)]
pub struct Encoder {
    /// Tidings' own embeddings; `None` on the candle-transformers path, whose model embeds.
    embeddings: Option<Embeddings>,
    stack: Stack,
    relative: Option<RelativeBias>,
    dtype: DType,
    hidden_size: usize,
}

impl Encoder {
    /// Loads the encoder whose tensors sit under `vb` (already narrowed to the model prefix,
    /// e.g. `bert` for a `BertForTokenClassification` checkpoint, nothing for a bare model).
    ///
    /// Frozen f32 weights on the CPU get the fused inference kernels; trainable weights
    /// (a `VarMap`-backed builder), other dtypes and devices run as candle ops.
    pub fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        Self::load_with(vb, cfg, Precision::F32)
    }

    /// [`Encoder::load`] with the fused layers' products in `precision`. int8 needs the fused
    /// CPU path and an x86-64 CPU with AVX2, and stays f32 otherwise: [`Encoder::precision`]
    /// says which is in effect. Each layer is quantized as it is fused, from its tensors.
    pub fn load_with(vb: VarBuilder, cfg: &ModelConfig, precision: Precision) -> Result<Self> {
        let enc = Self::load_graph(vb, cfg)?;
        let (frozen, cpu) = match (&enc.stack, &enc.embeddings) {
            (Stack::Graph(layers), Some(emb)) => (
                layers.iter().all(|l| !l.trainable()),
                emb.word.embeddings().device().is_cpu(),
            ),
            _ => return Ok(enc),
        };
        if frozen && cpu && enc.dtype == DType::F32 {
            enc.fused(precision)
        } else {
            Ok(enc)
        }
    }

    /// This encoder with its layers on the fused CPU kernels, products in `precision` (the
    /// weights are copied out of the tensors, which are then dropped). Inference only: a
    /// fused encoder refuses [`Mode::train`].
    pub fn fused(self, precision: Precision) -> Result<Self> {
        let stack = match self.stack {
            // Layer by layer, each layer's tensors dropped as soon as it is fused (and
            // quantized), so the fused copy grows as the tensors go.
            Stack::Graph(layers) => Stack::Fused(
                layers
                    .into_iter()
                    .map(|l| l.fuse(precision))
                    .collect::<Result<Vec<_>>>()?
                    .into(),
            ),
            fused => fused,
        };
        Ok(Self { stack, ..self })
    }

    /// Whether the layers run on the fused CPU kernels.
    pub fn is_fused(&self) -> bool {
        matches!(self.stack, Stack::Fused(_))
    }

    /// The kernel of the matrix products in effect: the int8 or f32 tile of this CPU
    /// ([`super::qgemm::Kernel`], [`super::sgemm::Kernel`]), `gemm` where none of Tidings'
    /// serves, `candle` off the fused path.
    pub fn kernel(&self) -> &'static str {
        match (&self.stack, self.precision()) {
            (Stack::Fused(_), Precision::Int8) => {
                super::qgemm::kernel().map_or("gemm", |k| k.name())
            }
            (Stack::Fused(_), Precision::F32) => {
                super::sgemm::kernel().map_or("gemm", |k| k.name())
            }
            _ => "candle",
        }
    }

    /// Which implementation runs the model: `fused` (Tidings' kernels), `candle` (Tidings'
    /// layers as candle ops: training, GPUs, other dtypes) or `candle-transformers`
    /// (DeBERTa-v2, ModernBERT).
    pub fn engine(&self) -> &'static str {
        match self.stack {
            Stack::Fused(_) => "fused",
            Stack::Graph(_) => "candle",
            Stack::External(_) => "candle-transformers",
        }
    }

    /// The precision of the matrix products.
    pub fn precision(&self) -> Precision {
        match &self.stack {
            Stack::Fused(layers)
                if !layers.is_empty() && layers.iter().all(FusedLayer::is_int8) =>
            {
                Precision::Int8
            }
            _ => Precision::F32,
        }
    }

    /// Like [`Encoder::load`], but always as candle ops (the differentiable path; for
    /// DeBERTa-v2 and ModernBERT, candle-transformers' model, inference only).
    pub fn load_graph(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        if External::handles(&cfg.model_type) {
            return Ok(Self {
                embeddings: None,
                dtype: vb.dtype(),
                stack: Stack::External(External::load(vb, cfg)?.into()),
                relative: None,
                hidden_size: cfg.hidden_size,
            });
        }
        let layout = Layout::of(cfg)?;
        if !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
            candle_core::bail!("hidden_size is not a multiple of num_attention_heads");
        }
        let stack = vb.pp(layout.stack());
        let relative = match layout {
            Layout::MpNet => Some(RelativeBias::load(
                vb.pp("encoder").pp("relative_attention_bias"),
                cfg,
            )?),
            _ => None,
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::load(stack.pp(i), cfg, layout))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embeddings: Some(Embeddings::load(vb.pp("embeddings"), cfg)?),
            stack: Stack::Graph(layers),
            relative,
            dtype: vb.dtype(),
            hidden_size: cfg.hidden_size,
        })
    }

    /// Float dtype the weights are in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Width of the hidden states.
    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    /// Runs the encoder; returns the last hidden states `[batch, seq, hidden]`.
    pub fn forward(&self, input: &EncoderInput, mode: Mode) -> Result<Tensor> {
        let mask = input.attention_mask.to_dtype(self.dtype)?;
        if mode.train && !matches!(self.stack, Stack::Graph(_)) {
            candle_core::bail!("this encoder was loaded for inference and cannot train");
        }
        let embeddings = match (&self.stack, &self.embeddings) {
            (Stack::External(model), _) => return model.forward(input),
            (_, Some(embeddings)) => embeddings,
            (_, None) => candle_core::bail!("an encoder without embeddings"),
        };
        let layers = match &self.stack {
            Stack::External(_) => unreachable!("returned above"),
            Stack::Fused(layers) => {
                let x = embeddings.forward(input, mode)?;
                let position = self
                    .relative
                    .as_ref()
                    .map(|r| r.position_bias())
                    .transpose()?;
                return super::fused::forward(layers, &x, &mask, position.as_ref());
            }
            Stack::Graph(layers) => layers,
        };
        let (b, s) = mask.dims2()?;
        // 0 where attended, a large negative number where padded.
        let mut bias = ((mask - 1.0)? * 10_000.0)?.reshape((b, 1, 1, s))?;
        if let Some(rel) = &self.relative {
            bias = bias.broadcast_add(&rel.forward(s, bias.device())?.to_dtype(self.dtype)?)?;
        }
        let mut x = embeddings.forward(input, mode)?;
        for layer in layers {
            x = layer.forward(&x, &bias, mode)?;
        }
        Ok(x)
    }
}
