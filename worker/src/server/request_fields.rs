//! Which fields a request body may carry, and the errors of those it may not. As OpenAI does,
//! an unknown field is refused by name (`max_token` is a typo, not a wish to be ignored), except
//! a few that clients send and that change nothing here ([`HARMLESS`]). Fields OpenAI defines
//! and this server cannot honour (tools, JSON mode) get a 400 that says so. A field of the
//! wrong type names itself in `param` too.
//!
//! The known fields are read from the request types themselves (their serde field lists), so
//! a field added to a type is known here without a second list to keep in step.

use serde::de::{self, DeserializeOwned, Visitor};
use serde_json::{Map, Value};

use super::errors::ApiError;

/// Accepted and ignored: they describe the caller or ask for storage and tiers that change
/// nothing in what is generated.
pub const HARMLESS: &[&str] = &[
    "user",
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
    "prompt_cache_key",
    "safety_identifier",
];

/// OpenAI fields this server does not implement, each refused unless its value asks for
/// nothing beyond plain text; the reason tells the client what to do.
const REFUSED: &[(&str, &str)] = &[
    (
        "response_format",
        "JSON mode and structured outputs are not supported; leave response_format out or use {\"type\": \"text\"}.",
    ),
    ("tools", "Tool calling is not supported; leave tools out."),
    (
        "tool_choice",
        "Tool calling is not supported; leave tool_choice out or set it to \"none\".",
    ),
    ("functions", "Function calling is not supported."),
    ("function_call", "Function calling is not supported."),
    (
        "modalities",
        "Only text output is supported; leave modalities out or use [\"text\"].",
    ),
    ("audio", "Audio output is not supported."),
    ("prediction", "Predicted outputs are not supported."),
    (
        "reasoning_effort",
        "This model has no reasoning effort setting.",
    ),
    ("web_search_options", "Web search is not supported."),
];

/// A refused field's value that asks for nothing: plain text, no tools.
fn asks_nothing(field: &str, value: &Value) -> bool {
    value.is_null()
        || match field {
            "response_format" => value.get("type").and_then(Value::as_str) == Some("text"),
            "tools" | "functions" => value.as_array().is_some_and(Vec::is_empty),
            "tool_choice" => value.as_str() == Some("none"),
            "modalities" => value
                .as_array()
                .is_some_and(|m| m == &[Value::from("text")]),
            _ => false,
        }
}

/// Refuses the body's fields that are neither in `known` nor harmless.
pub fn screen(body: &Map<String, Value>, known: &[&[&str]]) -> Result<(), ApiError> {
    for (name, value) in body {
        if known.iter().any(|k| k.contains(&name.as_str())) || HARMLESS.contains(&name.as_str()) {
            continue;
        }
        if let Some((_, why)) = REFUSED.iter().find(|(f, _)| f == name) {
            if asks_nothing(name, value) {
                continue;
            }
            return Err(ApiError::invalid_param(name, *why));
        }
        return Err(ApiError::invalid_param(
            name,
            format!("Unrecognized request argument supplied: {name}"),
        ));
    }
    Ok(())
}

/// Deserializes `T` from an object, naming the field in the error when one has the wrong
/// type or a required one is missing.
pub fn parse<T: DeserializeOwned>(body: Map<String, Value>) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(Value::Object(body)).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner().to_string();
        let param = match inner.strip_prefix("missing field `") {
            Some(rest) => rest.trim_end_matches('`').to_owned(),
            None => path,
        };
        ApiError::invalid_param(&param, format!("Invalid value for '{param}': {inner}"))
    })
}

/// Splits a body in two by field name: those `A` takes, and the rest.
pub fn split<A: DeserializeOwned>(
    body: Map<String, Value>,
) -> (Map<String, Value>, Map<String, Value>) {
    let names = field_names::<A>();
    let (mine, rest): (Vec<_>, Vec<_>) = body
        .into_iter()
        .partition(|(k, _)| names.contains(&k.as_str()));
    (mine.into_iter().collect(), rest.into_iter().collect())
}

/// The field names serde gives a struct's `deserialize_struct`.
pub fn field_names<T: DeserializeOwned>() -> &'static [&'static str] {
    let mut names: &'static [&'static str] = &[];
    let _ = T::deserialize(FieldNames(&mut names));
    names
}

/// A deserializer that only records the field list of the struct asked of it.
struct FieldNames<'a>(&'a mut &'static [&'static str]);

impl<'de> de::Deserializer<'de> for FieldNames<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("not a struct"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(de::Error::custom("only the names were wanted"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Debug, serde::Deserialize)]
    struct Sample {
        #[allow(dead_code)]
        max_tokens: Option<i64>,
        #[allow(dead_code)]
        model: String,
    }

    fn object(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn param(r: Result<(), ApiError>) -> Option<String> {
        r.unwrap_err().body().param.clone()
    }

    #[test]
    fn field_names_come_from_the_type() {
        assert_eq!(field_names::<Sample>(), ["max_tokens", "model"]);
    }

    #[test]
    fn unknown_fields_are_refused_by_name_and_harmless_ones_pass() {
        let known = [field_names::<Sample>()];
        assert!(
            screen(
                &object(json!({"model": "m", "user": "u", "store": false})),
                &known
            )
            .is_ok()
        );
        let err = screen(&object(json!({"model": "m", "max_token": 5})), &known).unwrap_err();
        assert_eq!(err.body().param.as_deref(), Some("max_token"));
        assert!(
            err.body()
                .message
                .contains("Unrecognized request argument supplied: max_token")
        );
        for refused in [
            json!({"response_format": {"type": "json_object"}}),
            json!({"tools": [{"type": "function"}]}),
            json!({"tool_choice": "auto"}),
        ] {
            let name = refused.as_object().unwrap().keys().next().unwrap().clone();
            assert_eq!(param(screen(&object(refused), &known)), Some(name));
        }
        for plain in [
            json!({"response_format": {"type": "text"}}),
            json!({"tools": []}),
            json!({"tool_choice": "none"}),
        ] {
            assert!(screen(&object(plain), &known).is_ok());
        }
    }

    #[test]
    fn type_errors_and_missing_fields_name_the_field() {
        let err = parse::<Sample>(object(json!({"model": "m", "max_tokens": "x"}))).unwrap_err();
        assert_eq!(err.body().param.as_deref(), Some("max_tokens"));
        let err = parse::<Sample>(object(json!({"max_tokens": 3}))).unwrap_err();
        assert_eq!(err.body().param.as_deref(), Some("model"));
    }
}
