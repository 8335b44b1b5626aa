//! The two Services: a headless one that gives each worker a peer DNS name, and the client
//! Service in front of the OpenAI API.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::crd::{InfiniteLLMCluster, PEER_PORT};
use crate::names::Names;

pub fn peer(ilc: &InfiniteLLMCluster, names: &Names) -> Service {
    Service {
        metadata: super::metadata(ilc, names.peer_service(), &names.labels()),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            selector: Some(names.selector_labels()),
            // Workers must find each other while they start, before they are Ready.
            publish_not_ready_addresses: Some(true),
            ports: Some(vec![
                port("peer", PEER_PORT, "peer"),
                port("http", ilc.spec.api.port, "http"),
            ]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

pub fn client(ilc: &InfiniteLLMCluster, names: &Names) -> Service {
    Service {
        metadata: super::metadata(ilc, names.client_service(), &names.labels()),
        spec: Some(ServiceSpec {
            type_: Some(
                ilc.spec
                    .api
                    .service_type
                    .map_or("ClusterIP", |t| t.as_str())
                    .to_owned(),
            ),
            selector: Some(names.selector_labels()),
            ports: Some(vec![port("http", ilc.spec.api.port, "http")]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

fn port(name: &str, port: i32, target_name: &str) -> ServicePort {
    ServicePort {
        name: Some(name.to_owned()),
        port,
        target_port: Some(IntOrString::String(target_name.to_owned())),
        protocol: Some("TCP".to_owned()),
        ..ServicePort::default()
    }
}
