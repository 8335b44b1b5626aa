//! The worker StatefulSet: stable names give workers stable ranks and peer DNS names.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, ExecAction,
    HTTPGetAction, HostPathVolumeSource, ImageVolumeSource, Lifecycle, LifecycleHandler,
    ObjectFieldSelector, PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecretKeySelector,
    SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::children::Settings;
use crate::crd::{InfiniteLLMCluster, ModelSource, PEER_PORT};
use crate::names::{Names, TOKEN_KEY};

const WORKER_BIN: &str = "infinite-llm-worker";
const TOKEN_DIR: &str = "/var/run/infinite-llm/token";
const MODEL_DIR: &str = "/models";
const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// The worker image's user (the Dockerfile's `USER 65532:65532`), numeric so that the kubelet
/// can check runAsNonRoot.
const WORKER_UID: i64 = 65532;
/// How much sooner than the Pod's grace period the worker stops waiting for its requests and
/// loans, so that it still leaves the gManager before the kubelet kills it.
const EXIT_MARGIN_SECS: i64 = 5;
/// Seconds the preStop hook keeps the worker serving before it drains: the time kube-proxy
/// and load balancers take to stop sending new requests to a Pod being deleted.
const DRAIN_DELAY_SECS: u32 = 5;

pub fn build(ilc: &InfiniteLLMCluster, names: &Names, settings: &Settings) -> StatefulSet {
    let spec = &ilc.spec;
    let workers = &spec.workers;
    let labels = names.labels();
    StatefulSet {
        metadata: super::metadata(ilc, names.workers(), &labels),
        spec: Some(StatefulSetSpec {
            replicas: Some(workers.replicas),
            selector: names.label_selector(),
            service_name: Some(names.peer_service()),
            // Workers do not depend on each other to start; ranks come from the gManager.
            pod_management_policy: Some("Parallel".to_owned()),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![worker_container(ilc, settings)],
                    volumes: Some(volumes(ilc, names)),
                    termination_grace_period_seconds: Some(
                        workers.termination_grace_period_seconds,
                    ),
                    node_selector: workers.node_selector.clone(),
                    tolerations: workers.tolerations.clone(),
                    affinity: workers.affinity.clone(),
                    priority_class_name: workers.priority_class_name.clone(),
                    // Service env vars would only shadow the ILM_* configuration.
                    enable_service_links: Some(false),
                    // Workers never call the Kubernetes API.
                    automount_service_account_token: Some(false),
                    // What the `restricted` Pod Security Standard asks for.
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(WORKER_UID),
                        run_as_group: Some(WORKER_UID),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".to_owned(),
                            localhost_profile: None,
                        }),
                        ..PodSecurityContext::default()
                    }),
                    ..PodSpec::default()
                }),
            },
            ..StatefulSetSpec::default()
        }),
        status: None,
    }
}

fn worker_container(ilc: &InfiniteLLMCluster, settings: &Settings) -> Container {
    let spec = &ilc.spec;
    let port = spec.api.port;
    let token_file = format!("{TOKEN_DIR}/{TOKEN_KEY}");
    let http_probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("http".to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Probe::default()
    };
    Container {
        name: "worker".to_owned(),
        image: Some(spec.workers.image.clone()),
        image_pull_policy: spec
            .workers
            .image_pull_policy
            .map(|p| p.as_str().to_owned()),
        command: Some(vec![WORKER_BIN.to_owned(), "serve".to_owned()]),
        env: Some(env(ilc, settings, &token_file)),
        ports: Some(vec![
            ContainerPort {
                name: Some("http".to_owned()),
                container_port: port,
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("peer".to_owned()),
                container_port: PEER_PORT,
                ..ContainerPort::default()
            },
        ]),
        resources: Some(resources(
            spec.workers.resources.clone(),
            spec.workers.gpus_per_worker,
        )),
        // Loading a large model can take minutes; liveness must not kill a worker mid-load.
        startup_probe: Some(http_probe("/health", 10, 90)),
        liveness_probe: Some(http_probe("/health", 10, 3)),
        readiness_probe: Some(http_probe("/ready", 5, 2)),
        lifecycle: Some(Lifecycle {
            // The worker hands its KV blocks to peers before it exits, so scale-in fails no request.
            pre_stop: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(vec![
                        WORKER_BIN.to_owned(),
                        "drain".to_owned(),
                        "--port".to_owned(),
                        port.to_string(),
                        "--token-file".to_owned(),
                        token_file.clone(),
                        "--delay-secs".to_owned(),
                        DRAIN_DELAY_SECS.to_string(),
                    ]),
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "token".to_owned(),
                mount_path: TOKEN_DIR.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "model".to_owned(),
                mount_path: MODEL_DIR.to_owned(),
                // The demo model is written there at start.
                read_only: Some(spec.model.source.demo.is_none()),
                ..VolumeMount::default()
            },
        ]),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                add: None,
            }),
            ..SecurityContext::default()
        }),
        // The worker writes why it stopped (a model that does not load, say) to the
        // termination message; a crash that leaves none shows its last log lines instead.
        termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
        ..Container::default()
    }
}

