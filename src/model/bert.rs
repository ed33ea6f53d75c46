//! A BERT encoder in tch, one struct per Hugging Face module so that `nn::Path` produces the
//! checkpoint's own parameter names (`encoder.layer.3.attention.self.query.weight`).
//!
//! Reference: transformers' `modeling_bert.py`
//! <https://github.com/huggingface/transformers/blob/v4.48.0/src/transformers/models/bert/modeling_bert.py>
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use super::config::BertConfig;
use super::dropout::{RowSeeds, dropout};

/// How new parameters are filled before a checkpoint (if any) is copied in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Init {
    /// tch's default random initialisation (draws from libtorch's global RNG).
    Random,
    /// Zeros: for parameters a checkpoint overwrites; draws nothing and costs less.
    Zeros,
}

/// Dropout sites: 0 for the embeddings, then three per layer (attention probabilities, attention
/// output, feed-forward output), so every dropout of the network draws its own masks.
fn site(layer: usize, which: u64) -> u64 {
    1 + 3 * layer as u64 + which
}

fn linear(p: nn::Path, in_dim: i64, out_dim: i64, init: Init) -> nn::Linear {
    let cfg = match init {
        Init::Random => Default::default(),
        Init::Zeros => nn::LinearConfig {
            ws_init: nn::Init::Const(0.0),
            bs_init: Some(nn::Init::Const(0.0)),
            bias: true,
        },
    };
    nn::linear(p, in_dim, out_dim, cfg)
}

/// The kind matrix products run in: `None` for f32, or a reduced kind (bf16) — mixed precision as
/// CUDA autocast does it: products and attention in the reduced kind, the residual stream,
/// LayerNorm, softmax (computed in f32) and everything after the encoder in f32, and gradients
/// reaching the f32 weights. Activations between two products stay in the reduced kind, so each
/// block casts its input once and its output once.
pub(crate) type Compute = Option<Kind>;

/// `l.forward(xs)` with the product in `compute`; the result stays in that kind (`xs` is cast when
/// it is not in it already).
fn product(l: &nn::Linear, xs: &Tensor, compute: Compute) -> Tensor {
    match compute {
        None => l.forward(xs),
        Some(k) => xs
            .to_kind(k)
            .linear(&l.ws.to_kind(k), l.bs.as_ref().map(|b| b.to_kind(k))),
    }
}

/// `t` in the kind products run in.
fn reduced(t: &Tensor, compute: Compute) -> Tensor {
    match compute {
        None => t.shallow_clone(),
        Some(k) => t.to_kind(k),
    }
}

fn layer_norm(p: nn::Path, cfg: &BertConfig) -> nn::LayerNorm {
    let ln_cfg = nn::LayerNormConfig {
        eps: cfg.layer_norm_eps,
        ..Default::default()
    };
    nn::layer_norm(p, vec![cfg.hidden_size], ln_cfg)
}

/// Word + position + token-type embeddings, then LayerNorm and dropout (`BertEmbeddings`).
#[derive(Debug)]
struct Embeddings {
    word: nn::Embedding,
    position: nn::Embedding,
    token_type: nn::Embedding,
    layer_norm: nn::LayerNorm,
    dropout: f64,
    span: tracing::Span,
}

impl Embeddings {
    fn load(p: nn::Path, cfg: &BertConfig, init: Init) -> Self {
        let emb_cfg = match init {
            Init::Random => Default::default(),
            Init::Zeros => nn::EmbeddingConfig {
                ws_init: nn::Init::Const(0.0),
                ..Default::default()
            },
        };
        let emb = |name: &str, n: i64| nn::embedding(&p / name, n, cfg.hidden_size, emb_cfg);
        Self {
            word: emb("word_embeddings", cfg.vocab_size),
            position: emb("position_embeddings", cfg.max_position_embeddings),
            token_type: emb("token_type_embeddings", cfg.type_vocab_size),
            layer_norm: layer_norm(&p / "LayerNorm", cfg),
            dropout: cfg.hidden_dropout_prob,
            span: tracing::span!(tracing::Level::TRACE, "embeddings"),
        }
    }

