//! The routes of `external.metrics.k8s.io/v1beta1`: discovery, and one collection per
//! metric per namespace holding a value per cluster whose labels match the selector.
//! Errors are Kubernetes `Status` objects, as the HPA and kubectl expect.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use infinite_llm_protocol::gmanager::PoolView;
use k8s_openapi::jiff::{Timestamp, Unit};
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::warn;

use super::auth::{AuthError, Authenticator, Caller};
use super::selector::Selector;
use super::tls::Peer;
use super::{GROUP, Metric, VERSION};
use crate::gmanager::GManager;
use crate::names::CLUSTER_LABEL;

#[derive(Clone)]
struct AppState {
    gmanager: GManager,
    auth: Arc<Authenticator>,
}

pub fn router(gmanager: GManager, auth: Authenticator) -> Router {
    let group_version = format!("/apis/{GROUP}/{VERSION}");
    Router::new()
        .route("/apis", get(group_list))
        .route(&format!("/apis/{GROUP}"), get(group))
        .route(&group_version, get(resources))
        .route(
            &format!("{group_version}/namespaces/{{namespace}}/{{metric}}"),
            get(values),
        )
        .fallback(|| async { status(StatusCode::NOT_FOUND, "NotFound", "no such path") })
        .with_state(AppState {
            gmanager,
            auth: Arc::new(auth),
        })
}

fn group_version_doc() -> Value {
    json!({"groupVersion": format!("{GROUP}/{VERSION}"), "version": VERSION})
}

fn group_doc() -> Value {
    json!({
        "name": GROUP,
        "versions": [group_version_doc()],
        "preferredVersion": group_version_doc(),
    })
}

async fn group_list(
    State(s): State<AppState>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
) -> Response {
    discovery(
        &s,
        &peer,
        &headers,
        || json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [group_doc()]}),
    )
    .await
}

async fn group(
    State(s): State<AppState>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
) -> Response {
    discovery(&s, &peer, &headers, || {
        let mut doc = group_doc();
        doc["kind"] = json!("APIGroup");
        doc["apiVersion"] = json!("v1");
        doc
    })
    .await
}

async fn resources(
    State(s): State<AppState>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
) -> Response {
    discovery(&s, &peer, &headers, || {
        let resources: Vec<Value> = Metric::ALL
            .iter()
            .map(|m| {
                json!({
                    "name": m.name(),
                    "singularName": "",
                    "namespaced": true,
                    "kind": "ExternalMetricValueList",
                    "verbs": ["get"],
                })
            })
            .collect();
        json!({
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": format!("{GROUP}/{VERSION}"),
            "resources": resources,
        })
    })
    .await
}

/// Discovery names only the metrics, so any authenticated caller may read it.
async fn discovery(
    s: &AppState,
    peer: &Peer,
    headers: &HeaderMap,
    doc: impl FnOnce() -> Value,
) -> Response {
    match s
        .auth
        .authenticate(peer.verified_name.as_deref(), headers)
        .await
    {
        Ok(Some(_)) => Json(doc()).into_response(),
        Ok(None) => unauthorized(),
        Err(error) => auth_failed(&error),
    }
}

#[derive(Deserialize)]
struct ListParams {
    #[serde(rename = "labelSelector", default)]
    label_selector: String,
}

async fn values(
    State(s): State<AppState>,
    Extension(peer): Extension<Peer>,
    Path((namespace, metric_name)): Path<(String, String)>,
    Query(params): Query<ListParams>,
    headers: HeaderMap,
) -> Response {
    let user = match s
        .auth
        .authenticate(peer.verified_name.as_deref(), &headers)
        .await
    {
        Ok(Some(Caller::User(user))) => user,
        Ok(Some(Caller::FrontProxy) | None) => return unauthorized(),
        Err(error) => return auth_failed(&error),
    };
    match s.auth.authorize(&user, &namespace, &metric_name).await {
        Ok(true) => {}
        Ok(false) => {
            return status(
                StatusCode::FORBIDDEN,
                "Forbidden",
                &format!(
                    "{} may not list {metric_name}.{GROUP} in namespace {namespace}",
                    user.name
                ),
            );
        }
        Err(error) => return auth_failed(&error),
    }
    let Some(metric) = Metric::from_name(&metric_name) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("no external metric {metric_name}"),
        );
    };
    let selector = match Selector::parse(&params.label_selector) {
        Ok(s) => s,
        Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
    };
    let prefix = format!("{namespace}/");
    let clusters: Vec<(String, PoolView)> = s
        .gmanager
        .clusters()
        .into_iter()
        .filter_map(|key| {
            let name = key.strip_prefix(&prefix)?.to_owned();
            Some((name, s.gmanager.pool(&key)?))
        })
        .collect();
    let now = Timestamp::now()
        .round(Unit::Second)
        .unwrap_or_else(|_| Timestamp::now());
    Json(value_list(metric, &clusters, &selector, now)).into_response()
}

