package main

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/edgeproxy/edgeproxy/userspace"
	"github.com/spf13/cobra"
)

// upgradeReportFD names the descriptor on which a process started by
// `edgeproxy upgrade` reports how the hand-over went: "ready PID
// PREDECESSOR" once it serves, or "error: ..." if it could not.
const upgradeReportFD = "EDGEPROXY_UPGRADE_REPORT_FD"

// upgradeWait bounds the whole upgrade: the new process loading its
// databases and BPF objects, and the old one stopping its accepts.
const upgradeWait = 90 * time.Second

func newUpgradeCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "upgrade [run flags]",
		Short: "Replace the running edgeproxy with this binary without refusing a connection",
		Long: `Start this binary as the new server. It takes the listening sockets, the admin
socket and the BPF state from the edgeproxy serving the same EDGEPROXY_LISTEN_ADDR
(found on its control socket), serves, and then the old process stops accepting
and drains its established connections as on SIGTERM (EDGEPROXY_DRAIN_SECS).
Run it with the environment and flags of the running process; the systemd unit's
ExecReload does. Exits 0 once the new process serves; non-zero, with the reason,
if it could not, and the old process then keeps serving.`,
		DisableFlagParsing: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			for _, a := range args {
				if a == "-h" || a == "--help" {
					return cmd.Help()
				}
			}
			return upgrade(cmd, args)
		},
	}
}

func upgrade(cmd *cobra.Command, runArgs []string) error {
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("find this binary: %w", err)
	}
	reportR, reportW, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("report pipe: %w", err)
	}
	defer reportR.Close()
	next := exec.Command(exe, append([]string{"run"}, runArgs...)...)
	next.Env = append(os.Environ(), upgradeReportFD+"=3")
	next.ExtraFiles = []*os.File{reportW}
	// The new server outlives this command: its own session, its output
	// where ours goes (the journal under systemd).
	next.Stdout, next.Stderr = os.Stdout, os.Stderr
	next.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := next.Start(); err != nil {
		reportW.Close()
		return fmt.Errorf("start %s run: %w", exe, err)
	}
	reportW.Close()
	exited := make(chan error, 1)
	go func() { exited <- next.Wait() }()
	lines := make(chan string, 1)
	go func() {
		line, _ := bufio.NewReader(reportR).ReadString('\n')
		lines <- strings.TrimSpace(line)
	}()
	select {
	case line := <-lines:
		if rest, ok := strings.CutPrefix(line, "ready "); ok {
			pid, predecessor, _ := strings.Cut(rest, " ")
			fmt.Fprintf(cmd.OutOrStdout(), "upgraded: pid %s serves, pid %s drains its connections\n", pid, predecessor)
			return nil
		}
		if msg, ok := strings.CutPrefix(line, "error: "); ok {
			<-exited
			return fmt.Errorf("new process did not take over, the running one keeps serving: %s", msg)
		}
		err := <-exited
		return fmt.Errorf("new process (pid %d) ended before serving (%v), the running one keeps serving", next.Process.Pid, err)
	case <-time.After(upgradeWait):
		_ = next.Process.Kill()
		return fmt.Errorf("new process (pid %d) not serving after %s: killed it, the running one keeps serving", next.Process.Pid, upgradeWait)
	}
}

// upgradeReport is the report descriptor of a process started by
// `edgeproxy upgrade`, or nil for a plain start.
type upgradeReport struct{ f *os.File }

func openUpgradeReport(e env) (*upgradeReport, error) {
	v := e.str(upgradeReportFD, "")
	if v == "" {
		return nil, nil
	}
	os.Unsetenv(upgradeReportFD) // not for what this process starts
	fd, err := strconv.Atoi(v)
	if err != nil || fd < 3 {
		return nil, fmt.Errorf("%s=%q: want a descriptor number", upgradeReportFD, v)
	}
	syscall.CloseOnExec(fd)
	return &upgradeReport{f: os.NewFile(uintptr(fd), "upgrade-report")}, nil
}

func (r *upgradeReport) ready(predecessor int) {
	fmt.Fprintf(r.f, "ready %d %d\n", os.Getpid(), predecessor)
	r.f.Close()
}

func (r *upgradeReport) failed(err error) {
	if err == nil {
		err = fmt.Errorf("stopped before serving")
	}
	fmt.Fprintf(r.f, "error: %s\n", strings.ReplaceAll(err.Error(), "\n", " "))
	r.f.Close()
}

// takeOver asks the running edgeproxy for its sockets when this process
// was started by `edgeproxy upgrade`.
func takeOver(report *upgradeReport, cfg *userspace.Config) error {
	if report == nil {
		return nil
	}
	h, err := userspace.TakeOver(cfg.ListenAddr)
	if err != nil {
		return err
	}
	cfg.Handover = h
	return nil
}
