package main

import (
	"bufio"
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	_ "modernc.org/sqlite"
)

const (
	clientIP   = "10.88.1.2"
	proxyIPC   = "10.88.1.1" // proxy, client side
	proxyIPB   = "10.88.2.1" // proxy, backend side
	backendIP  = "10.88.2.2"
	backendPrt = 9000
)

var proxyPorts = map[string]int{cSockmap: 10001, cSplice: 10002, cHAProxy: 10003}

type bench struct {
	ctx       context.Context
	sockperf  string // sockperf binary; "" when missing
	strace    string // strace binary; "" when missing
	id        string
	nsC       string
	nsP       string
	nsB       string
	tmp       string
	self      string
	edgeproxy string
	haproxy   string
	cfg       Config
	server    *proc
	sockSrv   *proc // sockperf server in the backend namespace
	cs        map[string]*contender
	res       *Results

	// deleteNetns removes the testbed setupNetns built; nil before.
	deleteNetns func() error
}

type contender struct {
	name   string
	plane  string // edgeproxy data plane
	addr   string // what the client dials
	port   int
	p      *proc
	pin    string
	starts int
}

func envInt(name string, def int) (int, error) {
	v := os.Getenv(name)
	if v == "" {
		return def, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("%s=%q: want a whole number > 0", name, v)
	}
	return n, nil
}

// envCount is envInt that also accepts 0 (to turn a phase off).
func envCount(name string, def int) (int, error) {
	if os.Getenv(name) == "0" {
		return 0, nil
	}
	return envInt(name, def)
}

func envFloat(name string, def float64) (float64, error) {
	v := os.Getenv(name)
	if v == "" {
		return def, nil
	}
	n, err := strconv.ParseFloat(v, 64)
	if err != nil || n <= 0 || n > 600 {
		return 0, fmt.Errorf("%s=%q: want seconds in (0, 600]", name, v)
	}
	return n, nil
}

