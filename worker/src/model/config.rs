//! Model hyper-parameters read from a Hugging Face `config.json` of the Llama family.

use std::f64::consts::PI;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot parse {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The model families whose decoder layers share the Llama layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

impl Architecture {
    fn from_hf_name(name: &str) -> Option<Self> {
        match name {
            "LlamaForCausalLM" | "llama" => Some(Self::Llama),
            "MistralForCausalLM" | "mistral" => Some(Self::Mistral),
            "Qwen2ForCausalLM" | "qwen2" => Some(Self::Qwen2),
            _ => None,
        }
    }
}

/// How RoPE frequencies are stretched for contexts longer than the model was trained on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    Linear {
        factor: f64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Whether q/k/v projections carry a bias (Qwen2 does).
    pub attention_bias: bool,
    pub torch_dtype: Option<String>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// `config.json` as written by `transformers`; optional where any supported family omits it.
#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    architectures: Vec<String>,
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<Map<String, Value>>,
    /// transformers >= 5 keeps theta and scaling together under this key.
    rope_parameters: Option<Map<String, Value>>,
    max_position_embeddings: usize,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    #[serde(alias = "dtype")]
    torch_dtype: Option<String>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<TokenIds>,
}

/// Token ids that `transformers` writes either as one integer or as a list.
#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub(crate) fn into_vec(self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![id],
            Self::Many(ids) => ids,
        }
    }
}

impl ModelConfig {
    pub fn from_model_dir(dir: &Path) -> Result<Self, ConfigError> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        Self::parse(&text, &path)
    }

    fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };

        let architecture = raw
            .architectures
            .iter()
            .chain(raw.model_type.iter())
            .find_map(|name| Architecture::from_hf_name(name))
            .ok_or_else(|| {
                invalid(format!(
                    "unsupported architecture {:?} (model_type {:?}); supported: \
                     LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM",
                    raw.architectures, raw.model_type
                ))
            })?;

        let rope_params = raw.rope_parameters.as_ref();
        let rope_theta = raw
            .rope_theta
            .or_else(|| rope_params?.get("rope_theta")?.as_f64())
            .unwrap_or(10_000.0);
        let rope_scaling = match raw.rope_scaling.as_ref().or(rope_params) {
            Some(map) => parse_rope_scaling(map).map_err(invalid)?,
            None => None,
        };

        let heads = raw.num_attention_heads;
        if heads == 0 {
            return Err(invalid("num_attention_heads must be positive".into()));
        }
        let head_dim = match raw.head_dim {
            Some(d) => d,
            None if raw.hidden_size.is_multiple_of(heads) => raw.hidden_size / heads,
            None => {
                return Err(invalid(format!(
                    "hidden_size {} is not divisible by num_attention_heads {heads} \
                     and head_dim is not given",
                    raw.hidden_size
                )));
            }
        };

        let config = ModelConfig {
            architecture,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: raw.num_key_value_heads.unwrap_or(heads),
            head_dim,
            vocab_size: raw.vocab_size,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            attention_bias: raw
                .attention_bias
                .unwrap_or(architecture == Architecture::Qwen2),
            torch_dtype: raw.torch_dtype,
            bos_token_id: raw.bos_token_id,
            eos_token_ids: raw.eos_token_id.map(TokenIds::into_vec).unwrap_or_default(),
        };
        config.validate().map_err(invalid)?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} must be positive"));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        // RoPE rotates pairs of dimensions (first half against second half).
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        if self.rms_norm_eps <= 0.0 {
            return Err(format!(
                "rms_norm_eps {} must be positive",
                self.rms_norm_eps
            ));
        }
        if self.rope_theta <= 0.0 {
            return Err(format!("rope_theta {} must be positive", self.rope_theta));
        }
        Ok(())
    }

    /// RoPE inverse frequencies, one per rotated pair (`head_dim / 2` values), with the
    /// configured scaling applied exactly as `transformers` does it.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let dim = self.head_dim as f64;
        (0..self.head_dim / 2)
            .map(|i| {
                let inv_freq = 1.0 / self.rope_theta.powf((2 * i) as f64 / dim);
                scale_inv_freq(inv_freq, self.rope_scaling.as_ref()) as f32
            })
            .collect()
    }
}