fn env(ilc: &InfiniteLLMCluster, settings: &Settings, token_file: &str) -> Vec<EnvVar> {
    let spec = &ilc.spec;
    let kv = &spec.kv_cache;
    let sched = &spec.scheduling;
    let value = |name: &str, value: String| EnvVar {
        name: name.to_owned(),
        value: Some(value),
        value_from: None,
    };
    let field = |name: &str, path: &str| EnvVar {
        name: name.to_owned(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_owned(),
                api_version: None,
            }),
            ..EnvVarSource::default()
        }),
    };
    let device = if spec.workers.gpus_per_worker > 0 {
        "cuda:0"
    } else {
        "cpu"
    };
    let mut env = vec![
        value("ILM_MODEL", model_dir(&spec.model.source)),
        value("ILM_SERVED_MODEL_NAME", spec.model.served_name.clone()),
        value("ILM_HOST", "0.0.0.0".to_owned()),
        value("ILM_PORT", spec.api.port.to_string()),
        value("ILM_PEER_PORT", PEER_PORT.to_string()),
        value("ILM_DEVICE", device.to_owned()),
        value("ILM_BLOCK_TOKENS", kv.block_tokens.to_string()),
        value(
            "ILM_GPU_MEMORY_FRACTION",
            kv.gpu_memory_fraction.to_string(),
        ),
        value("ILM_LEND_FRACTION", kv.lend_fraction.to_string()),
        value(
            "ILM_MAX_BATCHED_TOKENS",
            sched.max_batched_tokens.to_string(),
        ),
        value(
            "ILM_LONG_PREFILL_TOKENS",
            sched.long_prefill_tokens.to_string(),
        ),
        value(
            "ILM_LONG_PREFILL_SHARE",
            sched.long_prefill_share.to_string(),
        ),
        value(
            "ILM_LONG_PREFILL_PAIRS",
            sched.long_prefill_pairs.to_string(),
        ),
        value(
            "ILM_QUEUE_TIMEOUT_SECS",
            sched.queue_timeout_seconds.to_string(),
        ),
        value("ILM_TRANSPORT", kv.transport.as_str().to_owned()),
        value("ILM_GMANAGER_URL", settings.gmanager_url.clone()),
        value("ILM_TOKEN_FILE", token_file.to_owned()),
        value(
            "ILM_GRACE_PERIOD_SECS",
            (spec.workers.termination_grace_period_seconds - EXIT_MARGIN_SECS).to_string(),
        ),
        field("ILM_WORKER_ID", "metadata.name"),
        // The worker listens on all interfaces, so it must be told the address its peers and
        // the gManager reach it at: its own Pod IP, which NetworkPolicies match on.
        field("ILM_ADVERTISE_HOST", "status.podIP"),
    ];
    if let Some(blocks) = kv.max_blocks {
        env.push(value("ILM_KV_BLOCKS", blocks.to_string()));
    }
    if spec.model.source.demo.is_some() {
        env.push(value("ILM_WRITE_DEMO_MODEL", "true".to_owned()));
    }
    if let Some(key) = &spec.api.api_key_secret {
        env.push(EnvVar {
            name: "ILM_API_KEY".to_owned(),
            value: None,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: key.name.clone(),
                    key: key.key.clone(),
                    optional: None,
                }),
                ..EnvVarSource::default()
            }),
        });
    }
    env
}

/// Where the model folder appears inside the container.
fn model_dir(source: &ModelSource) -> String {
    if source.demo.is_some() {
        return format!("{MODEL_DIR}/demo");
    }
    let sub = source
        .pvc
        .as_ref()
        .and_then(|p| p.path.as_deref())
        .or_else(|| source.image.as_ref().and_then(|i| i.path.as_deref()))
        .map(|p| p.trim_matches('/'))
        .filter(|p| !p.is_empty());
    match sub {
        Some(sub) => format!("{MODEL_DIR}/{sub}"),
        None => MODEL_DIR.to_owned(),
    }
}

