package main

import (
	"bufio"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// clientResult is what one client run prints as its last stdout line.
type clientResult struct {
	Workload string `json:"workload"`
	Addr     string `json:"addr"`

	// pingpong
	Count  int     `json:"count,omitempty"`
	P50us  float64 `json:"p50_us,omitempty"`
	P99us  float64 `json:"p99_us,omitempty"`
	MeanUs float64 `json:"mean_us,omitempty"`
	MaxUs  float64 `json:"max_us,omitempty"`

	// bulk
	Streams      int     `json:"streams,omitempty"`
	Bytes        int64   `json:"bytes,omitempty"`
	Secs         float64 `json:"secs,omitempty"`
	Gbps         float64 `json:"gbps,omitempty"`
	BusyCPUSecs  float64 `json:"busy_cpu_secs,omitempty"`
	CPUSecsPerGB float64 `json:"cpu_secs_per_gb,omitempty"`
	Verified     int     `json:"verified_streams,omitempty"`

	// conns
	Conns        int64   `json:"conns,omitempty"`
	ConnsPerSec  float64 `json:"conns_per_sec,omitempty"`
	CPUUsPerConn float64 `json:"cpu_us_per_conn,omitempty"`
	// BusyShare is the machine's busy fraction over the window: a rate that
	// falls short with CPU to spare is latency, not cost.
	BusyShare float64 `json:"busy_share,omitempty"`

	// rr
	Requests       int64   `json:"requests,omitempty"`
	RequestsPerSec float64 `json:"requests_per_sec,omitempty"`
	CPUUsPerReq    float64 `json:"cpu_us_per_request,omitempty"`

	// idle
	Opened int `json:"opened,omitempty"`

	Errors       int64    `json:"errors"`
	ErrorSamples []string `json:"error_samples,omitempty"`
}

// errLog keeps a count of errors and the first few messages.
type errLog struct {
	mu      sync.Mutex
	n       int64
	samples []string
	seen    map[string]bool
}

func (e *errLog) add(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	e.mu.Lock()
	defer e.mu.Unlock()
	e.n++
	if e.seen == nil {
		e.seen = map[string]bool{}
	}
	// Keep distinct messages (addresses and ports stripped) up to 8.
	key := stripPorts(msg)
	if len(e.samples) < 8 && !e.seen[key] {
		e.seen[key] = true
		e.samples = append(e.samples, msg)
	}
}

func stripPorts(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == ':' {
			j := i + 1
			for j < len(s) && s[j] >= '0' && s[j] <= '9' {
				j++
			}
			if j > i+1 {
				b.WriteString(":N")
				i = j - 1
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func (e *errLog) fill(r *clientResult) {
	e.mu.Lock()
	defer e.mu.Unlock()
	r.Errors, r.ErrorSamples = e.n, e.samples
}

func clientMain(args []string) error {
	fs := flag.NewFlagSet("client", flag.ContinueOnError)
	workload := fs.String("w", "", "workload: check, pingpong, bulk, conns, rr, idle")
	addr := fs.String("addr", "", "target host:port")
	n := fs.Int("n", 20000, "pingpong: measured round trips; idle: connections")
	warm := fs.Int("warm", 1000, "pingpong: warm-up round trips")
	streams := fs.Int("streams", 1, "bulk: parallel streams")
	workers := fs.Int("workers", 4, "conns: concurrent workers")
	cpu := fs.Int("cpu", -1, "pingpong: pin the measuring thread to this CPU (-1: anywhere)")
	count := fs.Int64("count", 0, "conns: stop after this many connections instead of timing a window (0: timed)")
	rrConns := fs.Int("conns", 50, "rr: keep-alive connections")
	rrSize := fs.Int("size", 2048, "rr: request and response size, bytes")
	secs := fs.Float64("secs", 5, "bulk, conns, rr: measured seconds")
	warmSecs := fs.Float64("warm-secs", 0.5, "bulk, conns, rr: seconds before measuring")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *addr == "" {
		return errors.New("-addr is required")
	}
	raiseNoFile()
	res := clientResult{Workload: *workload, Addr: *addr}
	var el errLog
	dur := func(s float64) time.Duration { return time.Duration(s * float64(time.Second)) }
	var err error
	switch *workload {
	case "check":
		err = runCheck(*addr)
	case "pingpong":
		err = runPingPong(*addr, *warm, *n, *cpu, &res)
	case "bulk":
		err = runBulk(*addr, *streams, dur(*warmSecs), dur(*secs), &res, &el)
	case "conns":
		if *count > 0 {
			err = runConnCount(*addr, *workers, *count, &res, &el)
		} else {
			err = runConns(*addr, *workers, dur(*warmSecs), dur(*secs), &res, &el)
		}
	case "rr":
		err = runRR(*addr, *rrConns, *rrSize, dur(*warmSecs), dur(*secs), &res, &el)
	case "idle":
		err = runIdle(*addr, *n, &res, &el)
	default:
		return fmt.Errorf("unknown workload %q", *workload)
	}
	el.fill(&res)
	out, _ := json.Marshal(res)
	fmt.Println(string(out))
	return err
}

// echoOnce sends one 64-byte echo message and checks the reply.
func echoOnce(c net.Conn, seq uint64) error {
	var msg, got [64]byte
	msg[0] = modeEcho
	binary.BigEndian.PutUint64(msg[1:], seq)
	for i := 9; i < 64; i++ {
		msg[i] = byte(i)
	}
	if _, err := c.Write(msg[:]); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	if _, err := io.ReadFull(c, got[:]); err != nil {
		return fmt.Errorf("read echo: %w", err)
	}
	if got != msg {
		return errors.New("echo differs from what was sent")
	}
	return nil
}

func runCheck(addr string) error {
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	return echoOnce(c, 1)
}

// runPingPong measures 64-byte round trips over one connection with
// blocking system calls on a locked thread (no netpoller in the path),
// pinned to cpu when cpu >= 0. The reads and writes bypass the runtime's
// syscall bookkeeping (rawRead, rawWrite): with it, each blocking read woke
// other threads of the Go runtime, about two extra wake-ups per round trip
// between client and backend, each a wake-up of an idle vCPU on this kind
// of VM.
func runPingPong(addr string, warm, n, cpu int, res *clientResult) error {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return err
	}
	// A pinned thread exits with this goroutine instead of being reused.
	runtime.LockOSThread()
	if cpu < 0 {
		defer runtime.UnlockOSThread()
	} else if err := pinThread(cpu); err != nil {
		return err
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM, 0)
	if err != nil {
		return err
	}
	unix.CloseOnExec(fd)
	defer unix.Close(fd)
	tv := unix.Timeval{Sec: 5}
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv)
	_ = unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	if err := unix.Connect(fd, &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}); err != nil {
		return fmt.Errorf("connect %s: %w", addr, err)
	}
	var msg, got [64]byte
	msg[0] = modePing
	for i := 9; i < 64; i++ {
		msg[i] = byte(i)
	}
	samples := make([]int64, 0, n)
	deadline := time.Now().Add(120 * time.Second)
	for i := 0; i < warm+n; i++ {
		binary.BigEndian.PutUint64(msg[1:], uint64(i))
		t0 := time.Now()
		if err := writeAll(fd, msg[:], rawSyscalls); err != nil {
			return fmt.Errorf("round trip %d: write: %w", i, err)
		}
		if err := readFull(fd, got[:], rawSyscalls); err != nil {
			return fmt.Errorf("round trip %d: read: %w", i, err)
		}
		d := time.Since(t0)
		if got != msg {
			return fmt.Errorf("round trip %d: echo differs from what was sent", i)
		}
		if i >= warm {
			samples = append(samples, int64(d))
		}
		if i&1023 == 0 && time.Now().After(deadline) {
			break // bounded in time as well as in count
		}
	}
	if len(samples) == 0 {
		return errors.New("no round trips measured")
	}
	sort.Slice(samples, func(i, j int) bool { return samples[i] < samples[j] })
	pct := func(p float64) float64 {
		i := int(p*float64(len(samples))+0.5) - 1
		if i < 0 {
			i = 0
		}
		if i >= len(samples) {
			i = len(samples) - 1
		}
		return float64(samples[i]) / 1e3
	}
	var sum int64
	for _, s := range samples {
		sum += s
	}
	res.Count = len(samples)
	res.P50us = pct(0.50)
	res.P99us = pct(0.99)
	res.MeanUs = float64(sum) / float64(len(samples)) / 1e3
	res.MaxUs = float64(samples[len(samples)-1]) / 1e3
	if len(samples) < n {
		return fmt.Errorf("only %d of %d round trips within the time limit", len(samples), n)
	}
	return nil
}

// cpuJiffies reads the machine's busy and total jiffies from /proc/stat.
func cpuJiffies() (busy, total int64, err error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0, err
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 5 || f[0] != "cpu" {
		return 0, 0, fmt.Errorf("unexpected /proc/stat: %q", line)
	}
	// user nice system idle iowait irq softirq steal guest guest_nice;
	// guest time is already counted in user.
	for i, s := range f[1:] {
		if i >= 8 {
			break
		}
		v, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return 0, 0, err
		}
		total += v
		if i != 3 && i != 4 { // idle, iowait
			busy += v
		}
	}
	return busy, total, nil
}

