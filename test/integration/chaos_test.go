//go:build linux

package integration

import (
	"bytes"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/edgeproxy/edgeproxy/internal/nettest"
)

// The chaos run (issue 12, point 5): steady echo traffic with payload
// checks through the proxy while killable backends are SIGKILLed and
// restarted, routing.db changes 50 times a second, one backend stops
// reading, and the proxy is upgraded twice. Every connection is
// classified; corrupted must be 0 and every refusal or reset must be
// explained by a backend that was deliberately dead or full at the time.
//
//	go test -count=1 -run TestChaos -v ./test/integration/
//	EDGEPROXY_CHAOS_SEED=12345 go test ... # replay one run's schedule
//
// The seed fixes the schedule (which row changes how, payload sizes and
// bytes, event times); the interleaving with the kernel is the machine's.

const (
	chaosLength     = 10 * time.Second // the DB churn; traffic runs over it
	chaosDBPeriod   = 20 * time.Millisecond
	chaosWorkers    = 6
	chaosMaxPayload = 32 << 10
	chaosStall      = 2 * time.Second
	// chaosFullBound is how long a connection to the backend that stopped
	// reading may last: both planes sample stalls once a second and the
	// first sample only starts the clock, the clock restarts whenever the
	// receiver acknowledges a byte (it does while its receive queue
	// fills), and the machine is shared (6.0 s seen on the splice plane).
	chaosFullBound   = 2*chaosStall + 2*time.Second + 2*time.Second
	chaosConnTimeout = 10 * time.Second // a client's bound on one connection
	// chaosFullPush bounds what a client pushes at the backend that
	// stopped reading: more than every queue on the way can park.
	chaosFullPush = 32 << 20
)

// chaosSeed is EDGEPROXY_CHAOS_SEED, else a fresh one; the test prints it.
func chaosSeed(t *testing.T) uint64 {
	if v := os.Getenv("EDGEPROXY_CHAOS_SEED"); v != "" {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			t.Fatalf("EDGEPROXY_CHAOS_SEED=%q: want a whole number", v)
		}
		return n
	}
	return rand.Uint64()
}

func TestChaos(t *testing.T) {
	nettest.RequireRoot(t)
	seed := chaosSeed(t)
	t.Logf("chaos seed %d (replay: EDGEPROXY_CHAOS_SEED=%d go test -count=1 -run TestChaos -v ./test/integration/)", seed, seed)
	for i, plane := range planes {
		t.Run(plane, func(t *testing.T) { runChaos(t, plane, seed+uint64(i)) })
	}
}

// Backends of the chaos run, all on the backend host.
const (
	chaosStable1 = "b1" // never killed, never marked unhealthy: something always serves
	chaosStable2 = "b2"
	chaosKill1   = "k1" // echo-backend processes, SIGKILLed and restarted
	chaosKill2   = "k2"
	chaosFull    = "full" // greets, then never reads
)

var chaosPorts = map[string]int{
	chaosStable1: 9001, chaosStable2: 9002, chaosKill1: 9011, chaosKill2: 9012, chaosFull: 9020,
	"s1": 9031, "s2": 9032, "s3": 9033, // spares: rows added and removed
}

var chaosSpares = []string{"s1", "s2", "s3"}

// deadWindow is when a backend was deliberately unable to serve.
type deadWindow struct {
	id       string
	from, to time.Time // to is zero while it is still down
}

// chaosLog records the deliberate outages, for the classification.
type chaosLog struct {
	mu   sync.Mutex
	dead []deadWindow
}

func (l *chaosLog) down(id string, at time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.dead = append(l.dead, deadWindow{id: id, from: at})
}

func (l *chaosLog) up(id string, at time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for i := len(l.dead) - 1; i >= 0; i-- {
		if l.dead[i].id == id && l.dead[i].to.IsZero() {
			l.dead[i].to = at
			return
		}
	}
}

// explains reports whether a connection open over [start, end] was cut by
// the kill of backend id (of any backend when id is empty): it was open at
// the instant of a kill. Only that instant counts, not the whole outage:
// while a backend is down, dials to it fail over to the next one, so a
// connection that starts then must succeed. The slack covers the kernel
// closing the killed process's sockets after the signal.
func (l *chaosLog) explains(id string, start, end time.Time) bool {
	const slack = 500 * time.Millisecond
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, w := range l.dead {
		if id != "" && w.id != id {
			continue
		}
		if !start.After(w.from.Add(slack)) && !end.Before(w.from) {
			return true
		}
	}
	return false
}

