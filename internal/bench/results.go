package main

import (
	"encoding/json"
	"fmt"
	"math"
	"os"
	"sort"
)

// Contender names, in report order.
const (
	cDirect  = "direct"
	cSockmap = "edgeproxy-sockmap"
	cSplice  = "edgeproxy-splice"
	cHAProxy = "haproxy"
)

var allContenders = []string{cDirect, cSockmap, cSplice, cHAProxy}

var displayName = map[string]string{
	cDirect:  "direct",
	cSockmap: "edgeproxy sockmap",
	cSplice:  "edgeproxy splice",
	cHAProxy: "HAProxy",
}

func nameOf(c string) string {
	if n, ok := displayName[c]; ok {
		return n
	}
	return c
}

// Metric describes one reported figure.
type Metric struct {
	Key    string `json:"key"`
	Label  string `json:"label"`
	Unit   string `json:"unit"`
	Better string `json:"better"` // "lower" or "higher"
	Digits int    `json:"digits"`
}

// Metric keys.
const (
	mRTT50     = "rtt_p50_us"
	mRTT99     = "rtt_p99_us"
	mRTTSame   = "rtt_same_cpu_p50_us"
	mSockperf  = "sockperf_rtt_p50_us"
	mSockSame  = "sockperf_same_cpu_rtt_p50_us"
	mBulk1     = "bulk1_gbps"
	mBulk4     = "bulk4_gbps"
	mCPUGB1    = "cpu_s_per_gb_1"
	mCPUGB     = "cpu_s_per_gb"
	mConns     = "conns_per_sec"
	mConnsCPU  = "conns_cpu_us_per_conn"
	mConnsBusy = "conns_busy_pct"
	mRR        = "rr2k_per_sec"
	mRRCPU     = "rr2k_cpu_us_per_req"
	mRSS       = "rss_kib_per_conn"
	mSlab      = "slab_kib_per_conn"
	mKernel    = "kernel_kib_per_conn"
	mMemTotal  = "rss_kernel_kib_per_conn"
	mHeld      = "rss_held_mib"
	mSyscalls  = "syscalls_per_conn"
	mSyscallsX = "syscalls_per_conn_no_runtime"
)

var metrics = []Metric{
	{mRTT50, "64 B round trip p50", "µs", "lower", 1},
	{mRTT99, "64 B round trip p99", "µs", "lower", 1},
	// Both ends on one CPU: no vCPU wake-up between client and backend, so
	// what is left is the path itself, plus whatever wake-ups the proxy adds.
	{mRTTSame, "64 B round trip p50, client and backend on one CPU", "µs", "lower", 1},
	// The independent check of the direct path, same placement as the row
	// above; and the same tool with both ends on one CPU, which shows what
	// the wake-up of the other vCPU costs on this machine.
	{mSockperf, "64 B round trip p50, sockperf", "µs", "lower", 1},
	{mSockSame, "64 B round trip p50, sockperf, both ends on one CPU", "µs", "lower", 1},
	{mBulk1, "bulk, 1 stream", "Gbit/s", "higher", 2},
	{mBulk4, "bulk, 4 streams", "Gbit/s", "higher", 2},
	{mCPUGB1, "machine CPU per GB, 1 stream", "CPU s/GB", "lower", 2},
	{mCPUGB, "machine CPU per GB, 4 streams", "CPU s/GB", "lower", 2},
	{mConns, "new connections/s (connect, 64 B echo, close)", "conn/s", "higher", 0},
	// The rate is the machine's busy share over its CPU per connection:
	// these two say which of them a gap in the rate comes from.
	{mConnsCPU, "machine CPU per new connection", "CPU µs/conn", "lower", 1},
	{mConnsBusy, "machine busy during the new-connection run", "%", "higher", 0},
	{mRR, "2 KiB request/response on keep-alive connections", "req/s", "higher", 0},
	{mRRCPU, "machine CPU per 2 KiB request", "CPU µs/req", "lower", 1},
	{mRSS, "proxy RSS per idle connection", "KiB", "lower", 1},
	// Growth of the whole machine's live slab objects, divided by the
	// connections: the client's and backend's sockets are in it too, so
	// direct (no proxy) is the baseline that mKernel subtracts.
	{mSlab, "machine slab objects per idle connection, all hosts", "KiB", "lower", 1},
	{mKernel, "proxy kernel memory per idle connection: slab beyond direct's", "KiB", "lower", 1},
	{mMemTotal, "proxy RSS + kernel memory per idle connection", "KiB", "lower", 1},
	// Context for the rows above, not charted: a garbage-collected heap can
	// absorb new connections into memory it already holds, so the
	// per-connection delta of one round can read low; the total cannot.
	{mHeld, "proxy RSS with the idle connections held", "MiB", "lower", 1},
	{mSyscalls, "proxy system calls per connection, strace -f -c", "calls", "lower", 1},
	{mSyscallsX, "proxy system calls per connection, without the Go runtime's own", "calls", "lower", 1},
}

// charted says whether a metric is drawn in bench-chart.svg.
func charted(k string) bool {
	switch k {
	case mHeld, mSlab, mSockperf, mSockSame, mRSS, mKernel, mSyscallsX, mConnsBusy:
		return false
	}
	return true
}