func runMain(args []string) error {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	out := fs.String("out", "docs", "where bench-results.json, benchmarks.md and bench-chart.svg go")
	epBin := fs.String("edgeproxy", "bin/edgeproxy", "edgeproxy binary")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if os.Geteuid() != 0 {
		return errors.New("must run as root (network namespaces, BPF): sudo make bench")
	}
	if runtime.GOOS != "linux" {
		return errors.New("needs Linux")
	}
	cfg := Config{PingWarm: 1000, BulkChunk: 128 << 10}
	var err error
	if cfg.Rounds, err = envInt("BENCH_ROUNDS", 5); err != nil {
		return err
	}
	if cfg.Secs, err = envFloat("BENCH_SECS", 5); err != nil {
		return err
	}
	if cfg.Pings, err = envInt("BENCH_PINGS", 20000); err != nil {
		return err
	}
	if cfg.IdleConns, err = envInt("BENCH_IDLE_CONNS", 3000); err != nil {
		return err
	}
	if cfg.ConnWorkers, err = envInt("BENCH_CONN_WORKERS", 32); err != nil {
		return err
	}
	if cfg.RRConns, err = envInt("BENCH_RR_CONNS", 50); err != nil {
		return err
	}
	if cfg.RRSize, err = envInt("BENCH_RR_BYTES", 2048); err != nil {
		return err
	}
	if cfg.SyscallConns, err = envCount("BENCH_SYSCALL_CONNS", 2000); err != nil {
		return err
	}
	// The round trip's two ends on two different CPUs, as on two hosts, and
	// the same two for every contender and round. Left to the scheduler they
	// shared a vCPU in some rounds and not in others, and on this kind of VM
	// (cpuidle haltpoll, guest_halt_poll_ns=0: an idle vCPU halts at once)
	// waking the other vCPU costs tens of µs each way: direct's rounds read
	// 32 to 120 µs for that reason alone.
	cfg.ClientCPU, cfg.BackendCPU = -1, -1
	if os.Getenv("BENCH_PIN") != "0" {
		cfg.ClientCPU, cfg.BackendCPU = 0, min(1, runtime.NumCPU()-1)
	}
	if cfg.IdleConns > 3300 {
		return errors.New("BENCH_IDLE_CONNS above 3300 does not fit the 20,000 open-file limit on the splice plane (6 descriptors per connection)")
	}
	cfg.WarmSecs = 0.5
	cfg.Workloads = allWorkloads
	if v := os.Getenv("BENCH_WORKLOADS"); v != "" {
		cfg.Workloads = nil
		for _, w := range strings.Split(v, ",") {
			w = strings.TrimSpace(w)
			if !slices.Contains(allWorkloads, w) {
				return fmt.Errorf("BENCH_WORKLOADS: unknown workload %q (have %s)", w, strings.Join(allWorkloads, ","))
			}
			cfg.Workloads = append(cfg.Workloads, w)
		}
	}
	cfg.Contenders = allContenders
	if v := os.Getenv("BENCH_CONTENDERS"); v != "" {
		cfg.Contenders = nil
		for _, c := range strings.Split(v, ",") {
			c = strings.TrimSpace(c)
			if _, ok := displayName[c]; !ok {
				return fmt.Errorf("BENCH_CONTENDERS: unknown contender %q (have %s)", c, strings.Join(allContenders, ","))
			}
			cfg.Contenders = append(cfg.Contenders, c)
		}
	}

	b := &bench{cfg: cfg, cs: map[string]*contender{}}
	b.id = os.Getenv("BENCH_ID")
	if b.id == "" {
		b.id = strconv.Itoa(os.Getpid())
	}
	b.nsC, b.nsP, b.nsB = "epb-"+b.id+"-client", "epb-"+b.id+"-proxy", "epb-"+b.id+"-backend"
	if b.self, err = os.Executable(); err != nil {
		return err
	}
	if b.edgeproxy, err = filepath.Abs(*epBin); err != nil {
		return err
	}
	if _, err := os.Stat(b.edgeproxy); err != nil {
		return fmt.Errorf("edgeproxy binary: %w (run make build)", err)
	}
	if b.has(cDirect) {
		if b.sockperf, err = exec.LookPath("sockperf"); err != nil {
			b.sockperf = ""
		}
	}
	if cfg.SyscallConns > 0 {
		if b.strace, err = exec.LookPath("strace"); err != nil {
			b.strace = ""
		}
	}
	if b.has(cHAProxy) {
		if b.haproxy, err = exec.LookPath("haproxy"); err != nil {
			return errors.New("haproxy not found: apt-get install -y haproxy (scripts/bench.sh does it)")
		}
	}
	if b.tmp, err = os.MkdirTemp("", "edgeproxy-bench-"); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	b.ctx = ctx

	start := time.Now()
	b.res = &Results{
		Schema:     2,
		Command:    commandLine(),
		Config:     cfg,
		Contenders: cfg.Contenders,
		Metrics:    metrics,
		Raw:        map[string]map[string][]float64{},
		Testbed: fmt.Sprintf("Three network namespaces, client (%s) ⇄ proxy (%s | %s) ⇄ backend (%s), "+
			"joined by two veth pairs (default offloads), on one host; every contender crosses both hops.",
			clientIP, proxyIPC, proxyIPB, backendIP),
	}
	for _, c := range cfg.Contenders {
		b.res.Raw[c] = map[string][]float64{}
	}
	b.res.Machine = machineInfo(b.edgeproxy, b.haproxy)
	if b.has(cDirect) && b.sockperf == "" {
		b.problem("sockperf not found: the direct round trip is not checked against an independent tool (apt-get install -y sockperf; scripts/bench.sh does it)")
	}
	if cfg.SyscallConns > 0 && b.strace == "" {
		b.problem("strace not found: no system-call count (apt-get install -y strace; scripts/bench.sh does it)")
	}

	err = b.measure()
	b.teardown()
	if err != nil {
		if ctx.Err() != nil {
			return errors.New("interrupted; testbed removed")
		}
		return err
	}
	b.res.Duration = math.Round(time.Since(start).Seconds())
	if len(b.res.Problems) == 0 {
		b.res.Problems = []string{}
	}
	b.res.computeMedians()
	if err := os.MkdirAll(*out, 0o755); err != nil {
		return err
	}
	path := filepath.Join(*out, "bench-results.json")
	if err := writeResults(path, b.res); err != nil {
		return err
	}
	if err := writeReports(*out, b.res); err != nil {
		return err
	}
	printTable(os.Stdout, b.res)
	fmt.Printf("\nwrote %s, %s, %s (%.0f s)\n", path, filepath.Join(*out, "benchmarks.md"), filepath.Join(*out, "bench-chart.svg"), b.res.Duration)
	return nil
}