/// Mirrors `_compute_llama3_parameters` and `_compute_linear_scaling_rope_parameters` of
/// `transformers.modeling_rope_utils`.
fn scale_inv_freq(inv_freq: f64, scaling: Option<&RopeScaling>) -> f64 {
    match scaling {
        None => inv_freq,
        Some(RopeScaling::Linear { factor }) => inv_freq / factor,
        Some(&RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let old_context = original_max_position_embeddings as f64;
            let low_freq_wavelen = old_context / low_freq_factor;
            let high_freq_wavelen = old_context / high_freq_factor;
            let wavelen = 2.0 * PI / inv_freq;
            if wavelen < high_freq_wavelen {
                inv_freq
            } else if wavelen > low_freq_wavelen {
                inv_freq / factor
            } else {
                let smooth = (old_context / wavelen - low_freq_factor)
                    / (high_freq_factor - low_freq_factor);
                (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
            }
        }
    }
}

fn parse_rope_scaling(map: &Map<String, Value>) -> Result<Option<RopeScaling>, String> {
    let kind = map
        .get("rope_type")
        .or_else(|| map.get("type"))
        .and_then(Value::as_str)
        .ok_or("rope_scaling has no \"rope_type\" or \"type\" string")?;
    let number = |key: &str| {
        map.get(key).and_then(Value::as_f64).ok_or(format!(
            "rope_scaling of type {kind:?} needs a number {key:?}"
        ))
    };
    let positive = |key: &str| {
        let value = number(key)?;
        if value > 0.0 {
            Ok(value)
        } else {
            Err(format!(
                "rope_scaling {key:?} must be positive, got {value}"
            ))
        }
    };
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: positive("factor")?,
        })),
        "llama3" => {
            let low_freq_factor = positive("low_freq_factor")?;
            let high_freq_factor = positive("high_freq_factor")?;
            // The smooth interpolation divides by their difference.
            if high_freq_factor <= low_freq_factor {
                return Err(format!(
                    "rope_scaling high_freq_factor {high_freq_factor} must exceed \
                     low_freq_factor {low_freq_factor}"
                ));
            }
            let original = map
                .get("original_max_position_embeddings")
                .and_then(Value::as_u64)
                .filter(|&v| v > 0)
                .ok_or("rope_scaling of type \"llama3\" needs a positive integer \"original_max_position_embeddings\"")?;
            Ok(Some(RopeScaling::Llama3 {
                factor: positive("factor")?,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: original as usize,
            }))
        }
        other => Err(format!(
            "unsupported rope_scaling type {other:?}; supported: default, linear, llama3"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(value: Value) -> Result<ModelConfig, ConfigError> {
        ModelConfig::parse(&value.to_string(), Path::new("/models/x/config.json"))
    }

    /// Abridged `config.json` of meta-llama/Llama-3.1-8B-Instruct.
    fn llama31() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "attention_bias": false,
            "bos_token_id": 128000,
            "eos_token_id": [128001, 128008, 128009],
            "hidden_act": "silu",
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "max_position_embeddings": 131072,
            "model_type": "llama",
            "num_attention_heads": 32,
            "num_hidden_layers": 32,
            "num_key_value_heads": 8,
            "rms_norm_eps": 1e-05,
            "rope_scaling": {
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
                "rope_type": "llama3"
            },
            "rope_theta": 500000.0,
            "tie_word_embeddings": false,
            "torch_dtype": "bfloat16",
            "vocab_size": 128256
        })
    }

    #[test]
    fn parses_llama31() {
        let c = parse(llama31()).unwrap();
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!(c.num_key_value_heads, 8);
        assert_eq!(c.head_dim, 128);
        assert_eq!(c.rope_theta, 500_000.0);
        assert_eq!(
            c.rope_scaling,
            Some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192
            })
        );
        assert_eq!(c.bos_token_id, Some(128000));
        assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
        assert_eq!(c.torch_dtype.as_deref(), Some("bfloat16"));
        assert!(!c.tie_word_embeddings && !c.attention_bias);
    }

    #[test]
    fn defaults_for_missing_keys() {
        // Llama 2 style: no kv heads, no theta, no head_dim, single eos id.
        let c = parse(json!({
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": 100, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 4096, "eos_token_id": 2, "rope_scaling": null
        }))
        .unwrap();
        assert_eq!(c.num_key_value_heads, 4);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.rope_theta, 10_000.0);
        assert_eq!(c.rope_scaling, None);
        assert_eq!(c.eos_token_ids, vec![2]);
        assert!(!c.tie_word_embeddings);
        assert_eq!(c.bos_token_id, None);
    }

    #[test]
    fn qwen2_has_attention_bias_and_mistral_explicit_head_dim() {
        let qwen = parse(json!({
            "architectures": ["Qwen2ForCausalLM"], "hidden_size": 896,
            "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
            "num_key_value_heads": 2, "vocab_size": 151936, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "max_position_embeddings": 32768,
            "sliding_window": 32768, "use_sliding_window": false,
            "tie_word_embeddings": true, "eos_token_id": 151645
        }))
        .unwrap();
        assert_eq!(qwen.architecture, Architecture::Qwen2);
        assert!(qwen.attention_bias && qwen.tie_word_embeddings);
        assert_eq!(qwen.head_dim, 64);

        let mistral = parse(json!({
            "architectures": ["MistralForCausalLM"], "hidden_size": 5120,
            "intermediate_size": 14336, "num_hidden_layers": 40, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 131072,
            "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "max_position_embeddings": 1024000,
            "sliding_window": null
        }))
        .unwrap();
        assert_eq!(mistral.architecture, Architecture::Mistral);
        assert_eq!(mistral.head_dim, 128);
        assert!(!mistral.attention_bias);
    }

    #[test]
    fn accepts_type_key_and_linear_scaling() {
        let mut v = llama31();
        v["rope_scaling"] = json!({"type": "linear", "factor": 4.0});
        let c = parse(v).unwrap();
        assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 4.0 }));
        let mut unscaled = llama31();
        unscaled["rope_scaling"] = Value::Null;
        let base = parse(unscaled).unwrap().rope_inv_freq();
        for (scaled, base) in c.rope_inv_freq().iter().zip(&base) {
            assert!((scaled * 4.0 - base).abs() <= base * 1e-6);
        }
    }

    #[test]
    fn reads_rope_parameters_of_newer_transformers() {
        let mut v = llama31();
        let scaling = v.as_object_mut().unwrap().remove("rope_scaling").unwrap();
        v.as_object_mut().unwrap().remove("rope_theta");
        let mut params = scaling;
        params["rope_theta"] = json!(250000.0);
        v["rope_parameters"] = params;
        let c = parse(v).unwrap();
        assert_eq!(c.rope_theta, 250_000.0);
        assert!(matches!(c.rope_scaling, Some(RopeScaling::Llama3 { .. })));
    }

    #[test]
    fn rejects_bad_configs_with_the_path() {
        let mut v = llama31();
        v["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
        let err = parse(v).unwrap_err().to_string();
        assert!(err.contains("/models/x/config.json"), "{err}");
        assert!(err.contains("\"yarn\""), "{err}");

        let mut v = llama31();
        v["num_key_value_heads"] = json!(5);
        let err = parse(v).unwrap_err().to_string();
        assert!(
            err.contains("not a multiple of num_key_value_heads 5"),
            "{err}"
        );

        let mut v = llama31();
        v["architectures"] = json!(["GPT2LMHeadModel"]);
        v["model_type"] = json!("gpt2");
        assert!(
            parse(v)
                .unwrap_err()
                .to_string()
                .contains("GPT2LMHeadModel")
        );

        let mut v = llama31();
        v["hidden_size"] = json!(4095);
        assert!(parse(v).unwrap_err().to_string().contains("not divisible"));

        let mut v = llama31();
        v["rope_scaling"]["low_freq_factor"] = json!(4.0);
        assert!(parse(v).unwrap_err().to_string().contains("must exceed"));

        let mut v = llama31();
        v.as_object_mut().unwrap().remove("hidden_size");
        assert!(matches!(parse(v), Err(ConfigError::Parse { .. })));
    }

    #[test]
    fn from_model_dir_reports_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = ModelConfig::from_model_dir(dir.path()).unwrap_err();
        assert!(matches!(err, ConfigError::Read { ref path, .. } if path.ends_with("config.json")));
        std::fs::write(dir.path().join("config.json"), llama31().to_string()).unwrap();
        assert_eq!(
            ModelConfig::from_model_dir(dir.path()).unwrap().vocab_size,
            128256
        );
    }

    /// Llama-3.1-8B's RoPE (head_dim 128, theta 500000, factor 8, low 1, high 4, original 8192)
    /// has all three bands of `_compute_llama3_parameters`.
    #[test]
    fn llama3_inv_freq_matches_transformers() {
        let inv = parse(llama31()).unwrap().rope_inv_freq();
        assert_eq!(inv.len(), 64);
        // High-frequency band: untouched.
        assert_eq!(inv[0], 1.0);
        let base = |i: usize| 1.0 / 500_000f64.powf(2.0 * i as f64 / 128.0);
        assert_eq!(inv[10], base(10) as f32);
        // Low-frequency band: divided by the factor.
        assert_eq!(inv[63], (base(63) / 8.0) as f32);
        // Band edges: wavelength 1956 < 2048 keeps i = 28, 10070 > 8192 scales i = 36.
        assert_eq!(inv[28], base(28) as f32);
        assert_eq!(inv[36], (base(36) / 8.0) as f32);
        // Medium band: smooth interpolation between the two.
        let i = 32;
        let wavelen = 2.0 * PI / base(i);
        let smooth = (8192.0 / wavelen - 1.0) / 3.0;
        assert!(smooth > 0.0 && smooth < 1.0);
        let expected = (1.0 - smooth) * base(i) / 8.0 + smooth * base(i);
        assert_eq!(inv[i], expected as f32);
        // Every value lies between the unscaled and fully scaled frequency.
        for (i, &f) in inv.iter().enumerate() {
            let b = base(i) as f32;
            assert!(f <= b && f >= b / 8.0 * (1.0 - 1e-6), "{i}: {f} vs {b}");
        }
        // Monotone: scaling never reorders frequencies.
        assert!(inv.windows(2).all(|w| w[0] > w[1]));
    }
}