// Machine says where and when the numbers were taken.
type Machine struct {
	Kernel    string `json:"kernel"`
	CPUModel  string `json:"cpu_model"`
	CPUs      int    `json:"cpus"`
	MemTotal  string `json:"mem_total,omitempty"`
	Date      string `json:"date"`
	HAProxy   string `json:"haproxy_version"`
	Go        string `json:"go_version"`
	Edgeproxy string `json:"edgeproxy_version"`
	Git       string `json:"git_commit,omitempty"`
	// CPUIdle is the cpuidle driver and the guest halt-poll setting: on a
	// VM whose idle vCPU halts at once, waking it dominates a round trip.
	CPUIdle string `json:"cpu_idle,omitempty"`
}

// Config is the run's sizing.
type Config struct {
	Rounds      int     `json:"rounds"`
	Secs        float64 `json:"secs"`
	WarmSecs    float64 `json:"warm_secs"`
	Pings       int     `json:"pings"`
	PingWarm    int     `json:"ping_warmup"`
	IdleConns   int     `json:"idle_conns"`
	ConnWorkers int     `json:"conn_workers"`
	RRConns     int     `json:"rr_conns"`
	RRSize      int     `json:"rr_bytes"`
	// SyscallConns is how many connections the strace phase makes per
	// proxy; 0: no strace phase.
	SyscallConns int `json:"syscall_conns"`
	// ClientCPU and BackendCPU pin the round-trip threads (and sockperf);
	// -1: not pinned.
	ClientCPU  int      `json:"client_cpu"`
	BackendCPU int      `json:"backend_cpu"`
	BulkChunk  int      `json:"bulk_write_bytes"`
	Contenders []string `json:"contenders"`
	Workloads  []string `json:"workloads"`
}

var allWorkloads = []string{"pingpong", "pingpong1cpu", "bulk1", "bulk4", "conns", "rr2k", "idle"}

// Run is one measurement: one contender, one workload, one round.
type Run struct {
	Round     int                `json:"round"`
	Contender string             `json:"contender"`
	Workload  string             `json:"workload"`
	Values    map[string]float64 `json:"values,omitempty"`
	Client    *clientResult      `json:"client,omitempty"`
	Extra     map[string]any     `json:"extra,omitempty"`
	Error     string             `json:"error,omitempty"`
	Secs      float64            `json:"elapsed_secs"`
}

// Results is docs/bench-results.json.
type Results struct {
	Schema     int                             `json:"schema"`
	Command    string                          `json:"command"`
	Machine    Machine                         `json:"machine"`
	Config     Config                          `json:"config"`
	Testbed    string                          `json:"testbed"`
	Contenders []string                        `json:"contenders"`
	Metrics    []Metric                        `json:"metrics"`
	Medians    map[string]map[string]*float64  `json:"medians"`
	Raw        map[string]map[string][]float64 `json:"raw"`
	Runs       []Run                           `json:"runs"`
	// Syscalls is the strace phase: per contender, calls per connection by
	// system call name.
	Syscalls map[string]map[string]float64 `json:"syscalls,omitempty"`
	Problems []string                      `json:"problems"`
	Notes    []string                      `json:"notes,omitempty"`
	Duration float64                       `json:"duration_secs"`
}

func median(v []float64) (float64, bool) {
	if len(v) == 0 {
		return 0, false
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2], true
	}
	return (s[n/2-1] + s[n/2]) / 2, true
}

// computeDerived fills the figures computed from others: a proxy's kernel
// memory per idle connection is its round's machine slab growth minus the
// median of direct's (the client's and backend's own sockets), and the
// total adds the same round's RSS. Recomputed from Runs each time, so a
// report regenerated from the JSON agrees with the run.
func (r *Results) computeDerived() {
	base, ok := median(r.Raw[cDirect][mSlab])
	for c := range r.Raw {
		delete(r.Raw[c], mKernel)
		delete(r.Raw[c], mMemTotal)
	}
	if !ok {
		return
	}
	for _, run := range r.Runs {
		if run.Contender == cDirect || run.Workload != "idle" {
			continue
		}
		slab, ok1 := run.Values[mSlab]
		rss, ok2 := run.Values[mRSS]
		if !ok1 || !ok2 || r.Raw[run.Contender] == nil {
			continue
		}
		k := slab - base
		r.Raw[run.Contender][mKernel] = append(r.Raw[run.Contender][mKernel], k)
		r.Raw[run.Contender][mMemTotal] = append(r.Raw[run.Contender][mMemTotal], rss+k)
	}
}

// computeMedians fills Medians from Raw.
func (r *Results) computeMedians() {
	r.computeDerived()
	r.Medians = map[string]map[string]*float64{}
	for _, c := range r.Contenders {
		r.Medians[c] = map[string]*float64{}
		for _, m := range r.Metrics {
			if v, ok := median(r.Raw[c][m.Key]); ok && !math.IsNaN(v) && !math.IsInf(v, 0) {
				v := v
				r.Medians[c][m.Key] = &v
			} else {
				r.Medians[c][m.Key] = nil
			}
		}
	}
}

// med is the median of contender c for metric k, if there is one.
func (r *Results) med(c, k string) (float64, bool) {
	if m, ok := r.Medians[c]; ok {
		if v := m[k]; v != nil {
			return *v, true
		}
	}
	return 0, false
}

func (r *Results) metric(k string) Metric {
	for _, m := range r.Metrics {
		if m.Key == k {
			return m
		}
	}
	return Metric{Key: k, Label: k}
}

func (r *Results) hasContender(c string) bool {
	for _, x := range r.Contenders {
		if x == c {
			return true
		}
	}
	return false
}

func loadResults(path string) (*Results, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var r Results
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if len(r.Metrics) == 0 || r.Schema < 2 {
		r.Metrics = metrics
	}
	r.computeMedians()
	return &r, nil
}

func writeResults(path string, r *Results) error {
	b, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}
