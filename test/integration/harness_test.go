//go:build linux

// Package integration runs the real edgeproxy binary in network namespaces
// (client, proxy and backend hosts joined by veth) on both data planes.
package integration

import (
	"bufio"
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/edgeproxy/edgeproxy/internal/nettest"
	"github.com/edgeproxy/edgeproxy/loader"
	_ "modernc.org/sqlite"
)

var binary string // the edgeproxy binary under test, built once

func TestMain(m *testing.M) {
	if runtime.GOOS != "linux" || os.Geteuid() != 0 {
		// Each test says why it skips; nothing to build.
		os.Exit(m.Run())
	}
	dir, err := os.MkdirTemp("", "edgeproxy-it-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "temp dir:", err)
		os.Exit(1)
	}
	// Readable by everyone: one test runs it as nobody.
	_ = os.Chmod(dir, 0o755)
	binary = filepath.Join(dir, "edgeproxy")
	build := exec.Command("go", "build", "-o", binary, "github.com/edgeproxy/edgeproxy/cmd/edgeproxy")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build edgeproxy:", err)
		os.Exit(1)
	}
	// A privileged run must exercise the sockmap plane: a failed probe
	// here is a failure, not a reason to skip.
	if err := loader.Probe(); err != nil {
		fmt.Fprintln(os.Stderr, "FAIL: running as root but the sockmap data plane is unusable:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// planes are the data planes every stream test runs on.
var planes = []string{"sockmap", "splice"}

// backendRow is one row of the test routing.db.
type backendRow struct {
	ID, Region, Country, Addr string
	Port                      int
	Healthy                   bool
	Weight, Soft, Hard        int
	// ProxyProtocol is the optional proxy_protocol column (0 none, 1 v1,
	// 2 v2); the column is added only when a row sets it, so the other
	// tests keep the contract's eleven-column table.
	ProxyProtocol int
}

func writeDB(t testing.TB, path string, rows []backendRow) {
	t.Helper()
	db, err := sql.Open("sqlite", "file:"+path+"?_pragma=busy_timeout(5000)")
	if err != nil {
		t.Fatalf("open %s: %v", path, err)
	}
	defer db.Close()
	if _, err := db.Exec(`CREATE TABLE IF NOT EXISTS backends (
		id TEXT PRIMARY KEY, app TEXT, region TEXT, country TEXT,
		wg_ip TEXT, port INTEGER, healthy INTEGER, weight INTEGER,
		soft_limit INTEGER, hard_limit INTEGER, deleted INTEGER DEFAULT 0)`); err != nil {
		t.Fatalf("create backends in %s: %v", path, err)
	}
	if _, err := db.Exec(`DELETE FROM backends`); err != nil {
		t.Fatalf("clear backends: %v", err)
	}
	for _, r := range rows {
		if _, err := db.Exec(`INSERT INTO backends (id, app, region, country, wg_ip, port, healthy, weight, soft_limit, hard_limit, deleted)
			VALUES (?, 'test', ?, ?, ?, ?, ?, ?, ?, ?, 0)`,
			r.ID, r.Region, r.Country, r.Addr, r.Port, r.Healthy, r.Weight, r.Soft, r.Hard); err != nil {
			t.Fatalf("insert backend %s: %v", r.ID, err)
		}
		if r.ProxyProtocol != 0 {
			if _, err := db.Exec(`ALTER TABLE backends ADD COLUMN proxy_protocol INTEGER DEFAULT 0`); err != nil && !strings.Contains(err.Error(), "duplicate column") {
				t.Fatalf("add column proxy_protocol: %v", err)
			}
			if _, err := db.Exec(`UPDATE backends SET proxy_protocol = ? WHERE id = ?`, r.ProxyProtocol, r.ID); err != nil {
				t.Fatalf("set proxy_protocol of %s: %v", r.ID, err)
			}
		}
	}
}

// proxyProc is a running edgeproxy.
type proxyProc struct {
	cmd     *exec.Cmd
	Plane   string
	PinPath string
	DBPath  string
	logs    *syncBuffer
	done    chan error
	// wrap prefixes the command line, e.g. prlimit with its options; the
	// wrapper must exec edgeproxy so that cmd's pid is the proxy's.
	wrap []string
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

// tail is the log, or its last limit bytes when longer (a proxy that logs
// in a loop).
func (s *syncBuffer) tail(limit int) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	b := s.b.Bytes()
	if len(b) <= limit {
		return string(b)
	}
	return fmt.Sprintf("[%d earlier bytes left out]\n%s", len(b)-limit, b[len(b)-limit:])
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// startProxy runs edgeproxy in ns on the given plane, listening on
// 0.0.0.0:8080, with the backends in rows, and waits until it serves.
func startProxy(t testing.TB, ns *nettest.NS, plane string, rows []backendRow, env ...string) *proxyProc {
	t.Helper()
	return startProxyWrapped(t, ns, plane, rows, nil, env...)
}

// startProxyWrapped is startProxy with the command line prefixed by wrap,
// a program that execs the rest (prlimit, for one).
func startProxyWrapped(t testing.TB, ns *nettest.NS, plane string, rows []backendRow, wrap []string, env ...string) *proxyProc {
	t.Helper()
	dir := t.TempDir()
	p := &proxyProc{
		wrap:    wrap,
		Plane:   plane,
		DBPath:  filepath.Join(dir, "routing.db"),
		PinPath: fmt.Sprintf("/sys/fs/bpf/edgeproxy-test-%d-%d", os.Getpid(), time.Now().UnixNano()),
		logs:    &syncBuffer{},
		done:    make(chan error, 1),
	}
	writeDB(t, p.DBPath, rows)
	// Registered before start: a proxy that starts but fails the checks
	// there is stopped and its pins removed too, not left running (and
	// pinned) until the test binary exits.
	t.Cleanup(func() {
		p.stop(t)
		os.RemoveAll(p.PinPath)
		if t.Failed() {
			t.Logf("edgeproxy log:\n%s", p.logs.tail(64<<10))
		}
	})
	p.start(t, ns, env)
	return p
}

func (p *proxyProc) start(t testing.TB, ns *nettest.NS, env []string) {
	t.Helper()
	if len(p.wrap) > 0 {
		p.cmd = ns.Command(p.wrap[0], append(p.wrap[1:], binary, "run")...)
	} else {
		p.cmd = ns.Command(binary, "run")
	}
	p.cmd.Env = append(os.Environ(),
		"EDGEPROXY_LISTEN_ADDR=0.0.0.0:8080",
		"EDGEPROXY_DB_PATH="+p.DBPath,
		"EDGEPROXY_DATAPLANE="+p.Plane,
		"EDGEPROXY_BPF_PIN_PATH="+p.PinPath,
		"EDGEPROXY_ADMIN_ADDR=",
		"EDGEPROXY_CONNECT_TIMEOUT_MS=1000",
		"EDGEPROXY_DRAIN_SECS=2",
		// EDGEPROXY_TEST_DEBUG=1 go test ... shows the proxy's debug log
		// of failed tests.
		"DEBUG="+os.Getenv("EDGEPROXY_TEST_DEBUG"),
	)
	p.cmd.Env = append(p.cmd.Env, env...)
	stderr, err := p.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start edgeproxy: %v", err)
	}
	ready := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		once := sync.Once{}
		for sc.Scan() {
			line := sc.Text()
			p.logs.Write([]byte(line + "\n"))
			if strings.Contains(line, "edgeproxy started") {
				once.Do(func() { close(ready) })
			}
		}
		_, _ = io.Copy(io.Discard, stderr)
	}()
	go func() { p.done <- p.cmd.Wait() }()
	select {
	case <-ready:
	case err := <-p.done:
		p.cmd = nil // reaped: nothing for stop to wait for
		t.Fatalf("edgeproxy exited before serving: %v\n%s", err, p.logs.String())
	case <-time.After(10 * time.Second):
		t.Fatalf("edgeproxy not serving after 10s:\n%s", p.logs.String())
	}
	if want := "dataplane=" + p.Plane; !strings.Contains(p.logs.String(), want) {
		t.Fatalf("edgeproxy runs the wrong data plane, want %s:\n%s", want, p.logs.String())
	}
}

// stop sends SIGTERM and waits; SIGKILL after 10s.
func (p *proxyProc) stop(t testing.TB) {
	if p.cmd == nil || p.cmd.Process == nil {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		t.Errorf("edgeproxy ignored SIGTERM for 10s; killing it")
		_ = p.cmd.Process.Kill()
		<-p.done
	}
	p.cmd = nil
}

// kill ends the proxy with SIGKILL, leaving its pins behind.
func (p *proxyProc) kill() {
	_ = p.cmd.Process.Kill()
	<-p.done
	p.cmd = nil
}

// rssKiB reads the proxy's resident set size.
func (p *proxyProc) rssKiB(t testing.TB) int {
	t.Helper()
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.cmd.Process.Pid))
	if err != nil {
		t.Fatalf("read proxy status: %v", err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			n, _ := strconv.Atoi(f[1])
			return n
		}
	}
	t.Fatal("VmRSS missing from /proc status")
	return 0
}