const userHZ = 100 // USER_HZ, the unit of /proc/stat on Linux

// runBulk pushes bytes client -> backend over streams connections; the
// rate is measured at the sender over the window after warm-up, and each
// stream then checks with the backend that every byte arrived.
func runBulk(addr string, streams int, warm, window time.Duration, res *clientResult, el *errLog) error {
	conns := make([]*net.TCPConn, 0, streams)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for i := 0; i < streams; i++ {
		c, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err != nil {
			return fmt.Errorf("dial: %w", err)
		}
		conns = append(conns, c.(*net.TCPConn))
	}
	sent := make([]atomic.Int64, streams)
	var stop atomic.Bool
	var wg sync.WaitGroup
	hardStop := time.Now().Add(warm + window + 10*time.Second)
	for i, c := range conns {
		wg.Add(1)
		go func(i int, c *net.TCPConn) {
			defer wg.Done()
			buf := make([]byte, 128<<10)
			for j := range buf {
				buf[j] = byte(j)
			}
			buf[0] = modeDiscard
			_ = c.SetWriteDeadline(hardStop)
			first := true
			for !stop.Load() {
				n, err := c.Write(buf)
				sent[i].Add(int64(n))
				if err != nil {
					el.add("stream %d: write: %v", i, err)
					return
				}
				if first {
					first = false
					buf[0] = 0
				}
			}
		}(i, c)
	}
	total := func() int64 {
		var t int64
		for i := range sent {
			t += sent[i].Load()
		}
		return t
	}
	time.Sleep(warm)
	b0, _, err0 := cpuJiffies()
	s0, t0 := total(), time.Now()
	time.Sleep(window)
	b1, _, err1 := cpuJiffies()
	s1, t1 := total(), time.Now()
	stop.Store(true)
	wg.Wait()

	res.Streams = streams
	res.Bytes = s1 - s0
	res.Secs = t1.Sub(t0).Seconds()
	res.Gbps = float64(res.Bytes) * 8 / res.Secs / 1e9
	if err0 == nil && err1 == nil && res.Bytes > 0 {
		res.BusyCPUSecs = float64(b1-b0) / userHZ
		res.CPUSecsPerGB = res.BusyCPUSecs / (float64(res.Bytes) / 1e9)
	}

	// Half-close each stream; the backend replies with what it received.
	var vwg sync.WaitGroup
	var verified atomic.Int64
	for i, c := range conns {
		vwg.Add(1)
		go func(i int, c *net.TCPConn) {
			defer vwg.Done()
			want := sent[i].Load()
			_ = c.SetDeadline(time.Now().Add(10 * time.Second))
			if err := c.CloseWrite(); err != nil {
				el.add("stream %d: shutdown(SHUT_WR): %v", i, err)
				return
			}
			var b [8]byte
			if _, err := io.ReadFull(c, b[:]); err != nil {
				el.add("stream %d: no byte count from the backend after half-close (%d bytes sent): %v", i, want, err)
				return
			}
			if got := int64(binary.BigEndian.Uint64(b[:])); got != want {
				el.add("stream %d: backend received %d bytes, client sent %d", i, got, want)
				return
			}
			verified.Add(1)
		}(i, c)
	}
	vwg.Wait()
	res.Verified = int(verified.Load())
	return nil
}

