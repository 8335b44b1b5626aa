//! Checks the sampling fields shared by both completion endpoints and turns them into engine terms.

use std::sync::Arc;

use serde_json::Value;

use super::errors::ApiError;
use super::openai_types::CommonFields;
use crate::logit_adjust::LogitAdjust;
use crate::request::SamplingParams;

/// OpenAI allows at most this many stop sequences.
const MAX_STOP_SEQUENCES: usize = 4;

/// A request's validated generation settings.
#[derive(Debug, Clone)]
pub struct Params {
    /// `max_tokens` in here is a placeholder until the prompt length is known.
    pub sampling: SamplingParams,
    /// `None`: the endpoint's default applies.
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

/// `max_tokens` is passed separately with the name of the field it came from, since chat has
/// two; `vocab` bounds the token ids a request may name.
pub fn validate(
    fields: &CommonFields,
    max_tokens: Option<(i64, &str)>,
    logprobs: Option<usize>,
    vocab: usize,
) -> Result<Params, ApiError> {
    if let Some(n) = fields.n.filter(|&n| n != 1) {
        return Err(ApiError::invalid_param(
            "n",
            format!("Only n=1 is supported, got n={n}."),
        ));
    }
    let max_tokens = match max_tokens {
        Some((v, name)) if v < 1 => {
            return Err(ApiError::invalid_param(
                name,
                format!("{name} must be at least 1, got {v}."),
            ));
        }
        Some((v, _)) => Some(usize::try_from(v).unwrap_or(usize::MAX)),
        None => None,
    };
    let temperature = fields.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid_param(
            "temperature",
            format!("temperature must be between 0 and 2, got {temperature}."),
        ));
    }
    let top_p = fields.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid_param(
            "top_p",
            format!("top_p must be greater than 0 and at most 1, got {top_p}."),
        ));
    }
    let top_k = match fields.top_k.unwrap_or(0) {
        -1 => 0,
        k if k >= 0 => usize::try_from(k).unwrap_or(usize::MAX),
        k => {
            return Err(ApiError::invalid_param(
                "top_k",
                format!("top_k must be -1 (off), 0 (off) or positive, got {k}."),
            ));
        }
    };
    let stream = fields.stream.unwrap_or(false);
    if fields.stream_options.is_some() && !stream {
        return Err(ApiError::invalid_param(
            "stream_options",
            "stream_options is only allowed when stream is true.",
        ));
    }
    let include_usage = fields
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let adjust = logit_adjust(fields, max_tokens, vocab)?;
    let stop_token_ids = match &fields.stop_token_ids {
        Some(ids) => ids
            .iter()
            .map(|&id| token_id("stop_token_ids", id, vocab))
            .collect::<Result<_, _>>()?,
        None => Vec::new(),
    };
    Ok(Params {
        sampling: SamplingParams {
            temperature: temperature as f32,
            top_k,
            top_p: top_p as f32,
            // Seeds are opaque; negative ones from clients are kept distinct by their bits.
            seed: fields.seed.map(|s| s as u64),
            max_tokens: 0,
            logprobs,
            ignore_eos: fields.ignore_eos.unwrap_or(false),
            stop_token_ids,
            adjust: (!adjust.is_noop() || adjust.min_tokens > 0).then(|| Arc::new(adjust)),
            panic_for_test: false,
        },
        max_tokens,
        stop: stop_sequences(fields.stop.as_ref())?,
        stream,
        include_usage,
    })
}

/// A token id named by a request field, if the vocabulary has it.
fn token_id(field: &str, id: i64, vocab: usize) -> Result<u32, ApiError> {
    u32::try_from(id)
        .ok()
        .filter(|&id| (id as usize) < vocab)
        .ok_or_else(|| {
            ApiError::invalid_param(
                field,
                format!("Token id {id} is out of the vocabulary (size {vocab})."),
            )
        })
}

/// `value`, if within `range`; else an error naming `field`.
fn within(
    field: &str,
    value: Option<f64>,
    default: f64,
    range: std::ops::RangeInclusive<f64>,
) -> Result<f32, ApiError> {
    let v = value.unwrap_or(default);
    if range.contains(&v) {
        Ok(v as f32)
    } else {
        Err(ApiError::invalid_param(
            field,
            format!(
                "{field} must be between {} and {}, got {v}.",
                range.start(),
                range.end()
            ),
        ))
    }
}

/// The logit changes a request asks for; the stop tokens and the prompt they need are added
/// once the prompt is known.
fn logit_adjust(
    fields: &CommonFields,
    max_tokens: Option<usize>,
    vocab: usize,
) -> Result<LogitAdjust, ApiError> {
    let logit_bias = match &fields.logit_bias {
        Some(bias) => bias
            .iter()
            .map(|(id, &b)| {
                let id = id.parse::<i64>().map_err(|_| {
                    ApiError::invalid_param(
                        "logit_bias",
                        format!("logit_bias keys are token ids, got {id:?}."),
                    )
                })?;
                let id = token_id("logit_bias", id, vocab)?;
                Ok((id, within("logit_bias", Some(b), 0.0, -100.0..=100.0)?))
            })
            .collect::<Result<_, ApiError>>()?,
        None => Vec::new(),
    };
    let repetition_penalty = fields.repetition_penalty.unwrap_or(1.0);
    if !(repetition_penalty > 0.0 && repetition_penalty <= 10.0) {
        return Err(ApiError::invalid_param(
            "repetition_penalty",
            format!("repetition_penalty must be above 0 and at most 10, got {repetition_penalty}."),
        ));
    }
    let min_tokens = match fields.min_tokens {
        None => 0,
        Some(m) if m < 0 => {
            return Err(ApiError::invalid_param(
                "min_tokens",
                format!("min_tokens must be at least 0, got {m}."),
            ));
        }
        Some(m) => usize::try_from(m).unwrap_or(usize::MAX),
    };
    if let Some(max) = max_tokens.filter(|&max| min_tokens > max) {
        return Err(ApiError::invalid_param(
            "min_tokens",
            format!("min_tokens ({min_tokens}) must not exceed max_tokens ({max})."),
        ));
    }
    Ok(LogitAdjust {
        logit_bias,
        repetition_penalty: repetition_penalty as f32,
        presence_penalty: within("presence_penalty", fields.presence_penalty, 0.0, -2.0..=2.0)?,
        frequency_penalty: within(
            "frequency_penalty",
            fields.frequency_penalty,
            0.0,
            -2.0..=2.0,
        )?,
        min_p: within("min_p", fields.min_p, 0.0, 0.0..=1.0)?,
        min_tokens,
        ..LogitAdjust::default()
    })
}

