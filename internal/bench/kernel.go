package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// slabCache is one line of /proc/slabinfo: bytes held by live objects.
type slabCache struct {
	activeObjs int64
	objSize    int64
}

func (s slabCache) kib() float64 { return float64(s.activeObjs*s.objSize) / 1024 }

// readSlabinfo parses /proc/slabinfo (root only).
func readSlabinfo() (map[string]slabCache, error) {
	b, err := os.ReadFile("/proc/slabinfo")
	if err != nil {
		return nil, err
	}
	out := map[string]slabCache{}
	for _, l := range strings.Split(string(b), "\n") {
		if l == "" || strings.HasPrefix(l, "slabinfo") || strings.HasPrefix(l, "#") {
			continue
		}
		f := strings.Fields(l)
		if len(f) < 4 {
			continue
		}
		active, err1 := strconv.ParseInt(f[1], 10, 64)
		size, err2 := strconv.ParseInt(f[3], 10, 64)
		if err1 == nil && err2 == nil {
			out[f[0]] = slabCache{activeObjs: active, objSize: size}
		}
	}
	return out, nil
}

// meminfoKiB is one field of /proc/meminfo, in KiB.
func meminfoKiB(field string) (int64, error) {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok && k == field {
			f := strings.Fields(v)
			if len(f) > 0 {
				return strconv.ParseInt(f[0], 10, 64)
			}
		}
	}
	return 0, fmt.Errorf("no %s in /proc/meminfo", field)
}

// timeWaitCaches hold TIME_WAIT sockets: a connection-rate run leaves tens
// of thousands that expire 60 s later, possibly while idle connections are
// being counted, so slabObjectsKiB leaves them out.
var timeWaitCaches = map[string]bool{"tw_sock_TCP": true, "tw_sock_TCPv6": true}

// slabObjectsKiB is the bytes of live objects in every slab cache (active
// objects × object size, /proc/slabinfo), TIME_WAIT sockets left out: where
// an idle connection's kernel state lives (socket, inode, dentry, file,
// epoll item, psock, BPF map entry, pipe). Live objects rather than slab
// pages (/proc/meminfo Slab): new sockets first fill the free room that
// earlier workloads left in existing slab pages, so page growth depends on
// what ran before (measured here: direct's 3,000 connections grew Slab by
// 2.9-4.1 KiB each after a connection-rate run, while their live objects
// were 7.7-8.7 KiB). It is machine-wide: whatever else runs moves it too,
// hence medians and ranges.
func slabObjectsKiB(caches map[string]slabCache) int64 {
	var total float64
	for name, c := range caches {
		if !timeWaitCaches[name] {
			total += c.kib()
		}
	}
	return int64(total)
}

// readSlab reads the live slab objects (slabObjectsKiB), /proc/meminfo Slab
// for reference, and every cache for the breakdown.
func readSlab() (objects, pages int64, caches map[string]slabCache, err error) {
	if pages, err = meminfoKiB("Slab"); err != nil {
		return 0, 0, nil, err
	}
	if caches, err = readSlabinfo(); err != nil {
		return 0, 0, nil, fmt.Errorf("read /proc/slabinfo: %w", err)
	}
	return slabObjectsKiB(caches), pages, caches, nil
}

// slabCacheGrowth lists the caches that grew or shrank by at least 64 KiB,
// for the JSON: which kernel objects an idle connection costs.
func slabCacheGrowth(before, after map[string]slabCache) map[string]float64 {
	out := map[string]float64{}
	for name, a := range after {
		d := a.kib() - before[name].kib()
		if math.Abs(d) >= 64 {
			out[name] = math.Round(d)
		}
	}
	return out
}

// cpuIdleInfo names the cpuidle driver and the guest halt-poll window.
func cpuIdleInfo() string {
	read := func(p string) string {
		b, err := os.ReadFile(p)
		if err != nil {
			return ""
		}
		return strings.TrimSpace(string(b))
	}
	var parts []string
	if d := read("/sys/devices/system/cpu/cpuidle/current_driver"); d != "" {
		parts = append(parts, "cpuidle "+d)
	}
	if ns := read("/sys/module/haltpoll/parameters/guest_halt_poll_ns"); ns != "" {
		parts = append(parts, "guest_halt_poll_ns="+ns)
	}
	return strings.Join(parts, ", ")
}

const sockperfPort = 11111