    fn forward_t(
        &self,
        input_ids: &Tensor,
        token_type_ids: &Tensor,
        seeds: Option<&RowSeeds>,
    ) -> Tensor {
        let _enter = self.span.enter();
        let seq_len = input_ids.size()[1];
        let positions = Tensor::arange(seq_len, (Kind::Int64, input_ids.device())).unsqueeze(0);
        let xs = self.word.forward(input_ids)
            + self.token_type.forward(token_type_ids)
            + self.position.forward(&positions);
        dropout(&self.layer_norm.forward(&xs), self.dropout, seeds, 0)
    }
}

/// Multi-head self-attention over the padded batch (`BertSelfAttention` + `BertSelfOutput`).
#[derive(Debug)]
struct Attention {
    query: nn::Linear,
    key: nn::Linear,
    value: nn::Linear,
    output: nn::Linear,
    layer_norm: nn::LayerNorm,
    heads: i64,
    attention_dropout: f64,
    hidden_dropout: f64,
    span: tracing::Span,
}

impl Attention {
    fn load(p: nn::Path, cfg: &BertConfig, init: Init) -> Self {
        let h = cfg.hidden_size;
        let s = &p / "self";
        let o = &p / "output";
        Self {
            query: linear(&s / "query", h, h, init),
            key: linear(&s / "key", h, h, init),
            value: linear(&s / "value", h, h, init),
            output: linear(&o / "dense", h, h, init),
            layer_norm: layer_norm(&o / "LayerNorm", cfg),
            heads: cfg.num_attention_heads,
            attention_dropout: cfg.attention_probs_dropout_prob,
            hidden_dropout: cfg.hidden_dropout_prob,
            span: tracing::span!(tracing::Level::TRACE, "self-attn"),
        }
    }

    /// `mask` is boolean (batch, 1, 1, seq): true where a key token may be attended to.
    fn forward_t(
        &self,
        xs: &Tensor,
        mask: &Tensor,
        seeds: Option<&RowSeeds>,
        layer: usize,
        compute: Compute,
    ) -> Tensor {
        let _enter = self.span.enter();
        let (b, t, h) = xs.size3().expect("hidden states are (batch, seq, hidden)");
        let head_dim = h / self.heads;
        let input = reduced(xs, compute);
        let split = |x: Tensor| x.view([b, t, self.heads, head_dim]).transpose(1, 2);
        let q = split(product(&self.query, &input, compute));
        let k = split(product(&self.key, &input, compute));
        let v = split(product(&self.value, &input, compute));
        let ctx = match seeds {
            // Inference: the fused kernel.
            None => Tensor::scaled_dot_product_attention(
                &q,
                &k,
                &v,
                Some(mask),
                0.0,
                false,
                None,
                false,
            ),
            // Training: the same math written out, so the probabilities take our seeded dropout.
            // Softmax computes in f32 and hands its result over in the products' kind.
            Some(_) => {
                let scores =
                    q.matmul(&k.transpose(-1, -2)).to_kind(Kind::Float) / (head_dim as f64).sqrt();
                let probs = scores
                    .masked_fill(&mask.logical_not(), f64::NEG_INFINITY)
                    .softmax(-1, compute.unwrap_or(Kind::Float));
                dropout(&probs, self.attention_dropout, seeds, site(layer, 0)).matmul(&v)
            }
        };
        let ctx = ctx.transpose(1, 2).contiguous().view([b, t, h]);
        let out = dropout(
            &product(&self.output, &ctx, compute),
            self.hidden_dropout,
            seeds,
            site(layer, 1),
        );
        self.layer_norm.forward(&(out.to_kind(Kind::Float) + xs))
    }
}

