#!/usr/bin/env bash
# A one-node Kubernetes on this machine, from the project's own files:
#
#   cluster.sh up     start it (etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
#                     containerd + runc + CNI bridge, kubelet, kube-proxy, CoreDNS), import
#                     the operator and worker images, print the KUBECONFIG to use
#   cluster.sh down   stop it and put the host back as it was before `up`
#
# Binaries come from bin/ (make tools, tests/node/build.sh) and target/release; containerd,
# runc and the CNI plugins are Debian's packages, installed when missing. Everything the
# cluster writes lives in the state directory (ILM_CLUSTER_DIR, default <repo>/.cluster),
# containerd's root and state included, so it shares nothing with another containerd.
#
# Facts of this kind of machine that decide whether it starts at all:
# - cgroup v1: the kubelet needs failCgroupV1: false and the cgroupfs driver;
# - no CAP_SYS_RESOURCE: runc cannot lower oom_score_adj, so containerd's CRI config sets
#   restrict_oom_score_adj (else every sandbox fails with "can't get final child's PID");
# - no dummy interface: the node IP is a /32 on lo, and every component binds it;
# - no DNS upstream: CoreDNS answers NXDOMAIN for names outside the cluster.
# Pods reach nothing outside this machine: a FORWARD rule drops their traffic towards the
# machine's own interfaces. `down` restores what the kubelet and kube-proxy change: sysctls,
# iptables, mounts, /var/lib/kubelet, /run/netns, the bridge, cgroups, the node IP.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
bin="${ILM_TOOLS_BIN:-$repo/bin}"
release="${ILM_RELEASE_DIR:-$repo/target/release}"
state="${ILM_CLUSTER_DIR:-$repo/.cluster}"
node_ip="${ILM_NODE_IP:-10.87.0.1}"
pod_cidr="${ILM_POD_CIDR:-10.87.64.0/24}"
service_cidr="${ILM_SERVICE_CIDR:-10.87.128.0/24}"
api_service_ip="${service_cidr%.*}.1"
node_name="ilm-node"
bridge="ilm0"
# The images the chart and the examples name by default.
version="$(awk '$1 == "appVersion:" { gsub(/"/, "", $2); print $2 }' "$repo/charts/infinite-llm/Chart.yaml")"
operator_image="ghcr.io/infinite-llm/operator:$version"
worker_image="ghcr.io/infinite-llm/worker:$version"
pause_image="ilm.local/pause:1"

host="$state/host"   # what `up` found, for `down` to restore
pki="$state/pki"
logs="$state/logs"
pids="$state/pids"
sock="$state/containerd/containerd.sock"
kubeconfig="$state/kubeconfig"
sysctls=(net.ipv4.ip_forward net.bridge.bridge-nf-call-iptables net.bridge.bridge-nf-call-ip6tables
	vm.overcommit_memory kernel.panic kernel.panic_on_oops net.ipv4.conf.all.route_localnet)
# Paths outside the state directory that the kubelet, containerd and the CNI plugins create.
host_dirs=(/var/lib/kubelet /var/log/pods /var/log/containers /run/containerd /var/lib/cni
	/run/netns /etc/cni /opt/cni /etc/kubernetes)

log() { echo "cluster: $*" >&2; }
die() {
	log "$*"
	exit 1
}

need_root() { [[ "$(id -u)" == 0 ]] || die "must run as root (it runs a kubelet)"; }

