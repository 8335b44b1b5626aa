//! TLS for the external metrics API: the serving certificate, client certificates checked
//! against the request-header CA (optional: token callers present none), and an accept
//! loop that hands each connection's client certificate name to the handlers and closes
//! every connection when leadership ends.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::{Extension, Router};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{0} holds no certificate")]
    NoCertificate(PathBuf),
    #[error("the request-header CA: {0}")]
    ClientCa(#[source] rustls::Error),
    #[error("the request-header CA: {0}")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    #[error("the serving certificate and key: {0}")]
    Config(#[source] rustls::Error),
}

/// The serving certificate chain and its key.
pub struct Tls {
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

/// Adapter for `map_err` naming the file that could not be read.
fn pem(path: &Path) -> impl Fn(rustls::pki_types::pem::Error) -> TlsError {
    let path = path.to_owned();
    move |source| TlsError::Pem {
        path: path.clone(),
        source,
    }
}

impl Tls {
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Tls, TlsError> {
        let certs = CertificateDer::pem_file_iter(cert_file)
            .map_err(pem(cert_file))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem(cert_file))?;
        if certs.is_empty() {
            return Err(TlsError::NoCertificate(cert_file.to_owned()));
        }
        let key = PrivateKeyDer::from_pem_file(key_file).map_err(pem(key_file))?;
        Ok(Tls { certs, key })
    }

    /// Asks clients for a certificate signed by `client_ca` without requiring one; with no
    /// CA, asks for none.
    pub fn acceptor(self, client_ca: &[CertificateDer<'static>]) -> Result<TlsAcceptor, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = if client_ca.is_empty() {
            WebPkiClientVerifier::no_client_auth()
        } else {
            let mut roots = RootCertStore::empty();
            for cert in client_ca {
                roots.add(cert.clone()).map_err(TlsError::ClientCa)?;
            }
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .allow_unauthenticated()
                .build()
                .map_err(TlsError::Verifier)?
        };
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.certs, self.key)
            .map_err(TlsError::Config)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

/// What the handshake proved about the client: the common name of a certificate the
/// request-header CA signed, if it presented one.
#[derive(Clone, Debug, Default)]
pub struct Peer {
    pub verified_name: Option<String>,
}

fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// Serves `app` over TLS until `ended`; then stops accepting and closes open connections,
/// so that a keep-alive connection cannot reach a replica that no longer leads.
pub async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    app: Router,
    ended: impl Future<Output = ()> + Send + 'static,
) {
    let (stop, stopped) = watch::channel(false);
    tokio::pin!(ended);
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(%error, "accepting a metrics API connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut ended => break,
        };
        let (acceptor, app, mut stopped) = (acceptor.clone(), app.clone(), stopped.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    debug!(%remote, %error, "metrics API TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(%remote, "metrics API TLS handshake timed out");
                    return;
                }
            };
            let peer = Peer {
                verified_name: tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(common_name),
            };
            let service = TowerToHyperService::new(app.layer(Extension(peer)));
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service);
            tokio::select! {
                served = connection => {
                    if let Err(error) = served {
                        debug!(%remote, %error, "metrics API connection ended");
                    }
                }
                _ = stopped.wait_for(|stop| *stop) => {}
            }
        });
    }
    let _ = stop.send(true);
}
