//! The per-cluster token workers present to the gManager and to each other.
//!
//! It is generated once, when its Secret is first created, and afterwards only ever read
//! back from the Secret: regenerating it would cut running workers off from each other.
//! Neither the token nor the Secret holding it is ever logged.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use rand::TryRngCore;
use rand::rngs::OsRng;

use crate::crd::InfiniteLLMCluster;
use crate::names::{Names, TOKEN_KEY};

/// 256 random bits, hex encoded so it can travel in an HTTP header unchanged.
pub fn generate() -> Result<String, rand::rand_core::OsError> {
    let mut bytes = [0u8; 32];
    OsRng.try_fill_bytes(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The token Secret holding `token`, which is either freshly generated or read back from
/// the existing Secret.
pub fn secret(ilc: &InfiniteLLMCluster, names: &Names, token: ByteString) -> Secret {
    Secret {
        metadata: crate::children::metadata(ilc, names.token_secret(), &names.labels()),
        type_: Some("Opaque".to_owned()),
        data: Some(BTreeMap::from([(TOKEN_KEY.to_owned(), token)])),
        ..Secret::default()
    }
}

/// The token an existing Secret holds, if it holds one.
pub fn existing(secret: &Secret) -> Option<ByteString> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(TOKEN_KEY))
        .filter(|t| !t.0.is_empty())
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_and_distinct() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