/// The position-wise feed-forward block (`BertIntermediate` + `BertOutput`).
#[derive(Debug)]
struct FeedForward {
    intermediate: nn::Linear,
    output: nn::Linear,
    layer_norm: nn::LayerNorm,
    activation: String,
    dropout: f64,
    span: tracing::Span,
}

impl FeedForward {
    fn load(p: nn::Path, cfg: &BertConfig, init: Init) -> Self {
        Self {
            intermediate: linear(
                &p / "intermediate" / "dense",
                cfg.hidden_size,
                cfg.intermediate_size,
                init,
            ),
            output: linear(
                &p / "output" / "dense",
                cfg.intermediate_size,
                cfg.hidden_size,
                init,
            ),
            layer_norm: layer_norm(&p / "output" / "LayerNorm", cfg),
            activation: cfg.hidden_act.clone(),
            dropout: cfg.hidden_dropout_prob,
            span: tracing::span!(tracing::Level::TRACE, "feed-forward"),
        }
    }

    fn activate(&self, xs: &Tensor) -> Tensor {
        match self.activation.as_str() {
            "relu" => xs.relu(),
            "gelu_new" | "gelu_pytorch_tanh" => xs.gelu("tanh"),
            _ => xs.gelu("none"),
        }
    }

    fn forward_t(
        &self,
        xs: &Tensor,
        seeds: Option<&RowSeeds>,
        layer: usize,
        compute: Compute,
    ) -> Tensor {
        let _enter = self.span.enter();
        let hidden = self.activate(&product(&self.intermediate, xs, compute));
        let out = dropout(
            &product(&self.output, &hidden, compute),
            self.dropout,
            seeds,
            site(layer, 2),
        );
        self.layer_norm.forward(&(out.to_kind(Kind::Float) + xs))
    }
}

/// One transformer block (`BertLayer`).
#[derive(Debug)]
struct Layer {
    attention: Attention,
    feed_forward: FeedForward,
}

impl Layer {
    fn load(p: nn::Path, cfg: &BertConfig, init: Init) -> Self {
        Self {
            attention: Attention::load(&p / "attention", cfg, init),
            feed_forward: FeedForward::load(p, cfg, init),
        }
    }
}

/// The encoder: embeddings and a stack of layers; returns token states, the caller pools.
#[derive(Debug)]
pub(crate) struct BertModel {
    embeddings: Embeddings,
    layers: Vec<Layer>,
}

impl BertModel {
    /// Creates the parameters under `p` (the checkpoint's root, no `bert.` prefix).
    pub(crate) fn load(p: nn::Path, cfg: &BertConfig, init: Init) -> Self {
        let encoder = &p / "encoder" / "layer";
        Self {
            embeddings: Embeddings::load(&p / "embeddings", cfg, init),
            layers: (0..cfg.num_hidden_layers)
                .map(|i| Layer::load(&encoder / i, cfg, init))
                .collect(),
        }
    }

    /// Token states (batch, seq, hidden, f32) for `input_ids`, with `attention_mask` 1 on real
    /// tokens. `seeds` (one per row) turns dropout on; `None` is inference. `compute` is the kind
    /// of the matrix products.
    pub(crate) fn forward_t(
        &self,
        input_ids: &Tensor,
        token_type_ids: &Tensor,
        attention_mask: &Tensor,
        seeds: Option<&RowSeeds>,
        compute: Compute,
    ) -> Tensor {
        let key_mask = attention_mask.to_kind(Kind::Bool).unsqueeze(1).unsqueeze(1);
        let mut xs = self.embeddings.forward_t(input_ids, token_type_ids, seeds);
        // A loop rather than a fold: easier to add per-layer instrumentation.
        for (i, layer) in self.layers.iter().enumerate() {
            xs = layer.attention.forward_t(&xs, &key_mask, seeds, i, compute);
            xs = layer.feed_forward.forward_t(&xs, seeds, i, compute);
        }
        xs
    }
}
