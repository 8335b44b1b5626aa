// The sandbox ("pause") process of every Pod on the one-node test cluster: it holds the
// Pod's namespaces open and waits to be stopped. The upstream image comes from a registry
// this project cannot reach, so tests/node/images.sh puts this one in an image of its own.
// No Pod here shares its process namespace, so there are no orphans to reap.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	<-stop
}
