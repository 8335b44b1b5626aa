//! Label selectors in the string form of a `labelSelector` query parameter, as the HPA
//! controller and `kubectl get --raw` send them: `a=b`, `a==b`, `a!=b`, `a in (b,c)`,
//! `a notin (b,c)`, `a`, `!a`, comma-separated and all required.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A parsed selector; the empty one selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector(Vec<Requirement>);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid label selector {selector:?}: {why}")]
pub struct SelectorError {
    selector: String,
    why: &'static str,
}

impl Selector {
    pub fn parse(text: &str) -> Result<Selector, SelectorError> {
        let fail = |why| SelectorError {
            selector: text.to_owned(),
            why,
        };
        let mut requirements = Vec::new();
        for term in split_terms(text).map_err(fail)? {
            let term = term.trim();
            if term.is_empty() {
                if text.trim().is_empty() {
                    continue;
                }
                return Err(fail("empty requirement"));
            }
            requirements.push(requirement(term).map_err(fail)?);
        }
        Ok(Selector(requirements))
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::In(k, values) => labels.get(k).is_some_and(|v| values.contains(v)),
            Requirement::NotIn(k, values) => labels.get(k).is_none_or(|v| !values.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }
}

/// Splits on the commas outside parentheses.
fn split_terms(text: &str) -> Result<Vec<&str>, &'static str> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0u32, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' if depth == 0 => depth = 1,
            '(' => return Err("nested parentheses"),
            ')' if depth == 1 => depth = 0,
            ')' => return Err("unbalanced parentheses"),
            ',' if depth == 0 => {
                terms.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("unbalanced parentheses");
    }
    terms.push(&text[start..]);
    Ok(terms)
}

fn requirement(term: &str) -> Result<Requirement, &'static str> {
    if let Some(key) = term.strip_prefix('!') {
        return Ok(Requirement::DoesNotExist(key_of(key)?));
    }
    if let Some((key, value)) = term.split_once("!=") {
        return Ok(Requirement::NotIn(key_of(key)?, vec![value_of(value)?]));
    }
    if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
        return Ok(Requirement::In(key_of(key)?, vec![value_of(value)?]));
    }
    for (op, negated) in [(" notin ", true), (" in ", false)] {
        if let Some((key, set)) = term.split_once(op) {
            let set = set
                .trim()
                .strip_prefix('(')
                .and_then(|s| s.strip_suffix(')'))
                .ok_or("a set must be in parentheses")?;
            let values = set
                .split(',')
                .map(value_of)
                .collect::<Result<Vec<_>, _>>()?;
            let key = key_of(key)?;
            return Ok(if negated {
                Requirement::NotIn(key, values)
            } else {
                Requirement::In(key, values)
            });
        }
    }
    Ok(Requirement::Exists(key_of(term)?))
}

/// A label key: an optional DNS prefix and `/`, then a name of letters, digits and `-_.`.
fn key_of(key: &str) -> Result<String, &'static str> {
    let key = key.trim();
    let name = key.rsplit_once('/').map_or(key, |(_, name)| name);
    let valid = !name.is_empty()
        && key.len() <= 317
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    valid.then(|| key.to_owned()).ok_or("invalid label key")
}

fn value_of(value: &str) -> Result<String, &'static str> {
    let value = value.trim();
    let valid = value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    valid.then(|| value.to_owned()).ok_or("invalid label value")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn equality_and_sets() {
        let l = labels(&[("infinitellm.io/cluster", "llm")]);
        for (text, expected) in [
            ("", true),
            ("infinitellm.io/cluster=llm", true),
            ("infinitellm.io/cluster==llm", true),
            ("infinitellm.io/cluster=other", false),
            ("infinitellm.io/cluster!=llm", false),
            ("infinitellm.io/cluster!=other", true),
            ("infinitellm.io/cluster in (a, llm)", true),
            ("infinitellm.io/cluster in (a,b)", false),
            ("infinitellm.io/cluster notin (a,b)", true),
            ("infinitellm.io/cluster notin (llm)", false),
            ("infinitellm.io/cluster", true),
            ("!infinitellm.io/cluster", false),
            ("tier", false),
            ("!tier", true),
            ("tier!=gold", true),
            ("infinitellm.io/cluster=llm,tier", false),
            ("infinitellm.io/cluster in (a,llm),!tier", true),
        ] {
            let selector = Selector::parse(text).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(selector.matches(&l), expected, "{text:?}");
        }
    }

    #[test]
    fn malformed_selectors_are_refused() {
        for text in [
            "a in (b",
            "a in b",
            "a=(b)",
            "a,,b",
            "=b",
            "a=b c",
            "a in ((b))",
        ] {
            assert!(Selector::parse(text).is_err(), "{text:?} parsed");
        }
    }
}
