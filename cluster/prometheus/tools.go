//go:build tools

// Package tools pins the prometheus command that scripts/cluster.sh builds from this module.
package tools

import _ "github.com/prometheus/prometheus/cmd/prometheus"
