//go:build linux

package integration

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/edgeproxy/edgeproxy/internal/nettest"
	"golang.org/x/sys/unix"
)

// adoptOrphans makes the test binary the subreaper of the processes it
// starts: a server started by `edgeproxy upgrade` outlives that command
// and is then re-parented here, so the test can wait for it and see its
// exit instead of losing track of it.
var adoptOrphans = sync.OnceValue(func() error {
	return unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
})

var upgradedPID = regexp.MustCompile(`upgraded: pid (\d+) serves, pid (\d+) drains`)

// upgrade runs `edgeproxy upgrade` in ns with the environment old runs
// with (as the unit's ExecReload does) and returns the new server as a
// proxyProc, or the command's error and output. The new process's log
// goes to its own buffer from its first line.
func upgrade(t *testing.T, ns *nettest.NS, old *proxyProc, extraEnv ...string) (*proxyProc, string, error) {
	t.Helper()
	// No t.Fatal here: TestConcurrentUpgrades calls this from goroutines.
	if err := adoptOrphans(); err != nil {
		return nil, "", fmt.Errorf("become child subreaper: %w", err)
	}
	logR, logW, err := os.Pipe()
	if err != nil {
		return nil, "", err
	}
	cmd := ns.Command(binary, "upgrade")
	cmd.Env = append(append([]string{}, old.cmd.Env...), extraEnv...)
	// A file, not a pipe os/exec copies: Wait must not wait for the new
	// server, which inherits it and runs on.
	cmd.Stdout, cmd.Stderr = logW, logW
	next := &proxyProc{Plane: old.Plane, PinPath: old.PinPath, DBPath: old.DBPath, logs: &syncBuffer{}, done: make(chan error, 1)}
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		sc := bufio.NewScanner(logR)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			next.logs.Write([]byte(sc.Text() + "\n"))
		}
	}()
	runErr := cmd.Run()
	logW.Close()
	// The reader may not have reached the command's last line yet (the
	// new server keeps the pipe open, so there is no EOF to wait for).
	var out string
	var m []string
	for deadline := time.Now().Add(2 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		out = next.logs.String()
		m = upgradedPID.FindStringSubmatch(out)
		if m != nil || time.Now().After(deadline) || (runErr != nil && strings.Contains(out, "Error: upgrade")) {
			break
		}
	}
	if runErr != nil || m == nil {
		logR.Close()
		return nil, out, fmt.Errorf("edgeproxy upgrade: %v", runErr)
	}
	pid, _ := strconv.Atoi(m[1])
	proc, err := os.FindProcess(pid)
	if err != nil {
		return nil, out, fmt.Errorf("find new server pid %d: %w", pid, err)
	}
	next.cmd = &exec.Cmd{Process: proc, Env: cmd.Env}
	go func() {
		var ws syscall.WaitStatus
		for {
			_, err := syscall.Wait4(pid, &ws, 0, nil)
			if errors.Is(err, syscall.EINTR) {
				continue
			}
			<-readerDone
			logR.Close()
			switch {
			case err != nil:
				next.done <- fmt.Errorf("wait for pid %d: %w", pid, err)
			case ws.Signaled() || ws.ExitStatus() != 0:
				next.done <- fmt.Errorf("pid %d ended: %v", pid, ws)
			default:
				next.done <- nil
			}
			return
		}
	}()
	t.Cleanup(func() {
		next.stop(t)
		if t.Failed() {
			t.Logf("log of pid %d:\n%s", pid, next.logs.tail(64<<10))
		}
	})
	return next, out, nil
}

func (p *proxyProc) pid() int { return p.cmd.Process.Pid }

// loadCounts are what a client loop saw: every attempt ends as ok,
// refused, reset, corrupted or failed otherwise.
type loadCounts struct {
	attempts, ok, refused, reset, corrupted, other atomic.Int64
	mu                                             sync.Mutex
	firstErrs                                      []string
}

func (c *loadCounts) note(kind *atomic.Int64, format string, args ...any) {
	kind.Add(1)
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.firstErrs) < 5 {
		c.firstErrs = append(c.firstErrs, fmt.Sprintf(format, args...))
	}
}

func (c *loadCounts) String() string {
	return fmt.Sprintf("attempted %d, completed %d, refused %d, reset %d, corrupted %d, other failures %d %v",
		c.attempts.Load(), c.ok.Load(), c.refused.Load(), c.reset.Load(), c.corrupted.Load(), c.other.Load(), c.firstErrs)
}