func commandLine() string {
	var over []string
	for _, v := range []string{"BENCH_ROUNDS", "BENCH_SECS", "BENCH_PINGS", "BENCH_IDLE_CONNS", "BENCH_CONN_WORKERS",
		"BENCH_RR_CONNS", "BENCH_RR_BYTES", "BENCH_SYSCALL_CONNS", "BENCH_PIN", "BENCH_PING_LEGACY",
		"BENCH_CONTENDERS", "BENCH_WORKLOADS", "BENCH_EDGEPROXY_ENV"} {
		if s := os.Getenv(v); s != "" {
			over = append(over, v+"="+s)
		}
	}
	if len(over) == 0 {
		return "sudo make bench"
	}
	return "sudo " + strings.Join(over, " ") + " make bench"
}

func (b *bench) has(c string) bool {
	for _, x := range b.cfg.Contenders {
		if x == c {
			return true
		}
	}
	return false
}

func (b *bench) logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "bench: "+format+"\n", args...)
}

// note records something worth knowing that is not a fault, once.
func (b *bench) note(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	if slices.Contains(b.res.Notes, msg) {
		return
	}
	b.res.Notes = append(b.res.Notes, msg)
	fmt.Fprintf(os.Stderr, "bench: note: %s\n", msg)
}

func (b *bench) problem(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	b.res.Problems = append(b.res.Problems, msg)
	fmt.Fprintf(os.Stderr, "bench: PROBLEM: %s\n", msg)
}

func (b *bench) measure() error {
	if err := b.setupNetns(); err != nil {
		return fmt.Errorf("testbed: %w", err)
	}
	var err error
	b.server, err = startProc("backend", b.nsB, filepath.Join(b.tmp, "backend.log"), os.Environ(), "READY", nil,
		b.self, "serve", "-listen", fmt.Sprintf("0.0.0.0:%d", backendPrt), "-ping-cpu", strconv.Itoa(b.cfg.BackendCPU))
	if err != nil {
		return err
	}
	if err := b.server.waitReady(b.ctx, 10*time.Second); err != nil {
		return err
	}
	if b.sockperf != "" {
		if err := b.startSockperfServer(); err != nil {
			b.problem("sockperf server: %v; the direct round trip is not checked", err)
			b.sockperf = ""
		}
	}
	if b.has(cSockmap) || b.has(cSplice) {
		if err := b.makeDB(); err != nil {
			return fmt.Errorf("routing database: %w", err)
		}
	}
	if b.has(cHAProxy) {
		if err := b.writeHAProxyConfig(); err != nil {
			return err
		}
	}
	for _, name := range b.cfg.Contenders {
		c := &contender{name: name}
		switch name {
		case cDirect:
			c.addr = fmt.Sprintf("%s:%d", backendIP, backendPrt)
		case cSockmap, cSplice:
			c.plane = strings.TrimPrefix(name, "edgeproxy-")
			c.port = proxyPorts[name]
			c.addr = fmt.Sprintf("%s:%d", proxyIPC, c.port)
			c.pin = fmt.Sprintf("/sys/fs/bpf/edgeproxy-bench-%s-%s", b.id, c.plane)
		case cHAProxy:
			c.port = proxyPorts[name]
			c.addr = fmt.Sprintf("%s:%d", proxyIPC, c.port)
		}
		b.cs[name] = c
		if err := b.startContender(c); err != nil {
			return err
		}
	}

	workloads := b.cfg.Workloads
	n := len(b.cfg.Contenders)
	for round := 1; round <= b.cfg.Rounds; round++ {
		for i := 0; i < n; i++ {
			name := b.cfg.Contenders[(i+round-1)%n]
			c := b.cs[name]
			for _, w := range workloads {
				if b.ctx.Err() != nil {
					return b.ctx.Err()
				}
				if err := b.ensureRunning(c, round); err != nil {
					b.problem("round %d %s: cannot (re)start: %v", round, name, err)
					break
				}
				b.runWorkload(round, c, w)
				b.collectWarns(round, c, w)
				time.Sleep(300 * time.Millisecond)
			}
		}
	}
	if b.cfg.SyscallConns > 0 && b.strace != "" {
		b.syscallPhase()
	}
	return nil
}

func (b *bench) teardown() {
	for _, c := range b.cs {
		if c.p != nil {
			c.p.stop(5 * time.Second)
		}
		if c.pin != "" {
			_ = os.RemoveAll(c.pin)
		}
	}
	if b.server != nil {
		b.server.stop(2 * time.Second)
	}
	if b.sockSrv != nil {
		b.sockSrv.stop(2 * time.Second)
	}
	if b.deleteNetns != nil {
		if err := b.deleteNetns(); err != nil {
			b.logf("cleanup: %v", err)
		}
	}
	if os.Getenv("BENCH_KEEP_LOGS") == "" {
		_ = os.RemoveAll(b.tmp)
	} else {
		b.logf("logs kept in %s", b.tmp)
	}
}

