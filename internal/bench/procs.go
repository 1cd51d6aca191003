package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// proc is a long-running child started in a namespace through nsenter.
type proc struct {
	name    string
	cmd     *exec.Cmd
	exited  chan struct{}
	waitErr error
	logPath string

	mu      sync.Mutex
	ready   chan struct{} // closed when readyLine is seen on stderr or stdout
	readyAt string
	warns   []string // warning and error lines, for the report
	nwarns  int
	stopped bool // we asked it to stop
}

func nsArgv(ns string, argv ...string) []string {
	return append([]string{"nsenter", "--net=/run/netns/" + ns, "--"}, argv...)
}

// startProc starts argv in namespace ns; stdout and stderr go to logPath.
// ready is closed when a line containing readyLine appears ("" = never).
// isWarn picks the log lines worth reporting.
func startProc(name, ns, logPath string, env []string, readyLine string, isWarn func(string) bool, argv ...string) (*proc, error) {
	full := nsArgv(ns, argv...)
	cmd := exec.Command(full[0], full[1:]...)
	cmd.Env = env
	setPdeathsig(cmd)
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(logf, "=== %s: %s\n", time.Now().Format(time.RFC3339Nano), strings.Join(full, " "))
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	cmd.Stdin = nil
	p := &proc{name: name, cmd: cmd, exited: make(chan struct{}), logPath: logPath, ready: make(chan struct{})}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	go func() {
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		readySeen := false
		for sc.Scan() {
			line := sc.Text()
			fmt.Fprintln(logf, line)
			if !readySeen && readyLine != "" && strings.Contains(line, readyLine) {
				readySeen = true
				p.mu.Lock()
				p.readyAt = line
				p.mu.Unlock()
				close(p.ready)
			}
			if isWarn != nil && isWarn(line) {
				p.mu.Lock()
				p.nwarns++
				if len(p.warns) < 20 {
					p.warns = append(p.warns, line)
				}
				p.mu.Unlock()
			}
		}
		_, _ = io.Copy(io.Discard, pr)
		logf.Close()
	}()
	go func() {
		p.waitErr = cmd.Wait()
		pw.Close()
		close(p.exited)
	}()
	return p, nil
}

func (p *proc) alive() bool {
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

// waitReady waits for the ready line, the process's exit or the timeout.
func (p *proc) waitReady(ctx context.Context, timeout time.Duration) error {
	select {
	case <-p.ready:
		return nil
	case <-p.exited:
		return fmt.Errorf("%s exited before it was ready (%v); log: %s\n%s", p.name, p.waitErr, p.logPath, tail(p.logPath, 15))
	case <-time.After(timeout):
		return fmt.Errorf("%s not ready after %s; log: %s\n%s", p.name, timeout, p.logPath, tail(p.logPath, 15))
	case <-ctx.Done():
		return ctx.Err()
	}
}

// stop sends SIGTERM, then SIGKILL after grace. It reports how long the
// process took and whether it had to be killed.
func (p *proc) stop(grace time.Duration) (time.Duration, bool) {
	p.mu.Lock()
	p.stopped = true
	p.mu.Unlock()
	if !p.alive() {
		return 0, false
	}
	t0 := time.Now()
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
		return time.Since(t0), false
	case <-time.After(grace):
	}
	_ = p.cmd.Process.Kill()
	<-p.exited
	return time.Since(t0), true
}

// takeWarns returns the warning lines gathered since the last call.
func (p *proc) takeWarns() (int, []string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	n, w := p.nwarns, p.warns
	p.nwarns, p.warns = 0, nil
	return n, w
}

// pid is the process that does the work: nsenter execs its command, but
// follow a child if it forked.
func (p *proc) pid() int {
	pid := p.cmd.Process.Pid
	for i := 0; i < 3; i++ {
		comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
		if strings.TrimSpace(string(comm)) != "nsenter" {
			return pid
		}
		ch, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid))
		f := strings.Fields(string(ch))
		if len(f) == 0 {
			return pid
		}
		pid, _ = strconv.Atoi(f[0])
	}
	return pid
}

// rssKiB is VmRSS of pid in KiB.
func rssKiB(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "VmRSS:") {
			f := strings.Fields(l)
			if len(f) >= 2 {
				return strconv.ParseInt(f[1], 10, 64)
			}
		}
	}
	return 0, errors.New("no VmRSS in /proc/PID/status")
}

// listening reports whether pid's network namespace has a TCP socket
// listening on port (read from /proc/PID/net/tcp, which shows the
// namespace of that process).
func listening(pid, port int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/tcp", pid))
	if err != nil {
		return false
	}
	want := fmt.Sprintf(":%04X", port)
	for _, l := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(l)
		if len(f) > 3 && strings.HasSuffix(f[1], want) && f[3] == "0A" {
			return true
		}
	}
	return false
}

func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return "    " + strings.Join(lines, "\n    ")
}

// run runs a short command and returns its combined output.
func run(ctx context.Context, argv ...string) (string, error) {
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s: %w: %s", strings.Join(argv, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}