func (c *loadCounts) failures() int64 {
	return c.refused.Load() + c.reset.Load() + c.corrupted.Load() + c.other.Load()
}

// runLoad runs workers client loops through the proxy until ctx ends (each
// at most maxPerWorker connections): connect, read the greeting of wantID,
// send a random payload, check its echo byte for byte, close.
func runLoad(ctx context.Context, ns *nettest.NS, workers, maxPerWorker int, wantID string) (*loadCounts, func()) {
	counts := &loadCounts{}
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 42))
			for i := 0; i < maxPerWorker && ctx.Err() == nil; i++ {
				counts.attempts.Add(1)
				oneExchange(ns, rng, counts, wantID)
			}
		}()
	}
	return counts, wg.Wait
}

func oneExchange(ns *nettest.NS, rng *rand.Rand, counts *loadCounts, wantID string) {
	c, err := nettest.Dial(ns, proxyAddr, 3*time.Second)
	if err != nil {
		classify(counts, "dial", err)
		return
	}
	defer c.Close()
	line, err := nettest.ReadLine(c, 3*time.Second)
	if err != nil {
		classify(counts, "greeting", err)
		return
	}
	if line != "hello from "+wantID {
		counts.note(&counts.corrupted, "greeting %q", line)
		return
	}
	payload := make([]byte, 64+rng.IntN(8192))
	for i := range payload {
		payload[i] = byte(rng.Uint32())
	}
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write(payload); err != nil {
		classify(counts, "write", err)
		return
	}
	got := make([]byte, len(payload))
	if _, err := io.ReadFull(c, got); err != nil {
		classify(counts, "read echo", err)
		return
	}
	if !bytes.Equal(got, payload) {
		counts.note(&counts.corrupted, "echo of %d bytes differs", len(payload))
		return
	}
	counts.ok.Add(1)
}

func classify(counts *loadCounts, step string, err error) {
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		counts.note(&counts.refused, "%s: %v", step, err)
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, syscall.EPIPE):
		counts.note(&counts.reset, "%s: %v", step, err)
	default:
		counts.note(&counts.other, "%s: %v", step, err)
	}
}

// pingLine sends one line on c and checks its echo.
func pingLine(c *net.TCPConn, msg string) error {
	if _, err := fmt.Fprintln(c, msg); err != nil {
		return err
	}
	got, err := nettest.ReadLine(c, 3*time.Second)
	if err != nil {
		return err
	}
	if got != msg {
		return fmt.Errorf("echo %q, want %q", got, msg)
	}
	return nil
}

// waitGone waits for an old process that handed over to end by itself,
// within its drain time and a margin.
func waitGone(t *testing.T, p *proxyProc, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	timer := time.NewTimer(max(within, 0))
	defer timer.Stop()
	ended := func(err error) time.Duration {
		p.cmd = nil
		if err != nil {
			t.Errorf("old process ended with %v", err)
		}
		return time.Since(start)
	}
	select {
	case err := <-p.done:
		return ended(err)
	case <-timer.C:
		select {
		case err := <-p.done:
			return ended(err)
		default:
		}
		dumpStacks(t, p)
		t.Fatalf("old process still running %s after the hand-over (drain time is shorter)", within)
		return 0
	}
}

