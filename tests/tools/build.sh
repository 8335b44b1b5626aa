#!/usr/bin/env bash
# Builds the control plane the operator tests run against (etcd, kube-apiserver,
# kube-controller-manager, and kubectl only when the machine has none) from the
# upstream Go modules pinned in go.mod, into <repo>/bin.
#
# Slow the first time (tens of minutes on two cores), so results are cached twice:
# <repo>/bin/.tools-stamp records what is in bin/, and a copy is kept under
# ${XDG_CACHE_HOME:-$HOME/.cache}/infinite-llm/bin/<stamp hash> for other clones.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
bin="${ILM_TOOLS_BIN:-$repo/bin}"
cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/infinite-llm/bin"

tools=(etcd kube-apiserver kube-controller-manager)
need_kubectl=0
if ! command -v kubectl >/dev/null 2>&1 || [[ "$(command -v kubectl)" == "$bin/kubectl" ]]; then
	need_kubectl=1
	tools+=(kubectl)
fi

# The stamp names everything that decides the binaries' bytes: the pinned module
# graph, this script, the Go toolchain, and which tools were asked for.
stamp="$(
	{
		cat "$here/go.mod" "$here/go.sum" "$here/build.sh" 2>/dev/null
		go version
		printf '%s\n' "${tools[@]}"
	} | sha256sum | cut -c1-16
)"
cached="$cache_root/$stamp"

have_all() {
	local dir="$1" t
	for t in "${tools[@]}"; do
		[[ -x "$dir/$t" ]] || return 1
	done
}

if have_all "$bin" && [[ "$(cat "$bin/.tools-stamp" 2>/dev/null)" == "$stamp" ]]; then
	echo "tools: up to date in $bin ($stamp)"
	exit 0
fi

mkdir -p "$bin"
if have_all "$cached"; then
	echo "tools: copying cached build $cached -> $bin"
	for t in "${tools[@]}"; do
		cp -f "$cached/$t" "$bin/$t"
	done
	echo "$stamp" >"$bin/.tools-stamp"
	exit 0
fi

export GOFLAGS=-mod=mod CGO_ENABLED=0
declare -A pkg=(
	[etcd]=go.etcd.io/etcd/server/v3
	[kube-apiserver]=k8s.io/kubernetes/cmd/kube-apiserver
	[kube-controller-manager]=k8s.io/kubernetes/cmd/kube-controller-manager
	[kubectl]=k8s.io/kubernetes/cmd/kubectl
)
cd "$here"
# Without these the binaries report v0.0.0, which kubectl's version-skew check and any
# client reading /version would see.
k8s_version="$(go list -m -f '{{.Version}}' k8s.io/kubernetes)"
k8s_minor="$(echo "$k8s_version" | cut -d. -f2)"
version_flags="-X k8s.io/component-base/version.gitVersion=$k8s_version"
version_flags+=" -X k8s.io/component-base/version.gitMajor=1"
version_flags+=" -X k8s.io/component-base/version.gitMinor=$k8s_minor"
version_flags+=" -X k8s.io/component-base/version.gitTreeState=clean"
for t in "${tools[@]}"; do
	echo "tools: building $t (${pkg[$t]})"
	nice -n 10 go build -trimpath -ldflags="-s -w $version_flags" -o "$bin/$t.tmp" "${pkg[$t]}"
	mv -f "$bin/$t.tmp" "$bin/$t"
done

mkdir -p "$cached"
for t in "${tools[@]}"; do
	cp -f "$bin/$t" "$cached/$t"
done
echo "$stamp" >"$bin/.tools-stamp"
echo "tools: built into $bin and cached in $cached"
