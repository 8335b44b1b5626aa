//! The `InfiniteLLMCluster` custom resource: what users write, and the status we report.
//!
//! Validation lives in the schema and in CEL rules so that the API server refuses bad specs
//! with a message, before the reconciler ever sees them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Port of the worker-to-worker transport; fixed so that the NetworkPolicy and the peer
/// Service can name it.
pub const PEER_PORT: i32 = 8101;

/// One pool of workers serving a single model.
// Several printer columns repeat the same keys, which clippy mistakes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "infinitellm.io",
    version = "v1alpha1",
    kind = "InfiniteLLMCluster",
    plural = "infinitellmclusters",
    shortname = "ilc",
    namespaced,
    status = "InfiniteLLMClusterStatus",
    derive = "PartialEq",
    doc = "A pool of Infinite-LLM workers that serve one model and share their KV cache",
    scale(
        spec_replicas_path = ".spec.workers.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        json_path = ".status.readyReplicas",
        description = "Workers that pass their readiness probe"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".spec.workers.replicas",
        description = "Desired workers"
    ),
    printcolumn(
        name = "Pool Used %",
        type_ = "integer",
        json_path = ".status.pool.usedPercent",
        description = "Percent of the pool's KV blocks that hold KV, for their own worker or lent"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.kvCache.transport != 'nccl' || self.workers.gpusPerWorker > 0").message("kvCache.transport nccl needs GPU workers (workers.gpusPerWorker > 0)"))]
pub struct InfiniteLLMClusterSpec {
    pub model: ModelSpec,
    pub workers: WorkersSpec,
    #[serde(default)]
    pub kv_cache: KvCacheSpec,
    #[serde(default)]
    pub scheduling: SchedulingSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
    #[serde(default)]
    #[x_kube(validation = Rule::new("self.port != 8101").message("api.port must differ from the peer port 8101"))]
    pub api: ApiSpec,
}

/// The model every worker loads.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// Name clients pass as `model` in OpenAI requests.
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$')").message("model.servedName must be 1-128 characters of letters, digits and ._:/- starting with a letter or digit"))]
    pub served_name: String,
    pub source: ModelSource,
}

/// Where the model folder (config.json, *.safetensors, tokenizer.json) comes from; exactly
/// one of the four.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.pvc), has(self.hostPath), has(self.image), has(self.demo)].filter(x, x).size() == 1").message("model.source must set exactly one of pvc, hostPath, image or demo"))]
pub struct ModelSource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<PvcSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<HostPathSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub demo: Option<DemoSource>,
}

/// The small random-weight demo model, which each worker writes at start into a volume of
/// its own: nothing to download or prepare, for trying the operator out (its text is
/// gibberish).
#[derive(JsonSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct DemoSource {}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PvcSource {
    #[schemars(length(min = 1))]
    pub claim_name: String,
    /// Folder of the model inside the volume; the volume root when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("!self.startsWith('/') && !self.contains('..')").message("model.source.pvc.path must be relative and must not contain '..'"))]
    pub path: Option<String>,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HostPathSource {
    /// Absolute folder of the model on every node that may run a worker.
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("model.source.hostPath.path must be an absolute path"))]
    pub path: String,
}

/// An OCI image (or artifact) mounted read-only as an image volume.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ImageSource {
    #[schemars(length(min = 1))]
    pub reference: String,
    /// Folder of the model inside the image; the image root when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("!self.startsWith('/') && !self.contains('..')").message("model.source.image.path must be relative and must not contain '..'"))]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_policy: Option<PullPolicy>,
}

#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// The worker StatefulSet: how many, on what, and where.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkersSpec {
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1024))]
    pub replicas: i32,
    /// GPUs per worker: 1, or 0 for the CPU backend. A worker drives one GPU, so more would
    /// only be held idle.
    #[serde(default = "default_gpus")]
    #[schemars(range(min = 0))]
    #[x_kube(validation = Rule::new("self <= 1").message("workers.gpusPerWorker must be 0 or 1: a worker uses one GPU; run more workers for more GPUs"))]
    pub gpus_per_worker: i32,
    #[schemars(length(min = 1))]
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    /// CPU and memory for each worker; GPU limits come from gpusPerWorker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Time a worker gets to drain (finish its requests, take back its loans) before it is
    /// killed; the worker itself gives up 5 s before, so that it still leaves the pool cleanly.
    #[serde(default = "default_grace")]
    #[schemars(range(min = 30, max = 3600))]
    pub termination_grace_period_seconds: i64,
}

fn default_replicas() -> i32 {
    1
}

fn default_gpus() -> i32 {
    1
}

fn default_grace() -> i64 {
    300
}

