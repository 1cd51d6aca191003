// Package loader loads, attaches and pins edgeproxy's BPF data plane and
// gives the rest of the proxy typed, domain-named access to its maps. It is
// the only package that imports github.com/cilium/ebpf.
package loader
