package main

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "edgeproxy-cli-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	// World-readable so the capability tests can run it as nobody.
	_ = os.Chmod(dir, 0o755)
	binary = filepath.Join(dir, "edgeproxy")
	if out, err := exec.Command("go", "build", "-o", binary, ".").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// run executes the binary with a clean EDGEPROXY_* environment.
func run(t *testing.T, env []string, args ...string) (stdout, stderr string, exit int) {
	t.Helper()
	cmd := exec.Command(binary, args...)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "EDGEPROXY_") && !strings.HasPrefix(kv, "DEBUG=") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env, env...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	done := make(chan error, 1)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { done <- cmd.Wait() }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		cmd.Process.Kill()
		<-done
		t.Fatalf("edgeproxy %v did not exit within 20s; stderr:\n%s", args, e.String())
	}
	return o.String(), e.String(), cmd.ProcessState.ExitCode()
}

func sampleDB(t *testing.T) string {
	t.Helper()
	db := filepath.Join(t.TempDir(), "routing.db")
	if _, stderr, code := run(t, nil, "db", "init", "--db", db, "--sample"); code != 0 {
		t.Fatalf("db init: exit %d: %s", code, stderr)
	}
	return db
}

// Every failure is one line naming its cause, and a non-zero exit.
func TestErrorsAreOneLineWithCause(t *testing.T) {
	db := sampleDB(t)
	corrupt := filepath.Join(t.TempDir(), "corrupt.db")
	if err := os.WriteFile(corrupt, bytes.Repeat([]byte("not sqlite "), 100), 0o644); err != nil {
		t.Fatal(err)
	}
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()

	base := []string{"--dataplane", "splice", "--admin", ""}
	for _, tc := range []struct {
		name string
		env  []string
		args []string
		want string
	}{
		{"unknown flag", nil, []string{"run", "--bogus"}, "unknown flag: --bogus"},
		{"missing database", nil, append([]string{"run", "--db", "/nonexistent/routing.db", "--listen", "127.0.0.1:0"}, base...), "/nonexistent/routing.db"},
		{"corrupt database", nil, append([]string{"run", "--db", corrupt, "--listen", "127.0.0.1:0"}, base...), "open routing database"},
		{"listen address in use", nil, append([]string{"run", "--db", db, "--listen", busy.Addr().String()}, base...), "address already in use"},
		{"bad data plane", nil, []string{"run", "--db", db, "--listen", "127.0.0.1:0", "--dataplane", "xdp"}, `--dataplane="xdp": want auto, sockmap or splice`},
		{"bad timeout variable", []string{"EDGEPROXY_CONNECT_TIMEOUT_MS=soon"}, append([]string{"run", "--db", db}, base...), `EDGEPROXY_CONNECT_TIMEOUT_MS="soon"`},
		{"bad reload variable", []string{"EDGEPROXY_DB_RELOAD_SECS=-1"}, append([]string{"run", "--db", db}, base...), `EDGEPROXY_DB_RELOAD_SECS="-1"`},
		{"health fall of zero", []string{"EDGEPROXY_HEALTH_FALL=0"}, append([]string{"run", "--db", db}, base...), `EDGEPROXY_HEALTH_FALL="0": want a whole number from 1 to 1000`},
		{"negative keepalive", []string{"EDGEPROXY_KEEPALIVE_SECS=-5"}, append([]string{"run", "--db", db}, base...), `EDGEPROXY_KEEPALIVE_SECS="-5"`},
		{"rate that is not a number", []string{"EDGEPROXY_CLIENT_RATE=fast"}, append([]string{"run", "--db", db}, base...), `EDGEPROXY_CLIENT_RATE="fast"`},
		{"buffer budget of zero", []string{"EDGEPROXY_MAX_BUFFERED_MB=0"}, append([]string{"run", "--db", db}, base...), `EDGEPROXY_MAX_BUFFERED_MB="0"`},
		{"too many workers", []string{"EDGEPROXY_WORKERS=5000"}, append([]string{"run", "--db", db}, base...), `EDGEPROXY_WORKERS="5000"`},
		{"retries flag out of range", nil, append([]string{"run", "--db", db, "--connect-retries", "99"}, base...), `--connect-retries=99: want a whole number from 0 to 16`},
		{"check timeout longer than its interval", []string{"EDGEPROXY_HEALTH_INTERVAL_SECS=1", "EDGEPROXY_HEALTH_TIMEOUT_MS=5000"}, append([]string{"run", "--db", db}, base...), `checks would overlap`},
		{"echo backend without id", nil, []string{"echo-backend"}, "--id is required"},
		{"unknown command", nil, []string{"serve"}, `unknown command "serve"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, stderr, code := run(t, tc.env, tc.args...)
			if code == 0 {
				t.Fatalf("exit 0, want non-zero; stderr: %s", stderr)
			}
			lines := strings.Split(strings.TrimRight(stderr, "\n"), "\n")
			last := lines[len(lines)-1]
			if !strings.HasPrefix(last, "Error: ") || !strings.Contains(last, tc.want) {
				t.Fatalf("last stderr line %q, want an \"Error: \" line containing %q; all stderr:\n%s", last, tc.want, stderr)
			}
			for _, l := range lines[:len(lines)-1] {
				if strings.HasPrefix(l, "Error") {
					t.Fatalf("more than one error line:\n%s", stderr)
				}
			}
		})
	}
}

func TestDBInitIsIdempotent(t *testing.T) {
	db := filepath.Join(t.TempDir(), "routing.db")
	out, _, code := run(t, nil, "db", "init", "--db", db, "--sample")
	if code != 0 || !strings.Contains(out, "created routing database "+db+"; added 3 sample backends") {
		t.Fatalf("first init: exit %d, %q", code, out)
	}
	out, _, code = run(t, nil, "db", "init", "--db", db, "--sample")
	if code != 0 || !strings.Contains(out, "already had the schema; added 0 sample backends") {
		t.Fatalf("second init: exit %d, %q", code, out)
	}
	out, _, code = run(t, []string{"EDGEPROXY_DB_PATH=" + db}, "db", "init")
	if code != 0 || !strings.Contains(out, db) {
		t.Fatalf("init through EDGEPROXY_DB_PATH: exit %d, %q", code, out)
	}
}

func TestVersion(t *testing.T) {
	out, _, code := run(t, nil, "version")
	if code != 0 || !strings.HasPrefix(out, "edgeproxy ") {
		t.Fatalf("version: exit %d, %q", code, out)
	}
}

// Help text is part of the interface: every subcommand has it, and each
// flag of the contract is listed with its variable.
func TestHelpNamesEveryVariable(t *testing.T) {
	out, _, code := run(t, nil, "run", "--help")
	if code != 0 {
		t.Fatalf("run --help: exit %d", code)
	}
	for _, v := range []string{"EDGEPROXY_LISTEN_ADDR", "EDGEPROXY_DB_PATH", "EDGEPROXY_REGION", "EDGEPROXY_DB_RELOAD_SECS",
		"EDGEPROXY_BINDING_TTL_SECS", "EDGEPROXY_BINDING_GC_INTERVAL_SECS", "EDGEPROXY_GEOIP_PATH", "EDGEPROXY_DATAPLANE",
		"EDGEPROXY_ADMIN_ADDR", "EDGEPROXY_BPF_PIN_PATH", "EDGEPROXY_CONNECT_TIMEOUT_MS", "DEBUG"} {
		if !strings.Contains(out, v) {
			t.Errorf("run --help does not mention %s", v)
		}
	}
	for _, sub := range [][]string{{"db", "init"}, {"echo-backend"}, {"version"}} {
		if _, _, code := run(t, nil, append(sub, "--help")...); code != 0 {
			t.Errorf("%v --help: exit %d", sub, code)
		}
	}
}

// Without the capabilities BPF needs, `sockmap` refuses to start and says
// why, and `auto` falls back to splice and logs the same reason.
func TestDataplaneChoiceWithoutCapabilities(t *testing.T) {
	if runtime.GOOS != "linux" || os.Geteuid() != 0 {
		t.Skip("needs root on Linux to drop to an unprivileged user with setpriv")
	}
	// t.TempDir's parent is private to root; nobody must read the db.
	dir, err := os.MkdirTemp("", "edgeproxy-caps-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	_ = os.Chmod(dir, 0o755)
	db := filepath.Join(dir, "routing.db")
	if _, stderr, code := run(t, nil, "db", "init", "--db", db, "--sample"); code != 0 {
		t.Fatalf("db init: %s", stderr)
	}
	_ = os.Chmod(db, 0o644)
	unprivileged := func(args ...string) *exec.Cmd {
		return exec.Command("setpriv", append([]string{"--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--", binary}, args...)...)
	}
	out, err := unprivileged("run", "--db", db, "--listen", "127.0.0.1:0", "--admin", "", "--dataplane", "sockmap").CombinedOutput()
	if err == nil {
		t.Fatalf("sockmap as nobody started; output:\n%s", out)
	}
	if !strings.Contains(string(out), "Error: run: data plane sockmap: sockmap data plane not supported: missing [CAP_BPF CAP_NET_ADMIN]") {
		t.Fatalf("sockmap as nobody: want the probe's reason, got:\n%s", out)
	}

	cmd := unprivileged("run", "--db", db, "--listen", "127.0.0.1:0", "--admin", "", "--dataplane", "auto")
	logs := &lockedBuffer{}
	cmd.Stderr = logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(logs.String(), "edgeproxy started") && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if !strings.Contains(logs.String(), "dataplane=splice") || !strings.Contains(logs.String(), "sockmap unusable") || !strings.Contains(logs.String(), "missing [CAP_BPF CAP_NET_ADMIN]") {
		t.Fatalf("auto as nobody: want splice with the probe's reason in the start line, got:\n%s", logs.String())
	}
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
