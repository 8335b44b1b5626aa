//! Delegated authentication and authorization, as an aggregated API server does it: the
//! request-header settings kube-apiserver publishes in
//! `kube-system/extension-apiserver-authentication` (read with the
//! `extension-apiserver-authentication-reader` Role), TokenReview for bearer tokens and
//! SubjectAccessReview for every read (both granted by `system:auth-delegator`).

use std::collections::BTreeMap;

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Client;
use kube::api::{Api, PostParams};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use super::{GROUP, VERSION};

const CONFIG_NAMESPACE: &str = "kube-system";
const CONFIG_NAME: &str = "extension-apiserver-authentication";

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("reading {CONFIG_NAMESPACE}/{CONFIG_NAME}: {0}")]
    Config(#[source] kube::Error),
    #[error("{CONFIG_NAMESPACE}/{CONFIG_NAME} key {key}: {why}")]
    ConfigValue { key: &'static str, why: String },
    #[error("TokenReview: {0}")]
    TokenReview(#[source] kube::Error),
    #[error("SubjectAccessReview: {0}")]
    AccessReview(#[source] kube::Error),
}

/// The request-header scheme: which client certificate names may assert a user, and in
/// which headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestHeader {
    client_ca: Vec<CertificateDer<'static>>,
    /// Empty: any name the CA signed.
    allowed_names: Vec<String>,
    username_headers: Vec<String>,
    group_headers: Vec<String>,
    extra_prefixes: Vec<String>,
}

/// What kube-apiserver tells extension servers; without request-header settings only
/// bearer tokens authenticate.
#[derive(Debug, Clone, Default)]
pub struct Delegation {
    request_header: Option<RequestHeader>,
}

impl Delegation {
    pub async fn load(client: &Client) -> Result<Delegation, AuthError> {
        let config = Api::<ConfigMap>::namespaced(client.clone(), CONFIG_NAMESPACE)
            .get(CONFIG_NAME)
            .await
            .map_err(AuthError::Config)?;
        let data = config.data.unwrap_or_default();
        let request_header = RequestHeader::from_config(&data)?;
        if request_header.is_none() {
            tracing::warn!(
                "{CONFIG_NAMESPACE}/{CONFIG_NAME} has no request-header CA: only bearer tokens authenticate"
            );
        }
        Ok(Delegation { request_header })
    }

    /// The CAs client certificates are checked against.
    pub fn client_ca(&self) -> &[CertificateDer<'static>] {
        self.request_header
            .as_ref()
            .map_or(&[], |r| r.client_ca.as_slice())
    }
}

impl RequestHeader {
    fn from_config(data: &BTreeMap<String, String>) -> Result<Option<RequestHeader>, AuthError> {
        let Some(ca) = data.get("requestheader-client-ca-file") else {
            return Ok(None);
        };
        let client_ca = CertificateDer::pem_slice_iter(ca.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| AuthError::ConfigValue {
                key: "requestheader-client-ca-file",
                why: e.to_string(),
            })?;
        let list = |key: &'static str| -> Result<Vec<String>, AuthError> {
            data.get(key).map_or(Ok(Vec::new()), |v| {
                serde_json::from_str(v).map_err(|e| AuthError::ConfigValue {
                    key,
                    why: e.to_string(),
                })
            })
        };
        Ok(Some(RequestHeader {
            client_ca,
            allowed_names: list("requestheader-allowed-names")?,
            username_headers: list("requestheader-username-headers")?,
            group_headers: list("requestheader-group-headers")?,
            extra_prefixes: list("requestheader-extra-headers-prefix")?,
        }))
    }

    /// The user a trusted front proxy asserts, `None` when it names none.
    fn user(&self, headers: &HeaderMap) -> Option<User> {
        let values = |name: &str| {
            headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        let name = self
            .username_headers
            .iter()
            .find_map(|h| values(h).into_iter().find(|v| !v.is_empty()))?;
        let groups = self.group_headers.iter().flat_map(|h| values(h)).collect();
        let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (header, value) in headers {
            let Ok(value) = value.to_str() else { continue };
            let header = header.as_str();
            for prefix in &self.extra_prefixes {
                if let Some(key) = header
                    .get(..prefix.len())
                    .filter(|p| p.eq_ignore_ascii_case(prefix))
                    .map(|_| &header[prefix.len()..])
                {
                    let key = percent_encoding::percent_decode_str(key)
                        .decode_utf8_lossy()
                        .to_lowercase();
                    extra.entry(key).or_default().push(value.to_owned());
                }
            }
        }
        Some(User {
            name,
            uid: None,
            groups,
            extra,
        })
    }

    fn allows(&self, name: &str) -> bool {
        self.allowed_names.is_empty() || self.allowed_names.iter().any(|n| n == name)
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    uid: Option<String>,
    groups: Vec<String>,
    extra: BTreeMap<String, Vec<String>>,
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A user, asserted by a trusted front proxy or proven by a token.
    User(User),
    /// The aggregator itself (its availability checks): trusted, but no user to authorize.
    FrontProxy,
}

/// Authenticates and authorizes requests through the API server.
pub struct Authenticator {
    client: Client,
    delegation: Delegation,
}

impl Authenticator {
    pub fn new(client: Client, delegation: Delegation) -> Self {
        Authenticator { client, delegation }
    }

    /// `verified_name` is the common name of the client certificate the request-header CA
    /// signed, if the connection presented one. `None` when nothing authenticates.
    pub async fn authenticate(
        &self,
        verified_name: Option<&str>,
        headers: &HeaderMap,
    ) -> Result<Option<Caller>, AuthError> {
        if let (Some(name), Some(rh)) = (verified_name, &self.delegation.request_header)
            && rh.allows(name)
        {
            return Ok(Some(
                rh.user(headers).map_or(Caller::FrontProxy, Caller::User),
            ));
        }
        let Some(token) = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
        else {
            return Ok(None);
        };
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: None,
            },
            ..TokenReview::default()
        };
        let answer = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(AuthError::TokenReview)?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Ok(None);
        }
        let info = status.user.unwrap_or_default();
        Ok(info.username.filter(|n| !n.is_empty()).map(|name| {
            Caller::User(User {
                name,
                uid: info.uid,
                groups: info.groups.unwrap_or_default(),
                extra: info.extra.unwrap_or_default(),
            })
        }))
    }

    /// Whether `user` may read `metric` in `namespace`: the `list` a generic API server
    /// would ask about for this collection.
    pub async fn authorize(
        &self,
        user: &User,
        namespace: &str,
        metric: &str,
    ) -> Result<bool, AuthError> {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.name.clone()),
                uid: user.uid.clone(),
                groups: Some(user.groups.clone()),
                extra: Some(user.extra.clone()).filter(|e| !e.is_empty()),
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some(namespace.to_owned()),
                    verb: Some("list".to_owned()),
                    group: Some(GROUP.to_owned()),
                    version: Some(VERSION.to_owned()),
                    resource: Some(metric.to_owned()),
                    ..ResourceAttributes::default()
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let answer = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(AuthError::AccessReview)?;
        Ok(answer.status.is_some_and(|s| s.allowed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_header() -> RequestHeader {
        let data = BTreeMap::from([
            (
                "requestheader-client-ca-file".to_owned(),
                String::new(), // no certificate in it: parsing still works
            ),
            (
                "requestheader-allowed-names".to_owned(),
                r#"["front-proxy-client"]"#.to_owned(),
            ),
            (
                "requestheader-username-headers".to_owned(),
                r#"["X-Remote-User"]"#.to_owned(),
            ),
            (
                "requestheader-group-headers".to_owned(),
                r#"["X-Remote-Group"]"#.to_owned(),
            ),
            (
                "requestheader-extra-headers-prefix".to_owned(),
                r#"["X-Remote-Extra-"]"#.to_owned(),
            ),
        ]);
        RequestHeader::from_config(&data).unwrap().unwrap()
    }

    #[test]
    fn the_front_proxy_asserts_user_groups_and_extra() {
        let rh = request_header();
        assert!(rh.allows("front-proxy-client"));
        assert!(!rh.allows("someone-else"));
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-remote-user",
            "system:serviceaccount:a:b".parse().unwrap(),
        );
        headers.append("x-remote-group", "system:authenticated".parse().unwrap());
        headers.append("x-remote-group", "team".parse().unwrap());
        headers.insert("x-remote-extra-scopes%2Fone", "x".parse().unwrap());
        let user = rh.user(&headers).unwrap();
        assert_eq!(user.name, "system:serviceaccount:a:b");
        assert_eq!(user.groups, ["system:authenticated", "team"]);
        assert_eq!(
            user.extra,
            BTreeMap::from([("scopes/one".to_owned(), vec!["x".to_owned()])])
        );
        assert_eq!(rh.user(&HeaderMap::new()), None, "no user header, no user");
    }

    #[test]
    fn no_request_header_ca_means_tokens_only() {
        assert_eq!(RequestHeader::from_config(&BTreeMap::new()).unwrap(), None);
        let bad = BTreeMap::from([
            ("requestheader-client-ca-file".to_owned(), String::new()),
            (
                "requestheader-allowed-names".to_owned(),
                "not json".to_owned(),
            ),
        ]);
        assert!(RequestHeader::from_config(&bad).is_err());
    }
}