// mapEntries counts sockhash and pairing entries; zero on the splice plane.
func (p *proxyProc) mapEntries(t testing.TB) (sockets, pairings int) {
	t.Helper()
	if p.Plane != "sockmap" {
		return 0, 0
	}
	s, pr, err := loader.CountPinned(p.PinPath)
	if err != nil {
		t.Fatalf("count pinned map entries: %v", err)
	}
	return s, pr
}

// waitNoEntries waits up to 3s for every pairing to be gone.
func (p *proxyProc) waitNoEntries(t testing.TB) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for {
		s, pr := p.mapEntries(t)
		if s == 0 && pr == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("BPF maps not empty after connections ended: %d sockhash entries, %d pairings", s, pr)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// withTimeout is a context bounded for one test step.
func withTimeout(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

const proxyAddr = nettest.ProxyClientIP + ":8080"

func backendAt(id string, port int) backendRow {
	return backendRow{ID: id, Region: "sa", Country: "BR", Addr: nettest.BackendIP, Port: port, Healthy: true, Weight: 1, Soft: 1000, Hard: 0}
}

// adminAddr is where tests that read /status and /metrics run the admin
// server: loopback of the proxy's namespace, reached with ns.Do.
const adminAddr = "127.0.0.1:9090"

// adminEnv turns on the admin server at adminAddr.
const adminEnv = "EDGEPROXY_ADMIN_ADDR=" + adminAddr

// adminGet fetches path from the admin server inside ns.
func adminGet(ns *nettest.NS, path string) (int, []byte, error) {
	client := &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return nettest.Dial(ns, addr, 2*time.Second)
		},
	}}
	resp, err := client.Get("http://" + adminAddr + path)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp.StatusCode, body, err
}

