//! A small random-weight Llama model written as a complete Hugging Face folder, so the worker
//! runs without downloading anything. Weights come from a seeded ChaCha stream and the
//! tokenizer is a byte-level BPE trained on an embedded English corpus; the same spec always
//! gives byte-identical files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::{Value, json};
use thiserror::Error;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    TokenizerBuilder,
};

#[derive(Debug, Error)]
pub enum DemoModelError {
    #[error("invalid demo model spec: {0}")]
    InvalidSpec(String),
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot train the demo tokenizer: {0}")]
    Tokenizer(#[source] tokenizers::Error),
    #[error("cannot serialize the demo weights: {0}")]
    Safetensors(#[source] safetensors::SafeTensorError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DemoDtype {
    F32,
    F16,
    BF16,
}

impl DemoDtype {
    fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct DemoModelSpec {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// The trained tokenizer's size, special tokens included. The embedded corpus yields at
    /// most about 1900; config.json always states the size actually trained.
    pub vocab_size_target: usize,
    pub rope_theta: f64,
    /// Llama 3.1's scaling (factor 8, low 1, high 4, original context 8192).
    pub rope_scaling_llama3: bool,
    pub tie_word_embeddings: bool,
    pub dtype: DemoDtype,
    pub seed: u64,
    pub max_position_embeddings: usize,
}

impl Default for DemoModelSpec {
    /// About 3.4M parameters: fast on two CPU cores, with GQA (8 query heads over 2 KV heads,
    /// head_dim 32), four layers, and RoPE frequencies in all three llama3 scaling bands.
    fn default() -> Self {
        Self {
            hidden_size: 256,
            intermediate_size: 768,
            num_hidden_layers: 4,
            num_attention_heads: 8,
            num_key_value_heads: 2,
            vocab_size_target: 1024,
            rope_theta: 500_000.0,
            rope_scaling_llama3: true,
            tie_word_embeddings: false,
            dtype: DemoDtype::F32,
            seed: 0,
            max_position_embeddings: 8192,
        }
    }
}

const BOS: &str = "<|begin_of_text|>";
const END_OF_TEXT: &str = "<|end_of_text|>";
const EOT: &str = "<|eot_id|>";
const SPECIAL_TOKENS: [&str; 5] = [
    BOS,
    END_OF_TEXT,
    "<|start_header_id|>",
    "<|end_header_id|>",
    EOT,
];
const CORPUS: &str = include_str!("demo_corpus.txt");

/// The chat template of meta-llama/Meta-Llama-3-8B-Instruct.
pub(crate) const LLAMA3_CHAT_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// Writes config.json, model.safetensors, tokenizer.json, tokenizer_config.json and
/// generation_config.json into `dir` (created if needed). config.json is written last, so a
/// folder that has it is complete.
pub fn write_demo_model(dir: &Path, spec: &DemoModelSpec) -> Result<(), DemoModelError> {
    validate(spec).map_err(DemoModelError::InvalidSpec)?;
    std::fs::create_dir_all(dir).map_err(|source| DemoModelError::Io {
        path: dir.to_path_buf(),
        source,
    })?;

    let tokenizer = train_tokenizer(spec.vocab_size_target)?;
    if tokenizer.vocab_size < spec.vocab_size_target {
        tracing::warn!(
            requested = spec.vocab_size_target,
            trained = tokenizer.vocab_size,
            "the demo corpus has too few merges for the requested vocabulary"
        );
    }
    let weights = random_weights(spec, tokenizer.vocab_size)?;
    let special = &tokenizer.special_ids;
    let (bos, end_of_text, eot) = (special[BOS], special[END_OF_TEXT], special[EOT]);

    let added_tokens: serde_json::Map<String, Value> = SPECIAL_TOKENS
        .iter()
        .map(|&t| {
            let entry = json!({"content": t, "lstrip": false, "normalized": false,
                               "rstrip": false, "single_word": false, "special": true});
            (special[t].to_string(), entry)
        })
        .collect();
    let tokenizer_config = json!({
        "add_bos_token": true,
        "add_eos_token": false,
        "added_tokens_decoder": added_tokens,
        "bos_token": BOS,
        "chat_template": LLAMA3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": false,
        "eos_token": EOT,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": spec.max_position_embeddings,
        "tokenizer_class": "PreTrainedTokenizerFast"
    });
    let generation_config = json!({
        "bos_token_id": bos,
        "eos_token_id": [end_of_text, eot],
    });
    let rope_scaling = spec.rope_scaling_llama3.then(|| {
        json!({"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
               "original_max_position_embeddings": 8192, "rope_type": "llama3"})
    });
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": false,
        "attention_dropout": 0.0,
        "bos_token_id": bos,
        "eos_token_id": [end_of_text, eot],
        "head_dim": spec.hidden_size / spec.num_attention_heads,
        "hidden_act": "silu",
        "hidden_size": spec.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": spec.intermediate_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "mlp_bias": false,
        "model_type": "llama",
        "num_attention_heads": spec.num_attention_heads,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_key_value_heads": spec.num_key_value_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-5,
        "rope_scaling": rope_scaling,
        "rope_theta": spec.rope_theta,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "torch_dtype": spec.dtype.torch_name(),
        "use_cache": true,
        "vocab_size": tokenizer.vocab_size
    });

    write_atomic(dir, "tokenizer.json", tokenizer.json.as_bytes())?;
    write_atomic(
        dir,
        "tokenizer_config.json",
        pretty(&tokenizer_config).as_bytes(),
    )?;
    write_atomic(
        dir,
        "generation_config.json",
        pretty(&generation_config).as_bytes(),
    )?;
    write_atomic(dir, "model.safetensors", &weights)?;
    write_atomic(dir, "config.json", pretty(&config).as_bytes())
}

/// Writes the demo model unless `dir/config.json` exists. Returns whether it wrote.
pub fn write_demo_model_if_missing(
    dir: &Path,
    spec: &DemoModelSpec,
) -> Result<bool, DemoModelError> {
    if dir.join("config.json").exists() {
        return Ok(false);
    }
    write_demo_model(dir, spec)?;
    Ok(true)
}

fn validate(spec: &DemoModelSpec) -> Result<(), String> {
    let sizes = [
        ("hidden_size", spec.hidden_size),
        ("intermediate_size", spec.intermediate_size),
        ("num_hidden_layers", spec.num_hidden_layers),
        ("num_attention_heads", spec.num_attention_heads),
        ("num_key_value_heads", spec.num_key_value_heads),
        ("max_position_embeddings", spec.max_position_embeddings),
    ];
    if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
        return Err(format!("{name} must be positive"));
    }
    if !spec.hidden_size.is_multiple_of(spec.num_attention_heads) {
        return Err(format!(
            "hidden_size {} is not divisible by num_attention_heads {}",
            spec.hidden_size, spec.num_attention_heads
        ));
    }
    if !(spec.hidden_size / spec.num_attention_heads).is_multiple_of(2) {
        return Err("head_dim (hidden_size / num_attention_heads) must be even".into());
    }
    if !spec
        .num_attention_heads
        .is_multiple_of(spec.num_key_value_heads)
    {
        return Err(format!(
            "num_attention_heads {} is not a multiple of num_key_value_heads {}",
            spec.num_attention_heads, spec.num_key_value_heads
        ));
    }
    let minimum = 256 + SPECIAL_TOKENS.len();
    if spec.vocab_size_target < minimum {
        return Err(format!(
            "vocab_size_target {} is below {minimum} (256 bytes and the special tokens)",
            spec.vocab_size_target
        ));
    }
    if spec.rope_theta <= 0.0 {
        return Err(format!("rope_theta {} must be positive", spec.rope_theta));
    }
    Ok(())
}