/// The user's CPU/memory with the GPU count written over any GPU limit they gave.
fn resources(user: Option<ResourceRequirements>, gpus: i32) -> ResourceRequirements {
    let mut resources = user.unwrap_or_default();
    for map in [&mut resources.limits, &mut resources.requests] {
        if let Some(m) = map.as_mut() {
            m.remove(GPU_RESOURCE);
        }
    }
    if gpus > 0 {
        resources
            .limits
            .get_or_insert_with(BTreeMap::new)
            .insert(GPU_RESOURCE.to_owned(), Quantity(gpus.to_string()));
    }
    resources
}

fn volumes(ilc: &InfiniteLLMCluster, names: &Names) -> Vec<Volume> {
    let source = &ilc.spec.model.source;
    let mut model = Volume {
        name: "model".to_owned(),
        ..Volume::default()
    };
    if let Some(pvc) = &source.pvc {
        model.persistent_volume_claim = Some(PersistentVolumeClaimVolumeSource {
            claim_name: pvc.claim_name.clone(),
            read_only: Some(true),
        });
    } else if let Some(host) = &source.host_path {
        model.host_path = Some(HostPathVolumeSource {
            path: host.path.clone(),
            type_: Some("Directory".to_owned()),
        });
    } else if let Some(image) = &source.image {
        model.image = Some(ImageVolumeSource {
            reference: Some(image.reference.clone()),
            pull_policy: image.pull_policy.map(|p| p.as_str().to_owned()),
        });
    } else if source.demo.is_some() {
        model.empty_dir = Some(EmptyDirVolumeSource::default());
    }
    vec![
        Volume {
            name: "token".to_owned(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(names.token_secret()),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
        model,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::InfiniteLLMClusterSpec;

    fn cluster(spec: serde_json::Value) -> InfiniteLLMCluster {
        let spec: InfiniteLLMClusterSpec = serde_json::from_value(spec).unwrap();
        InfiniteLLMCluster::new("c", spec)
    }

    fn container(sts: &StatefulSet) -> &Container {
        &sts.spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0]
    }

    fn env_value<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
        c.env
            .iter()
            .flatten()
            .find(|e| e.name == name)?
            .value
            .as_deref()
    }

    fn settings() -> Settings {
        Settings {
            gmanager_url: "http://g:8001".into(),
        }
    }

    #[test]
    fn cpu_workers_get_no_gpu_and_the_cpu_device() {
        let ilc = cluster(serde_json::json!({
            "model": {"servedName": "m", "source": {"hostPath": {"path": "/srv/m"}}},
            "workers": {"image": "img", "gpusPerWorker": 0,
                        "resources": {"limits": {"cpu": "2", "nvidia.com/gpu": "4"}}}
        }));
        let sts = build(&ilc, &Names::new("c"), &settings());
        let c = container(&sts);
        assert_eq!(env_value(c, "ILM_DEVICE"), Some("cpu"));
        assert_eq!(env_value(c, "ILM_TRANSPORT"), Some("auto"));
        assert_eq!(env_value(c, "ILM_LONG_PREFILL_SHARE"), Some("0.5"));
        assert_eq!(env_value(c, "ILM_QUEUE_TIMEOUT_SECS"), Some("60"));
        assert_eq!(env_value(c, "ILM_MODEL"), Some("/models"));
        let limits = c.resources.as_ref().unwrap().limits.as_ref().unwrap();
        assert!(
            !limits.contains_key(GPU_RESOURCE),
            "gpusPerWorker overrides user GPU limits"
        );
        assert_eq!(limits["cpu"], Quantity("2".into()));
        let volumes = sts.spec.unwrap().template.spec.unwrap().volumes.unwrap();
        let model = volumes.iter().find(|v| v.name == "model").unwrap();
        assert_eq!(model.host_path.as_ref().unwrap().path, "/srv/m");
    }

    #[test]
    fn workers_advertise_their_pod_ip_and_the_peer_port_they_listen_on() {
        let ilc = cluster(serde_json::json!({
            "model": {"servedName": "m", "source": {"hostPath": {"path": "/srv/m"}}},
            "workers": {"image": "img"}
        }));
        let sts = build(&ilc, &Names::new("c"), &settings());
        let c = container(&sts);
        let field = |name: &str| {
            c.env
                .iter()
                .flatten()
                .find(|e| e.name == name)?
                .value_from
                .as_ref()?
                .field_ref
                .as_ref()
                .map(|f| f.field_path.clone())
        };
        assert_eq!(field("ILM_ADVERTISE_HOST").as_deref(), Some("status.podIP"));
        assert_eq!(env_value(c, "ILM_HOST"), Some("0.0.0.0"));
        let peer = c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some("peer"))
            .unwrap();
        assert_eq!(
            env_value(c, "ILM_PEER_PORT"),
            Some(peer.container_port.to_string().as_str())
        );
        assert_eq!(peer.container_port, PEER_PORT);
    }

    #[test]
    fn worker_pods_meet_the_restricted_pod_security_standard() {
        let ilc = cluster(serde_json::json!({
            "model": {"servedName": "m", "source": {"pvc": {"claimName": "c"}}},
            "workers": {"image": "img", "terminationGracePeriodSeconds": 60}
        }));
        let sts = build(&ilc, &Names::new("c"), &settings());
        let pod = sts.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let ctx = pod.security_context.as_ref().unwrap();
        assert_eq!(ctx.run_as_non_root, Some(true));
        assert_eq!(ctx.run_as_user, Some(WORKER_UID));
        assert_eq!(
            ctx.seccomp_profile.as_ref().map(|p| p.type_.as_str()),
            Some("RuntimeDefault")
        );
        assert_eq!(pod.automount_service_account_token, Some(false));
        let c = container(&sts);
        let cctx = c.security_context.as_ref().unwrap();
        assert_eq!(cctx.allow_privilege_escalation, Some(false));
        assert_eq!(
            cctx.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_owned()][..])
        );
        assert_eq!(
            c.termination_message_policy.as_deref(),
            Some("FallbackToLogsOnError")
        );
        // The worker gives up before the kubelet kills it.
        assert_eq!(env_value(c, "ILM_GRACE_PERIOD_SECS"), Some("55"));
    }

    #[test]
    fn the_demo_source_gives_each_worker_a_volume_to_write_the_model_into() {
        let ilc = cluster(serde_json::json!({
            "model": {"servedName": "m", "source": {"demo": {}}},
            "workers": {"image": "img", "gpusPerWorker": 0}
        }));
        let sts = build(&ilc, &Names::new("c"), &settings());
        let c = container(&sts);
        assert_eq!(env_value(c, "ILM_MODEL"), Some("/models/demo"));
        assert_eq!(env_value(c, "ILM_WRITE_DEMO_MODEL"), Some("true"));
        let mount = c
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == "model")
            .unwrap();
        assert_eq!(mount.read_only, Some(false));
        let volumes = sts.spec.unwrap().template.spec.unwrap().volumes.unwrap();
        let model = volumes.iter().find(|v| v.name == "model").unwrap();
        assert!(model.empty_dir.is_some());
    }

    #[test]
    fn optional_settings_appear_only_when_set() {
        let ilc = cluster(serde_json::json!({
            "model": {"servedName": "m", "source": {"image": {"reference": "r", "path": "/w/"}}},
            "workers": {"image": "img", "gpusPerWorker": 1},
            "kvCache": {"maxBlocks": 100},
            "scheduling": {"maxBatchedTokens": 2048, "longPrefillShare": 1.0, "longPrefillPairs": 0},
            "api": {"port": 9000, "apiKeySecret": {"name": "k", "key": "key"}}
        }));
        let sts = build(&ilc, &Names::new("c"), &settings());
        let c = container(&sts);
        assert_eq!(env_value(c, "ILM_KV_BLOCKS"), Some("100"));
        assert_eq!(env_value(c, "ILM_MAX_BATCHED_TOKENS"), Some("2048"));
        // The worker reads "1" as 1.0: a long prefill may take whole steps.
        assert_eq!(env_value(c, "ILM_LONG_PREFILL_SHARE"), Some("1"));
        assert_eq!(env_value(c, "ILM_LONG_PREFILL_PAIRS"), Some("0"));
        assert_eq!(env_value(c, "ILM_WRITE_DEMO_MODEL"), None);
        assert_eq!(env_value(c, "ILM_MODEL"), Some("/models/w"));
        assert_eq!(env_value(c, "ILM_PORT"), Some("9000"));
        assert_eq!(env_value(c, "ILM_GMANAGER_URL"), Some("http://g:8001"));
        let key = c
            .env
            .iter()
            .flatten()
            .find(|e| e.name == "ILM_API_KEY")
            .unwrap();
        assert_eq!(
            key.value_from
                .as_ref()
                .unwrap()
                .secret_key_ref
                .as_ref()
                .unwrap()
                .name,
            "k"
        );
        let limits = c.resources.as_ref().unwrap().limits.as_ref().unwrap();
        assert_eq!(limits[GPU_RESOURCE], Quantity("1".into()));
        let drain = c.lifecycle.as_ref().unwrap().pre_stop.as_ref().unwrap();
        assert_eq!(
            drain.exec.as_ref().unwrap().command.as_ref().unwrap()[3],
            "9000"
        );
    }
}
