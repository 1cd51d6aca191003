package loader

import (
	"errors"
	"fmt"
	"os"
	"runtime"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/features"
	"golang.org/x/sys/unix"
)

// ErrNotSupported wraps every reason the sockmap data plane cannot run here.
var ErrNotSupported = errors.New("sockmap data plane not supported")

// ErrNotEstablished says a socket left the ESTABLISHED state (its remote
// already sent FIN) before it could join the sockhash, which only takes
// established sockets.
var ErrNotEstablished = errors.New("socket no longer established")

// ErrClientStaysPaired comes with a Pair that failed after the client
// socket joined the sockhash: it stays there, and its pairings stay until
// Unpair.
var ErrClientStaysPaired = errors.New("client socket stays in the sockhash")

// ErrAlreadyLoaded says another live edgeproxy holds the pin path.
var ErrAlreadyLoaded = errors.New("data plane already loaded by another process")

// RequiredCapabilities are what loading the data plane needs: CAP_BPF to
// load programs and create maps, CAP_NET_ADMIN for sockhash maps and
// sk_skb programs, CAP_SYS_ADMIN only when bpffs must still be mounted.
var RequiredCapabilities = []string{"CAP_BPF", "CAP_NET_ADMIN"}

// Probe returns nil when the sockmap data plane can run on this host, or an
// error wrapping ErrNotSupported that says why in words.
func Probe() error {
	if runtime.GOOS != "linux" {
		return fmt.Errorf("%w: requires Linux, this is %s", ErrNotSupported, runtime.GOOS)
	}
	if missing := missingCapabilities(); len(missing) > 0 {
		return fmt.Errorf("%w: missing %v (running as uid %d)", ErrNotSupported, missing, os.Geteuid())
	}
	if err := features.HaveMapType(ebpf.SockHash); err != nil {
		return fmt.Errorf("%w: sockhash maps unavailable (requires Linux >= 4.18): %v", ErrNotSupported, err)
	}
	if err := features.HaveProgramType(ebpf.SkSKB); err != nil {
		return fmt.Errorf("%w: sk_skb programs unavailable (requires Linux >= 4.14): %v", ErrNotSupported, err)
	}
	if err := features.HaveMapFlag(features.BPF_F_MMAPABLE); err != nil {
		return fmt.Errorf("%w: mmapable arrays unavailable (requires Linux >= 5.5): %v", ErrNotSupported, err)
	}
	if err := features.HaveV3ISA(); err != nil {
		return fmt.Errorf("%w: BPF atomics unavailable (requires Linux >= 5.12): %v", ErrNotSupported, err)
	}
	return nil
}

func missingCapabilities() []string {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return []string{fmt.Sprintf("capabilities unreadable: %v", err)}
	}
	has := func(c uint) bool { return data[c/32].Effective&(1<<(c%32)) != 0 }
	var missing []string
	if !has(unix.CAP_BPF) && !has(unix.CAP_SYS_ADMIN) {
		missing = append(missing, "CAP_BPF")
	}
	if !has(unix.CAP_NET_ADMIN) {
		missing = append(missing, "CAP_NET_ADMIN")
	}
	return missing
}
