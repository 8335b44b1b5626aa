//! Reading a streamed `/v1/completions` response: Server-Sent Events, each a JSON chunk, then
//! `data: [DONE]`.

use serde::Deserialize;

use crate::error::Error;

/// Splits a byte stream into the data of its events; keep-alive comments carry nothing.
#[derive(Debug, Default)]
pub struct SseDecoder {
    pending: Vec<u8>,
    data: String,
}

impl SseDecoder {
    /// Feeds bytes as they arrive; returns the data of every event they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<String>, Error> {
        self.pending.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = self.pending.drain(..=end).collect();
            let line = std::str::from_utf8(&raw)?.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if !self.data.is_empty() {
                    events.push(std::mem::take(&mut self.data));
                }
            } else if let Some(data) = line.strip_prefix("data:") {
                if !self.data.is_empty() {
                    self.data.push('\n');
                }
                self.data.push_str(data.strip_prefix(' ').unwrap_or(data));
            }
        }
        Ok(events)
    }
}

/// One event of the stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A chunk with the number of tokens it carries, and the usage when the server reports it.
    Chunk {
        tokens: usize,
        completion_tokens: Option<usize>,
    },
    Done,
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<Choice>,
    usage: Option<Usage>,
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    text: String,
    logprobs: Option<Logprobs>,
}

#[derive(Deserialize)]
struct Logprobs {
    tokens: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct Usage {
    completion_tokens: usize,
}

/// Tokens are counted from the chunk's `logprobs.tokens` (the replay asks for `logprobs: 0`
/// for this), since a chunk may carry several tokens or none (text held back until a character
/// is complete); without logprobs, a chunk with text counts as one token.
pub fn parse(data: &str) -> Result<Event, Error> {
    if data == "[DONE]" {
        return Ok(Event::Done);
    }
    let chunk: Chunk = serde_json::from_str(data)?;
    if let Some(error) = chunk.error {
        return Err(Error::Server(error.to_string()));
    }
    let tokens = chunk
        .choices
        .iter()
        .map(|c| match &c.logprobs {
            Some(logprobs) => logprobs.tokens.len(),
            None => usize::from(!c.text.is_empty()),
        })
        .sum();
    Ok(Event::Chunk {
        tokens,
        completion_tokens: chunk.usage.map(|u| u.completion_tokens),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_reads_and_keep_alives() {
        let mut sse = SseDecoder::default();
        assert_eq!(
            sse.push(b": keep-alive\n\nda").unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(
            sse.push(b"ta: {\"a\":1}\r\n").unwrap(),
            Vec::<String>::new()
        );
        let events = sse
            .push(b"\r\ndata: x\ndata: y\n\ndata: [DONE]\n\n")
            .unwrap();
        assert_eq!(events, ["{\"a\":1}", "x\ny", "[DONE]"]);
    }

    #[test]
    fn chunks_count_their_tokens() {
        let with_logprobs = r#"{"choices":[{"text":"ab","logprobs":{"tokens":["a","b"]}}]}"#;
        let held_back = r#"{"choices":[{"text":"","logprobs":{"tokens":[]}}]}"#;
        let plain = r#"{"choices":[{"text":"a","finish_reason":null}]}"#;
        let finish = r#"{"choices":[{"text":"","finish_reason":"length"}],"usage":null}"#;
        let usage = r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":9}}"#;
        let chunk = |tokens, completion_tokens| Event::Chunk {
            tokens,
            completion_tokens,
        };
        assert_eq!(parse(with_logprobs).unwrap(), chunk(2, None));
        assert_eq!(parse(held_back).unwrap(), chunk(0, None));
        assert_eq!(parse(plain).unwrap(), chunk(1, None));
        assert_eq!(parse(finish).unwrap(), chunk(0, None));
        assert_eq!(parse(usage).unwrap(), chunk(0, Some(9)));
        assert_eq!(parse("[DONE]").unwrap(), Event::Done);
        let err = parse(r#"{"error":{"message":"engine failed"}}"#).unwrap_err();
        assert!(matches!(err, Error::Server(m) if m.contains("engine failed")));
        assert!(matches!(parse("not json"), Err(Error::Chunk(_))));
    }
}