func setLinger0(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
}

// runConns repeats connectEchoClose on workers for a timed window.
func runConns(addr string, workers int, warm, window time.Duration, res *clientResult, el *errLog) error {
	var done atomic.Int64
	var measuring, stop atomic.Bool
	var wg sync.WaitGroup
	d := net.Dialer{Timeout: 2 * time.Second}
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			seq := uint64(w) << 40
			for !stop.Load() {
				seq++
				if err := connectEchoClose(&d, addr, seq); err != nil {
					el.add("%v", err)
					time.Sleep(time.Millisecond)
					continue
				}
				if measuring.Load() {
					done.Add(1)
				}
			}
		}(w)
	}
	time.Sleep(warm)
	b0, t0j, err0 := cpuJiffies()
	measuring.Store(true)
	t0 := time.Now()
	time.Sleep(window)
	measuring.Store(false)
	elapsed := time.Since(t0)
	b1, t1j, err1 := cpuJiffies()
	n := done.Load()
	stop.Store(true)
	wg.Wait()
	res.Conns = n
	res.Secs = elapsed.Seconds()
	res.ConnsPerSec = float64(n) / elapsed.Seconds()
	if err0 == nil && err1 == nil && n > 0 && t1j > t0j {
		res.BusyCPUSecs = float64(b1-b0) / userHZ
		res.CPUUsPerConn = res.BusyCPUSecs / float64(n) * 1e6
		res.BusyShare = float64(b1-b0) / float64(t1j-t0j)
	}
	return nil
}

