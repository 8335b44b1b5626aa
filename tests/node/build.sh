#!/usr/bin/env bash
# Builds the node side of the one-node test cluster into <repo>/bin: kubelet, kube-scheduler
# and kube-proxy from the Kubernetes module pinned in ../tools/go.mod (the control plane's),
# and CoreDNS and the Pod sandbox program from ./cmd (its own module).
#
# Cached like ../tools/build.sh, apart from it so that neither invalidates the other:
# <repo>/bin/.node-stamp records what is in bin/, and a copy is kept under
# ${XDG_CACHE_HOME:-$HOME/.cache}/infinite-llm/node/<stamp hash>.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
tools_mod="$repo/tests/tools"
bin="${ILM_TOOLS_BIN:-$repo/bin}"
cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/infinite-llm/node"

k8s_tools=(kubelet kube-scheduler kube-proxy)
own_tools=(coredns ilm-pause)
tools=("${k8s_tools[@]}" "${own_tools[@]}")

stamp="$(
	{
		cat "$tools_mod/go.mod" "$tools_mod/go.sum" "$here/build.sh"
		cat "$here/cmd/go.mod" "$here/cmd/go.sum" "$here"/cmd/*/main.go
		go version
	} | sha256sum | cut -c1-16
)"
cached="$cache_root/$stamp"

have_all() {
	local dir="$1" t
	for t in "${tools[@]}"; do
		[[ -x "$dir/$t" ]] || return 1
	done
}

if have_all "$bin" && [[ "$(cat "$bin/.node-stamp" 2>/dev/null)" == "$stamp" ]]; then
	echo "node tools: up to date in $bin ($stamp)"
	exit 0
fi

mkdir -p "$bin"
if have_all "$cached"; then
	echo "node tools: copying cached build $cached -> $bin"
	for t in "${tools[@]}"; do
		cp -f "$cached/$t" "$bin/$t"
	done
	echo "$stamp" >"$bin/.node-stamp"
	exit 0
fi

# Read-only: go.sum must already hold everything, or a build would rewrite ../tools/go.sum
# and so change the control plane's stamp.
export GOFLAGS=-mod=readonly CGO_ENABLED=0
build() { # <module dir> <output name> <package> [ldflags]
	echo "node tools: building $2 ($3)"
	(cd "$1" && nice -n 10 go build -trimpath -ldflags="-s -w ${4:-}" -o "$bin/$2.tmp" "$3")
	mv -f "$bin/$2.tmp" "$bin/$2"
}

# The same version stamp as the control plane, or the kubelet reports v0.0.0 to the API
# server and kubectl's skew check.
k8s_version="$(cd "$tools_mod" && go list -m -f '{{.Version}}' k8s.io/kubernetes)"
version_flags="-X k8s.io/component-base/version.gitVersion=$k8s_version"
version_flags+=" -X k8s.io/component-base/version.gitMajor=1"
version_flags+=" -X k8s.io/component-base/version.gitMinor=$(echo "$k8s_version" | cut -d. -f2)"
version_flags+=" -X k8s.io/component-base/version.gitTreeState=clean"
for t in "${k8s_tools[@]}"; do
	build "$tools_mod" "$t" "k8s.io/kubernetes/cmd/$t" "$version_flags"
done
build "$here/cmd" coredns ./coredns
build "$here/cmd" ilm-pause ./pause

mkdir -p "$cached"
for t in "${tools[@]}"; do
	cp -f "$bin/$t" "$cached/$t"
done
echo "$stamp" >"$bin/.node-stamp"
echo "node tools: built into $bin and cached in $cached"