// adminStatus is the part of GET /status the tests read.
type adminStatus struct {
	Panic    bool              `json:"panic"`
	Active   int               `json:"active"`
	Workers  int               `json:"workers"`
	Accepted []uint64          `json:"accepted_per_worker"`
	Rejected map[string]uint64 `json:"rejected"`
	Backends []adminBackend    `json:"backends"`
}

type adminBackend struct {
	ID            string `json:"id"`
	Address       string `json:"address"`
	Healthy       bool   `json:"healthy"`
	State         string `json:"state"`
	StateSince    string `json:"state_since"`
	LastError     string `json:"last_error"`
	Active        int64  `json:"active"`
	ConnectErrors uint64 `json:"connect_errors"`
	ProxyProtocol int    `json:"proxy_protocol"`
}

func (s adminStatus) backend(id string) (adminBackend, bool) {
	for _, b := range s.Backends {
		if b.ID == id {
			return b, true
		}
	}
	return adminBackend{}, false
}

// states shows each backend's state, for failure messages.
func (s adminStatus) states() string {
	var parts []string
	for _, b := range s.Backends {
		parts = append(parts, fmt.Sprintf("%s=%q(since %s, last error %q)", b.ID, b.State, b.StateSince, b.LastError))
	}
	return fmt.Sprintf("panic=%v active=%d backends: %s", s.Panic, s.Active, strings.Join(parts, ", "))
}

// proxyStatus reads GET /status from the admin server in ns.
func proxyStatus(t testing.TB, ns *nettest.NS) adminStatus {
	t.Helper()
	code, body, err := adminGet(ns, "/status")
	if err != nil || code != http.StatusOK {
		t.Fatalf("GET /status: HTTP %d, %v\n%s", code, err, body)
	}
	var st adminStatus
	if err := json.Unmarshal(body, &st); err != nil {
		t.Fatalf("GET /status: %v\n%s", err, body)
	}
	return st
}

