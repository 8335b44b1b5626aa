//! Writes a child only when it differs from what the API server holds.
//!
//! A desired object "is in place" when every field we set has the same value on the server
//! (the server adds defaults, which we ignore). A fingerprint of the desired object rides
//! along as an annotation, so that a field we stop setting also counts as a difference.
//! Only then is the object server-side applied; an unchanged cluster costs reads only.

use std::fmt::Debug;

use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::Error;
use crate::metrics::Metrics;
use crate::names::FIELD_MANAGER;

const FINGERPRINT: &str = "infinitellm.io/desired-fingerprint";

/// What `ensure` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome<K> {
    Unchanged(K),
    Created(K),
    Updated { before: K, after: K },
}

impl<K> Outcome<K> {
    pub fn object(&self) -> &K {
        match self {
            Outcome::Unchanged(k) | Outcome::Created(k) => k,
            Outcome::Updated { after, .. } => after,
        }
    }
}

/// Makes the server hold `desired`, writing only when it does not yet.
pub async fn ensure<K>(api: &Api<K>, mut desired: K, metrics: &Metrics) -> Result<Outcome<K>, Error>
where
    K: Resource<DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned,
{
    let fingerprint = fingerprint(&serde_json::to_value(&desired).map_err(Error::Serialize)?);
    desired
        .annotations_mut()
        .insert(FINGERPRINT.to_owned(), fingerprint);
    let name = desired.name_any();
    let current = api
        .get_opt(&name)
        .await
        .map_err(Error::kube("get", K::kind(&())))?;
    if let Some(current) = &current {
        let want = serde_json::to_value(&desired).map_err(Error::Serialize)?;
        let have = serde_json::to_value(current).map_err(Error::Serialize)?;
        if covers(&have, &want) {
            return Ok(Outcome::Unchanged(current.clone()));
        }
    }
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let after = api
        .patch(&name, &params, &Patch::Apply(&desired))
        .await
        .map_err(Error::kube("apply", K::kind(&())))?;
    metrics.write(&K::kind(&()));
    Ok(match current {
        Some(before) => Outcome::Updated { before, after },
        None => Outcome::Created(after),
    })
}

/// Whether `have` holds every value `want` sets. Empty lists and maps in `want` match
/// absent ones, because the server drops them; resource quantities match by value,
/// because the server rewrites them in canonical form ("1000m" comes back as "1").
pub fn covers(have: &Value, want: &Value) -> bool {
    covers_under(have, want, None)
}

fn covers_under(have: &Value, want: &Value, key: Option<&str>) -> bool {
    match (have, want) {
        (_, Value::Null) => true,
        (Value::Object(h), Value::Object(w)) => {
            let quantities = matches!(key, Some("limits" | "requests"));
            w.iter().all(|(k, wv)| match (h.get(k), wv) {
                (Some(Value::String(hq)), Value::String(wq)) if quantities => same_quantity(hq, wq),
                (Some(hv), _) => covers_under(hv, wv, Some(k)),
                (None, _) => is_empty(wv),
            })
        }
        (Value::Array(h), Value::Array(w)) => {
            h.len() == w.len() && h.iter().zip(w).all(|(hv, wv)| covers_under(hv, wv, key))
        }
        (Value::Null, w) => is_empty(w),
        (h, w) => h == w,
    }
}

fn same_quantity(a: &str, b: &str) -> bool {
    match (quantity(a), quantity(b)) {
        (Some(x), Some(y)) => (x - y).abs() <= 1e-12 * x.abs().max(y.abs()),
        _ => a == b,
    }
}

/// The value of a Kubernetes quantity ("512Mi", "1.5", "250m", "1e3").
fn quantity(s: &str) -> Option<f64> {
    const SUFFIXES: &[(&str, f64)] = &[
        ("Ki", 1024.0),
        ("Mi", 1048576.0),
        ("Gi", 1073741824.0),
        ("Ti", 1099511627776.0),
        ("Pi", 1125899906842624.0),
        ("Ei", 1152921504606846976.0),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    let (number, scale) = SUFFIXES
        .iter()
        .find_map(|(suffix, scale)| Some((s.strip_suffix(suffix)?, *scale)))
        .unwrap_or((s, 1.0));
    number.parse::<f64>().ok().map(|n| n * scale)
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// FNV-1a over the canonical JSON: stable across builds, unlike std's hasher.
fn fingerprint(v: &Value) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in v.to_string().bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn server_defaults_do_not_count_as_changes() {
        let want = json!({"spec": {"replicas": 2, "ports": [{"port": 80}], "extra": []}});
        let have = json!({"spec": {"replicas": 2, "ports": [{"port": 80, "protocol": "TCP"}], "default": 1}});
        assert!(covers(&have, &want));
    }

    #[test]
    fn changed_or_missing_values_count() {
        let want = json!({"spec": {"replicas": 3}});
        assert!(!covers(&json!({"spec": {"replicas": 2}}), &want));
        assert!(!covers(&json!({"spec": {}}), &want));
        let want = json!({"ports": [{"port": 80}]});
        assert!(!covers(
            &json!({"ports": [{"port": 80}, {"port": 81}]}),
            &want
        ));
    }

    #[test]
    fn quantities_match_by_value_only_in_resource_lists() {
        let want = json!({"resources": {"limits": {"cpu": "1000m", "memory": "1Gi"}}});
        let have = json!({"resources": {"limits": {"cpu": "1", "memory": "1073741824"}}});
        assert!(covers(&have, &want));
        let have = json!({"resources": {"limits": {"cpu": "2", "memory": "1Gi"}}});
        assert!(!covers(&have, &want));
        assert!(!covers(&json!({"env": "1"}), &json!({"env": "1.0"})));
        assert_eq!(quantity("1e3"), Some(1000.0));
        assert_eq!(quantity("250m"), Some(0.25));
        assert_eq!(quantity("lots"), None);
    }

    #[test]
    fn fingerprints_follow_content() {
        assert_eq!(fingerprint(&json!({"a": 1})), fingerprint(&json!({"a": 1})));
        assert_ne!(fingerprint(&json!({"a": 1})), fingerprint(&json!({"a": 2})));
    }
}