// startSockperfServer runs sockperf's TCP server in the backend namespace
// on the backend's round-trip CPU.
func (b *bench) startSockperfServer() error {
	argv := []string{b.sockperf, "server", "--tcp", "-i", "0.0.0.0", "-p", strconv.Itoa(sockperfPort)}
	if b.cfg.BackendCPU >= 0 {
		argv = append([]string{"taskset", "-c", strconv.Itoa(b.cfg.BackendCPU)}, argv...)
	}
	p, err := startProc("sockperf-server", b.nsB, filepath.Join(b.tmp, "sockperf-server.log"), os.Environ(), "", nil, argv...)
	if err != nil {
		return err
	}
	b.sockSrv = p
	deadline := time.Now().Add(10 * time.Second)
	for !listening(p.pid(), sockperfPort) {
		if !p.alive() {
			return fmt.Errorf("sockperf server exited (%v):\n%s", p.waitErr, tail(p.logPath, 10))
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("sockperf server not listening after 10 s:\n%s", tail(p.logPath, 10))
		}
		time.Sleep(50 * time.Millisecond)
	}
	return nil
}

var sockperfP50 = regexp.MustCompile(`percentile 50\.000 =\s*([0-9.]+)`)

// sockperfRTT runs a sockperf TCP ping-pong of 64-byte messages from the
// client namespace, the client on cpu (-1: anywhere), and returns the round
// trip p50 in µs (--full-rtt: sockperf otherwise reports half of it).
func (b *bench) sockperfRTT(cpu int) (float64, error) {
	argv := []string{b.sockperf, "ping-pong", "--tcp", "-i", backendIP, "-p", strconv.Itoa(sockperfPort),
		"-m", "64", "-t", "2", "--full-rtt"}
	if cpu >= 0 {
		argv = append([]string{"taskset", "-c", strconv.Itoa(cpu)}, argv...)
	}
	ctx, cancel := context.WithTimeout(b.ctx, 30*time.Second)
	defer cancel()
	out, err := run(ctx, nsArgv(b.nsC, argv...)...)
	if err != nil {
		return 0, err
	}
	m := sockperfP50.FindStringSubmatch(out)
	if m == nil {
		return 0, fmt.Errorf("no p50 in sockperf's output: %s", strings.TrimSpace(out))
	}
	return strconv.ParseFloat(m[1], 64)
}

// sockperfCheck measures the direct path with sockperf in the same
// placement right after the round trip just measured (before: the run just
// before it), records the mean of the two, and once more with both ends on
// the backend's CPU. A harness p50 more than 1.5× away from both sockperf
// runs is a problem.
func (b *bench) sockperfCheck(round int, run *Run, harnessP50, before float64, beforeErr error) {
	after, err := b.sockperfRTT(b.cfg.ClientCPU)
	if err != nil || beforeErr != nil {
		b.problem("round %d direct: sockperf: %v", round, errors.Join(beforeErr, err))
		return
	}
	b.record(run, mSockperf, (before+after)/2)
	same := math.NaN()
	if b.cfg.BackendCPU >= 0 {
		if same, err = b.sockperfRTT(b.cfg.BackendCPU); err != nil {
			b.problem("round %d direct: sockperf on one CPU: %v", round, err)
		} else {
			b.record(run, mSockSame, same)
		}
	}
	b.logf("[%d/%d] %-18s sockperf    p50 %7.1f and %.1f µs, before and after (both ends on one CPU: %.1f µs)",
		round, b.cfg.Rounds, cDirect, before, after, same)
	lo, hi := math.Min(before, after), math.Max(before, after)
	if harnessP50 > hi*1.5 || harnessP50 < lo/1.5 {
		b.problem("round %d direct: the harness's round trip p50 (%.1f µs) is more than 1.5× away from sockperf's just before and after (%.1f and %.1f µs)",
			round, harnessP50, before, after)
	}
}

// goRuntimeSyscalls are system calls the Go runtime makes for itself
// (scheduler, memory, signals), whatever the connection count: left out of
// the "without the Go runtime's own" figure, for every contender alike.
var goRuntimeSyscalls = map[string]bool{
	"futex": true, "nanosleep": true, "sched_yield": true, "rt_sigreturn": true, "rt_sigprocmask": true,
	"sigaltstack": true, "tgkill": true, "getpid": true, "gettid": true, "madvise": true, "mmap": true,
	"munmap": true, "mprotect": true, "clone": true, "clone3": true, "restart_syscall": true,
}

// parseStraceSummary reads the table strace -c writes: calls per system
// call. The total line is not used (its columns differ between versions).
func parseStraceSummary(out []byte) map[string]float64 {
	calls := map[string]float64{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 5 || f[len(f)-1] == "total" || f[len(f)-1] == "syscall" {
			continue
		}
		if _, err := strconv.ParseFloat(f[0], 64); err != nil {
			continue // header or rule
		}
		n, err := strconv.ParseFloat(f[3], 64)
		if err != nil {
			continue
		}
		calls[f[len(f)-1]] += n
	}
	return calls
}