// metrics is one scrape of GET /metrics: each sample's series as the text
// format prints it (name{labels}) mapped to its value.
type metrics map[string]float64

// scrape reads GET /metrics from the admin server in ns.
func scrape(t testing.TB, ns *nettest.NS) metrics {
	t.Helper()
	code, body, err := adminGet(ns, "/metrics")
	if err != nil || code != http.StatusOK {
		t.Fatalf("GET /metrics: HTTP %d, %v\n%s", code, err, body)
	}
	m := metrics{}
	for _, line := range strings.Split(string(body), "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("GET /metrics: bad sample %q", line)
		}
		m[line[:i]] = v
	}
	return m
}

// get returns a sample; absent series read as 0 with ok false.
func (m metrics) get(series string) (v float64, ok bool) {
	v, ok = m[series]
	return v, ok
}

// waitUntil polls cond every 50ms until it holds or within has passed; the
// failure names what was awaited and cond's last explanation.
func waitUntil(t testing.TB, within time.Duration, what string, cond func() (bool, string)) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		ok, why := cond()
		if ok {
			return time.Since(start)
		}
		if time.Since(start) > within {
			t.Fatalf("%s: not within %s: %s", what, within, why)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// cpuTicks is the proxy's user plus system CPU time in clock ticks
// (utime and stime of /proc/PID/stat).
func (p *proxyProc) cpuTicks(t testing.TB) int {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.cmd.Process.Pid))
	if err != nil {
		t.Fatalf("read proxy stat: %v", err)
	}
	// Fields after the command name, which may hold spaces: state is
	// field 3, utime 14, stime 15.
	f := strings.Fields(string(data[bytes.LastIndexByte(data, ')')+1:]))
	utime, _ := strconv.Atoi(f[11])
	stime, _ := strconv.Atoi(f[12])
	return utime + stime
}

// outcome is how one connection through the proxy to a greeting backend
// went.
type outcome int

const (
	greeted outcome = iota // a backend's greeting arrived
	refused                // reset or closed without a byte
	silent                 // open, nothing within the wait: e.g. still in the listen backlog
	broken                 // anything else: a failed dial, a garbled greeting
)

func (o outcome) String() string {
	return [...]string{"greeted", "refused", "silent", "broken"}[o]
}

// attempt is one connection's outcome, the greeting backend's id, and how
// long the greeting (or refusal) took from the start of the dial.
type attempt struct {
	out     outcome
	id      string
	err     error
	latency time.Duration
	conn    *net.TCPConn // open after greeted and silent; the caller closes it
}

func (a attempt) String() string {
	return fmt.Sprintf("%s id=%q err=%v after %s", a.out, a.id, a.err, a.latency.Round(time.Millisecond))
}

// tryGreeting dials addr from ns (bound to localIP unless empty) and waits
// up to wait for a greeting "hello from ID".
func tryGreeting(ns *nettest.NS, localIP, addr string, wait time.Duration) attempt {
	start := time.Now()
	var c *net.TCPConn
	var err error
	if localIP == "" {
		c, err = nettest.Dial(ns, addr, 2*time.Second)
	} else {
		c, err = nettest.DialFrom(ns, localIP, addr, 2*time.Second)
	}
	if err != nil {
		a := attempt{out: broken, err: err, latency: time.Since(start)}
		// The reset may beat the dial's own return.
		if errors.Is(err, syscall.ECONNRESET) {
			a.out = refused
		}
		return a
	}
	line, err := nettest.ReadLine(c, wait)
	a := attempt{err: err, latency: time.Since(start), conn: c}
	switch {
	case err == nil && strings.HasPrefix(line, "hello from "):
		a.out, a.id = greeted, strings.TrimPrefix(line, "hello from ")
		return a
	case err != nil && line == "" && isTimeout(err):
		a.out = silent
		return a
	case err != nil && line == "" && (errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)):
		a.out = refused
	default:
		a.out, a.err = broken, fmt.Errorf("greeting %q: %v", line, err)
	}
	c.Close()
	a.conn = nil
	return a
}

// readProcFile reads /proc/PID/name without its trailing newline.
func readProcFile(pid int, name string) (string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/%s", pid, name))
	return strings.TrimSuffix(string(b), "\n"), err
}