func (b *bench) makeDB() error {
	path := filepath.Join(b.tmp, "routing.db")
	if _, err := run(b.ctx, b.edgeproxy, "db", "init", "--db", path); err != nil {
		return err
	}
	db, err := sql.Open("sqlite", path)
	if err != nil {
		return err
	}
	defer db.Close()
	_, err = db.Exec(`INSERT INTO backends (id,app,region,country,wg_ip,port,healthy,weight,soft_limit,hard_limit,deleted)
		VALUES ('bench','bench','sa','BR',?,?,1,1,100000,0,0)`, backendIP, backendPrt)
	return err
}

func (b *bench) writeHAProxyConfig() error {
	// One thread per CPU, as the issue compares against.
	cfg := fmt.Sprintf(`# edgeproxy bench: HAProxy in TCP mode, splice forced both ways
global
    maxconn 7000
    nbthread %d

defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m
    option splice-request
    option splice-response

listen bench
    bind 0.0.0.0:%d
    server backend %s:%d
`, runtime.NumCPU(), proxyPorts[cHAProxy], backendIP, backendPrt)
	return os.WriteFile(filepath.Join(b.tmp, "haproxy.cfg"), []byte(cfg), 0o644)
}

// epEnv is the environment of an edgeproxy run: ours without EDGEPROXY_*
// and DEBUG, plus the bench's settings, plus BENCH_EDGEPROXY_ENV (settings
// under test, e.g. "EDGEPROXY_WORKERS=1"), which win.
func (b *bench) epEnv(c *contender) []string {
	var env []string
	for _, e := range os.Environ() {
		if strings.HasPrefix(e, "EDGEPROXY_") || strings.HasPrefix(e, "DEBUG=") {
			continue
		}
		env = append(env, e)
	}
	return append(append(env,
		fmt.Sprintf("EDGEPROXY_LISTEN_ADDR=0.0.0.0:%d", c.port),
		"EDGEPROXY_DB_PATH="+filepath.Join(b.tmp, "routing.db"),
		"EDGEPROXY_DATAPLANE="+c.plane,
		"EDGEPROXY_BPF_PIN_PATH="+c.pin,
		"EDGEPROXY_ADMIN_ADDR=",
		"EDGEPROXY_WG_INTERFACE=",
		// One client address opens every connection of the benchmark.
		"EDGEPROXY_CLIENT_MAX_CONNS=0",
		// Health checks would add connections to the backend under test.
		"EDGEPROXY_HEALTH_INTERVAL_SECS=0",
	), strings.Fields(os.Getenv("BENCH_EDGEPROXY_ENV"))...)
}

func edgeproxyWarn(line string) bool {
	return strings.Contains(line, "level=WARN") || strings.Contains(line, "level=ERROR") ||
		strings.Contains(line, "panic:") || strings.Contains(line, "fatal error:")
}

func haproxyWarn(line string) bool {
	return strings.Contains(line, "[ALERT]") || strings.Contains(line, "[WARNING]")
}