/// Paged KV cache and pooling knobs, passed to every worker.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KvCacheSpec {
    /// Tokens per KV block; a power of two.
    #[serde(default = "default_block_tokens")]
    #[x_kube(validation = Rule::new("self in [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]").message("kvCache.blockTokens must be a power of two between 1 and 1024"))]
    pub block_tokens: i32,
    /// Share of free GPU memory given to the KV cache, in (0, 1].
    #[serde(default = "default_gpu_memory_fraction")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 1.0").message("kvCache.gpuMemoryFraction must be in (0, 1]"))]
    pub gpu_memory_fraction: f64,
    /// Most of its blocks a worker lends to others, in [0, 1].
    #[serde(default = "default_lend_fraction")]
    #[x_kube(validation = Rule::new("self >= 0.0 && self <= 1.0").message("kvCache.lendFraction must be in [0, 1]"))]
    pub lend_fraction: f64,
    /// Cap on KV blocks per worker; sized from memory when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_blocks: Option<i64>,
    /// How attention's queries and partial outputs travel between workers: `auto` (NCCL
    /// between GPU workers, TCP otherwise), `tcp`, or `nccl` (a worker without it refuses to
    /// start).
    #[serde(default)]
    pub transport: Transport,
}

#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    #[default]
    Auto,
    Tcp,
    Nccl,
}

impl Transport {
    /// The worker's `--transport` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Auto => "auto",
            Transport::Tcp => "tcp",
            Transport::Nccl => "nccl",
        }
    }
}

impl Default for KvCacheSpec {
    fn default() -> Self {
        KvCacheSpec {
            block_tokens: default_block_tokens(),
            gpu_memory_fraction: default_gpu_memory_fraction(),
            lend_fraction: default_lend_fraction(),
            max_blocks: None,
            transport: Transport::default(),
        }
    }
}

fn default_block_tokens() -> i32 {
    16
}

fn default_gpu_memory_fraction() -> f64 {
    0.9
}

fn default_lend_fraction() -> f64 {
    0.5
}

/// How each worker shares a step between requests, and how long a request may wait for KV
/// blocks. Decodes go first, then prefill chunks, short prompts ahead of long ones; a request's
/// KV grows as its tokens arrive (nothing is reserved for `max_tokens`).
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SchedulingSpec {
    /// Most tokens (decodes plus prefill chunks) in one engine step.
    #[serde(default = "default_max_batched_tokens")]
    #[schemars(range(min = 1, max = 1048576))]
    pub max_batched_tokens: i32,
    /// A prompt with more tokens than this left to prefill is long: short ones go ahead of it.
    #[serde(default = "default_long_prefill_tokens")]
    #[schemars(range(min = 1))]
    pub long_prefill_tokens: i32,
    /// The most of a step's token budget one long prefill takes while other requests want
    /// the step, in (0, 1].
    #[serde(default = "default_long_prefill_share")]
    #[x_kube(validation = Rule::new("self > 0.0 && self <= 1.0").message("scheduling.longPrefillShare must be in (0, 1]"))]
    pub long_prefill_share: f64,
    /// The most attention (query, key) pairs one long prefill chunk does in a step shared
    /// with other requests, so steps stay short deep into a long context (0: no bound).
    #[serde(default = "default_long_prefill_pairs")]
    #[schemars(range(min = 0))]
    pub long_prefill_pairs: i64,
    /// How long a request may wait for KV blocks before it gets a retryable 503.
    #[serde(default = "default_queue_timeout")]
    #[schemars(range(min = 1, max = 3600))]
    pub queue_timeout_seconds: i32,
}

impl Default for SchedulingSpec {
    fn default() -> Self {
        SchedulingSpec {
            max_batched_tokens: default_max_batched_tokens(),
            long_prefill_tokens: default_long_prefill_tokens(),
            long_prefill_share: default_long_prefill_share(),
            long_prefill_pairs: default_long_prefill_pairs(),
            queue_timeout_seconds: default_queue_timeout(),
        }
    }
}

/// The worker's defaults (`StepRule::default()`).
fn default_max_batched_tokens() -> i32 {
    infinite_llm_policy::StepRule::default().max_batched_tokens as i32
}

fn default_long_prefill_tokens() -> i32 {
    infinite_llm_policy::StepRule::default().long_prefill_tokens as i32
}

fn default_long_prefill_share() -> f64 {
    infinite_llm_policy::StepRule::default().long_prefill_share
}

fn default_long_prefill_pairs() -> i64 {
    infinite_llm_policy::StepRule::default().long_prefill_pairs as i64
}

fn default_queue_timeout() -> i32 {
    60
}