// straceFor attaches strace -f -c to pid (every thread), runs during (nil:
// sleeps idle), and returns calls per system call and the seconds attached.
func (b *bench) straceFor(pid int, idle time.Duration, during func() error) (map[string]float64, float64, error) {
	outFile := filepath.Join(b.tmp, fmt.Sprintf("strace-%d-%d.txt", pid, time.Now().UnixNano()))
	ctx, cancel := context.WithTimeout(b.ctx, 180*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, b.strace, "-f", "-c", "-o", outFile, "-p", strconv.Itoa(pid))
	setPdeathsig(cmd)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	t0 := time.Now()
	if err := cmd.Start(); err != nil {
		return nil, 0, fmt.Errorf("start strace: %w", err)
	}
	// strace says "Process N attached" for each thread it attached; give it
	// a moment to reach them all before traffic starts.
	time.Sleep(500 * time.Millisecond)
	var derr error
	if during == nil {
		time.Sleep(idle)
	} else {
		derr = during()
	}
	_ = cmd.Process.Signal(syscall.SIGINT) // strace detaches and writes the table
	werr := cmd.Wait()
	secs := time.Since(t0).Seconds()
	out, rerr := os.ReadFile(outFile)
	if rerr != nil {
		return nil, secs, fmt.Errorf("strace wrote no summary (%v): %s", werr, strings.TrimSpace(stderr.String()))
	}
	return parseStraceSummary(out), secs, derr
}

// syscallPhase counts each proxy's system calls per connection: strace
// attached while exactly SyscallConns connections (connect, 64-byte echo,
// close) go through it, less what the idle proxy calls in the same time.
// It runs after the timed rounds, never during them: strace slows the proxy
// many times over.
func (b *bench) syscallPhase() {
	b.res.Syscalls = map[string]map[string]float64{}
	for _, name := range b.cfg.Contenders {
		c := b.cs[name]
		if name == cDirect || c == nil || c.p == nil {
			continue
		}
		if err := b.ensureRunning(c, 0); err != nil {
			b.problem("syscalls %s: cannot (re)start: %v", name, err)
			continue
		}
		pid := c.p.pid()
		idle, idleSecs, err := b.straceFor(pid, 2*time.Second, nil)
		if err != nil {
			b.problem("syscalls %s: idle baseline: %v", name, err)
			continue
		}
		var res *clientResult
		var errOut string
		busy, busySecs, err := b.straceFor(pid, 0, func() error {
			var err error
			// Fewer workers than the timed run: strace slows every call, and
			// the count, not the rate, is measured here.
			res, errOut, err = b.client(150*time.Second, "conns", c.addr, "-count", strconv.Itoa(b.cfg.SyscallConns), "-workers", "8")
			return err
		})
		if err != nil {
			b.problem("syscalls %s: %v %s", name, err, errOut)
			continue
		}
		if res == nil || res.Conns == 0 {
			b.problem("syscalls %s: no connection completed", name)
			continue
		}
		if res.Errors > 0 {
			b.problem("syscalls %s: %d client error(s) under strace: %s", name, res.Errors, strings.Join(res.ErrorSamples, " | "))
		}
		per := map[string]float64{}
		var total, noRuntime float64
		for sc, n := range busy {
			v := (n - idle[sc]/idleSecs*busySecs) / float64(res.Conns)
			if v < 0.005 {
				continue
			}
			per[sc] = math.Round(v*100) / 100
			total += v
			if !goRuntimeSyscalls[sc] {
				noRuntime += v
			}
		}
		b.res.Syscalls[name] = per
		b.res.Raw[name][mSyscalls] = append(b.res.Raw[name][mSyscalls], total)
		b.res.Raw[name][mSyscallsX] = append(b.res.Raw[name][mSyscallsX], noRuntime)
		b.logf("syscalls %-18s %.1f per connection (%.1f without the Go runtime's own), %d connections under strace in %.1f s",
			name, total, noRuntime, res.Conns, busySecs)
		b.collectWarns(0, c, "syscalls")
	}
}

// topSyscalls lists the system calls of one contender, most first.
func topSyscalls(per map[string]float64, n int) []string {
	names := make([]string, 0, len(per))
	for k := range per {
		names = append(names, k)
	}
	sort.Slice(names, func(i, j int) bool {
		if per[names[i]] != per[names[j]] {
			return per[names[i]] > per[names[j]]
		}
		return names[i] < names[j]
	})
	if len(names) > n {
		names = names[:n]
	}
	return names
}
