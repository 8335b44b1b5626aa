//! A real control plane for the tests, started the way controller-runtime's envtest does:
//! etcd, kube-apiserver (TLS from a throwaway CA, RBAC authorization, a service-account
//! signing key) and kube-controller-manager (so the StatefulSet controller and the garbage
//! collector are the real ones, and the HPA controller), on free loopback ports, with the
//! aggregation layer configured (front-proxy certificates) so that an APIService can be
//! proxied to an operator process. No kubelet runs; tests mark Pods Ready through the
//! status subresource.
//!
//! One control plane serves every test of this binary. It is stopped, and its temp dir
//! removed, when it drops or when the test process exits, whether tests passed or not.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use infinite_llm_operator::crd::InfiniteLLMCluster;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, CustomResourceExt, ResourceExt};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tempfile::TempDir;

/// The shared control plane, started by the first test that asks for it. If it cannot
/// start, every test fails with the same reason instead of retrying.
pub fn shared() -> &'static ControlPlane {
    static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();
    let started = SHARED.get_or_init(|| {
        let cp = std::panic::catch_unwind(ControlPlane::start).map_err(|panic| {
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        })?;
        // Statics never drop, so stop the processes when the test binary exits.
        extern "C" fn stop_shared() {
            if let Some(Ok(cp)) = SHARED.get() {
                cp.stop();
            }
        }
        // SAFETY: registering a plain extern "C" fn with no captured state.
        unsafe {
            libc::atexit(stop_shared);
        }
        Ok(cp)
    });
    match started {
        Ok(cp) => cp,
        Err(why) => panic!("the control plane did not start: {why}"),
    }
}

pub struct ControlPlane {
    dir: Mutex<Option<TempDir>>,
    root: PathBuf,
    procs: Mutex<Vec<(&'static str, Child)>>,
    pub server: String,
    pub kubeconfig: PathBuf,
    ca_cert: PathBuf,
    pub kubectl: PathBuf,
}

impl ControlPlane {
    pub fn start() -> ControlPlane {
        let bin = tools_bin();
        for tool in ["etcd", "kube-apiserver", "kube-controller-manager"] {
            assert!(
                bin.join(tool).is_file(),
                "{} is missing: the tests need a real control plane. Run `make tools` \
                 (tests/tools/build.sh) to build it, or point ILM_TOOLS_BIN at a folder with \
                 etcd, kube-apiserver and kube-controller-manager.",
                bin.join(tool).display()
            );
        }
        let kubectl = find_kubectl(&bin);
        let dir = tempfile::Builder::new()
            .prefix("ilm-envtest-")
            .tempdir()
            .expect("creating the control plane's temp dir");
        let root = dir.path().to_owned();
        let pki = Pki::write(&root);
        let apiserver_port = free_port();
        let server = format!("https://127.0.0.1:{apiserver_port}");
        let kubeconfig = root.join("admin.kubeconfig");
        fs::write(
            &kubeconfig,
            kubeconfig_yaml(
                &server,
                &pki.ca_cert,
                &format!(
                    "client-certificate: {}\n    client-key: {}",
                    pki.admin_cert.display(),
                    pki.admin_key.display()
                ),
            ),
        )
        .unwrap();
        let cp = ControlPlane {
            dir: Mutex::new(Some(dir)),
            root: root.clone(),
            procs: Mutex::new(Vec::new()),
            server,
            kubeconfig,
            ca_cert: pki.ca_cert.clone(),
            kubectl,
        };

        let etcd_port = free_port();
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{}", free_port());
        cp.spawn(
            "etcd",
            Command::new(bin.join("etcd")).args([
                "--name=envtest",
                &format!("--data-dir={}", root.join("etcd").display()),
                &format!("--listen-client-urls={etcd_url}"),
                &format!("--advertise-client-urls={etcd_url}"),
                &format!("--listen-peer-urls={peer_url}"),
                &format!("--initial-advertise-peer-urls={peer_url}"),
                &format!("--initial-cluster=envtest={peer_url}"),
                "--unsafe-no-fsync",
                "--log-level=warn",
            ]),
        );
        cp.spawn(
            "kube-apiserver",
            Command::new(bin.join("kube-apiserver")).args([
                &format!("--etcd-servers={etcd_url}"),
                &format!("--cert-dir={}", root.join("apiserver").display()),
                &format!("--tls-cert-file={}", pki.serving_cert.display()),
                &format!("--tls-private-key-file={}", pki.serving_key.display()),
                &format!("--client-ca-file={}", pki.ca_cert.display()),
                &format!("--secure-port={apiserver_port}"),
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                &format!("--service-account-key-file={}", pki.sa_pub.display()),
                &format!(
                    "--service-account-signing-key-file={}",
                    pki.sa_key.display()
                ),
                "--authorization-mode=RBAC",
                // As on clusters that enforce it (OpenShift among them): owner references
                // that block deletion need update on the owner's finalizers, which the
                // operator's RBAC must then grant.
                "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
                "--allow-privileged=true",
                // The aggregation layer, for the operator's external metrics API.
                &format!(
                    "--requestheader-client-ca-file={}",
                    pki.front_proxy_ca.display()
                ),
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                &format!(
                    "--proxy-client-cert-file={}",
                    pki.front_proxy_cert.display()
                ),
                &format!("--proxy-client-key-file={}", pki.front_proxy_key.display()),
                "--v=0",
            ]),
        );
        cp.wait_until("kube-apiserver is ready", Duration::from_secs(90), || {
            cp.kubectl_ok(&["get", "--raw", "/readyz"])
        });
        // The garbage collector discovers resource types when it starts; installing the CRD
        // first means it watches InfiniteLLMClusters from the beginning.
        cp.install_crd();
        let kcm_port = free_port();
        let kubeconfig_arg = cp.kubeconfig.display().to_string();
        cp.spawn(
            "kube-controller-manager",
            Command::new(bin.join("kube-controller-manager")).args([
                &format!("--kubeconfig={kubeconfig_arg}"),
                &format!("--authentication-kubeconfig={kubeconfig_arg}"),
                &format!("--authorization-kubeconfig={kubeconfig_arg}"),
                "--leader-elect=false",
                "--controllers=statefulset-controller,garbage-collector-controller,serviceaccount-controller,horizontal-pod-autoscaler-controller",
                // Autoscaling tests wait for the HPA; its default period is 15 s.
                "--horizontal-pod-autoscaler-sync-period=2s",
                &format!("--secure-port={kcm_port}"),
                "--bind-address=127.0.0.1",
                &format!("--cert-dir={}", root.join("kcm").display()),
                &format!("--root-ca-file={}", pki.ca_cert.display()),
                &format!("--service-account-private-key-file={}", pki.sa_key.display()),
                "--v=0",
            ]),
        );
        cp
    }

