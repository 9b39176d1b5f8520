// Command etcd is etcd's own server main (go.etcd.io/etcd/server/v3/etcdmain), built inside this
// module so that it shares the control plane's pinned dependency versions.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