// connectEchoClose is one unit of the connection-rate workloads: connect,
// one 64-byte echo, close with RST (SO_LINGER 0, so no TIME_WAIT piles up on
// the client).
func connectEchoClose(d *net.Dialer, addr string, seq uint64) error {
	c, err := d.Dial("tcp", addr)
	if err != nil {
		return fmt.Errorf("dial: %w", err)
	}
	setLinger0(c)
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	err = echoOnce(c, seq)
	c.Close()
	if err != nil {
		return fmt.Errorf("echo: %w", err)
	}
	return nil
}

// runConnCount makes exactly count connections (connect, echo, close) on
// workers, for the system-call count, where a fixed number matters and time
// does not. Bounded in time too: 120 s.
func runConnCount(addr string, workers int, count int64, res *clientResult, el *errLog) error {
	var next, done atomic.Int64
	var wg sync.WaitGroup
	d := net.Dialer{Timeout: 2 * time.Second}
	deadline := time.Now().Add(120 * time.Second)
	t0 := time.Now()
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for {
				i := next.Add(1)
				if i > count || time.Now().After(deadline) {
					return
				}
				if err := connectEchoClose(&d, addr, uint64(i)); err != nil {
					el.add("%v", err)
					continue
				}
				done.Add(1)
			}
		}(w)
	}
	wg.Wait()
	res.Conns = done.Load()
	res.Secs = time.Since(t0).Seconds()
	res.ConnsPerSec = float64(res.Conns) / res.Secs
	if res.Conns < count {
		return fmt.Errorf("%d of %d connections completed", res.Conns, count)
	}
	return nil
}

