// CoreDNS for the one-node test cluster, with only the plugins its Corefile uses
// (tests/node/cluster.sh writes it): the upstream binary links every plugin, cloud SDKs
// included, which would triple the build for nothing.
package main

import (
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/template"
)

func main() {
	coremain.Run()
}
