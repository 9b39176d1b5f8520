//go:build tools

// Package tools pins the control-plane commands this module builds (see build.sh).
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "sigs.k8s.io/scheduler-plugins/cmd/scheduler"
)