// describe lists the outages relative to begin, for the log.
func (l *chaosLog) describe(begin time.Time) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var parts []string
	for _, w := range l.dead {
		to := "end"
		if !w.to.IsZero() {
			to = w.to.Sub(begin).Round(time.Millisecond).String()
		}
		parts = append(parts, fmt.Sprintf("%s %s-%s", w.id, w.from.Sub(begin).Round(time.Millisecond), to))
	}
	return strings.Join(parts, ", ")
}

// connResult is how one client connection went.
type connResult struct {
	start, end time.Time
	backend    string // from the greeting; empty if none came
	kind       resultKind
	err        error
	sent, got  int
}

type resultKind int

const (
	completed   resultKind = iota // the whole payload echoed back intact, then EOF
	refusedConn                   // refused, reset or closed before a greeting
	resetConn                     // greeted, then cut (reset or EOF) before the echo was whole
	corrupted                     // a byte differs from what was sent, or a garbled greeting
	hung                          // the client's own deadline passed: nothing bounded it
)

func (k resultKind) String() string {
	return [...]string{"completed", "refused", "reset", "corrupted", "hung"}[k]
}

// chaosBackends runs the backends: in-process greeters for the stable,
// spare and full ones, echo-backend processes for the killable ones.
type chaosBackends struct {
	t    *testing.T
	ns   *nettest.NS
	log  *chaosLog
	mu   sync.Mutex
	proc map[string]*echoProc
}

type echoProc struct {
	cmd  *os.Process
	done chan struct{}
}

func (b *chaosBackends) startKillable(id string) {
	b.t.Helper()
	addr := fmt.Sprintf("%s:%d", nettest.BackendIP, chaosPorts[id])
	cmd := b.ns.Command(binary, "echo-backend", "--listen", addr, "--id", id)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		b.t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.t.Fatalf("start echo-backend %s: %v", id, err)
	}
	p := &echoProc{cmd: cmd.Process, done: make(chan struct{})}
	listening := make(chan struct{})
	go func() {
		buf := make([]byte, 4096)
		var seen []byte
		once := sync.Once{}
		for {
			n, err := stderr.Read(buf)
			seen = append(seen, buf[:n]...)
			if bytes.Contains(seen, []byte("listening on")) {
				once.Do(func() { close(listening) })
			}
			if err != nil {
				return
			}
		}
	}()
	go func() { _ = cmd.Wait(); close(p.done) }()
	select {
	case <-listening:
	case <-p.done:
		b.t.Fatalf("echo-backend %s exited before listening on %s", id, addr)
	case <-time.After(5 * time.Second):
		b.t.Fatalf("echo-backend %s not listening on %s after 5s", id, addr)
	}
	b.mu.Lock()
	b.proc[id] = p
	b.mu.Unlock()
}

// kill SIGKILLs a killable backend: the kernel closes its sockets, so its
// clients see a reset or an early end.
func (b *chaosBackends) kill(id string) {
	b.mu.Lock()
	p := b.proc[id]
	delete(b.proc, id)
	b.mu.Unlock()
	if p == nil {
		return
	}
	b.log.down(id, time.Now())
	_ = p.cmd.Kill()
	<-p.done
}

func (b *chaosBackends) restart(id string) {
	b.startKillable(id)
	b.log.up(id, time.Now())
}

func (b *chaosBackends) killAll() {
	b.mu.Lock()
	ids := make([]string, 0, len(b.proc))
	for id := range b.proc {
		ids = append(ids, id)
	}
	b.mu.Unlock()
	for _, id := range ids {
		b.kill(id)
	}
}

