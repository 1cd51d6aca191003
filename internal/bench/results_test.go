package main

import (
	"math"
	"testing"
)

func TestParseStraceSummaryReadsEveryCallAndSkipsTotal(t *testing.T) {
	// strace 6.x: usecs/call column present, errors column only when nonzero.
	out := []byte(`% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 40.12    0.004012           2      2000           epoll_ctl
 30.00    0.003000           1      3000       600 accept4
  0.50    0.000050           5        10           futex
------ ----------- ----------- --------- --------- ----------------
100.00    0.010000           2      5010       600 total
`)
	got := parseStraceSummary(out)
	want := map[string]float64{"epoll_ctl": 2000, "accept4": 3000, "futex": 10}
	if len(got) != len(want) {
		t.Fatalf("parsed %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s: %v calls, want %v", k, got[k], v)
		}
	}
}

func TestComputeDerivedSubtractsDirectsSlabAndAddsRSS(t *testing.T) {
	r := &Results{
		Contenders: []string{cDirect, cHAProxy},
		Metrics:    metrics,
		Raw: map[string]map[string][]float64{
			cDirect:  {mSlab: {7, 8, 9}},
			cHAProxy: {mSlab: {16, 18}, mRSS: {3, 4}},
		},
		Runs: []Run{
			{Round: 1, Contender: cHAProxy, Workload: "idle", Values: map[string]float64{mSlab: 16, mRSS: 3}},
			{Round: 2, Contender: cHAProxy, Workload: "idle", Values: map[string]float64{mSlab: 18, mRSS: 4}},
			{Round: 1, Contender: cHAProxy, Workload: "conns", Values: map[string]float64{mConns: 1000}},
		},
	}
	r.computeMedians()
	r.computeMedians() // regenerating the report must not add the derived values twice
	if got := r.Raw[cHAProxy][mKernel]; len(got) != 2 || got[0] != 8 || got[1] != 10 {
		t.Fatalf("kernel per connection %v, want [8 10] (slab less direct's median 8)", got)
	}
	if got := r.Raw[cHAProxy][mMemTotal]; len(got) != 2 || got[0] != 11 || got[1] != 14 {
		t.Fatalf("RSS + kernel %v, want [11 14]", got)
	}
	if v, ok := r.med(cHAProxy, mMemTotal); !ok || v != 12.5 {
		t.Fatalf("median RSS + kernel %v %v, want 12.5", v, ok)
	}
	if _, ok := r.med(cDirect, mKernel); ok {
		t.Fatal("direct has no proxy kernel memory: it is the baseline")
	}
}

func TestComputeDerivedWithoutBaselineLeavesKernelEmpty(t *testing.T) {
	r := &Results{
		Contenders: []string{cHAProxy},
		Metrics:    metrics,
		Raw:        map[string]map[string][]float64{cHAProxy: {mSlab: {16}, mRSS: {3}}},
		Runs:       []Run{{Round: 1, Contender: cHAProxy, Workload: "idle", Values: map[string]float64{mSlab: 16, mRSS: 3}}},
	}
	r.computeMedians()
	if _, ok := r.med(cHAProxy, mKernel); ok {
		t.Fatal("without direct's slab there is no baseline, so no kernel figure")
	}
}

func TestTargetsJudgeTheIssuesRatios(t *testing.T) {
	r := &Results{
		Contenders: []string{cDirect, cSockmap, cSplice, cHAProxy},
		Metrics:    metrics,
		Config:     Config{ConnWorkers: 32, RRConns: 50, RRSize: 2048},
		Raw: map[string]map[string][]float64{
			cDirect:  {mRTT50: {50}},
			cSockmap: {mRTT50: {70}, mBulk1: {13}, mConns: {900}},
			cSplice:  {mBulk1: {8}},
			cHAProxy: {mRTT50: {120}, mBulk1: {10}, mConns: {1000}},
		},
	}
	r.computeMedians()
	status := map[string]string{}
	for _, tg := range r.targets() {
		status[tg.goal] = tg.status
	}
	for goal, want := range map[string]string{
		"round trip p50 at most 0.6× HAProxy's and 1.6× direct":              "met",    // 0.58× HAProxy, 1.4× direct
		"bulk, one stream: at least 1.3× HAProxy and above the splice plane": "met",    // 1.3×, above 8
		"new connections/s (32 concurrent): at least 1.0× HAProxy's":         "missed", // 0.9×
		"bulk, four streams: at least 1.2× HAProxy":                          "no data",
	} {
		if status[goal] != want {
			t.Errorf("%q: %q, want %q", goal, status[goal], want)
		}
	}
}

func TestMedianOfEvenCountIsTheMidpoint(t *testing.T) {
	if v, ok := median([]float64{4, 1, 3, 2}); !ok || math.Abs(v-2.5) > 1e-9 {
		t.Fatalf("median %v %v, want 2.5", v, ok)
	}
}

func TestSlabObjectsLeaveOutTimeWaitSockets(t *testing.T) {
	caches := map[string]slabCache{
		"TCP":              {activeObjs: 4, objSize: 2048},   // 8 KiB
		"sock_inode_cache": {activeObjs: 8, objSize: 1024},   // 8 KiB
		"tw_sock_TCP":      {activeObjs: 1000, objSize: 256}, // left out
		"tw_sock_TCPv6":    {activeObjs: 1000, objSize: 256}, // left out
	}
	if got := slabObjectsKiB(caches); got != 16 {
		t.Fatalf("live slab objects %d KiB, want 16 (TIME_WAIT caches left out)", got)
	}
}
