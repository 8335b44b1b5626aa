#!/usr/bin/env bash
# Builds Helm, pinned in helm/go.mod, into <repo>/bin/helm for the chart tests.
#
# Kept apart from build.sh (its own module, stamp and cache) so that moving Helm never
# rebuilds the control plane. <repo>/bin/.helm-stamp records what is in bin/, and a copy
# is kept under ${XDG_CACHE_HOME:-$HOME/.cache}/infinite-llm/helm/<stamp hash>.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
bin="${ILM_TOOLS_BIN:-$repo/bin}"
cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/infinite-llm/helm"

stamp="$(
	{
		cat "$here/helm/go.mod" "$here/helm/go.sum" "$here/build_helm.sh"
		go version
	} | sha256sum | cut -c1-16
)"
cached="$cache_root/$stamp"

if [[ -x "$bin/helm" && "$(cat "$bin/.helm-stamp" 2>/dev/null)" == "$stamp" ]]; then
	echo "helm: up to date in $bin ($stamp)"
	exit 0
fi

mkdir -p "$bin"
if [[ -x "$cached/helm" ]]; then
	echo "helm: copying cached build $cached -> $bin"
	cp -f "$cached/helm" "$bin/helm"
	echo "$stamp" >"$bin/.helm-stamp"
	exit 0
fi

export GOFLAGS=-mod=mod CGO_ENABLED=0
cd "$here/helm"
version="$(go list -m -f '{{.Version}}' helm.sh/helm/v4)"
# Without these, `helm version` says "v4.3+unreleased" instead of the pinned release.
flags="-X helm.sh/helm/v4/internal/version.version=$version"
flags+=" -X helm.sh/helm/v4/internal/version.metadata="
flags+=" -X helm.sh/helm/v4/internal/version.gitTreeState=clean"
echo "helm: building $version"
nice -n 10 go build -trimpath -ldflags="-s -w $flags" -o "$bin/helm.tmp" helm.sh/helm/v4/cmd/helm
mv -f "$bin/helm.tmp" "$bin/helm"

mkdir -p "$cached"
cp -f "$bin/helm" "$cached/helm"
echo "$stamp" >"$bin/.helm-stamp"
echo "helm: built into $bin and cached in $cached"
