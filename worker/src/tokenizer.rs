//! Text <-> token ids for a Hugging Face model folder: `tokenizer.json`, the special tokens and
//! chat template of `tokenizer_config.json`, and the end-of-sequence ids of
//! `generation_config.json` and `config.json`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use thiserror::Error;
use tokenizers::Tokenizer;

pub use crate::chat_template::ChatMessage;
use crate::chat_template::{ChatTemplate, ChatTemplateError};
use crate::model::config::TokenIds;

#[derive(Debug, Error)]
pub enum TokenizerError {
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
    #[error("cannot load tokenizer {path}: {source}")]
    Load {
        path: PathBuf,
        source: tokenizers::Error,
    },
    #[error("{path}: {source}")]
    InvalidTemplate {
        path: PathBuf,
        source: ChatTemplateError,
    },
    #[error("cannot encode text: {0}")]
    Encode(#[source] tokenizers::Error),
    #[error("cannot decode token ids: {0}")]
    Decode(#[source] tokenizers::Error),
    #[error("the model in {dir} has no chat template")]
    NoChatTemplate { dir: PathBuf },
    #[error(transparent)]
    Render(ChatTemplateError),
}

pub struct TextTokenizer {
    dir: PathBuf,
    inner: Arc<Tokenizer>,
    eos_token_ids: Vec<u32>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    chat_template: Option<ChatTemplate>,
    max_token_bytes: usize,
}

#[derive(Default, Deserialize)]
struct TokenizerConfig {
    bos_token: Option<SpecialToken>,
    eos_token: Option<SpecialToken>,
    chat_template: Option<TemplateSource>,
}

/// `transformers` writes special tokens as a plain string or a serialized `AddedToken`.
#[derive(Deserialize)]
#[serde(untagged)]
enum SpecialToken {
    Text(String),
    Added { content: String },
}

impl SpecialToken {
    fn into_content(self) -> String {
        match self {
            Self::Text(content) | Self::Added { content } => content,
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TemplateSource {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

/// The one key we need from `config.json` and `generation_config.json`.
#[derive(Deserialize)]
struct EosTokenIds {
    eos_token_id: Option<TokenIds>,
}

impl TextTokenizer {
    pub fn from_model_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let tokenizer_path = dir.join("tokenizer.json");
        let inner =
            Tokenizer::from_file(&tokenizer_path).map_err(|source| TokenizerError::Load {
                path: tokenizer_path,
                source,
            })?;

        let config_path = dir.join("tokenizer_config.json");
        let config: TokenizerConfig = read_json_if_exists(&config_path)?.unwrap_or_default();
        let bos_token = config.bos_token.map(SpecialToken::into_content);
        let eos_token = config.eos_token.map(SpecialToken::into_content);

        // Newer transformers save the template next to the config instead of inside it.
        let jinja_path = dir.join("chat_template.jinja");
        let (template_path, template_source) = match std::fs::read_to_string(&jinja_path) {
            Ok(source) => (jinja_path, Some(source)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (
                config_path,
                match config.chat_template {
                    Some(TemplateSource::One(source)) => Some(source),
                    Some(TemplateSource::Named(named)) => named
                        .into_iter()
                        .find(|t| t.name == "default")
                        .map(|t| t.template),
                    None => None,
                },
            ),
            Err(source) => {
                return Err(TokenizerError::Read {
                    path: jinja_path,
                    source,
                });
            }
        };
        let chat_template = template_source
            .map(|source| ChatTemplate::new(&source))
            .transpose()
            .map_err(|source| TokenizerError::InvalidTemplate {
                path: template_path,
                source,
            })?;

        let mut eos_token_ids = Vec::new();
        for file in ["generation_config.json", "config.json"] {
            if let Some(EosTokenIds {
                eos_token_id: Some(ids),
            }) = read_json_if_exists(&dir.join(file))?
            {
                eos_token_ids.extend(ids.into_vec());
            }
        }
        eos_token_ids.extend(eos_token.as_deref().and_then(|t| inner.token_to_id(t)));
        let mut seen = std::collections::HashSet::new();
        eos_token_ids.retain(|id| seen.insert(*id));

        let max_token_bytes = inner
            .get_vocab(true)
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(1)
            .max(1);
        Ok(Self {
            dir: dir.to_path_buf(),
            max_token_bytes,
            inner: Arc::new(inner),
            eos_token_ids,
            bos_token,
            eos_token,
            chat_template,
        })
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(TokenizerError::Encode)?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(TokenizerError::Decode)
    }

    /// The text of one token on its own, for listing alternatives in logprobs. Empty for ids
    /// outside the vocabulary.
    pub fn token_text(&self, id: u32) -> String {
        self.inner.decode(&[id], false).unwrap_or_default()
    }

    /// Every id that ends generation: generation_config.json, config.json and the
    /// tokenizer's eos token, without duplicates.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// Bytes of the longest token in the vocabulary, as written there (at least as long as
    /// the text it stands for): a text of `n` bytes has at least `n / max_token_bytes` tokens.
    pub fn max_token_bytes(&self) -> usize {
        self.max_token_bytes
    }

    /// Number of token ids, added tokens included. The model's embedding may be larger.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The prompt text for a chat. Its special tokens are already in the text, so encode it
    /// with `add_special_tokens = false`.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let template =
            self.chat_template
                .as_ref()
                .ok_or_else(|| TokenizerError::NoChatTemplate {
                    dir: self.dir.clone(),
                })?;
        template
            .render(
                messages,
                add_generation_prompt,
                self.bos_token.as_deref(),
                self.eos_token.as_deref(),
            )
            .map_err(TokenizerError::Render)
    }

    /// A streaming detokenizer for the tokens generated after `prompt_ids`.
    pub fn incremental_decoder(&self, prompt_ids: &[u32]) -> IncrementalDecoder {
        let start = prompt_ids.len().saturating_sub(CONTEXT_TOKENS);
        let ids = prompt_ids[start..].to_vec();
        IncrementalDecoder {
            tokenizer: Arc::clone(&self.inner),
            read_offset: ids.len(),
            prefix_offset: 0,
            ids,
        }
    }
}

fn read_json_if_exists<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, TokenizerError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(TokenizerError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| TokenizerError::Parse {
            path: path.to_path_buf(),
            source,
        })
}

/// Tokens of context decoded before the new ones, so that a token's leading space or the
/// rest of a multi-byte character comes out as it does in the full text.
const CONTEXT_TOKENS: usize = 5;

/// Turns generated ids into text as they arrive. Special tokens are skipped. For byte-level
/// BPE tokenizers the pushed pieces plus `finish` equal `decode(generated, true)`; for
/// SentencePiece tokenizers the first piece keeps the leading space it has after the prompt,
/// which decoding the generated ids alone would strip.
pub struct IncrementalDecoder {
    tokenizer: Arc<Tokenizer>,
    /// A window of the sequence: context, then tokens whose text is not yet returned.
    ids: Vec<u32>,
    /// Start of the context that `read_offset`'s text is decoded against.
    prefix_offset: usize,
    /// Tokens before this have had their text returned.
    read_offset: usize,
}

impl IncrementalDecoder {
    /// Adds one generated token and returns the text it completes: empty while the text ends
    /// in an incomplete UTF-8 sequence or the token is special.
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        let mut prefix = self.decode(self.prefix_offset, self.read_offset)?;
        if prefix.ends_with('\u{FFFD}') {
            // Only a prompt can end inside a character; its tail is no usable context.
            self.prefix_offset = self.read_offset;
            prefix.clear();
        }
        let full = self.decode(self.prefix_offset, self.ids.len())?;
        if full.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let Some(new_text) = full
            .get(prefix.len()..)
            .filter(|t| !t.is_empty() && full.starts_with(&prefix))
        else {
            return Ok(String::new());
        };
        let new_text = new_text.to_string();
        // Slide the window: what was new becomes the context of the next token.
        self.ids.drain(..self.read_offset);
        self.prefix_offset = 0;
        self.read_offset = self.ids.len();
        Ok(new_text)
    }

    /// Text still held back at the end of the stream (an incomplete character decodes as
    /// U+FFFD, as in `decode`).
    pub fn finish(self) -> Result<String, TokenizerError> {
        let prefix = self.decode(self.prefix_offset, self.read_offset)?;
        let full = self.decode(self.prefix_offset, self.ids.len())?;
        Ok(full
            .strip_prefix(&prefix)
            .map(str::to_string)
            .unwrap_or_default())
    }

    fn decode(&self, start: usize, end: usize) -> Result<String, TokenizerError> {
        self.tokenizer
            .decode(&self.ids[start..end], true)
            .map_err(TokenizerError::Decode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo_model::{DemoModelSpec, write_demo_model};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use serde_json::json;

    /// The demo model's tokenizer; the weights are kept tiny since only the tokenizer is used.
    fn demo() -> TextTokenizer {
        let dir = tempfile::tempdir().unwrap();
        let spec = DemoModelSpec {
            hidden_size: 16,
            intermediate_size: 16,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            ..DemoModelSpec::default()
        };
        write_demo_model(dir.path(), &spec).unwrap();
        TextTokenizer::from_model_dir(dir.path()).unwrap()
    }

    fn stream(tok: &TextTokenizer, prompt: &[u32], generated: &[u32]) -> (Vec<String>, String) {
        let mut dec = tok.incremental_decoder(prompt);
        let pieces: Vec<String> = generated.iter().map(|&id| dec.push(id).unwrap()).collect();
        let rest = dec.finish().unwrap();
        (pieces, rest)
    }

    #[test]
    fn demo_tokenizer_round_trips_and_knows_its_special_tokens() {
        let tok = demo();
        let text = "The quick brown fox jumps over the lazy dog. Naïve café, 日本語 🎉!";
        let ids = tok.encode(text, true).unwrap();
        let bos = tok.encode("<|begin_of_text|>", false).unwrap();
        assert_eq!(bos.len(), 1, "special tokens in text are single ids");
        assert_eq!(ids[0], bos[0], "add_special_tokens prepends BOS");
        assert_eq!(tok.encode(text, false).unwrap(), ids[1..]);
        assert_eq!(tok.decode(&ids, true).unwrap(), text);
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            format!("<|begin_of_text|>{text}")
        );
        assert!(ids.len() < text.len(), "trained merges compress English");

        let end = tok.encode("<|end_of_text|>", false).unwrap()[0];
        let eot = tok.encode("<|eot_id|>", false).unwrap()[0];
        assert_eq!(tok.eos_token_ids(), [end, eot]);
        assert_eq!(tok.token_text(eot), "<|eot_id|>");
        assert_eq!(tok.token_text(u32::MAX), "");
        assert!(tok.vocab_size() > 256);
    }

    #[test]
    fn chat_prompt_has_one_bos_and_encodes_headers_as_special_tokens() {
        let tok = demo();
        let messages = vec![
            ChatMessage {
                role: "system".into(),
                content: "You are a helpful assistant.".into(),
            },
            ChatMessage {
                role: "user".into(),
                content: "Hello there!".into(),
            },
        ];
        let prompt = tok.apply_chat_template(&messages, true).unwrap();
        assert!(
            prompt.starts_with("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
        );
        assert!(prompt.ends_with("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"));
        let ids = tok.encode(&prompt, false).unwrap();
        let bos = tok.encode("<|begin_of_text|>", false).unwrap()[0];
        assert_eq!(ids.iter().filter(|&&id| id == bos).count(), 1);
        assert_eq!(tok.decode(&ids, false).unwrap(), prompt);
    }

    #[test]
    fn streaming_equals_full_decode_across_multibyte_characters() {
        let tok = demo();
        let prompt = tok.encode("Translate:", true).unwrap();
        let text = " Grüße aus Köln — 東京タワー 🎉🦀 ok<|eot_id|>";
        let generated = tok.encode(text, false).unwrap();
        let (pieces, rest) = stream(&tok, &prompt, &generated);
        assert_eq!(rest, "");
        assert_eq!(pieces.concat(), tok.decode(&generated, true).unwrap());
        assert!(
            pieces.iter().all(|p| !p.contains('\u{FFFD}')),
            "no half characters: {pieces:?}"
        );
        // A character split over several byte tokens is held back, then emitted whole.
        assert!(pieces.iter().any(|p| p.is_empty()));
        assert!(pieces.iter().any(|p| p.contains('🎉')));
    }

    #[test]
    fn streaming_equals_full_decode_for_random_ids() {
        let tok = demo();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let vocab = tok.vocab_size() as u32;
        for _ in 0..50 {
            let prompt: Vec<u32> = (0..rng.random_range(0..8))
                .map(|_| rng.random_range(0..vocab))
                .collect();
            let generated: Vec<u32> = (0..rng.random_range(1..40))
                .map(|_| rng.random_range(0..vocab))
                .collect();
            let (pieces, rest) = stream(&tok, &prompt, &generated);
            assert_eq!(
                pieces.concat() + &rest,
                tok.decode(&generated, true).unwrap(),
                "prompt {prompt:?} generated {generated:?}"
            );
        }
    }

    /// A SentencePiece-style tokenizer (Metaspace), the layout of Llama 2 and Mistral.
    fn write_metaspace_model(dir: &Path) {
        let vocab =
            json!({"<unk>": 0, "<s>": 1, "</s>": 2, "▁Say": 3, "▁Hello": 4, "▁world": 5, "!": 6});
        let metaspace = json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": true});
        let special = |id: u32, content: &str| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        };
        let tokenizer = json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
            "normalizer": null, "pre_tokenizer": metaspace, "post_processor": null,
            "decoder": metaspace,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
        });
        std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    }

    #[test]
    fn streaming_keeps_sentencepiece_leading_spaces() {
        let dir = tempfile::tempdir().unwrap();
        write_metaspace_model(dir.path());
        let tok = TextTokenizer::from_model_dir(dir.path()).unwrap();
        let (pieces, rest) = stream(&tok, &[1, 3], &[4, 5, 6, 2]);
        assert_eq!(pieces, [" Hello", " world", "!", ""]);
        assert_eq!(rest, "");
        // Decoding the generated ids alone strips the first space, as transformers does.
        assert_eq!(tok.decode(&[4, 5, 6, 2], true).unwrap(), "Hello world!");
        let (pieces, _) = stream(&tok, &[], &[4, 5]);
        assert_eq!(pieces.concat(), "Hello world");
    }

    #[test]
    fn reads_every_shape_of_tokenizer_config() {
        let dir = tempfile::tempdir().unwrap();
        write_metaspace_model(dir.path());
        let tok = TextTokenizer::from_model_dir(dir.path()).unwrap();
        assert!(tok.eos_token_ids().is_empty());
        assert!(matches!(
            tok.apply_chat_template(&[], true),
            Err(TokenizerError::NoChatTemplate { .. })
        ));

        let added = |c: &str| {
            json!({"__type": "AddedToken", "content": c, "lstrip": false,
                                     "normalized": true, "rstrip": false, "single_word": false})
        };
        let config = json!({
            "bos_token": added("<s>"), "eos_token": added("</s>"),
            "chat_template": [
                {"name": "tool_use", "template": "tools"},
                {"name": "default", "template": "{{ bos_token }}{% for m in messages %}[{{ m.content }}]{% endfor %}{{ eos_token }}"}
            ]
        });
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        std::fs::write(
            dir.path().join("generation_config.json"),
            r#"{"eos_token_id": 6}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"eos_token_id": [6, 0]}"#,
        )
        .unwrap();
        let tok = TextTokenizer::from_model_dir(dir.path()).unwrap();
        assert_eq!(tok.eos_token_ids(), [6, 0, 2]);
        let msg = ChatMessage {
            role: "user".into(),
            content: "hi".into(),
        };
        assert_eq!(
            tok.apply_chat_template(std::slice::from_ref(&msg), false)
                .unwrap(),
            "<s>[hi]</s>"
        );

        // chat_template.jinja takes precedence over tokenizer_config.json.
        std::fs::write(
            dir.path().join("chat_template.jinja"),
            "{{ messages[0].role }}",
        )
        .unwrap();
        let tok = TextTokenizer::from_model_dir(dir.path()).unwrap();
        assert_eq!(tok.apply_chat_template(&[msg], false).unwrap(), "user");

        std::fs::write(dir.path().join("chat_template.jinja"), "{% if %}").unwrap();
        let err = TextTokenizer::from_model_dir(dir.path())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("chat_template.jinja"), "{err}");
    }

    #[test]
    fn tokenizer_is_shared_and_decoders_move_across_threads() {
        fn shared<T: Send + Sync + 'static>() {}
        fn movable<T: Send + 'static>() {}
        shared::<TextTokenizer>();
        movable::<IncrementalDecoder>();
    }

    #[test]
    fn missing_tokenizer_json_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = TextTokenizer::from_model_dir(dir.path())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
    }
}