/// The `ExternalMetricValueList` of `metric` over the clusters whose labels match.
fn value_list(
    metric: Metric,
    clusters: &[(String, PoolView)],
    selector: &Selector,
    now: Timestamp,
) -> Value {
    let items: Vec<Value> = clusters
        .iter()
        .filter_map(|(name, view)| {
            let labels = BTreeMap::from([(CLUSTER_LABEL.to_owned(), name.clone())]);
            selector.matches(&labels).then(|| {
                json!({
                    "metricName": metric.name(),
                    "metricLabels": labels,
                    "timestamp": now.to_string(),
                    "value": quantity(metric.milli_value(view)),
                })
            })
        })
        .collect();
    json!({
        "kind": "ExternalMetricValueList",
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "metadata": {},
        "items": items,
    })
}

/// Thousandths as a quantity: whole numbers plain, others in milli-units ("92500m").
fn quantity(milli: u128) -> String {
    if milli.is_multiple_of(1000) {
        (milli / 1000).to_string()
    } else {
        format!("{milli}m")
    }
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    });
    (code, Json(body)).into_response()
}

fn unauthorized() -> Response {
    status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized")
}

/// The API server could not answer a review: the caller may retry.
fn auth_failed(error: &AuthError) -> Response {
    warn!(%error, "could not check a metrics API caller");
    let mut response = status(
        StatusCode::SERVICE_UNAVAILABLE,
        "ServiceUnavailable",
        "cannot check the caller's identity or access right now",
    );
    response
        .headers_mut()
        .insert("retry-after", axum::http::HeaderValue::from_static("1"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use infinite_llm_protocol::gmanager::PoolFigures;

    fn view(total: u64, used: u64) -> PoolView {
        PoolView {
            epoch: 1,
            block_tokens: 16,
            workers: Vec::new(),
            totals: PoolFigures {
                total_blocks: total,
                used_blocks: used,
                ..PoolFigures::default()
            },
            debtors: Vec::new(),
            creditors: Vec::new(),
            debts: Vec::new(),
            planned_moves: Vec::new(),
            moves_in_flight: Vec::new(),
            epoch_history: Vec::new(),
        }
    }

    #[test]
    fn a_value_per_matching_cluster() {
        let clusters = vec![("a".to_owned(), view(8, 6)), ("b".to_owned(), view(3, 1))];
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let all = value_list(
            Metric::PoolUsedPercent,
            &clusters,
            &Selector::default(),
            now,
        );
        assert_eq!(all["kind"], "ExternalMetricValueList");
        assert_eq!(all["items"].as_array().unwrap().len(), 2);
        let a = Selector::parse("infinitellm.io/cluster=a").unwrap();
        let one = value_list(Metric::PoolUsedPercent, &clusters, &a, now);
        let items = one["items"].as_array().unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0]["value"], "75");
        assert_eq!(items[0]["metricName"], "ilm_pool_used_percent");
        assert_eq!(items[0]["metricLabels"]["infinitellm.io/cluster"], "a");
        assert_eq!(items[0]["timestamp"], "2027-01-15T08:00:00Z");
        let b = Selector::parse("infinitellm.io/cluster=b").unwrap();
        let one = value_list(Metric::PoolUsedPercent, &clusters, &b, now);
        assert_eq!(one["items"][0]["value"], "33333m");
    }

    #[test]
    fn quantities_are_canonical() {
        assert_eq!(quantity(80_000), "80");
        assert_eq!(quantity(92_500), "92500m");
        assert_eq!(quantity(0), "0");
    }
}