func TestUpgradeUnderLoad(t *testing.T) {
	nettest.RequireRoot(t)
	for _, plane := range planes {
		t.Run(plane, func(t *testing.T) {
			topo := nettest.NewTopology(t)
			nettest.Serve(t, topo.Backend, nettest.BackendIP+":9000", nettest.Greeter("b1"))
			old := startProxy(t, topo.Proxy, plane, []backendRow{backendAt("b1", 9000)},
				adminEnv, "EDGEPROXY_DRAIN_SECS=5", "EDGEPROXY_HEALTH_INTERVAL_SECS=0")
			// Long-lived connections opened before the upgrade.
			var held []*net.TCPConn
			for i := range 5 {
				c, err := nettest.Dial(topo.Client, proxyAddr, 2*time.Second)
				if err != nil {
					t.Fatalf("held connection %d: %v", i, err)
				}
				t.Cleanup(func() { c.Close() })
				if l, err := nettest.ReadLine(c, 2*time.Second); err != nil || l != "hello from b1" {
					t.Fatalf("held connection %d greeting %q %v", i, l, err)
				}
				held = append(held, c)
			}
			before := scrape(t, topo.Proxy)

			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			counts, wait := runLoad(ctx, topo.Client, 4, 5000, "b1")
			time.Sleep(700 * time.Millisecond)
			next, out, err := upgrade(t, topo.Proxy, old)
			if err != nil {
				cancel()
				wait()
				t.Fatalf("%v\n%s", err, out)
			}
			t.Logf("upgrade: %s", strings.TrimSpace(strings.Split(out, "\n")[0]))
			time.Sleep(700 * time.Millisecond)
			for i, c := range held {
				if err := pingLine(c, fmt.Sprintf("held %d after upgrade", i)); err != nil {
					t.Errorf("held connection %d after the upgrade: %v", i, err)
				}
			}
			// A second upgrade, from the new process this time.
			third, out, err := upgrade(t, topo.Proxy, next)
			if err != nil {
				cancel()
				wait()
				t.Fatalf("second upgrade: %v\n%s", err, out)
			}
			time.Sleep(700 * time.Millisecond)
			cancel()
			wait()
			t.Logf("client loop: %s", counts)
			if counts.failures() != 0 || counts.ok.Load() < 50 {
				t.Errorf("under load through two upgrades: %s; want no failure and at least 50 completed", counts)
			}
			// The held connections still work, then end by themselves,
			// and the old processes leave once they are gone.
			for i, c := range held {
				if err := pingLine(c, fmt.Sprintf("held %d at the end", i)); err != nil {
					t.Errorf("held connection %d after two upgrades: %v", i, err)
				}
				c.Close()
			}
			waitGone(t, old, 7*time.Second)
			waitGone(t, next, 7*time.Second)
			// The old processes' final counts reach the serving one just
			// as they exit: give it a moment to add them.
			series := `edgeproxy_connections_total{backend="b1"}`
			want := before[series] + float64(counts.ok.Load())
			waitUntil(t, 3*time.Second, "counters continue across the upgrades", func() (bool, string) {
				got := scrape(t, topo.Proxy)[series]
				return got >= want, fmt.Sprintf("%s went from %v to %v with %d connections completed", series, before[series], got, counts.ok.Load())
			})
			nettest.MustReach(t, topo.Client, proxyAddr, "b1")
			if plane == "sockmap" {
				third.waitNoEntries(t)
				if n := pinnedFlows(t, third); n != 0 {
					t.Errorf("%d flow slots still owned after every connection closed", n)
				}
			}
		})
	}
}