func (b *bench) startContender(c *contender) error {
	if c.name == cDirect {
		return b.check(c)
	}
	c.starts++
	logPath := filepath.Join(b.tmp, c.name+".log")
	var err error
	switch c.name {
	case cSockmap, cSplice:
		_ = os.RemoveAll(c.pin)
		c.p, err = startProc(c.name, b.nsP, logPath, b.epEnv(c), "edgeproxy started", edgeproxyWarn, b.edgeproxy, "run")
		if err != nil {
			return err
		}
		if err := c.p.waitReady(b.ctx, 30*time.Second); err != nil {
			return err
		}
	case cHAProxy:
		c.p, err = startProc(c.name, b.nsP, logPath, os.Environ(), "", haproxyWarn, b.haproxy, "-db", "-f", filepath.Join(b.tmp, "haproxy.cfg"))
		if err != nil {
			return err
		}
		deadline := time.Now().Add(15 * time.Second)
		for !listening(c.p.pid(), c.port) {
			if !c.p.alive() {
				return fmt.Errorf("haproxy exited at start (%v):\n%s", c.p.waitErr, tail(logPath, 15))
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("haproxy not listening after 15 s:\n%s", tail(logPath, 15))
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	if c.starts == 1 {
		b.logf("%s started (pid %d)", c.name, c.p.pid())
	}
	return b.check(c)
}

// check runs one echo through the contender, retrying briefly.
func (b *bench) check(c *contender) error {
	var last error
	for i := 0; i < 20; i++ {
		_, errOut, err := b.client(15*time.Second, "check", c.addr)
		if err == nil {
			return nil
		}
		last = fmt.Errorf("%v %s", err, errOut)
		time.Sleep(250 * time.Millisecond)
	}
	return fmt.Errorf("%s: echo through %s fails: %v", c.name, c.addr, last)
}

func (b *bench) ensureRunning(c *contender, round int) error {
	if c.p == nil || c.p.alive() {
		return nil
	}
	b.problem("round %d %s: process exited unexpectedly (%v); last log lines:\n%s", round, c.name, c.p.waitErr, tail(c.p.logPath, 10))
	if c.pin != "" {
		_ = os.RemoveAll(c.pin)
	}
	return b.startContender(c)
}

func (b *bench) restart(c *contender) error {
	if c.p != nil {
		took, killed := c.p.stop(10 * time.Second)
		if killed {
			b.problem("%s did not exit within 10 s of SIGTERM; killed", c.name)
		} else if took > 3*time.Second {
			b.problem("%s took %.1f s to exit after SIGTERM", c.name, took.Seconds())
		}
		if c.p.waitErr != nil && !killed {
			var ee *exec.ExitError
			if !errors.As(c.p.waitErr, &ee) || !isSignalExit(ee) {
				b.problem("%s exit status after SIGTERM: %v; last log lines:\n%s", c.name, c.p.waitErr, tail(c.p.logPath, 5))
			}
		}
		b.collectWarns(0, c, "stop")
		if n := activeAtStop(c.p.logPath); n > 0 {
			b.problem("%s still counted %d active connection(s) when stopped for a restart, with no client connected (every earlier client run had finished and closed its sockets)", c.name, n)
		}
		if c.pin != "" {
			_ = os.RemoveAll(c.pin)
		}
	}
	return b.startContender(c)
}

func isSignalExit(ee *exec.ExitError) bool {
	if ws, ok := ee.Sys().(syscall.WaitStatus); ok {
		return ws.Signaled() && ws.Signal() == syscall.SIGTERM
	}
	return false
}

func (b *bench) collectWarns(round int, c *contender, w string) {
	if c.p == nil {
		return
	}
	n, all := c.p.takeWarns()
	var lines []string
	for _, l := range all {
		// edgeproxy says at every start that 20,000 descriptors is low:
		// expected here (DESIGN.md), not a fault.
		if strings.Contains(l, "open-file limit is low") {
			b.note("%s logs at start: %s", c.name, stripLogTime(l))
			n--
			continue
		}
		lines = append(lines, l)
	}
	if n <= 0 {
		return
	}
	if len(lines) == 0 {
		lines = []string{"(not kept)"}
	}
	where := fmt.Sprintf("round %d %s %s", round, c.name, w)
	if round == 0 {
		where = c.name + " " + w
	}
	b.problem("%s: the proxy logged %d warning/error line(s), e.g.: %s", where, n, strings.Join(lines[:min(len(lines), 3)], " | "))
}

// client runs the load generator in the client namespace and decodes the
// JSON line it prints last.
func (b *bench) client(timeout time.Duration, workload, addr string, args ...string) (*clientResult, string, error) {
	ctx, cancel := context.WithTimeout(b.ctx, timeout)
	defer cancel()
	argv := nsArgv(b.nsC, append([]string{b.self, "client", "-w", workload, "-addr", addr}, args...)...)
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	setPdeathsig(cmd)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	res := lastJSON(string(out))
	if ctx.Err() == context.DeadlineExceeded {
		err = fmt.Errorf("client %s timed out after %s", workload, timeout)
	}
	if err != nil && res == nil {
		return nil, strings.TrimSpace(stderr.String()), err
	}
	if res == nil {
		return nil, strings.TrimSpace(stderr.String()), errors.New("client printed no result")
	}
	return res, strings.TrimSpace(stderr.String()), err
}

func lastJSON(out string) *clientResult {
	lines := strings.Split(strings.TrimSpace(out), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		l := strings.TrimPrefix(lines[i], "READY ")
		var r clientResult
		if strings.HasPrefix(l, "{") && json.Unmarshal([]byte(l), &r) == nil {
			return &r
		}
	}
	return nil
}

func (b *bench) record(run *Run, key string, v float64) {
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return
	}
	if run.Values == nil {
		run.Values = map[string]float64{}
	}
	run.Values[key] = v
	b.res.Raw[run.Contender][key] = append(b.res.Raw[run.Contender][key], v)
}

func (b *bench) runWorkload(round int, c *contender, w string) {
	t0 := time.Now()
	run := Run{Round: round, Contender: c.name, Workload: w}
	secs := strconv.FormatFloat(b.cfg.Secs, 'f', -1, 64)
	warm := strconv.FormatFloat(b.cfg.WarmSecs, 'f', -1, 64)
	timed := time.Duration((b.cfg.Secs+b.cfg.WarmSecs)*float64(time.Second)) + 60*time.Second
	where := fmt.Sprintf("round %d %s %s", round, c.name, w)
	var res *clientResult
	var errOut string
	var err error
	switch w {
	case "pingpong":
		// sockperf just before and just after the harness (direct only), so
		// a disagreement is not a change of the machine between the two.
		sockBefore, sockErr := math.NaN(), error(nil)
		if c.name == cDirect && b.sockperf != "" {
			sockBefore, sockErr = b.sockperfRTT(b.cfg.ClientCPU)
		}
		res, errOut, err = b.client(180*time.Second, "pingpong", c.addr, "-n", strconv.Itoa(b.cfg.Pings), "-warm", strconv.Itoa(b.cfg.PingWarm),
			"-cpu", strconv.Itoa(b.cfg.ClientCPU))
		if err == nil {
			b.record(&run, mRTT50, res.P50us)
			b.record(&run, mRTT99, res.P99us)
			b.logf("[%d/%d] %-18s round trip  p50 %7.1f µs  p99 %7.1f µs", round, b.cfg.Rounds, c.name, res.P50us, res.P99us)
		}
		if err == nil && c.name == cDirect && b.sockperf != "" {
			b.sockperfCheck(round, &run, res.P50us, sockBefore, sockErr)
		}
	case "pingpong1cpu":
		if b.cfg.BackendCPU < 0 {
			b.note("pingpong1cpu skipped: the round-trip threads are not pinned (BENCH_PIN=0)")
			return
		}
		res, errOut, err = b.client(180*time.Second, "pingpong", c.addr, "-n", strconv.Itoa(b.cfg.Pings), "-warm", strconv.Itoa(b.cfg.PingWarm),
			"-cpu", strconv.Itoa(b.cfg.BackendCPU))
		if err == nil {
			b.record(&run, mRTTSame, res.P50us)
			b.logf("[%d/%d] %-18s round trip, client and backend on CPU %d: p50 %7.1f µs  p99 %7.1f µs", round, b.cfg.Rounds, c.name,
				b.cfg.BackendCPU, res.P50us, res.P99us)
		}
	case "bulk1", "bulk4":
		streams := "1"
		if w == "bulk4" {
			streams = "4"
		}
		res, errOut, err = b.client(timed, "bulk", c.addr, "-streams", streams, "-secs", secs, "-warm-secs", warm)
		if err == nil && res != nil {
			if w == "bulk1" {
				b.record(&run, mBulk1, res.Gbps)
				if res.CPUSecsPerGB > 0 {
					b.record(&run, mCPUGB1, res.CPUSecsPerGB)
				}
			} else {
				b.record(&run, mBulk4, res.Gbps)
				if res.CPUSecsPerGB > 0 {
					b.record(&run, mCPUGB, res.CPUSecsPerGB)
				}
			}
			b.logf("[%d/%d] %-18s bulk x%s     %6.2f Gbit/s  CPU %.2f s/GB  (%d/%s streams verified)",
				round, b.cfg.Rounds, c.name, streams, res.Gbps, res.CPUSecsPerGB, res.Verified, streams)
		}
	case "conns":
		res, errOut, err = b.client(timed, "conns", c.addr, "-workers", strconv.Itoa(b.cfg.ConnWorkers), "-secs", secs, "-warm-secs", warm)
		if err == nil && res != nil {
			b.record(&run, mConns, res.ConnsPerSec)
			if res.CPUUsPerConn > 0 {
				b.record(&run, mConnsCPU, res.CPUUsPerConn)
				b.record(&run, mConnsBusy, 100*res.BusyShare)
			}
			b.logf("[%d/%d] %-18s new conns   %7.0f /s (%d concurrent)  CPU %.1f µs/conn, machine %.0f%% busy", round, b.cfg.Rounds, c.name,
				res.ConnsPerSec, b.cfg.ConnWorkers, res.CPUUsPerConn, 100*res.BusyShare)
		}
	case "rr2k":
		res, errOut, err = b.client(timed, "rr", c.addr, "-conns", strconv.Itoa(b.cfg.RRConns), "-size", strconv.Itoa(b.cfg.RRSize),
			"-secs", secs, "-warm-secs", warm)
		if err == nil && res != nil {
			b.record(&run, mRR, res.RequestsPerSec)
			if res.CPUUsPerReq > 0 {
				b.record(&run, mRRCPU, res.CPUUsPerReq)
			}
			b.logf("[%d/%d] %-18s rr %d B x%d  %7.0f req/s  CPU %.1f µs/req", round, b.cfg.Rounds, c.name, b.cfg.RRSize, b.cfg.RRConns,
				res.RequestsPerSec, res.CPUUsPerReq)
		}
	case "idle":
		res, run.Extra, err = b.idle(c)
		if err == nil && res != nil && res.Opened > 0 {
			slabBefore, _ := run.Extra["slab_before_kib"].(int64)
			slabAfter, _ := run.Extra["slab_after_kib"].(int64)
			slab := float64(slabAfter-slabBefore) / float64(res.Opened)
			b.record(&run, mSlab, slab)
			if c.name == cDirect {
				b.logf("[%d/%d] %-18s idle        %d conns, machine slab %+.2f KiB/conn (the baseline: client and backend sockets)",
					round, b.cfg.Rounds, c.name, res.Opened, slab)
				break
			}
			before, _ := run.Extra["rss_before_kib"].(int64)
			after, _ := run.Extra["rss_after_kib"].(int64)
			per := float64(after-before) / float64(res.Opened)
			b.record(&run, mRSS, per)
			b.record(&run, mHeld, float64(after)/1024)
			b.logf("[%d/%d] %-18s idle        %d conns, RSS %d -> %d KiB, %.2f KiB/conn, machine slab %+.2f KiB/conn, descriptors %v -> %v",
				round, b.cfg.Rounds, c.name, res.Opened, before, after, per, slab, run.Extra["fds_before"], run.Extra["fds_after"])
		}
	}
	run.Client = res
	run.Secs = math.Round(time.Since(t0).Seconds()*10) / 10
	if err != nil {
		run.Error = err.Error()
		msg := err.Error()
		if errOut != "" {
			msg += "; client stderr: " + errOut
		}
		b.problem("%s: %s", where, msg)
	}
	if res != nil && res.Errors > 0 {
		b.problem("%s: %d client error(s): %s", where, res.Errors, strings.Join(res.ErrorSamples, " | "))
	}
	if res != nil && (w == "bulk1" || w == "bulk4") && res.Verified != res.Streams && res.Streams > 0 {
		b.problem("%s: only %d of %d streams confirmed by the backend's byte count", where, res.Verified, res.Streams)
	}
	b.res.Runs = append(b.res.Runs, run)
}

// idle restarts the proxy, reads its RSS, has the client hold
// IdleConns connections, reads RSS again and lets the client close them.
//
// Kernel memory: the machine's live slab objects (slabObjectsKiB) read
// just before and after. For direct (no proxy process) only the slab is
// read: it is the baseline of the client's and backend's own sockets.
func (b *bench) idle(c *contender) (*clientResult, map[string]any, error) {
	pid := 0
	var before int64
	extra := map[string]any{}
	if c.name != cDirect {
		if err := b.restart(c); err != nil {
			return nil, nil, fmt.Errorf("restart: %w", err)
		}
		pid = c.p.pid()
		time.Sleep(300 * time.Millisecond)
		var err error
		if before, err = rssKiB(pid); err != nil {
			return nil, nil, err
		}
		extra = map[string]any{"rss_before_kib": before, "pid": pid, "fds_before": countFDs(pid), "status_before": memStatus(pid)}
	}
	slabBefore, pagesBefore, cachesBefore, err := readSlab()
	if err != nil {
		return nil, nil, err
	}
	extra["slab_before_kib"] = slabBefore
	extra["meminfo_slab_before_kib"] = pagesBefore
	ctx, cancel := context.WithTimeout(b.ctx, 180*time.Second)
	defer cancel()
	argv := nsArgv(b.nsC, b.self, "client", "-w", "idle", "-addr", c.addr, "-n", strconv.Itoa(b.cfg.IdleConns))
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	setPdeathsig(cmd)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, nil, err
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		return nil, nil, err
	}
	sc := bufio.NewScanner(stdout)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	var ready *clientResult
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "READY ") {
			ready = lastJSON(line)
			time.Sleep(time.Second)
			slabAfter, pagesAfter, cachesAfter, serr := readSlab()
			if serr != nil {
				err = serr
			}
			extra["slab_after_kib"] = slabAfter
			extra["meminfo_slab_after_kib"] = pagesAfter
			extra["slab_caches_kib"] = slabCacheGrowth(cachesBefore, cachesAfter)
			if pid != 0 {
				after, rerr := rssKiB(pid)
				if rerr != nil {
					err = rerr
				}
				extra["rss_after_kib"] = after
				extra["fds_after"] = countFDs(pid)
				extra["status_after"] = memStatus(pid)
				if !c.p.alive() {
					err = errors.New("proxy exited while holding idle connections")
				}
			}
			_, _ = stdin.Write([]byte("done\n"))
			break
		}
	}
	stdin.Close()
	final := ""
	for sc.Scan() {
		final = sc.Text()
	}
	werr := cmd.Wait()
	res := lastJSON(final)
	if res == nil {
		res = ready
	}
	if ready == nil {
		return res, extra, fmt.Errorf("idle client never became ready: %v %s", werr, strings.TrimSpace(stderr.String()))
	}
	if err != nil {
		return res, extra, err
	}
	if werr != nil {
		return res, extra, fmt.Errorf("idle client: %v %s", werr, strings.TrimSpace(stderr.String()))
	}
	return res, extra, nil
}