struct TrainedTokenizer {
    json: String,
    vocab_size: usize,
    special_ids: HashMap<&'static str, u32>,
}

/// Byte-level BPE like Llama 3's: every byte is a token, so any text encodes, and merges
/// learned from the corpus make English compact.
fn train_tokenizer(vocab_size: usize) -> Result<TrainedTokenizer, DemoModelError> {
    let byte_level = ByteLevel::default().add_prefix_space(false);
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .special_tokens(
            SPECIAL_TOKENS
                .iter()
                .map(|&t| AddedToken::from(t, true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tokenizer = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_pre_tokenizer(Some(byte_level.into()))
    .with_decoder(Some(byte_level.into()))
    .build()
    .map_err(DemoModelError::Tokenizer)?;
    tokenizer
        .train(&mut trainer, CORPUS.lines())
        .map_err(DemoModelError::Tokenizer)?;

    let special_ids: HashMap<&'static str, u32> = SPECIAL_TOKENS
        .iter()
        .map(|&t| {
            let id = tokenizer
                .token_to_id(t)
                .expect("the trainer adds every special token");
            (t, id)
        })
        .collect();
    // Like Llama 3's tokenizer.json: encoding with special tokens prepends BOS.
    let post_processor = TemplateProcessing::builder()
        .try_single(format!("{BOS} $A"))
        .and_then(|b| b.try_pair(format!("{BOS} $A {BOS}:1 $B:1")))
        .map_err(|e| DemoModelError::Tokenizer(e.into()))?
        .special_tokens(vec![(BOS, special_ids[BOS])])
        .build()
        .map_err(|e| DemoModelError::Tokenizer(e.into()))?;
    tokenizer.with_post_processor(Some(post_processor));

    Ok(TrainedTokenizer {
        json: tokenizer
            .to_string(true)
            .map_err(DemoModelError::Tokenizer)?,
        vocab_size: tokenizer.get_vocab_size(true),
        special_ids,
    })
}

/// Approximately standard normal values: the sum of four uniforms, rescaled. Only additions
/// and multiplications, so the stream is the same on every platform.
struct NormalStream(ChaCha8Rng);

impl NormalStream {
    fn fill(&mut self, n: usize, mean: f32, std: f32) -> Vec<f32> {
        let scale = std * 3f32.sqrt();
        (0..n)
            .map(|_| {
                let sum: f32 = (0..4).map(|_| self.0.random::<f32>()).sum();
                mean + (sum - 2.0) * scale
            })
            .collect()
    }
}

/// Every Llama tensor under its Hugging Face name, serialized as safetensors. Projections
/// use std 1/sqrt(fan_in) so activations stay O(1) through the layers.
fn random_weights(spec: &DemoModelSpec, vocab_size: usize) -> Result<Vec<u8>, DemoModelError> {
    let hidden = spec.hidden_size;
    let head_dim = hidden / spec.num_attention_heads;
    let q_dim = spec.num_attention_heads * head_dim;
    let kv_dim = spec.num_key_value_heads * head_dim;
    let inter = spec.intermediate_size;
    let mut rng = NormalStream(ChaCha8Rng::seed_from_u64(spec.seed));
    let fan_in = |n: usize| 1.0 / (n as f32).sqrt();

    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, mean: f32, std: f32| {
        let data = rng.fill(shape.iter().product(), mean, std);
        tensors.push((name, shape, data));
    };
    add(
        "model.embed_tokens.weight".into(),
        vec![vocab_size, hidden],
        0.0,
        1.0,
    );
    for layer in 0..spec.num_hidden_layers {
        let p = format!("model.layers.{layer}");
        add(
            format!("{p}.input_layernorm.weight"),
            vec![hidden],
            1.0,
            0.05,
        );
        add(
            format!("{p}.self_attn.q_proj.weight"),
            vec![q_dim, hidden],
            0.0,
            fan_in(hidden),
        );
        add(
            format!("{p}.self_attn.k_proj.weight"),
            vec![kv_dim, hidden],
            0.0,
            fan_in(hidden),
        );
        add(
            format!("{p}.self_attn.v_proj.weight"),
            vec![kv_dim, hidden],
            0.0,
            fan_in(hidden),
        );
        add(
            format!("{p}.self_attn.o_proj.weight"),
            vec![hidden, q_dim],
            0.0,
            fan_in(q_dim),
        );
        add(
            format!("{p}.post_attention_layernorm.weight"),
            vec![hidden],
            1.0,
            0.05,
        );
        add(
            format!("{p}.mlp.gate_proj.weight"),
            vec![inter, hidden],
            0.0,
            fan_in(hidden),
        );
        add(
            format!("{p}.mlp.up_proj.weight"),
            vec![inter, hidden],
            0.0,
            fan_in(hidden),
        );
        add(
            format!("{p}.mlp.down_proj.weight"),
            vec![hidden, inter],
            0.0,
            fan_in(inter),
        );
    }
    add("model.norm.weight".into(), vec![hidden], 1.0, 0.05);
    if !spec.tie_word_embeddings {
        add(
            "lm_head.weight".into(),
            vec![vocab_size, hidden],
            0.0,
            fan_in(hidden),
        );
    }

    let (dtype, bytes): (Dtype, Vec<Vec<u8>>) = match spec.dtype {
        DemoDtype::F32 => (Dtype::F32, encode(&tensors, f32::to_le_bytes)),
        DemoDtype::F16 => (
            Dtype::F16,
            encode(&tensors, |v| f16::from_f32(v).to_le_bytes()),
        ),
        DemoDtype::BF16 => (
            Dtype::BF16,
            encode(&tensors, |v| bf16::from_f32(v).to_le_bytes()),
        ),
    };
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), data)| {
            TensorView::new(dtype, shape.clone(), data).map(|view| (name.as_str(), view))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(DemoModelError::Safetensors)?;
    // transformers checks this key when it loads safetensors.
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(metadata)).map_err(DemoModelError::Safetensors)
}

fn encode<const N: usize>(
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    to_bytes: impl Fn(f32) -> [u8; N],
) -> Vec<Vec<u8>> {
    tensors
        .iter()
        .map(|(_, _, data)| data.iter().flat_map(|&v| to_bytes(v)).collect())
        .collect()
}

fn pretty(value: &Value) -> String {
    format!("{value:#}\n")
}

/// Writes through a temporary file and a rename, so readers never see half a file.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), DemoModelError> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|source| DemoModelError::Io { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::{Architecture, ModelConfig, RopeScaling};
    use crate::model::weights::Weights;
    use crate::tokenizer::{ChatMessage, TextTokenizer};

    const FILES: [&str; 5] = [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ];

    fn small(dtype: DemoDtype) -> DemoModelSpec {
        DemoModelSpec {
            hidden_size: 64,
            intermediate_size: 96,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            vocab_size_target: 400,
            dtype,
            ..DemoModelSpec::default()
        }
    }

    #[test]
    fn default_model_loads_with_our_own_readers() {
        let dir = tempfile::tempdir().unwrap();
        let spec = DemoModelSpec::default();
        write_demo_model(dir.path(), &spec).unwrap();

        let config = ModelConfig::from_model_dir(dir.path()).unwrap();
        assert_eq!(config.architecture, Architecture::Llama);
        assert_eq!(
            (
                config.num_attention_heads,
                config.num_key_value_heads,
                config.head_dim
            ),
            (8, 2, 32)
        );
        assert_eq!(config.num_hidden_layers, 4);
        assert!(matches!(
            config.rope_scaling,
            Some(RopeScaling::Llama3 { factor: 8.0, .. })
        ));
        assert_eq!(config.rope_theta, 500_000.0);
        assert_eq!(config.torch_dtype.as_deref(), Some("float32"));

        let tokenizer = TextTokenizer::from_model_dir(dir.path()).unwrap();
        assert_eq!(config.vocab_size, tokenizer.vocab_size());
        assert_eq!(
            config.vocab_size, spec.vocab_size_target,
            "the corpus supports 1024 tokens"
        );
        assert_eq!(tokenizer.eos_token_ids(), config.eos_token_ids);
        let bos = tokenizer.encode("", true).unwrap();
        assert_eq!(bos, [config.bos_token_id.unwrap()]);

        let weights = Weights::open(dir.path()).unwrap();
        let names: Vec<&str> = weights.names().collect();
        assert_eq!(names.len(), 2 + 4 * 9 + 1);
        for layer in 0..4 {
            for suffix in [
                "input_layernorm.weight",
                "post_attention_layernorm.weight",
                "self_attn.q_proj.weight",
                "self_attn.k_proj.weight",
                "self_attn.v_proj.weight",
                "self_attn.o_proj.weight",
                "mlp.gate_proj.weight",
                "mlp.up_proj.weight",
                "mlp.down_proj.weight",
            ] {
                assert!(weights.contains(&format!("model.layers.{layer}.{suffix}")));
            }
        }
        let vocab = config.vocab_size;
        assert_eq!(
            weights.get_f32("model.embed_tokens.weight").unwrap().shape,
            [vocab, 256]
        );
        assert_eq!(
            weights.get_f32("lm_head.weight").unwrap().shape,
            [vocab, 256]
        );
        assert_eq!(
            weights
                .get_f32("model.layers.3.self_attn.k_proj.weight")
                .unwrap()
                .shape,
            [64, 256]
        );
        assert_eq!(
            weights
                .get_f32("model.layers.0.mlp.down_proj.weight")
                .unwrap()
                .shape,
            [256, 768]
        );

        // Projection weights have std close to 1/sqrt(fan_in); norms sit around 1.
        let q = weights
            .get_f32("model.layers.0.self_attn.q_proj.weight")
            .unwrap()
            .data;
        let std = (q.iter().map(|v| v * v).sum::<f32>() / q.len() as f32).sqrt();
        assert!((std * 16.0 - 1.0).abs() < 0.02, "std {std}");
        let norm = weights.get_f32("model.norm.weight").unwrap().data;
        assert!(norm.iter().all(|v| (0.8..1.2).contains(v)));
        assert!(norm.iter().any(|&v| v != 1.0));

        let chat = [ChatMessage {
            role: "user".into(),
            content: "Hello!".into(),
        }];
        let prompt = tokenizer.apply_chat_template(&chat, true).unwrap();
        assert_eq!(
            prompt,
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello!<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    /// candle-transformers' Llama, an independent reader, loads the folder as written, and its
    /// logits have the scale the weights were drawn for.
    #[test]
    fn candle_runs_the_demo_model_with_clear_greedy_margins() {
        use candle_core::{DType, Device, Tensor};
        use candle_transformers::models::llama::{Cache, Llama, LlamaConfig};

        let dir = tempfile::tempdir().unwrap();
        write_demo_model(dir.path(), &DemoModelSpec::default()).unwrap();
        let config: LlamaConfig =
            serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap())
                .unwrap();
        let config = config.into_config(false);
        let device = Device::Cpu;
        let weights = [dir.path().join("model.safetensors")];
        // SAFETY: the file is not modified while mapped.
        let vb = unsafe {
            candle_nn::VarBuilder::from_mmaped_safetensors(&weights, DType::F32, &device).unwrap()
        };
        let model = Llama::load(vb, &config).unwrap();
        let mut cache = Cache::new(true, DType::F32, &config, &device).unwrap();

        let tokenizer = TextTokenizer::from_model_dir(dir.path()).unwrap();
        let mut ids = tokenizer
            .encode("The river was wide and calm", true)
            .unwrap();
        let mut margins = Vec::new();
        let mut pos = 0;
        for _ in 0..24 {
            let input = Tensor::new(&ids[pos..], &device)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits: Vec<f32> = model
                .forward(&input, pos, &mut cache)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1()
                .unwrap();
            pos = ids.len();
            let n = logits.len() as f32;
            let mean = logits.iter().sum::<f32>() / n;
            let std = (logits.iter().map(|l| (l - mean).powi(2)).sum::<f32>() / n).sqrt();
            assert!((0.5..2.0).contains(&std), "logit std {std}");
            let mut sorted = logits.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            margins.push(sorted[0] - sorted[1]);
            let next = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1));
            ids.push(next.unwrap().0 as u32);
        }
        margins.sort_by(f32::total_cmp);
        assert!(
            margins[margins.len() / 2] > 0.05,
            "top-2 logit margins {margins:?}"
        );
    }

    #[test]
    fn same_spec_gives_identical_files_and_seed_changes_weights() {
        let [a, b, c] = [(); 3].map(|()| tempfile::tempdir().unwrap());
        let spec = small(DemoDtype::F32);
        write_demo_model(a.path(), &spec).unwrap();
        write_demo_model(b.path(), &spec).unwrap();
        for file in FILES {
            let x = std::fs::read(a.path().join(file)).unwrap();
            let y = std::fs::read(b.path().join(file)).unwrap();
            assert!(x == y, "{file} differs between two writes");
        }
        write_demo_model(c.path(), &DemoModelSpec { seed: 1, ..spec }).unwrap();
        let read = |d: &tempfile::TempDir, f: &str| std::fs::read(d.path().join(f)).unwrap();
        assert_ne!(read(&a, "model.safetensors"), read(&c, "model.safetensors"));
        assert_eq!(read(&a, "tokenizer.json"), read(&c, "tokenizer.json"));
        assert!(!a.path().join(".config.json.tmp").exists());
    }

    #[test]
    fn half_precision_and_tied_embeddings() {
        let f32_dir = tempfile::tempdir().unwrap();
        write_demo_model(f32_dir.path(), &small(DemoDtype::F32)).unwrap();
        let reference = Weights::open(f32_dir.path()).unwrap();
        for (dtype, name, tolerance) in [
            (DemoDtype::F16, "float16", 1e-3),
            (DemoDtype::BF16, "bfloat16", 8e-3),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let spec = DemoModelSpec {
                tie_word_embeddings: true,
                ..small(dtype)
            };
            write_demo_model(dir.path(), &spec).unwrap();
            let config = ModelConfig::from_model_dir(dir.path()).unwrap();
            assert!(config.tie_word_embeddings);
            assert_eq!(config.torch_dtype.as_deref(), Some(name));
            let weights = Weights::open(dir.path()).unwrap();
            assert!(!weights.contains("lm_head.weight"));
            // Same seed, same values up to the rounding of the narrower type.
            let x = weights
                .get_f32("model.layers.1.mlp.up_proj.weight")
                .unwrap();
            let y = reference
                .get_f32("model.layers.1.mlp.up_proj.weight")
                .unwrap();
            assert_eq!(x.shape, y.shape);
            for (a, b) in x.data.iter().zip(&y.data) {
                assert!((a - b).abs() <= tolerance * b.abs().max(1.0), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn write_if_missing_skips_existing_models() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("demo");
        assert!(write_demo_model_if_missing(&model, &small(DemoDtype::F32)).unwrap());
        std::fs::write(model.join("model.safetensors"), b"kept").unwrap();
        assert!(!write_demo_model_if_missing(&model, &small(DemoDtype::F32)).unwrap());
        assert_eq!(
            std::fs::read(model.join("model.safetensors")).unwrap(),
            b"kept"
        );
    }

    #[test]
    fn rejects_invalid_specs() {
        let dir = tempfile::tempdir().unwrap();
        for (spec, needle) in [
            (
                DemoModelSpec {
                    num_key_value_heads: 3,
                    ..DemoModelSpec::default()
                },
                "multiple",
            ),
            (
                DemoModelSpec {
                    hidden_size: 100,
                    ..DemoModelSpec::default()
                },
                "divisible",
            ),
            (
                DemoModelSpec {
                    vocab_size_target: 100,
                    ..DemoModelSpec::default()
                },
                "vocab_size_target",
            ),
        ] {
            let err = write_demo_model(dir.path(), &spec).unwrap_err();
            assert!(err.to_string().contains(needle), "{err}");
        }
        assert!(!dir.path().join("config.json").exists());
    }
}