// stoppedReader greets, then reads nothing for up to a minute: the proxy
// must bound its connections (buffer budget, stall timeout).
func stoppedReader(id string) nettest.Handler {
	return func(c *net.TCPConn) {
		if _, err := c.Write([]byte("hello from " + id + "\n")); err != nil {
			return
		}
		// Wait for the proxy's reset without reading a byte: poll the
		// socket's pending error.
		raw, err := c.SyscallConn()
		if err != nil {
			return
		}
		deadline := time.Now().Add(time.Minute)
		for time.Now().Before(deadline) {
			var soErr int
			// Control fails once the server has closed the socket.
			if err := raw.Control(func(fd uintptr) {
				soErr, _ = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_ERROR)
			}); err != nil || soErr != 0 {
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
}

func chaosRows() []backendRow {
	var rows []backendRow
	for _, id := range []string{chaosStable1, chaosStable2, chaosKill1, chaosKill2} {
		rows = append(rows, backendAt(id, chaosPorts[id]))
	}
	// Hard limit 1: it holds one connection at a time, so one worker at
	// most waits on it while the others keep traffic flowing.
	full := backendAt(chaosFull, chaosPorts[chaosFull])
	full.Soft, full.Hard = 1, 1
	return append(rows, full)
}

func runChaos(t *testing.T, plane string, seed uint64) {
	rng := rand.New(rand.NewPCG(seed, 0x63686173))
	topo := nettest.NewTopology(t)
	log := &chaosLog{}
	backends := &chaosBackends{t: t, ns: topo.Backend, log: log, proc: map[string]*echoProc{}}
	t.Cleanup(backends.killAll)
	for _, id := range []string{chaosStable1, chaosStable2, "s1", "s2", "s3"} {
		nettest.Serve(t, topo.Backend, fmt.Sprintf("%s:%d", nettest.BackendIP, chaosPorts[id]), nettest.Greeter(id))
	}
	full := nettest.Serve(t, topo.Backend, fmt.Sprintf("%s:%d", nettest.BackendIP, chaosPorts[chaosFull]), stoppedReader(chaosFull))
	backends.startKillable(chaosKill1)
	backends.startKillable(chaosKill2)

	env := append(healthEnv(1, 2, 1),
		"EDGEPROXY_CLIENT_MAX_CONNS=0", // one client address opens everything
		fmt.Sprintf("EDGEPROXY_STALL_TIMEOUT_SECS=%d", int(chaosStall/time.Second)),
		"EDGEPROXY_MAX_BUFFERED_MB=8",
		"EDGEPROXY_DB_RELOAD_SECS=1",
		// Affinity off: with one client address every connection
		// would follow one binding, to one backend.
		"EDGEPROXY_BINDING_TTL_SECS=0",
		adminEnv,
	)
	p := startProxy(t, topo.Proxy, plane, chaosRows(), env...)
	procs := &proxyGroup{t: t, pin: p.PinPath, dir: t.TempDir()}
	t.Cleanup(procs.stopAll)

	// Traffic: bounded in count and time per worker.
	stop := make(chan struct{})
	var results []connResult
	var resultsMu sync.Mutex
	var wg sync.WaitGroup
	for w := range chaosWorkers {
		wseed := rng.Uint64()
		wg.Go(func() {
			wrng := rand.New(rand.NewPCG(wseed, uint64(w)))
			for seq := 0; seq < 100_000; seq++ {
				select {
				case <-stop:
					return
				default:
				}
				r := chaosConn(topo.Client, wrng)
				resultsMu.Lock()
				results = append(results, r)
				resultsMu.Unlock()
			}
		})
	}

	// The schedule: kills, restarts and upgrades at seeded times, the
	// DB churn on every tick in between.
	type event struct {
		at   time.Duration
		what string
	}
	jitter := func() time.Duration { return time.Duration(rng.IntN(500)) * time.Millisecond }
	events := []event{
		{1*time.Second + jitter(), "kill " + chaosKill1},
		{2500*time.Millisecond + jitter(), "upgrade"},
		{3500*time.Millisecond + jitter(), "restart " + chaosKill1},
		{4500*time.Millisecond + jitter(), "kill " + chaosKill2},
		{5000*time.Millisecond + jitter(), "kill " + chaosKill1},
		{6500*time.Millisecond + jitter(), "upgrade"},
		{7500*time.Millisecond + jitter(), "restart " + chaosKill2},
		{8000*time.Millisecond + jitter(), "restart " + chaosKill1},
	}
	// The DB churn runs on its own so a restart or an upgrade does not
	// hold it up.
	db := openChaosDB(t, p.DBPath, rand.New(rand.NewPCG(rng.Uint64(), 0x6462)))
	upgradeErrs := make(chan error, 2)
	var upgrades sync.WaitGroup
	begin := time.Now()
	churned := make(chan error, 1)
	go func() { churned <- db.churn(begin, chaosLength) }()
	for _, ev := range events {
		time.Sleep(time.Until(begin.Add(ev.at)))
		t.Logf("%6s %s", time.Since(begin).Round(time.Millisecond), ev.what)
		switch verb, id, _ := strings.Cut(ev.what, " "); verb {
		case "kill":
			backends.kill(id)
		case "restart":
			backends.restart(id)
		case "upgrade":
			upgrades.Go(func() { upgradeErrs <- procs.upgrade(topo.Proxy, p) })
		}
	}
	if err := <-churned; err != nil {
		t.Errorf("routing.db churn: %v", err)
	}
	churn := time.Since(begin)
	upgrades.Wait()
	close(upgradeErrs)
	// Let the traffic run a moment on the settled table, then stop it:
	// each worker ends within its connection bound.
	time.Sleep(time.Second)
	close(stop)
	waited := make(chan struct{})
	go func() { wg.Wait(); close(waited) }()
	select {
	case <-waited:
	case <-time.After(chaosConnTimeout + 5*time.Second):
		t.Fatalf("traffic workers still running %s after the end", chaosConnTimeout+5*time.Second)
	}
	full.Close()

	// Classify.
	counts := map[resultKind]int{}
	var unexplained, explained []string
	perBackend := map[string]int{}
	resetByFull, fullLongest := 0, time.Duration(0)
	for _, r := range results {
		counts[r.kind]++
		perBackend[r.backend]++
		switch r.kind {
		case completed:
		case corrupted, hung:
			unexplained = append(unexplained, r.String())
		case refusedConn:
			if !log.explains("", r.start, r.end) {
				unexplained = append(unexplained, r.String())
			} else {
				explained = append(explained, r.String()+" (open when a backend was killed)")
			}
		case resetConn:
			switch {
			case r.backend == chaosFull:
				resetByFull++
				fullLongest = max(fullLongest, r.end.Sub(r.start))
				if r.end.Sub(r.start) > chaosFullBound {
					unexplained = append(unexplained, r.String()+fmt.Sprintf(" (later than %s)", chaosFullBound))
				}
			case log.explains(r.backend, r.start, r.end):
				explained = append(explained, r.String()+" (open when its backend was killed)")
			default:
				unexplained = append(unexplained, r.String())
			}
		}
	}
	t.Logf("backends down (killed to restarted): %s", log.describe(begin))
	// What the proxy says it refused, and why: beside the clients' view.
	m := scrape(t, topo.Proxy)
	var said []string
	for series, v := range m {
		if v > 0 && (strings.HasPrefix(series, "edgeproxy_rejected_connections_total") ||
			strings.HasPrefix(series, "edgeproxy_backend_connect_errors_total") ||
			strings.HasPrefix(series, "edgeproxy_connect_retries_total")) {
			said = append(said, fmt.Sprintf("%s=%g", series, v))
		}
	}
	slices.Sort(said)
	t.Logf("proxy metrics: %s", strings.Join(said, " "))
	for i, e := range explained {
		if i == 20 {
			t.Logf("... and %d more failures explained", len(explained)-i)
			break
		}
		t.Logf("explained: %s", e)
	}
	t.Logf("chaos %s seed %d: %d connections attempted, %d completed, %d refused, %d reset (%d of them by the backend that stopped reading, the longest after %s), %d corrupted, %d hung; %d routing.db updates in %s; by backend %v",
		plane, seed, len(results), counts[completed], counts[refusedConn], counts[resetConn], resetByFull, fullLongest.Round(time.Millisecond),
		counts[corrupted], counts[hung], db.updates, churn.Round(time.Millisecond), perBackend)
	if counts[corrupted] > 0 {
		t.Errorf("%d connections corrupted: want 0", counts[corrupted])
	}
	if n := len(unexplained); n > 0 {
		const show = 20
		more := ""
		if n > show {
			more = fmt.Sprintf("\n... and %d more", n-show)
			unexplained = unexplained[:show]
		}
		t.Errorf("%d connections failed where no backend was deliberately dead or full:\n%s%s", n, strings.Join(unexplained, "\n"), more)
	}
	if counts[completed] < 100 {
		t.Errorf("only %d connections completed: the traffic did not flow", counts[completed])
	}
	if perBackend[chaosFull] == 0 {
		t.Errorf("no connection reached the backend that stopped reading: the run did not test the bound on it")
	}
	if db.updates < int(chaosLength/chaosDBPeriod)/2 {
		t.Errorf("only %d routing.db updates in %s: want about 50 a second", db.updates, churn)
	}
	for err := range upgradeErrs {
		if err != nil {
			t.Error(err)
		}
	}

	// Every connection has ended: nothing may be left in the maps.
	if plane == "sockmap" {
		p.waitNoEntries(t)
	}
	if n := procs.count(); n != 1 {
		t.Errorf("%d edgeproxy processes serve this test's pin path after the run, want 1 (the last upgrade's)", n)
	}
}

func (r connResult) String() string {
	return fmt.Sprintf("%s backend=%q at %s lasting %s sent=%d echoed=%d: %v",
		r.kind, r.backend, r.start.Format("15:04:05.000"), r.end.Sub(r.start).Round(time.Millisecond), r.sent, r.got, r.err)
}

// chaosConn makes one connection: greeting, a random payload echoed and
// compared, half-close, EOF. A connection to the backend that stopped
// reading pushes until the proxy cuts it.
func chaosConn(client *nettest.NS, rng *rand.Rand) (r connResult) {
	r.start = time.Now()
	defer func() { r.end = time.Now() }()
	c, err := nettest.Dial(client, proxyAddr, 2*time.Second)
	if err != nil {
		r.kind, r.err = refusedConn, fmt.Errorf("dial: %w", err)
		if isTimeout(err) {
			r.kind = hung
		}
		return r
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(chaosConnTimeout))
	line, err := nettest.ReadLine(c, chaosConnTimeout)
	switch {
	case err != nil && line == "" && isTimeout(err):
		r.kind, r.err = hung, fmt.Errorf("no greeting: %w", err)
		return r
	case err != nil && line == "":
		r.kind, r.err = refusedConn, fmt.Errorf("before a greeting: %w", err)
		return r
	case err != nil || !strings.HasPrefix(line, "hello from "):
		r.kind, r.err = corrupted, fmt.Errorf("greeting %q: %v", line, err)
		return r
	}
	r.backend = strings.TrimPrefix(line, "hello from ")
	if r.backend == chaosFull {
		return pushIntoFull(c, r)
	}
	payload := make([]byte, 1+rng.IntN(chaosMaxPayload))
	for i := range payload {
		payload[i] = byte(rng.Uint32())
	}
	r.sent = len(payload)
	writeErr := make(chan error, 1)
	go func() {
		_, err := c.Write(payload)
		if err == nil {
			err = c.CloseWrite()
		}
		writeErr <- err
	}()
	got := make([]byte, len(payload)+1)
	for r.got < len(got) {
		n, err := c.Read(got[r.got:])
		if n > 0 && !bytes.Equal(got[r.got:r.got+n], payload[r.got:min(r.got+n, len(payload))]) {
			r.got += n
			r.kind, r.err = corrupted, fmt.Errorf("echo differs from the payload within bytes %d-%d", r.got-n, r.got)
			<-writeErr
			return r
		}
		r.got += n
		if err != nil {
			werr := <-writeErr
			switch {
			case errors.Is(err, io.EOF) && r.got == len(payload) && werr == nil:
				r.kind = completed
			case isTimeout(err):
				r.kind, r.err = hung, err
			default:
				r.kind, r.err = resetConn, fmt.Errorf("read: %w (write: %v)", err, werr)
			}
			return r
		}
	}
	<-writeErr
	r.kind, r.err = corrupted, errors.New("more bytes echoed than sent")
	return r
}

// pushIntoFull writes at the backend that stopped reading until the proxy
// resets the connection (stall timeout); the client's own deadline
// passing means nothing bounded it.
func pushIntoFull(c *net.TCPConn, r connResult) connResult {
	chunk := make([]byte, 64<<10)
	greeted := time.Now()
	for r.sent < chaosFullPush {
		n, err := c.Write(chunk)
		r.sent += n
		if err != nil {
			r.kind, r.err = resetConn, fmt.Errorf("write %s after the greeting: %w", time.Since(greeted).Round(time.Millisecond), err)
			if isTimeout(err) {
				r.kind = hung
			}
			return r
		}
	}
	// Everything was parked on the way: the stall timeout must still
	// end the connection.
	_, err := io.Copy(io.Discard, c)
	r.kind, r.err = resetConn, fmt.Errorf("read %s after the greeting: %v", time.Since(greeted).Round(time.Millisecond), err)
	if isTimeout(err) {
		r.kind = hung
	}
	return r
}

// chaosDB changes routing.db 50 times a second, one statement each:
// weights and limits, health, spare rows added and removed. b1 always
// stays healthy with room, so a refusal can only come from the chaos the
// test made, never from an empty table.
type chaosDB struct {
	db      *sql.DB
	rng     *rand.Rand
	updates int
}

// openChaosDB opens routing.db as updateDB does, once (opening it 50
// times a second costs more than the updates on a busy machine), and
// without fsync: each transaction is still atomic for the proxy reading
// it, and the file need not survive a power cut.
func openChaosDB(t *testing.T, path string, rng *rand.Rand) *chaosDB {
	db, err := sql.Open("sqlite", "file:"+path+"?_pragma=busy_timeout(5000)&_pragma=synchronous(OFF)")
	if err != nil {
		t.Fatalf("open %s: %v", path, err)
	}
	db.SetMaxOpenConns(1)
	t.Cleanup(func() { db.Close() })
	return &chaosDB{db: db, rng: rng}
}

func (d *chaosDB) exec(stmt string, args ...any) error {
	if _, err := d.db.Exec(stmt, args...); err != nil {
		return fmt.Errorf("%s: %w", stmt, err)
	}
	d.updates++
	return nil
}

// churn makes length/chaosDBPeriod changes, one every chaosDBPeriod
// from begin; behind schedule (a busy machine) it catches up at once,
// and it stops 2 s past length whatever it has done.
func (d *chaosDB) churn(begin time.Time, length time.Duration) error {
	for i := range int(length / chaosDBPeriod) {
		time.Sleep(time.Until(begin.Add(time.Duration(i) * chaosDBPeriod)))
		if time.Since(begin) > length+2*time.Second {
			return nil
		}
		if err := d.step(); err != nil {
			return err
		}
	}
	return nil
}

// step makes one change with one statement, as an operator's tool would.
func (d *chaosDB) step() error {
	pick := func(ids ...string) string { return ids[d.rng.IntN(len(ids))] }
	// Hard limits stay above the soft limit (a row breaking that rule
	// is skipped, and b1 must stay) and above what the workers open.
	hard := []int{0, 256, 1024}
	switch d.rng.IntN(5) {
	case 0, 1:
		id := pick(chaosStable1, chaosStable2, chaosKill1, chaosKill2, "s1", "s2", "s3")
		return d.exec(`UPDATE backends SET weight = ?, soft_limit = ?, hard_limit = ? WHERE id = ?`,
			1+d.rng.IntN(10), 10+d.rng.IntN(240), hard[d.rng.IntN(len(hard))], id)
	case 2:
		return d.exec(`UPDATE backends SET healthy = ? WHERE id = ?`, d.rng.IntN(2), pick(chaosStable2, "s1", "s2", "s3"))
	case 3:
		id := pick(chaosSpares...)
		return d.exec(`INSERT OR REPLACE INTO backends VALUES (?, 'test', 'sa', 'BR', ?, ?, 1, ?, ?, 0, 0)`,
			id, nettest.BackendIP, chaosPorts[id], 1+d.rng.IntN(10), 10+d.rng.IntN(240))
	default:
		id := pick(chaosSpares...)
		if d.rng.IntN(2) == 0 {
			return d.exec(`DELETE FROM backends WHERE id = ?`, id)
		}
		return d.exec(`UPDATE backends SET deleted = 1 WHERE id = ?`, id)
	}
}

// proxyGroup finds the edgeproxy processes of one test by the pin path in
// their environment (unique to the test): the one the harness started and
// those `edgeproxy upgrade` started after it.
type proxyGroup struct {
	t   *testing.T
	pin string
	dir string // the upgrade commands' output
	mu  sync.Mutex
	// logs are the upgrade commands' output files, where the servers
	// they started log too.
	logs []string
}

// fileText reads a file when called: the new server may still write to it.
func fileText(path string) func() string {
	return func() string {
		b, _ := os.ReadFile(path)
		return string(b)
	}
}

func (g *proxyGroup) pids() []int {
	var out []int
	entries, _ := os.ReadDir("/proc")
	want := []byte("EDGEPROXY_BPF_PIN_PATH=" + g.pin + "\x00")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
		if err != nil || exe != binary {
			continue
		}
		environ, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
		if err != nil || !bytes.Contains(environ, want) {
			continue
		}
		cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if args := strings.Split(string(cmdline), "\x00"); len(args) > 1 && args[1] == "run" {
			out = append(out, pid)
		}
	}
	return out
}

func (g *proxyGroup) count() int { return len(g.pids()) }

// alive reports whether pid runs: a zombie waiting for its parent's wait
// has ended.
func alive(pid int) bool {
	if syscall.Kill(pid, 0) != nil {
		return false
	}
	stat, err := readProcFile(pid, "stat")
	return err == nil && !strings.Contains(stat, ") Z ")
}

// stopAll ends every process of the group the harness does not own:
// SIGTERM, then SIGKILL after 10 s.
func (g *proxyGroup) stopAll() {
	g.mu.Lock()
	defer g.mu.Unlock()
	defer func() {
		if g.t.Failed() {
			for _, path := range g.logs {
				log := fileText(path)()
				g.t.Logf("output of `edgeproxy upgrade` and the server it started (%s):\n%s", path, log[max(0, len(log)-32<<10):])
			}
		}
	}()
	pids := g.pids()
	for _, pid := range pids {
		_ = syscall.Kill(pid, syscall.SIGTERM)
	}
	deadline := time.Now().Add(10 * time.Second)
	for _, pid := range pids {
		for alive(pid) && time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
		}
		if alive(pid) {
			g.t.Errorf("edgeproxy %d ignored SIGTERM for 10s; killing it", pid)
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// upgradeWithin bounds `edgeproxy upgrade`: it returns once the new
// process accepts.
const upgradeWithin = 15 * time.Second

// upgrade runs `edgeproxy upgrade` in the proxy's namespace with the
// running process's environment (as the unit's ExecReload does), then
// checks that at most one process drains and that it ends within its
// drain time.
func (g *proxyGroup) upgrade(ns *nettest.NS, p *proxyProc) error {
	// One at a time: the counts below compare before and after.
	g.mu.Lock()
	defer g.mu.Unlock()
	before := g.pids()
	cmd := ns.Command(binary, "upgrade")
	cmd.Env = p.cmd.Env
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	// A file, not a pipe that os/exec copies: the new server inherits
	// the command's output and runs on, and Wait would wait for it.
	outFile, err := os.CreateTemp(g.dir, "upgrade-*.log")
	if err != nil {
		return err
	}
	defer outFile.Close()
	cmd.Stdout, cmd.Stderr = outFile, outFile
	out := fileText(outFile.Name())
	g.logs = append(g.logs, outFile.Name())
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start edgeproxy upgrade: %w", err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err = <-done:
	case <-time.After(upgradeWithin):
		_ = cmd.Process.Kill()
		<-done
		return fmt.Errorf("edgeproxy upgrade did not return within %s:\n%s", upgradeWithin, out())
	}
	if err != nil {
		return fmt.Errorf("edgeproxy upgrade: %v:\n%s", err, out())
	}
	// The processes serving before the upgrade drain and exit; the new
	// one stays. Drain time in the harness is 2 s.
	deadline := time.Now().Add(2*time.Second + 5*time.Second)
	for {
		draining := 0
		for _, pid := range before {
			if alive(pid) {
				draining++
			}
		}
		now := g.pids()
		if len(now) > len(before)+1 {
			return fmt.Errorf("%d edgeproxy processes after an upgrade from %d: want at most one draining beside the new one", len(now), len(before))
		}
		if draining == 0 {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d processes from before the upgrade still alive 7 s after it (drain time 2 s)", draining)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if len(g.pids()) != 1 {
		return fmt.Errorf("after the upgrade %d processes serve, want 1: %v\n%s", len(g.pids()), g.pids(), out())
	}
	// The new server logs to the same file; the command's own line is
	// the one that says "upgraded".
	said := strings.TrimSpace(out())
	for line := range strings.SplitSeq(said, "\n") {
		if strings.HasPrefix(line, "upgraded") {
			said = line
			break
		}
	}
	g.t.Logf("upgrade: %s", said)
	return nil
}