/// Autoscaling: the operator creates and owns a HorizontalPodAutoscaler that drives the
/// cluster's scale subresource from the pool figures it serves on the external metrics API.
/// Without this block no HPA exists and `kubectl scale` stays the user's.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("autoscaling.minReplicas must be <= autoscaling.maxReplicas"))]
pub struct AutoscalingSpec {
    #[schemars(range(min = 1, max = 1024))]
    pub min_replicas: i32,
    #[schemars(range(min = 1, max = 1024))]
    pub max_replicas: i32,
    /// Pool use (percent of all KV blocks holding KV, as status.pool.usedPercent) the
    /// autoscaler aims for.
    #[serde(default = "default_target_utilization")]
    #[schemars(range(min = 1, max = 100))]
    pub target_pool_utilization_percent: i32,
    /// Requests waiting for room, per worker, the autoscaler also aims for; the pool's use
    /// alone drives it when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub target_waiting_requests_per_worker: Option<i32>,
    /// Seconds the figures must call for more workers before a scale-up (0: at once).
    #[serde(default)]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_up_stabilization_seconds: i32,
    /// Seconds the figures must allow fewer workers before a scale-in. Workers leave one at
    /// a time, at most one per terminationGracePeriodSeconds, each draining first.
    #[serde(default = "default_scale_down_stabilization")]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_down_stabilization_seconds: i32,
}

fn default_target_utilization() -> i32 {
    80
}

fn default_scale_down_stabilization() -> i32 {
    300
}

/// The OpenAI-compatible API the client Service exposes.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ApiSpec {
    #[serde(default = "default_api_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_type: Option<ServiceType>,
    /// Secret key holding the API key clients must present; the API is open when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret: Option<SecretKeyRef>,
}

impl Default for ApiSpec {
    fn default() -> Self {
        ApiSpec {
            port: default_api_port(),
            service_type: None,
            api_key_secret: None,
        }
    }
}

fn default_api_port() -> i32 {
    8000
}

#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceType {
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    #[schemars(length(min = 1))]
    pub name: String,
    #[schemars(length(min = 1))]
    pub key: String,
}

/// What the operator observed; written only through the status subresource.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InfiniteLLMClusterStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub replicas: i32,
    #[serde(default)]
    pub ready_replicas: i32,
    /// Label selector of the worker Pods, for the scale subresource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// KV block totals across the pool, as the gManager last reported them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolStatus>,
    /// Bumped by the gManager on every membership change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub membership_epoch: Option<i64>,
}

#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Progressing,
    Ready,
    Degraded,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PoolStatus {
    /// Live workers the gManager sums over.
    #[serde(default)]
    pub workers: i64,
    pub total_blocks: i64,
    /// Held by each worker's own requests.
    pub used_blocks: i64,
    /// Held for requests homed on another worker.
    pub lent_blocks: i64,
    /// Held on other workers for each worker's requests.
    pub borrowed_blocks: i64,
    /// usedBlocks plus lentBlocks, as a rounded percent of totalBlocks.
    #[serde(default)]
    pub used_percent: i64,
}

/// The CRD as YAML, exactly as `crds/infinitellmclusters.infinitellm.io.yaml` holds it.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(&InfiniteLLMCluster::crd())
}

/// The chart's copy of the CRD, cert-manager style: a template (so `helm upgrade` upgrades
/// it too) installed with `crds.enabled` and left in place on uninstall with `crds.keep`.
const CHART_CRD_TEMPLATE: &str = r#"{{- /* Generated by `make crds` from operator/src/crd.rs, as crds/ is; do not edit. */}}
{{- if .Values.crds.enabled }}
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: @NAME@
  labels:
    {{- include "infinite-llm.labels" . | nindent 4 }}
  {{- if .Values.crds.keep }}
  annotations:
    # Uninstalling the operator must not delete every InfiniteLLMCluster with the CRD.
    helm.sh/resource-policy: keep
  {{- end }}
@SPEC@{{- end }}
"#;

/// The CRD as `charts/infinite-llm/templates/crd.yaml` holds it: the same spec as
/// [`crd_yaml`], wrapped in the chart's switches.
pub fn chart_crd_template() -> Result<String, serde_yaml::Error> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinitionSpec;
    #[derive(Serialize)]
    struct SpecOnly<'a> {
        spec: &'a CustomResourceDefinitionSpec,
    }
    let crd = InfiniteLLMCluster::crd();
    let spec = serde_yaml::to_string(&SpecOnly { spec: &crd.spec })?;
    Ok(CHART_CRD_TEMPLATE
        .replace("@NAME@", InfiniteLLMCluster::crd_name())
        .replace("@SPEC@", &spec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_port_rule_names_the_peer_port() {
        let yaml = crd_yaml().unwrap();
        assert!(yaml.contains(&format!("self.port != {PEER_PORT}")));
    }

    #[test]
    fn defaults_fill_a_minimal_spec() {
        let spec: InfiniteLLMClusterSpec = serde_json::from_value(serde_json::json!({
            "model": {"servedName": "m", "source": {"pvc": {"claimName": "c"}}},
            "workers": {"image": "img"}
        }))
        .unwrap();
        assert_eq!(spec.workers.replicas, 1);
        assert_eq!(spec.workers.gpus_per_worker, 1);
        assert_eq!(spec.kv_cache, KvCacheSpec::default());
        assert_eq!(spec.api.port, 8000);
    }
}
