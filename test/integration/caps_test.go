//go:build linux

package integration

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/edgeproxy/edgeproxy/internal/nettest"
	"golang.org/x/sys/unix"
)

// The systemd unit runs edgeproxy as a dedicated user holding only
// CAP_BPF, CAP_NET_ADMIN and CAP_NET_BIND_SERVICE. This runs the real
// binary the same way (as nobody, with exactly those capabilities) and
// proves the sockmap data plane works there.
func TestSockmapAsUnprivilegedUserWithUnitCapabilities(t *testing.T) {
	nettest.RequireRoot(t)
	if _, err := exec.LookPath("setpriv"); err != nil {
		t.Fatalf("setpriv (util-linux) is needed to drop privileges: %v", err)
	}
	topo := nettest.NewTopology(t)
	nettest.Serve(t, topo.Backend, nettest.BackendIP+":9000", nettest.Greeter("b1"))

	// What the unit's ExecStartPre does as root: bpffs mounted, the pin
	// directory handed to the service user.
	var st unix.Statfs_t
	if err := unix.Statfs("/sys/fs/bpf", &st); err != nil || st.Type != unix.BPF_FS_MAGIC {
		nettest.MustRun(t, "mount", "-t", "bpf", "bpf", "/sys/fs/bpf")
	}
	// Like the unit: traverse-only for others on the bpffs root.
	if fi, err := os.Stat("/sys/fs/bpf"); err == nil && fi.Mode().Perm()&0o001 == 0 {
		os.Chmod("/sys/fs/bpf", fi.Mode().Perm()|0o001)
		t.Cleanup(func() { os.Chmod("/sys/fs/bpf", fi.Mode().Perm()) })
	}
	pin := fmt.Sprintf("/sys/fs/bpf/edgeproxy-caps-%d", time.Now().UnixNano())
	if err := os.Mkdir(pin, 0o700); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(pin) })
	if err := os.Chown(pin, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "edgeproxy-caps-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	db := filepath.Join(dir, "routing.db")
	writeDB(t, db, []backendRow{backendAt("b1", 9000)})
	os.Chmod(db, 0o644)

	caps := "+bpf,+net_admin,+net_bind_service"
	cmd := topo.Proxy.Command("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
		"--inh-caps=-all,"+caps, "--ambient-caps="+caps, "--bounding-set=-all,"+caps, "--",
		binary, "run", "--listen", "0.0.0.0:443", "--db", db, "--dataplane", "sockmap", "--bpf-pin-path", pin, "--admin", "")
	logs := &syncBuffer{}
	cmd.Stderr = logs
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			t.Logf("edgeproxy log:\n%s", logs.String())
		}
	})
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(logs.String(), "edgeproxy started") {
		select {
		case err := <-done:
			t.Fatalf("edgeproxy as nobody exited: %v\n%s", err, logs.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("edgeproxy as nobody not serving after 10s:\n%s", logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if !strings.Contains(logs.String(), "dataplane=sockmap") {
		t.Fatalf("not on the sockmap plane:\n%s", logs.String())
	}
	status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", cmd.Process.Pid))
	if !strings.Contains(string(status), "Uid:\t65534") {
		t.Fatalf("edgeproxy does not run as nobody:\n%s", status)
	}
	// Port 443 (privileged) and a spliced connection both work.
	nettest.MustReach(t, topo.Client, nettest.ProxyClientIP+":443", "b1")
	c, err := nettest.Dial(topo.Client, nettest.ProxyClientIP+":443", 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	nettest.ReadLine(c, 2*time.Second)
	fmt.Fprintln(c, "spliced as nobody")
	if l, err := nettest.ReadLine(c, 2*time.Second); err != nil || l != "spliced as nobody" {
		t.Fatalf("echo as nobody: %q %v", l, err)
	}
}