func TestUpgradeHardLimitAcrossProcesses(t *testing.T) {
	nettest.RequireRoot(t)
	topo := nettest.NewTopology(t)
	nettest.Serve(t, topo.Backend, nettest.BackendIP+":9000", nettest.Greeter("b1"))
	row := backendAt("b1", 9000)
	row.Soft, row.Hard = 1, 3
	old := startProxy(t, topo.Proxy, "sockmap", []backendRow{row}, adminEnv, "EDGEPROXY_DRAIN_SECS=10", "EDGEPROXY_HEALTH_INTERVAL_SECS=0")
	var held []*net.TCPConn
	for i := range 3 {
		c, err := nettest.Dial(topo.Client, proxyAddr, 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		if l, err := nettest.ReadLine(c, 2*time.Second); err != nil || l != "hello from b1" {
			t.Fatalf("connection %d greeting %q %v", i, l, err)
		}
		held = append(held, c)
	}
	next, _, err := upgrade(t, topo.Proxy, old)
	if err != nil {
		t.Fatal(err)
	}
	// Three connections live in the old process: the new one must refuse
	// a fourth, however many times it is asked.
	for i := range 5 {
		if l, served := servedGreeting(t, topo.Client); served {
			t.Fatalf("connection %d beyond the hard limit was served (%q): the new process does not count the old one's connections", i, l)
		}
	}
	if n := scrape(t, topo.Proxy)[`edgeproxy_rejected_connections_total{reason="all_at_hard_limit"}`]; n < 5 {
		t.Errorf("all_at_hard_limit = %v after 5 refusals", n)
	}
	// One old connection ends: exactly one new one fits.
	held[0].Close()
	var fresh *net.TCPConn
	waitUntil(t, 3*time.Second, "a slot freed in the old process is usable in the new one", func() (bool, string) {
		c, err := nettest.Dial(topo.Client, proxyAddr, 2*time.Second)
		if err != nil {
			return false, err.Error()
		}
		if l, err := nettest.ReadLine(c, 2*time.Second); err != nil {
			c.Close()
			return false, fmt.Sprintf("refused (%v)", err)
		} else if l != "hello from b1" {
			c.Close()
			return false, l
		}
		fresh = c
		return true, ""
	})
	defer fresh.Close()
	if l, served := servedGreeting(t, topo.Client); served {
		t.Fatalf("a fifth connection overall was served (%q) with a hard limit of 3", l)
	}
	// The old process reports each close to the new one at once; give
	// the report of held[0]'s close time to arrive before the kill.
	time.Sleep(300 * time.Millisecond)
	// The old process is killed while it drains: its two connections
	// die with it, and the new process takes them out of the shared
	// count (it never got the old one's final message), so two more fit.
	old.kill()
	waitUntil(t, 3*time.Second, "the killed old process's connections leave the shared count", func() (bool, string) {
		st := proxyStatus(t, topo.Proxy)
		b, _ := st.backend("b1")
		return strings.Contains(next.logs.String(), "ended without handing over"), fmt.Sprintf("status active %d", b.Active)
	})
	for i := range 2 {
		c, err := nettest.Dial(topo.Client, proxyAddr, 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if l, err := nettest.ReadLine(c, 2*time.Second); err != nil || l != "hello from b1" {
			t.Fatalf("connection %d after the old process died: %q %v (its connections still count)", i, l, err)
		}
	}
	if l, served := servedGreeting(t, topo.Client); served {
		t.Fatalf("a fourth connection in the new process was served (%q) with a hard limit of 3", l)
	}
}

// servedGreeting dials the proxy and reads a greeting: served is false
// when the proxy closed the connection at once (a refusal: the reset may
// even reach the client before its connect returns).
func servedGreeting(t *testing.T, ns *nettest.NS) (line string, served bool) {
	t.Helper()
	c, err := nettest.Dial(ns, proxyAddr, 2*time.Second)
	if errors.Is(err, syscall.ECONNRESET) {
		return "", false
	}
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer c.Close()
	line, err = nettest.ReadLine(c, 2*time.Second)
	return line, err == nil
}

func TestUpgradeRefusals(t *testing.T) {
	nettest.RequireRoot(t)
	topo := nettest.NewTopology(t)
	nettest.Serve(t, topo.Backend, nettest.BackendIP+":9000", nettest.Greeter("b1"))
	old := startProxy(t, topo.Proxy, "sockmap", []backendRow{backendAt("b1", 9000)}, "EDGEPROXY_HEALTH_INTERVAL_SECS=0")

	t.Run("unrelated instance on the same pin path", func(t *testing.T) {
		cmd := topo.Proxy.Command(binary, "run")
		cmd.Env = append(append([]string{}, old.cmd.Env...), "EDGEPROXY_LISTEN_ADDR=0.0.0.0:8081")
		out, err := runBounded(cmd, 10*time.Second)
		if err == nil || !strings.Contains(out, "already loaded by another process") || !strings.Contains(out, "edgeproxy upgrade") {
			t.Fatalf("second instance: err %v, want the pin lock refusal naming the fix:\n%s", err, out)
		}
	})
	t.Run("new binary with another map layout", func(t *testing.T) {
		_, out, err := upgrade(t, topo.Proxy, old, "EDGEPROXY_TEST_SKEW_MAPS=1")
		if err == nil {
			t.Fatalf("upgrade to a binary with another map layout succeeded:\n%s", out)
		}
		if !strings.Contains(out, "another layout") || !strings.Contains(out, "keeps serving") {
			t.Fatalf("upgrade refusal does not say why:\n%s", out)
		}
	})
	t.Run("no running process", func(t *testing.T) {
		cmd := topo.Proxy.Command(binary, "upgrade")
		cmd.Env = append(append([]string{}, old.cmd.Env...), "EDGEPROXY_LISTEN_ADDR=0.0.0.0:8082")
		out, err := runBounded(cmd, 10*time.Second)
		if err == nil || !strings.Contains(out, "start it with edgeproxy run") {
			t.Fatalf("upgrade with nothing running: err %v\n%s", err, out)
		}
	})
	// The old one served on through all of it, and its pins are its own.
	nettest.MustReach(t, topo.Client, proxyAddr, "b1")
	old.waitNoEntries(t)
	if err := old.cmd.Process.Signal(syscall.Signal(0)); err != nil {
		t.Fatalf("old process gone: %v", err)
	}
	// And a good upgrade still works after the refused one.
	if _, out, err := upgrade(t, topo.Proxy, old); err != nil {
		t.Fatalf("upgrade after a refused one: %v\n%s", err, out)
	}
	nettest.MustReach(t, topo.Client, proxyAddr, "b1")
}

// runBounded runs cmd with its output captured, killing it after d.
func runBounded(cmd *exec.Cmd, d time.Duration) (string, error) {
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		return "", err
	}
	timer := time.AfterFunc(d, func() { _ = cmd.Process.Kill() })
	defer timer.Stop()
	err := cmd.Wait()
	return out.String(), err
}

func TestTenUpgradesInARow(t *testing.T) {
	nettest.RequireRoot(t)
	const drain = 3 * time.Second
	topo := nettest.NewTopology(t)
	nettest.Serve(t, topo.Backend, nettest.BackendIP+":9000", nettest.Greeter("b1"))
	cur := startProxy(t, topo.Proxy, "sockmap", []backendRow{backendAt("b1", 9000)},
		"EDGEPROXY_DRAIN_SECS=3", "EDGEPROXY_HEALTH_INTERVAL_SECS=0")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	counts, wait := runLoad(ctx, topo.Client, 2, 20000, "b1")
	// Each old process gets a connection that outlives every drain: the
	// drain deadline, not the client, must end it.
	type oldProc struct {
		p        *proxyProc
		handedAt time.Time
	}
	var olds []oldProc
	maxAlive := 0
	var mu sync.Mutex
	alive := func() int {
		mu.Lock()
		defer mu.Unlock()
		n := 0
		for _, o := range olds {
			if o.p.cmd != nil && o.p.cmd.Process.Signal(syscall.Signal(0)) == nil {
				n++
			}
		}
		return n
	}
	for i := range 10 {
		stuck, err := nettest.Dial(topo.Client, proxyAddr, 2*time.Second)
		if err != nil {
			t.Fatalf("upgrade %d: connection to hold: %v", i, err)
		}
		t.Cleanup(func() { stuck.Close() })
		next, out, err := upgrade(t, topo.Proxy, cur)
		if err != nil {
			cancel()
			wait()
			t.Fatalf("upgrade %d: %v\n%s", i, err, out)
		}
		mu.Lock()
		olds = append(olds, oldProc{p: cur, handedAt: time.Now()})
		mu.Unlock()
		cur = next
		// Draining processes: at most one per hand-over still inside its
		// drain time, never more.
		if n := alive(); n > maxAlive {
			maxAlive = n
		}
		if n, limit := alive(), int(drain/time.Second)+1; n > limit {
			t.Errorf("after upgrade %d: %d old processes alive, want at most %d (one per hand-over within the %s drain)", i, n, limit, drain)
		}
		time.Sleep(time.Second)
	}
	cancel()
	wait()
	t.Logf("client loop through 10 upgrades: %s; most old processes alive at once: %d", counts, maxAlive)
	if counts.failures() != 0 {
		t.Errorf("10 upgrades under load: %s", counts)
	}
	for i, o := range olds {
		waitGone(t, o.p, time.Until(o.handedAt.Add(drain+2*time.Second))+10*time.Millisecond)
		_ = i
	}
	if n := alive(); n != 0 {
		t.Errorf("%d old processes outlived their drain", n)
	}
	nettest.MustReach(t, topo.Client, proxyAddr, "b1")
}

// dumpStacks logs where a process that should have ended is stuck: each
// thread's kernel stack, then the Go stacks (SIGQUIT makes the runtime
// print them to the log before exiting).
func dumpStacks(t *testing.T, p *proxyProc) {
	pid := p.cmd.Process.Pid
	tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	for _, task := range tasks {
		stack, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/stack", pid, task.Name()))
		comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/wchan", pid, task.Name()))
		t.Logf("pid %d thread %s wchan %s:\n%s", pid, task.Name(), comm, stack)
	}
	_ = p.cmd.Process.Signal(syscall.SIGQUIT)
	time.Sleep(500 * time.Millisecond)
}

// Two upgrades at once: the serving process hands over to one; the other
// is refused while that hand-over runs ("already in progress") or, if it
// asks after, takes over from the winner. Never two serving processes
// that each think they own the pins, never a refused client.
func TestConcurrentUpgrades(t *testing.T) {
	nettest.RequireRoot(t)
	topo := nettest.NewTopology(t)
	nettest.Serve(t, topo.Backend, nettest.BackendIP+":9000", nettest.Greeter("b1"))
	old := startProxy(t, topo.Proxy, "sockmap", []backendRow{backendAt("b1", 9000)},
		"EDGEPROXY_DRAIN_SECS=2", "EDGEPROXY_HEALTH_INTERVAL_SECS=0")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	counts, wait := runLoad(ctx, topo.Client, 2, 20000, "b1")
	type result struct {
		next *proxyProc
		out  string
		err  error
	}
	results := make(chan result, 2)
	for range 2 {
		go func() {
			next, out, err := upgrade(t, topo.Proxy, old)
			results <- result{next, out, err}
		}()
	}
	var served []*proxyProc
	for range 2 {
		r := <-results
		switch {
		case r.err == nil:
			served = append(served, r.next)
		case !strings.Contains(r.out, "already in progress") && !strings.Contains(r.out, "draining, not serving"):
			t.Errorf("concurrent upgrade failed for another reason than the other one running:\n%s", r.out)
		default:
			t.Logf("concurrent upgrade refused: %s", strings.TrimSpace(r.out[strings.LastIndex(r.out, "Error: upgrade"):]))
		}
	}
	if len(served) == 0 {
		t.Fatal("neither of two concurrent upgrades took over")
	}
	time.Sleep(500 * time.Millisecond)
	cancel()
	wait()
	if counts.failures() != 0 {
		t.Errorf("clients during two concurrent upgrades: %s", counts)
	}
	waitGone(t, old, 4*time.Second)
	if len(served) == 2 {
		// Sequential after all: the first winner handed over to the second.
		first, second := served[0], served[1]
		if strings.Contains(second.logs.String(), fmt.Sprintf("successor=%d", first.pid())) {
			first, second = second, first
		}
		waitGone(t, first, 4*time.Second)
		served = []*proxyProc{second}
	}
	nettest.MustReach(t, topo.Client, proxyAddr, "b1")
	served[0].waitNoEntries(t)
}

// An old process with no connection has nothing to drain and ends at
// once: it must still answer the new one first, which otherwise never
// learns it may serve (seen: the new process drained itself and nobody
// served).
func TestUpgradeIdleProxy(t *testing.T) {
	nettest.RequireRoot(t)
	for _, plane := range planes {
		t.Run(plane, func(t *testing.T) {
			topo := nettest.NewTopology(t)
			nettest.Serve(t, topo.Backend, nettest.BackendIP+":9000", nettest.Greeter("b1"))
			cur := startProxy(t, topo.Proxy, plane, []backendRow{backendAt("b1", 9000)}, "EDGEPROXY_HEALTH_INTERVAL_SECS=0")
			for i := range 5 {
				next, out, err := upgrade(t, topo.Proxy, cur)
				if err != nil {
					t.Fatalf("upgrade %d of an idle proxy: %v\n%s", i, err, out)
				}
				waitGone(t, cur, 3*time.Second)
				nettest.MustReach(t, topo.Client, proxyAddr, "b1")
				if strings.Contains(next.logs.String(), "draining this process") {
					t.Fatalf("upgrade %d: the new process drains itself:\n%s", i, next.logs.String())
				}
				cur = next
			}
		})
	}
}

// A binding made by the old process holds in the new one: both use the
// pinned affinity map, so a client keeps its backend across an upgrade.
func TestAffinitySurvivesUpgrade(t *testing.T) {
	lab := newGeoLab(t)
	rows := []backendRow{row("eu-a", "eu", "FR", 9001, 1, 100, 0), row("eu-b", "eu", "FR", 9002, 1, 100, 0)}
	lab.serveBackends(t, rows)
	for _, plane := range planes {
		t.Run(plane, func(t *testing.T) {
			old := lab.start(t, plane, rows, "EDGEPROXY_DRAIN_SECS=2")
			// A US client holds eu-a (a tie between idle backends goes to
			// eu-a), so the BR client is routed to, and bound to, eu-b.
			hold, id := lab.connect(t, "US")
			if id != "eu-a" {
				t.Fatalf("US client reached %s, want eu-a", id)
			}
			if got := lab.reach(t, "BR"); got != "eu-b" {
				t.Fatalf("BR client reached %s, want eu-b (eu-a busy)", got)
			}
			hold.Close()
			next, out, err := upgrade(t, lab.proxy, old)
			if err != nil {
				t.Fatalf("upgrade: %v\n%s", err, out)
			}
			waitGone(t, old, 5*time.Second)
			// Both backends idle now: without its binding BR would get eu-a.
			if got := lab.reach(t, "BR"); got != "eu-b" {
				t.Fatalf("after the upgrade the BR client reached %s, want eu-b: its binding was lost", got)
			}
			next.stop(t)
		})
	}
}