install_packages() {
	local missing=()
	command -v containerd >/dev/null || missing+=(containerd)
	command -v runc >/dev/null || missing+=(runc)
	[[ -x /usr/lib/cni/bridge ]] || missing+=(containernetworking-plugins)
	command -v iptables >/dev/null || missing+=(iptables)
	command -v conntrack >/dev/null || missing+=(conntrack)
	command -v openssl >/dev/null || missing+=(openssl)
	if ((${#missing[@]})); then
		log "installing ${missing[*]} (Debian packages)"
		apt-get update -qq
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
	fi
	local t
	for t in etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy coredns ilm-pause; do
		[[ -x "$bin/$t" ]] || die "$bin/$t is missing: run make tools and tests/node/build.sh (make cluster does)"
	done
	for t in infinite-llm-operator infinite-llm-worker; do
		[[ -x "$release/$t" ]] || die "$release/$t is missing: run cargo build --release --bins"
	done
}

# ---- processes ---------------------------------------------------------------------------

start() { # <name> <command...>
	local name="$1"
	shift
	"$@" >"$logs/$name.log" 2>&1 &
	echo $! >"$pids/$name"
}

stop() { # <name>: TERM, then KILL after 15 s; only the process this script started
	local name="$1" pid i
	[[ -f "$pids/$name" ]] || return 0
	pid="$(cat "$pids/$name")"
	if kill -0 "$pid" 2>/dev/null; then
		kill "$pid" 2>/dev/null || true
		for ((i = 0; i < 150; i++)); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		kill -9 "$pid" 2>/dev/null || true
	fi
	rm -f "$pids/$name"
}

wait_for() { # <what> <seconds> <command...>
	local what="$1" seconds="$2" i
	shift 2
	for ((i = 0; i < seconds * 2; i++)); do
		if "$@" >/dev/null 2>&1; then
			return 0
		fi
		sleep 0.5
	done
	die "$what not up after ${seconds}s; logs in $logs"
}

# make tools builds kubectl only when the machine has none.
kubectl_bin="$bin/kubectl"
[[ -x "$kubectl_bin" ]] || kubectl_bin="$(command -v kubectl || echo "$bin/kubectl")"
kc() { "$kubectl_bin" --kubeconfig "$kubeconfig" "$@"; }

# ---- certificates ---------------------------------------------------------------------------

cert() { # <name> <subject> [subjectAltName]: a key and a certificate signed by the cluster CA
	local name="$1" subject="$2" san="${3:-}" ext="$pki/$1.ext"
	openssl genrsa -out "$pki/$name.key" 2048 2>/dev/null
	openssl req -new -key "$pki/$name.key" -subj "$subject" -out "$pki/$name.csr" 2>/dev/null
	{
		echo "basicConstraints=CA:FALSE"
		echo "keyUsage=critical,digitalSignature,keyEncipherment"
		echo "extendedKeyUsage=serverAuth,clientAuth"
		[[ -z "$san" ]] || echo "subjectAltName=$san"
	} >"$ext"
	openssl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
		-CAcreateserial -days 30 -extfile "$ext" -out "$pki/$name.crt" 2>/dev/null
}

write_pki() {
	mkdir -p "$pki"
	openssl req -x509 -newkey rsa:2048 -nodes -keyout "$pki/ca.key" -out "$pki/ca.crt" \
		-days 30 -subj "/CN=infinite-llm-test-ca" 2>/dev/null
	cert apiserver "/CN=kube-apiserver" \
		"IP:$node_ip,IP:$api_service_ip,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
	cert admin "/O=system:masters/CN=admin"
	cert kubelet "/O=system:nodes/CN=system:node:$node_name" "IP:$node_ip,DNS:$node_name"
	# The API server's identity towards the kubelet, for logs, exec and port-forward.
	cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
	# The aggregation layer's own CA and the API server's client certificate under it: the
	# operator's external metrics API trusts requests that carry it.
	openssl req -x509 -newkey rsa:2048 -nodes -keyout "$pki/front-proxy-ca.key" \
		-out "$pki/front-proxy-ca.crt" -days 30 -subj "/CN=infinite-llm-front-proxy-ca" 2>/dev/null
	openssl genrsa -out "$pki/front-proxy-client.key" 2048 2>/dev/null
	openssl req -new -key "$pki/front-proxy-client.key" -subj "/CN=front-proxy-client" \
		-out "$pki/front-proxy-client.csr" 2>/dev/null
	printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' \
		>"$pki/front-proxy-client.ext"
	openssl x509 -req -in "$pki/front-proxy-client.csr" -CA "$pki/front-proxy-ca.crt" \
		-CAkey "$pki/front-proxy-ca.key" -CAcreateserial -days 30 \
		-extfile "$pki/front-proxy-client.ext" -out "$pki/front-proxy-client.crt" 2>/dev/null
	openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
	openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
}

write_kubeconfig() { # <file> <cert name>
	cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
  - name: $node_name
    cluster:
      server: https://$node_ip:6443
      certificate-authority: $pki/ca.crt
users:
  - name: $2
    user:
      client-certificate: $pki/$2.crt
      client-key: $pki/$2.key
contexts:
  - name: $node_name
    context: {cluster: $node_name, user: $2}
current-context: $node_name
EOF
}

# ---- host state -----------------------------------------------------------------------------

save_host() {
	mkdir -p "$host"
	local s d
	for s in "${sysctls[@]}"; do
		if [[ -e "/proc/sys/${s//.//}" ]]; then
			echo "$s=$(cat "/proc/sys/${s//.//}")"
		fi
	done >"$host/sysctls"
	iptables-save >"$host/iptables"
	ip6tables-save >"$host/ip6tables"
	for d in "${host_dirs[@]}"; do
		[[ -e "$d" ]] && echo "$d"
	done >"$host/dirs"
	ls /run/netns 2>/dev/null >"$host/netns" || true
}

setup_host() {
	ip addr add "$node_ip/32" dev lo
	sysctl -qw net.ipv4.ip_forward=1
	if [[ -e /proc/sys/net/bridge/bridge-nf-call-iptables ]]; then
		# Pod-to-Service replies cross the bridge; kube-proxy's NAT must see them.
		sysctl -qw net.bridge.bridge-nf-call-iptables=1
	fi
	# Nothing a Pod sends leaves this machine through its own interfaces.
	iptables -N ILM-NODE-EGRESS
	local dev
	for dev in $(ip -o link show | awk -F': ' '{ print $2 }' | cut -d@ -f1); do
		case "$dev" in lo | "$bridge" | veth* | ifb*) continue ;; esac
		iptables -A ILM-NODE-EGRESS -s "$pod_cidr" -o "$dev" -j DROP
	done
	iptables -I FORWARD 1 -j ILM-NODE-EGRESS
}

# Unmounts everything mounted at or below each given path, deepest first.
unmount_under() {
	local p m
	for p in "$@"; do
		# Nothing mounted there is fine (grep's 1 would end the script under pipefail).
		awk '{ print $2 }' /proc/self/mounts | { grep -E "^${p}(/|$)" || true; } | sort -r | while read -r m; do
			umount -l "$m" 2>/dev/null || true
		done
	done
}

restore_iptables() { # <iptables-save binary> <iptables binary> <saved dump>
	local save="$1" tables="$2" dump="$3" t
	for t in $("$save" | awk '/^\*/ { print substr($1, 2) }'); do
		"$tables" -t "$t" -F
		"$tables" -t "$t" -X
	done
	"${save%-save}-restore" <"$dump"
}

restore_host() {
	[[ -d "$host" ]] || return 0
	local s d cg
	restore_iptables iptables-save iptables "$host/iptables" || log "could not restore iptables"
	restore_iptables ip6tables-save ip6tables "$host/ip6tables" || log "could not restore ip6tables"
	while IFS='=' read -r s d; do
		sysctl -qw "$s=$d" || log "could not restore $s"
	done <"$host/sysctls"
	for d in $(ls /run/netns 2>/dev/null); do
		if ! grep -qxF "$d" "$host/netns"; then
			umount -l "/run/netns/$d" 2>/dev/null || true
			rm -f "/run/netns/$d"
		fi
	done
	ip link del "$bridge" 2>/dev/null || true
	ip addr del "$node_ip/32" dev lo 2>/dev/null || true
	for d in "${host_dirs[@]}"; do
		if [[ -e "$d" ]] && ! grep -qxF "$d" "$host/dirs"; then
			unmount_under "$d"
			rm -rf "$d"
		fi
	done
	# The kubelet's cgroups: whatever still runs in them is a container of this cluster.
	local pid
	for cg in /sys/fs/cgroup/*/kubepods; do
		[[ -d "$cg" ]] || continue
		for pid in $(find "$cg" -name cgroup.procs -exec cat {} + 2>/dev/null); do
			kill -9 "$pid" 2>/dev/null || true
		done
	done
	sleep 1
	for cg in /sys/fs/cgroup/*/kubepods; do
		[[ -d "$cg" ]] && find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null || true
	done
	rm -rf "$host"
}

# ---- containerd -------------------------------------------------------------------------------

write_containerd_config() {
	mkdir -p "$state/containerd" "$state/cni/net.d"
	cat >"$state/containerd/config.toml" <<EOF
version = 2
root = "$state/containerd/root"
state = "$state/containerd/state"
# Snapshotters that need kernel features or tools this machine lacks only log errors.
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = "$sock"

[ttrpc]
  address = "$state/containerd/containerd.sock.ttrpc"

[debug]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "$state/containerd/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$pause_image"
  # runc may not lower a container's oom_score_adj below its own here.
  restrict_oom_score_adj = true
  # Pod network namespaces in our state, not /run/netns.
  netns_mounts_under_state_dir = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$state/cni/net.d"
EOF
	cat >"$state/cni/net.d/10-ilm.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "ilm",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$bridge",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$state/cni/ipam",
        "ranges": [[{"subnet": "$pod_cidr"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    }
  ]
}
EOF
}

import_images() {
	local dir="$state/images"
	mkdir -p "$dir"
	python3 "$here/images.py" "$dir/pause.tar" "$pause_image" --pause "$bin/ilm-pause"
	python3 "$here/images.py" "$dir/operator.tar" "$operator_image" --stage operator --bin-dir "$release"
	python3 "$here/images.py" "$dir/worker.tar" "$worker_image" --stage worker --bin-dir "$release"
	local t
	for t in pause operator worker; do
		ctr --address "$sock" -n k8s.io images import "$dir/$t.tar" >/dev/null
	done
	rm -rf "$dir"
}

# ---- node configuration ------------------------------------------------------------------------

write_kubelet_config() {
	mkdir -p "$state/kubelet"
	cat >"$state/kubelet-config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $node_ip
port: 10250
readOnlyPort: 0
healthzBindAddress: $node_ip
healthzPort: 10248
failCgroupV1: false
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://$sock
failSwapOn: false
tlsCertFile: $pki/kubelet.crt
tlsPrivateKeyFile: $pki/kubelet.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $pki/ca.crt}
authorization:
  mode: Webhook
clusterDNS: [$node_ip]
clusterDomain: cluster.local
# Pods get no search domains or servers of this machine.
resolvConf: ""
# A shared test machine: evict only when memory or disk is really short.
evictionHard: {memory.available: 100Mi, nodefs.available: 2%, imagefs.available: 2%}
imageGCHighThresholdPercent: 100
serializeImagePulls: false
EOF
	cat >"$state/kube-proxy-config.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection: {kubeconfig: $kubeconfig}
hostnameOverride: $node_name
bindAddress: $node_ip
healthzBindAddress: $node_ip:10256
metricsBindAddress: $node_ip:10249
clusterCIDR: $pod_cidr
# No masquerade of Pod-to-Service traffic (bridge-nf-call-iptables lets conntrack undo the
# DNAT of replies across the bridge): the gManager checks that a worker registers from its
# own Pod IP, so the source address must survive, as on most CNIs.
iptables: {masqueradeAll: false, localhostNodePorts: false}
# Leave the host's conntrack sysctls alone.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
	cat >"$state/Corefile" <<EOF
cluster.local:53 in-addr.arpa:53 ip6.arpa:53 {
    bind $node_ip
    errors
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $kubeconfig
    }
}
# No upstream here: every other name does not exist.
.:53 {
    bind $node_ip
    template ANY ANY {
        rcode NXDOMAIN
    }
}
EOF
}

# ---- up / down ---------------------------------------------------------------------------------

# A start that fails part-way shows why and undoes what it did.
failed_start() {
	local status=$? f
	((status)) || return 0
	for f in "$logs"/*.log; do
		[[ -f "$f" ]] || continue
		echo "---- last lines of $(basename "$f")" >&2
		tail -n 15 "$f" >&2
	done
	log "start failed; stopping what was started"
	down
	exit "$status"
}

up() {
	need_root
	if [[ -d "$pids" ]] && ls "$pids"/* >/dev/null 2>&1; then
		die "a cluster runs from $state already; run $0 down first"
	fi
	install_packages
	trap failed_start EXIT
	mkdir -p "$state" "$logs" "$pids"
	save_host
	setup_host
	write_pki
	write_kubeconfig "$kubeconfig" admin
	write_kubeconfig "$state/kubelet.kubeconfig" kubelet

	start etcd "$bin/etcd" --data-dir "$state/etcd" --name "$node_name" \
		--listen-client-urls "http://$node_ip:2379" --advertise-client-urls "http://$node_ip:2379" \
		--listen-peer-urls "http://$node_ip:2380" --initial-advertise-peer-urls "http://$node_ip:2380" \
		--initial-cluster "$node_name=http://$node_ip:2380" --quota-backend-bytes 1073741824
	start kube-apiserver "$bin/kube-apiserver" --etcd-servers "http://$node_ip:2379" \
		--bind-address "$node_ip" --advertise-address "$node_ip" --secure-port 6443 \
		--tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
		--client-ca-file "$pki/ca.crt" --authorization-mode Node,RBAC \
		--service-cluster-ip-range "$service_cidr" \
		--service-account-issuer "https://kubernetes.default.svc.cluster.local" \
		--service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
		--kubelet-client-certificate "$pki/apiserver-kubelet-client.crt" \
		--kubelet-client-key "$pki/apiserver-kubelet-client.key" \
		--kubelet-certificate-authority "$pki/ca.crt" --kubelet-preferred-address-types InternalIP \
		--allow-privileged=false \
		--requestheader-client-ca-file "$pki/front-proxy-ca.crt" \
		--requestheader-allowed-names front-proxy-client \
		--requestheader-username-headers X-Remote-User --requestheader-group-headers X-Remote-Group \
		--requestheader-extra-headers-prefix X-Remote-Extra- \
		--proxy-client-cert-file "$pki/front-proxy-client.crt" \
		--proxy-client-key-file "$pki/front-proxy-client.key" \
		--enable-aggregator-routing=true
	wait_for kube-apiserver 90 kc get --raw /readyz
	start kube-controller-manager "$bin/kube-controller-manager" --kubeconfig "$kubeconfig" \
		--bind-address "$node_ip" --leader-elect=false \
		--service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
		--use-service-account-credentials --controllers '*,-nodeipam'
	start kube-scheduler "$bin/kube-scheduler" --kubeconfig "$kubeconfig" \
		--bind-address "$node_ip" --leader-elect=false

	write_containerd_config
	start containerd containerd --config "$state/containerd/config.toml"
	wait_for containerd 30 ctr --address "$sock" version
	import_images

	write_kubelet_config
	start kubelet "$bin/kubelet" --config "$state/kubelet-config.yaml" \
		--kubeconfig "$state/kubelet.kubeconfig" --root-dir "$state/kubelet" \
		--cert-dir "$pki" --hostname-override "$node_name" --node-ip "$node_ip"
	start kube-proxy "$bin/kube-proxy" --config "$state/kube-proxy-config.yaml"
	start coredns "$bin/coredns" -conf "$state/Corefile"
	wait_for "the node" 120 kc wait --for=condition=Ready "node/$node_name" --timeout=2s
	wait_for "the default ServiceAccount" 60 kc get serviceaccount default
	trap - EXIT
	log "up in $state; images $operator_image, $worker_image"
	echo "export KUBECONFIG=$kubeconfig"
}

down() {
	need_root
	if [[ -f "$pids/kube-apiserver" ]] && kill -0 "$(cat "$pids/kube-apiserver")" 2>/dev/null; then
		# Nothing recreates Pods once these are gone; the kubelet then tears each sandbox
		# down through CNI, which frees its address and veth.
		stop kube-controller-manager
		stop kube-scheduler
		kc delete pods --all-namespaces --all --grace-period=0 --force --wait=false >/dev/null 2>&1 || true
		local i
		for ((i = 0; i < 60; i++)); do
			[[ -z "$(ctr --address "$sock" -n k8s.io tasks ls -q 2>/dev/null)" ]] && break
			sleep 1
		done
	fi
	local name
	for name in coredns kube-proxy kubelet kube-controller-manager kube-scheduler; do
		stop "$name"
	done
	if [[ -S "$sock" ]]; then
		local task
		for task in $(ctr --address "$sock" -n k8s.io tasks ls -q 2>/dev/null); do
			ctr --address "$sock" -n k8s.io tasks kill -s SIGKILL "$task" >/dev/null 2>&1 || true
		done
		sleep 1
	fi
	stop containerd
	# Shims outlive containerd; these are ours, told apart by our socket in their arguments.
	local pid
	for pid in $(grep -lzF -- "$sock" /proc/[0-9]*/cmdline 2>/dev/null | cut -d/ -f3); do
		if [[ "$(readlink "/proc/$pid/exe" 2>/dev/null)" == *containerd-shim* ]]; then
			kill -9 "$pid" 2>/dev/null || true
		fi
	done
	stop kube-apiserver
	stop etcd
	"$bin/kube-proxy" --cleanup >/dev/null 2>&1 || true
	unmount_under "$state"
	restore_host
	rm -rf "$state"
	log "down; host restored"
}

case "${1:-}" in
up) up ;;
down) down ;;
*) die "usage: $0 up|down" ;;
esac