/// `stop` is null, a string, or a list of up to four strings. Empty strings can never end
/// anything meaningful, so they are dropped rather than stopping at once.
fn stop_sequences(stop: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let invalid = || ApiError::invalid_param("stop", "stop must be a string or a list of strings.");
    let stops: Vec<String> = match stop {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().map(str::to_owned).ok_or_else(invalid))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(invalid()),
    };
    if stops.len() > MAX_STOP_SEQUENCES {
        return Err(ApiError::invalid_param(
            "stop",
            format!(
                "At most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {}.",
                stops.len()
            ),
        ));
    }
    Ok(stops.into_iter().filter(|s| !s.is_empty()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(extra: Value) -> CommonFields {
        let mut body = json!({"model": "m"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(body).unwrap()
    }

    fn validate(
        fields: &CommonFields,
        max_tokens: Option<(i64, &str)>,
        logprobs: Option<usize>,
    ) -> Result<Params, ApiError> {
        super::validate(fields, max_tokens, logprobs, 1000)
    }

    fn param_of(err: ApiError) -> Option<String> {
        err.body().param.clone()
    }

    #[test]
    fn defaults_are_openai_defaults() {
        let p = validate(&fields(json!({})), None, None).unwrap();
        assert_eq!(p.sampling.temperature, 1.0);
        assert_eq!(p.sampling.top_p, 1.0);
        assert_eq!(p.sampling.top_k, 0);
        assert!(p.stop.is_empty() && !p.stream && !p.include_usage);
        assert_eq!(p.max_tokens, None);
    }

    #[test]
    fn out_of_range_values_name_their_field() {
        let cases = [
            (json!({"temperature": 2.5}), "temperature"),
            (json!({"temperature": -0.1}), "temperature"),
            (json!({"top_p": 0.0}), "top_p"),
            (json!({"top_p": 2}), "top_p"),
            (json!({"top_k": -2}), "top_k"),
            (json!({"n": 2}), "n"),
            (json!({"presence_penalty": 2.5}), "presence_penalty"),
            (json!({"frequency_penalty": -3}), "frequency_penalty"),
            (json!({"logit_bias": {"5000": 1}}), "logit_bias"),
            (json!({"logit_bias": {"x": 1}}), "logit_bias"),
            (json!({"logit_bias": {"5": 101}}), "logit_bias"),
            (json!({"repetition_penalty": 0}), "repetition_penalty"),
            (json!({"min_p": 1.5}), "min_p"),
            (json!({"min_tokens": -1}), "min_tokens"),
            (json!({"stop_token_ids": [1, 1000]}), "stop_token_ids"),
            (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
            (json!({"stop": 3}), "stop"),
            (
                json!({"stream_options": {"include_usage": true}}),
                "stream_options",
            ),
        ];
        for (extra, param) in cases {
            let err = validate(&fields(extra.clone()), None, None).unwrap_err();
            assert_eq!(param_of(err).as_deref(), Some(param), "{extra}");
        }
        let err = validate(&fields(json!({})), Some((-1, "max_tokens")), None).unwrap_err();
        assert_eq!(param_of(err).as_deref(), Some("max_tokens"));
        let err = validate(
            &fields(json!({"min_tokens": 5})),
            Some((4, "max_tokens")),
            None,
        )
        .unwrap_err();
        assert_eq!(param_of(err).as_deref(), Some("min_tokens"));
    }

    #[test]
    fn the_extra_sampling_fields_reach_the_engine() {
        let p = validate(
            &fields(
                json!({"logit_bias": {"7": -100}, "min_p": 0.1, "min_tokens": 2,
                           "repetition_penalty": 1.2, "stop_token_ids": [3],
                           "presence_penalty": 0.5}),
            ),
            None,
            None,
        )
        .unwrap();
        let a = p.sampling.adjust.expect("adjustments");
        assert_eq!(a.logit_bias, vec![(7, -100.0)]);
        assert_eq!((a.min_p, a.min_tokens), (0.1, 2));
        assert_eq!((a.repetition_penalty, a.presence_penalty), (1.2, 0.5));
        assert_eq!(p.sampling.stop_token_ids, vec![3]);
        let plain = validate(&fields(json!({})), None, None).unwrap();
        assert!(plain.sampling.adjust.is_none());
    }

    #[test]
    fn stop_accepts_string_or_list_and_drops_empty_ones() {
        let p = validate(&fields(json!({"stop": "\n"})), None, None).unwrap();
        assert_eq!(p.stop, vec!["\n"]);
        let p = validate(&fields(json!({"stop": ["a", "", "b"]})), None, None).unwrap();
        assert_eq!(p.stop, vec!["a", "b"]);
        let p = validate(&fields(json!({"top_k": -1, "seed": -1})), None, None).unwrap();
        assert_eq!(p.sampling.top_k, 0);
        assert_eq!(p.sampling.seed, Some(u64::MAX));
    }
}