    fn spawn(&self, name: &'static str, cmd: &mut Command) {
        let log = fs::File::create(self.root.join(format!("{name}.log"))).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        self.procs.lock().unwrap().push((name, child));
    }

    /// Polls `ready` until it holds; on time-out, fails with the processes' log tails.
    pub fn wait_until(&self, what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
        let start = Instant::now();
        while !ready() {
            for (name, child) in self.procs.lock().unwrap().iter_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "{name} exited ({status}) while waiting until {what}\n{}",
                        self.logs()
                    );
                }
            }
            if start.elapsed() > limit {
                panic!("timed out waiting until {what}\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for name in ["etcd", "kube-apiserver", "kube-controller-manager"] {
            if let Ok(text) = fs::read_to_string(self.root.join(format!("{name}.log"))) {
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                out += &format!("--- {name} log (last lines) ---\n");
                for line in tail.into_iter().rev() {
                    out += line;
                    out.push('\n');
                }
            }
        }
        out
    }

    fn install_crd(&self) {
        let crd = serde_yaml::to_string(&InfiniteLLMCluster::crd()).unwrap();
        let out = self.kubectl_stdin(&["apply", "--server-side", "-f", "-"], &crd);
        assert!(out.status.success(), "installing the CRD: {}", stderr(&out));
        let out = self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/infinitellmclusters.infinitellm.io",
        ]);
        assert!(
            out.status.success(),
            "CRD not established: {}",
            stderr(&out)
        );
    }

    /// Stops every process and removes the temp dir; safe to call twice.
    pub fn stop(&self) {
        let mut procs = self.procs.lock().unwrap_or_else(|e| e.into_inner());
        // Controllers first, etcd last, so nothing logs storage errors on the way down.
        while let Some((_, mut child)) = procs.pop() {
            let _ = child.kill();
            let _ = child.wait();
        }
        drop(self.dir.lock().unwrap_or_else(|e| e.into_inner()).take());
    }

    /// A client with cluster-admin rights.
    pub async fn client(&self) -> Client {
        client_from(&self.kubeconfig).await
    }

    pub fn kubectl(&self, args: &[&str]) -> Output {
        Command::new(&self.kubectl)
            .args(self.kubectl_flags())
            .args(args)
            .output()
            .expect("running kubectl")
    }

    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> Output {
        let mut child = Command::new(&self.kubectl)
            .args(self.kubectl_flags())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running kubectl");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    /// Our kubeconfig, and a discovery cache that dies with the control plane.
    fn kubectl_flags(&self) -> [String; 2] {
        [
            format!("--kubeconfig={}", self.kubeconfig.display()),
            format!("--cache-dir={}", self.root.join("kubectl-cache").display()),
        ]
    }

    fn kubectl_ok(&self, args: &[&str]) -> bool {
        self.kubectl(args).status.success()
    }

    /// Helm from the tools bin, as cluster admin of this control plane; its cache and
    /// config live in the control plane's temp dir, not the user's home.
    pub fn helm(&self, args: &[&str]) -> Output {
        let helm = tools_bin().join("helm");
        assert!(
            helm.is_file(),
            "{} is missing: run `make tools` (tests/tools/build_helm.sh builds it)",
            helm.display()
        );
        let home = self.root.join("helm");
        Command::new(helm)
            .args(args)
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
            .output()
            .expect("running helm")
    }

    /// A kubeconfig that authenticates with a bearer token (a ServiceAccount's).
    pub fn token_kubeconfig(&self, name: &str, token: &str) -> PathBuf {
        let path = self.root.join(format!("{name}.kubeconfig"));
        fs::write(
            &path,
            kubeconfig_yaml(&self.server, &self.ca_cert, &format!("token: {token}")),
        )
        .unwrap();
        path
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

pub async fn client_from(kubeconfig: &Path) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ILM_TOOLS_BIN`, or the workspace's `bin/`.
fn tools_bin() -> PathBuf {
    std::env::var_os("ILM_TOOLS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("bin"))
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn find_kubectl(bin: &Path) -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("kubectl"))
            .find(|p| p.is_file())
    });
    on_path
        .or_else(|| Some(bin.join("kubectl")).filter(|p| p.is_file()))
        .expect("kubectl is neither on PATH nor in the tools bin; run `make tools`")
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn kubeconfig_yaml(server: &str, ca: &Path, user: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: envtest
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: user
  user:
    {user}
contexts:
- name: envtest
  context:
    cluster: envtest
    user: user
current-context: envtest
",
        ca = ca.display()
    )
}

/// Throwaway keys and certificates, written as PEM files.
struct Pki {
    ca_cert: PathBuf,
    serving_cert: PathBuf,
    serving_key: PathBuf,
    admin_cert: PathBuf,
    admin_key: PathBuf,
    sa_key: PathBuf,
    sa_pub: PathBuf,
    front_proxy_ca: PathBuf,
    front_proxy_cert: PathBuf,
    front_proxy_key: PathBuf,
}

impl Pki {
    fn write(root: &Path) -> Pki {
        let dir = root.join("pki");
        fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, pem: String| {
            let path = dir.join(name);
            fs::write(&path, pem).unwrap();
            path
        };

        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "envtest-ca");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);

        let serving_key = KeyPair::generate().unwrap();
        let mut serving = CertificateParams::new(vec![
            "localhost".to_owned(),
            "kubernetes".to_owned(),
            "kubernetes.default".to_owned(),
            "kubernetes.default.svc".to_owned(),
        ])
        .unwrap();
        serving
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        serving
            .subject_alt_names
            .push(SanType::IpAddress([10, 0, 0, 1].into()));
        serving
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving_cert = serving.signed_by(&serving_key, &issuer).unwrap();

        let admin_key = KeyPair::generate().unwrap();
        let mut admin = CertificateParams::new(Vec::<String>::new()).unwrap();
        admin.distinguished_name.push(DnType::CommonName, "admin");
        admin
            .distinguished_name
            .push(DnType::OrganizationName, "system:masters");
        admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let admin_cert = admin.signed_by(&admin_key, &issuer).unwrap();

        let sa_key = KeyPair::generate().unwrap();

        // The aggregator's client identity has a CA of its own, as kubeadm sets it up.
        let fp_ca_key = KeyPair::generate().unwrap();
        let mut fp_ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        fp_ca_params
            .distinguished_name
            .push(DnType::CommonName, "envtest-front-proxy-ca");
        fp_ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        fp_ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let fp_ca_cert = fp_ca_params.self_signed(&fp_ca_key).unwrap();
        let fp_issuer = Issuer::new(fp_ca_params, fp_ca_key);
        let fp_key = KeyPair::generate().unwrap();
        let mut fp = CertificateParams::new(Vec::<String>::new()).unwrap();
        fp.distinguished_name
            .push(DnType::CommonName, "front-proxy-client");
        fp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let fp_cert = fp.signed_by(&fp_key, &fp_issuer).unwrap();

        Pki {
            ca_cert: write("ca.crt", ca_cert.pem()),
            serving_cert: write("apiserver.crt", serving_cert.pem()),
            serving_key: write("apiserver.key", serving_key.serialize_pem()),
            admin_cert: write("admin.crt", admin_cert.pem()),
            admin_key: write("admin.key", admin_key.serialize_pem()),
            sa_key: write("sa.key", sa_key.serialize_pem()),
            sa_pub: write("sa.pub", sa_key.public_key_pem()),
            front_proxy_ca: write("front-proxy-ca.crt", fp_ca_cert.pem()),
            front_proxy_cert: write("front-proxy-client.crt", fp_cert.pem()),
            front_proxy_key: write("front-proxy-client.key", fp_key.serialize_pem()),
        }
    }
}

/// Creates a namespace for one test; names must be unique across the binary's tests.
pub async fn namespace(client: &Client, name: &str) -> String {
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name}
    }))
    .unwrap();
    Api::<Namespace>::all(client.clone())
        .patch(
            name,
            &PatchParams::apply("e2e").force(),
            &Patch::Apply(&serde_json::json!({
                "apiVersion": "v1", "kind": "Namespace", "metadata": ns.metadata
            })),
        )
        .await
        .unwrap();
    name.to_owned()
}

/// A bearer token for a ServiceAccount, which is created when missing.
pub async fn service_account_token(client: &Client, ns: &str, name: &str) -> String {
    let api = Api::<ServiceAccount>::namespaced(client.clone(), ns);
    if api.get_opt(name).await.unwrap().is_none() {
        let sa: ServiceAccount =
            serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
        api.create(&PostParams::default(), &sa).await.unwrap();
    }
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(3600),
            ..TokenRequestSpec::default()
        }),
        ..TokenRequest::default()
    };
    let answer = api
        .create_token_request(name, &PostParams::default(), &request)
        .await
        .unwrap();
    answer.status.and_then(|s| s.token).expect("a token")
}

/// Stands in for the kubelet: marks every Pod matching `selector` Running and Ready.
pub async fn mark_pods_ready(client: &Client, ns: &str, selector: &str) -> usize {
    let api = Api::<Pod>::namespaced(client.clone(), ns);
    let pods = api
        .list(&kube::api::ListParams::default().labels(selector))
        .await
        .unwrap();
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let mut marked = 0;
    for pod in pods.items {
        if pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        // Every process of these tests is on loopback, the workers' pods too.
        let patch = serde_json::json!({"status": {
            "phase": "Running",
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
                {"type": "Ready", "status": "True", "lastTransitionTime": now},
            ],
        }});
        api.patch_status(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .unwrap();
        marked += 1;
    }
    marked
}

/// Polls `check` every 200 ms until it returns `Some`, failing after `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The operator binary, run as a separate process against the control plane.
pub struct Operator {
    child: Child,
    pub metrics_addr: SocketAddr,
    pub gmanager_addr: SocketAddr,
    log: PathBuf,
}

impl Operator {
    /// Starts the operator for one namespace; its lease lives there too unless `args`
    /// says otherwise.
    pub fn start(
        cp: &ControlPlane,
        kubeconfig: &Path,
        ns: &str,
        id: &str,
        args: &[&str],
    ) -> Operator {
        Operator::start_with_env(cp, kubeconfig, ns, id, args, &[])
    }

    /// Like `start`, with `env` set as well (a Deployment's, say); flags win over it.
    pub fn start_with_env(
        cp: &ControlPlane,
        kubeconfig: &Path,
        ns: &str,
        id: &str,
        args: &[&str],
        env: &[(String, String)],
    ) -> Operator {
        let metrics_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let gmanager_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = cp.path(&format!("operator-{ns}-{id}.log"));
        let file = fs::File::create(&log).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_infinite-llm-operator"));
        cmd.env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,kube=warn")
            .arg(format!("--watch-namespace={ns}"))
            .arg(format!("--identity={id}"))
            .arg(format!("--metrics-addr={metrics_addr}"))
            .arg(format!("--gmanager-addr={gmanager_addr}"))
            .arg("--lease-duration=4")
            .arg("--lease-grace=1");
        if !args.iter().any(|a| a.starts_with("--lease-namespace")) {
            cmd.arg(format!("--lease-namespace={ns}"));
        }
        let child = cmd
            .args(args)
            .envs(env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("starting the operator binary");
        Operator {
            child,
            metrics_addr,
            gmanager_addr,
            log,
        }
    }

    /// The `/metrics` text, or `None` while the server is not up.
    pub async fn metrics(&self) -> Option<String> {
        http_get(self.metrics_addr, "/metrics").await
    }

    /// A sample's value in the operator's metrics; 0 when absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        let text = self.metrics().await.unwrap_or_default();
        metric_value(&text, sample)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: the process gets no chance to release its lease.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn terminate(&mut self) {
        // SAFETY: sending a signal to our own child by pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn metric_value(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            let rest = line.strip_prefix(sample)?;
            rest.strip_prefix(' ')?.trim().parse().ok()
        })
        .unwrap_or(0.0)
}

/// A minimal HTTP/1.0 GET, enough for the operator's plain-text endpoints; `None` unless
/// the answer is 200.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut stream =
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let (head, body) = response.split_once("\r\n\r\n")?;
        let status = head.lines().next()?;
        status.contains(" 200 ").then(|| body.to_owned())
    })
    .await
    .ok()?
}
