//! Which cluster a bearer token belongs to. Each cluster has its own token, so the token a
//! worker presents both authenticates it and picks the cluster's ledger. Tokens are never
//! logged, and compared in constant time so their bytes cannot be guessed from timings.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use infinite_llm_protocol::secret::tokens_match;

/// Cluster tokens, shared between the gManager and whoever learns them (the reconciler
/// reads each cluster's Secret; local mode reads a file). Cloning shares the same set.
#[derive(Clone, Default)]
pub struct Tokens {
    by_cluster: Arc<RwLock<BTreeMap<String, String>>>,
}

impl Tokens {
    /// One cluster, as in local mode.
    pub fn single(cluster: &str, token: &str) -> Self {
        let tokens = Tokens::default();
        tokens.set(cluster, token);
        tokens
    }

    /// Accepts `token` for `cluster` from now on, replacing its previous token.
    pub fn set(&self, cluster: &str, token: &str) {
        self.write().insert(cluster.to_owned(), token.to_owned());
    }

    /// Stops accepting the cluster's token.
    pub fn remove(&self, cluster: &str) {
        self.write().remove(cluster);
    }

    /// The cluster whose token was presented. Every token is compared in full, so the time
    /// taken says nothing about which one (if any) matched, or how much of it.
    pub fn cluster_of(&self, presented: &str) -> Option<String> {
        let map = self.by_cluster.read().unwrap_or_else(|e| e.into_inner());
        let mut found = None;
        for (cluster, token) in map.iter() {
            if tokens_match(presented.as_bytes(), token.as_bytes()) {
                found = Some(cluster.clone());
            }
        }
        found
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, String>> {
        // A panic while holding the lock cannot leave the map half-written.
        self.by_cluster.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_selects_its_cluster_only() {
        let tokens = Tokens::single("ns/a", "secret-a");
        tokens.set("ns/b", "secret-b");
        assert_eq!(tokens.cluster_of("secret-a").as_deref(), Some("ns/a"));
        assert_eq!(tokens.cluster_of("secret-b").as_deref(), Some("ns/b"));
        assert_eq!(
            tokens.cluster_of("secret-"),
            None,
            "a prefix is not a match"
        );
        assert_eq!(tokens.cluster_of("secret-ab"), None);
        assert_eq!(tokens.cluster_of(""), None);
    }

    #[test]
    fn tokens_can_be_rotated_and_removed_through_any_clone() {
        let tokens = Tokens::single("c", "old");
        let shared = tokens.clone();
        shared.set("c", "new");
        assert_eq!(tokens.cluster_of("old"), None);
        assert_eq!(tokens.cluster_of("new").as_deref(), Some("c"));
        shared.remove("c");
        assert_eq!(tokens.cluster_of("new"), None);
    }
}