// runRR keeps conns connections open and on each repeats: write a
// size-byte request, read the size-byte reply in full (the backend echoes),
// like many small keep-alive HTTP exchanges. Requests/s and machine CPU per
// request over the window after warm-up.
func runRR(addr string, conns, size int, warm, window time.Duration, res *clientResult, el *errLog) error {
	if size < 1 {
		return errors.New("rr: size must be at least 1 byte")
	}
	d := net.Dialer{Timeout: 2 * time.Second}
	cs := make([]net.Conn, 0, conns)
	defer func() {
		for _, c := range cs {
			c.Close()
		}
	}()
	for i := 0; i < conns; i++ {
		c, err := d.Dial("tcp", addr)
		if err != nil {
			return fmt.Errorf("dial %d of %d: %w", i+1, conns, err)
		}
		cs = append(cs, c)
	}
	var done atomic.Int64
	var measuring, stop atomic.Bool
	var wg sync.WaitGroup
	hardStop := time.Now().Add(warm + window + 10*time.Second)
	for i, c := range cs {
		wg.Add(1)
		go func(i int, c net.Conn) {
			defer wg.Done()
			req := make([]byte, size)
			for j := range req {
				req[j] = byte(i + j)
			}
			req[0] = modeEcho // the backend echoes the whole connection
			got := make([]byte, size)
			_ = c.SetDeadline(hardStop)
			for !stop.Load() {
				if _, err := c.Write(req); err != nil {
					el.add("conn %d: write: %v", i, err)
					return
				}
				if _, err := io.ReadFull(c, got); err != nil {
					el.add("conn %d: read reply: %v", i, err)
					return
				}
				if got[size-1] != req[size-1] || got[0] != req[0] {
					el.add("conn %d: reply differs from the request", i)
					return
				}
				if measuring.Load() {
					done.Add(1)
				}
			}
		}(i, c)
	}
	time.Sleep(warm)
	b0, _, err0 := cpuJiffies()
	measuring.Store(true)
	t0 := time.Now()
	time.Sleep(window)
	measuring.Store(false)
	elapsed := time.Since(t0)
	b1, _, err1 := cpuJiffies()
	stop.Store(true)
	wg.Wait()
	res.Requests = done.Load()
	res.Secs = elapsed.Seconds()
	res.RequestsPerSec = float64(res.Requests) / res.Secs
	if err0 == nil && err1 == nil && res.Requests > 0 {
		res.BusyCPUSecs = float64(b1-b0) / userHZ
		res.CPUUsPerReq = res.BusyCPUSecs / float64(res.Requests) * 1e6
	}
	return nil
}

// runIdle opens n connections, checks each end to end with one echo, says
// READY on stdout, holds them until a line (or EOF) arrives on stdin, then
// closes them.
func runIdle(addr string, n int, res *clientResult, el *errLog) error {
	conns := make([]net.Conn, n)
	var next atomic.Int64
	var wg sync.WaitGroup
	d := net.Dialer{Timeout: 3 * time.Second}
	deadline := time.Now().Add(90 * time.Second)
	for w := 0; w < 16; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= n || time.Now().After(deadline) {
					return
				}
				c, err := d.Dial("tcp", addr)
				if err != nil {
					el.add("dial: %v", err)
					continue
				}
				_ = c.SetDeadline(time.Now().Add(5 * time.Second))
				if err := echoOnce(c, uint64(i)); err != nil {
					el.add("echo: %v", err)
					setLinger0(c)
					c.Close()
					continue
				}
				_ = c.SetDeadline(time.Time{})
				conns[i] = c
			}
		}()
	}
	wg.Wait()
	for _, c := range conns {
		if c != nil {
			res.Opened++
		}
	}
	el.fill(res)
	ready, _ := json.Marshal(res)
	fmt.Printf("READY %s\n", ready)
	// Hold until told (bounded: the orchestrator reads RSS within seconds).
	line := make(chan struct{})
	go func() {
		_, _ = bufio.NewReader(os.Stdin).ReadString('\n')
		close(line)
	}()
	select {
	case <-line:
	case <-time.After(120 * time.Second):
	}
	for _, c := range conns {
		if c != nil {
			setLinger0(c)
			c.Close()
		}
	}
	if res.Opened < n {
		return fmt.Errorf("opened %d of %d connections", res.Opened, n)
	}
	return nil
}