func machineInfo(edgeproxy, haproxy string) Machine {
	m := Machine{CPUs: runtime.NumCPU(), Go: runtime.Version(), Date: time.Now().UTC().Format("2006-01-02 15:04 UTC")}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPUModel = strings.Join(strings.Fields(v), " ")
				break
			}
		}
	}
	m.CPUIdle = cpuIdleInfo()
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "MemTotal:") {
				f := strings.Fields(l)
				if len(f) >= 2 {
					if kb, err := strconv.ParseFloat(f[1], 64); err == nil {
						m.MemTotal = fmt.Sprintf("%.1f GiB", kb/1024/1024)
					}
				}
			}
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if haproxy != "" {
		if out, err := exec.CommandContext(ctx, haproxy, "-v").Output(); err == nil {
			v, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
			v = strings.TrimPrefix(v, "HAProxy version ")
			v, _, _ = strings.Cut(v, " - ")
			m.HAProxy = v
		}
	}
	if out, err := exec.CommandContext(ctx, edgeproxy, "version").Output(); err == nil {
		m.Edgeproxy = strings.TrimPrefix(strings.TrimSpace(string(out)), "edgeproxy ")
	}
	if out, err := exec.CommandContext(ctx, "git", "describe", "--always").Output(); err == nil {
		m.Git = strings.TrimSpace(string(out))
		// The run itself rewrites docs/ (the routing benchmarks come
		// first): only changes elsewhere make the code under test differ
		// from the commit.
		if st, err := exec.CommandContext(ctx, "git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs").Output(); err == nil && len(bytes.TrimSpace(st)) > 0 {
			m.Git += "-dirty"
		}
	}
	return m
}

// stripLogTime drops the slog time= field, so repeated lines compare equal.
func stripLogTime(l string) string {
	if strings.HasPrefix(l, "time=") {
		if _, rest, ok := strings.Cut(l, " "); ok {
			return rest
		}
	}
	return l
}

// activeAtStop reads "active=N" from edgeproxy's last drain line.
func activeAtStop(logPath string) int {
	b, err := os.ReadFile(logPath)
	if err != nil {
		return 0
	}
	lines := strings.Split(string(b), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if strings.HasPrefix(lines[i], "=== ") {
			return 0 // the start of the current run: no drain line in it
		}
		if !strings.Contains(lines[i], "draining") {
			continue
		}
		for _, f := range strings.Fields(lines[i]) {
			if v, ok := strings.CutPrefix(f, "active="); ok {
				n, _ := strconv.Atoi(v)
				return n
			}
		}
	}
	return 0
}

// countFDs is the number of open descriptors of pid.
func countFDs(pid int) int {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return -1
	}
	return len(ents)
}

// memStatus is the memory breakdown of /proc/PID/status (KiB).
func memStatus(pid int) map[string]int64 {
	out := map[string]int64{}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return out
	}
	for _, l := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(l, ":")
		if !ok || !(strings.HasPrefix(k, "Rss") || k == "VmRSS" || k == "VmData" || k == "Threads") {
			continue
		}
		f := strings.Fields(v)
		if len(f) > 0 {
			if n, err := strconv.ParseInt(f[0], 10, 64); err == nil {
				out[k] = n
			}
		}
	}
	return out
}
