package userspace

// The hand-over of a running edgeproxy to a new process (`edgeproxy
// upgrade`). The running process listens on a control socket named after
// its listen address; the new one connects, receives the listening
// sockets themselves (SCM_RIGHTS), the control socket and the pin-path
// lock, starts serving on them, and says so. Only then does the old one
// stop accepting and drain as on SIGTERM. The listening socket is never
// closed in between, so a client in the accept queue is taken by
// whichever process accepts first, and none is refused.
//
// The exchange, one JSON object per message:
//
//	new -> old  {"op":"handover","pid":N}
//	old -> new  {"pid":O,"files":["listener","admin","control","lock"]} + the descriptors
//	            or {"error":"..."} (draining, another hand-over in progress)
//	new -> old  {"op":"ready"} once it serves, or {"op":"abort","error":"..."}
//	old -> new  {"totals":{...}} after it stopped accepting: the counters
//	            the new process continues from

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"slices"
	"time"

	"golang.org/x/sys/unix"
)

// ControlSocketName is the abstract unix socket a running edgeproxy
// listens on for a hand-over. Abstract names live in the network
// namespace, need no writable directory (the unit's ProtectSystem), and
// vanish with the process, so a crash leaves nothing stale. Access is
// checked by the peer's credentials.
func ControlSocketName(listenAddr string) string { return "@edgeproxy-control:" + listenAddr }

// handoverWait bounds each step of the exchange: the new process loading
// its databases and BPF objects, the old one stopping its accepts.
const handoverWait = 60 * time.Second

type handoverMsg struct {
	Op     string          `json:"op,omitempty"`
	PID    int             `json:"pid,omitempty"`
	Files  []string        `json:"files,omitempty"`
	Error  string          `json:"error,omitempty"`
	Totals *handoverTotals `json:"totals,omitempty"`
	// Active is the sender's own live connections per backend, which it
	// counts in the shared backends map: if it dies without its final
	// message, the successor takes them out of the shared counts.
	Active map[string]int64 `json:"active,omitempty"`
}

// handoverTotals are the counters /metrics reports, handed to the new
// process so they continue instead of starting again from zero. Bytes the
// kernel moved are not among them: both processes add them to the same
// pinned backend_bytes map.
type handoverTotals struct {
	Backends map[string]backendTotals `json:"backends"`
	Rejected map[string]uint64        `json:"rejected"`
	Reloads  map[string]uint64        `json:"reloads"`
}

type backendTotals struct {
	Total, ConnectErrs, BytesIn, BytesOut, Retries, ChecksOK, ChecksFailed uint64
}

// Handover is what a new process received from the running one.
type Handover struct {
	conn *net.UnixConn
	dec  *json.Decoder
	// PredecessorPID is the running process handing over.
	PredecessorPID int
	Listener       *net.TCPListener
	Admin          net.Listener // nil: the predecessor served no admin HTTP
	Control        *net.UnixListener
	Lock           *os.File // nil: the predecessor held no BPF maps
}

// TakeOver asks the edgeproxy serving listenAddr for its sockets. Nothing
// changes in the running process until Commit; Abort (or this process
// ending) leaves it serving.
func TakeOver(listenAddr string) (*Handover, error) {
	name := ControlSocketName(listenAddr)
	conn, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: name, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("reach the running edgeproxy on control socket %s: %w (is one running with EDGEPROXY_LISTEN_ADDR=%s? start it with edgeproxy run)", name, err, listenAddr)
	}
	fail := func(err error) (*Handover, error) {
		conn.Close()
		return nil, err
	}
	_ = conn.SetDeadline(time.Now().Add(handoverWait))
	if err := json.NewEncoder(conn).Encode(handoverMsg{Op: "handover", PID: os.Getpid()}); err != nil {
		return fail(fmt.Errorf("ask for a hand-over on %s: %w", name, err))
	}
	buf := make([]byte, 4096)
	oob := make([]byte, unix.CmsgSpace(4*8))
	n, oobn, _, _, err := conn.ReadMsgUnix(buf, oob)
	if err != nil {
		return fail(fmt.Errorf("read hand-over answer on %s: %w", name, err))
	}
	fds, err := parseRights(oob[:oobn])
	if err != nil {
		return fail(fmt.Errorf("read hand-over descriptors: %w", err))
	}
	files := make([]*os.File, len(fds))
	for i, fd := range fds {
		files[i] = os.NewFile(uintptr(fd), "handover")
	}
	closeFiles := func() {
		for _, f := range files {
			f.Close()
		}
	}
	var answer handoverMsg
	if err := json.Unmarshal(buf[:n], &answer); err != nil {
		closeFiles()
		return fail(fmt.Errorf("read hand-over answer on %s: %w", name, err))
	}
	if answer.Error != "" {
		closeFiles()
		return fail(fmt.Errorf("running edgeproxy refused the hand-over: %s", answer.Error))
	}
	if len(answer.Files) != len(files) {
		closeFiles()
		return fail(fmt.Errorf("hand-over names %d descriptors, %d arrived", len(answer.Files), len(files)))
	}
	h := &Handover{conn: conn, PredecessorPID: answer.PID}
	for i, what := range answer.Files {
		f := files[i]
		switch what {
		case "listener", "admin":
			ln, err := net.FileListener(f)
			f.Close() // FileListener made its own descriptor
			if err != nil {
				h.closeFiles()
				closeFiles()
				return fail(fmt.Errorf("hand-over %s socket: %w", what, err))
			}
			if what == "admin" {
				h.Admin = ln
			} else if tl, ok := ln.(*net.TCPListener); ok {
				h.Listener = tl
			} else {
				ln.Close()
			}
		case "control":
			ln, err := net.FileListener(f)
			f.Close()
			if err != nil {
				h.closeFiles()
				closeFiles()
				return fail(fmt.Errorf("hand-over control socket: %w", err))
			}
			h.Control = ln.(*net.UnixListener)
			h.Control.SetUnlinkOnClose(false)
		case "lock":
			h.Lock = f
		default:
			f.Close()
		}
		files[i] = nil
	}
	if h.Listener == nil || h.Control == nil {
		h.closeFiles()
		return fail(errors.New("hand-over lacks the listening or the control socket"))
	}
	return h, nil
}

func parseRights(oob []byte) ([]int, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, err
	}
	var fds []int
	for _, m := range msgs {
		got, err := unix.ParseUnixRights(&m)
		if err != nil {
			return nil, err
		}
		fds = append(fds, got...)
	}
	return fds, nil
}

func (h *Handover) closeFiles() {
	if h.Listener != nil {
		h.Listener.Close()
	}
	if h.Admin != nil {
		h.Admin.Close()
	}
	if h.Control != nil {
		h.Control.Close()
	}
	if h.Lock != nil {
		h.Lock.Close()
	}
}

// Abort tells the running process the new one will not serve: it keeps
// serving as if nothing happened. The sockets received are closed here
// (the running process holds its own descriptors of them).
func (h *Handover) Abort(cause error) {
	_ = json.NewEncoder(h.conn).Encode(handoverMsg{Op: "abort", Error: cause.Error()})
	h.conn.Close()
	h.closeFiles()
}

// Commit tells the running process that this one serves; it stops
// accepting, starts its drain and answers with its counters.
func (h *Handover) Commit() (*handoverTotals, map[string]int64, error) {
	_ = h.conn.SetDeadline(time.Now().Add(handoverWait))
	if err := json.NewEncoder(h.conn).Encode(handoverMsg{Op: "ready"}); err != nil {
		h.conn.Close()
		return nil, nil, fmt.Errorf("tell pid %d this process serves: %w", h.PredecessorPID, err)
	}
	h.dec = json.NewDecoder(h.conn)
	var answer handoverMsg
	if err := h.dec.Decode(&answer); err != nil {
		h.conn.Close()
		return nil, nil, fmt.Errorf("wait for pid %d to stop accepting: %w", h.PredecessorPID, err)
	}
	if answer.Error != "" {
		h.conn.Close()
		return nil, nil, fmt.Errorf("pid %d: %s", h.PredecessorPID, answer.Error)
	}
	return answer.Totals, answer.Active, nil
}

// finalTotals waits for the predecessor to end and returns its counters
// as they were then. If it ended without sending them (killed), final is
// nil and active is its live connections per backend as it last reported
// them: they are still in the shared counts.
func (h *Handover) finalTotals(initialActive map[string]int64) (final *handoverTotals, active map[string]int64) {
	defer h.conn.Close()
	_ = h.conn.SetDeadline(time.Time{})
	active = initialActive
	for {
		var msg handoverMsg
		if err := h.dec.Decode(&msg); err != nil {
			return nil, active
		}
		switch msg.Op {
		case "final":
			return msg.Totals, nil
		case "active":
			active = msg.Active
		}
	}
}

// since is what t counted beyond base: the counters a predecessor added
// while it drained. Reloads are left out: the successor counts its own
// reloads of the same file.
func (t *handoverTotals) since(base *handoverTotals) *handoverTotals {
	d := &handoverTotals{Backends: map[string]backendTotals{}, Rejected: map[string]uint64{}}
	sub := func(a, b uint64) uint64 {
		if a < b {
			return 0
		}
		return a - b
	}
	for id, now := range t.Backends {
		was := base.Backends[id]
		d.Backends[id] = backendTotals{
			Total: sub(now.Total, was.Total), ConnectErrs: sub(now.ConnectErrs, was.ConnectErrs),
			BytesIn: sub(now.BytesIn, was.BytesIn), BytesOut: sub(now.BytesOut, was.BytesOut),
			Retries: sub(now.Retries, was.Retries), ChecksOK: sub(now.ChecksOK, was.ChecksOK),
			ChecksFailed: sub(now.ChecksFailed, was.ChecksFailed),
		}
	}
	for reason, n := range t.Rejected {
		d.Rejected[reason] = sub(n, base.Rejected[reason])
	}
	return d
}

// listenControl binds the control socket of a process that starts fresh.
// A name in use means an edgeproxy already serves this address.
func listenControl(listenAddr string) (*net.UnixListener, error) {
	name := ControlSocketName(listenAddr)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: name, Net: "unix"})
	if err != nil {
		if errors.Is(err, unix.EADDRINUSE) {
			return nil, fmt.Errorf("control socket %s: an edgeproxy already serves %s: %w (replace it with edgeproxy upgrade)", name, listenAddr, ErrRunning)
		}
		return nil, fmt.Errorf("listen on control socket %s: %w", name, err)
	}
	return ln, nil
}

// ErrRunning says another edgeproxy already serves this listen address.
var ErrRunning = errors.New("already running")

// handoverFiles are duplicates of what a hand-over passes, kept from the
// start: the data planes take their listener out of Go (and close it),
// and the descriptors must still exist when a successor asks.
type handoverFiles struct {
	names []string
	files []*os.File
}

func (hf *handoverFiles) add(name string, f *os.File) {
	hf.names = append(hf.names, name)
	hf.files = append(hf.files, f)
}

func (hf *handoverFiles) close() {
	for _, f := range hf.files {
		f.Close()
	}
	hf.files, hf.names = nil, nil
}

func listenerFile(ln net.Listener) (*os.File, error) {
	switch l := ln.(type) {
	case *net.TCPListener:
		return l.File()
	case *net.UnixListener:
		return l.File()
	}
	return nil, fmt.Errorf("listener of type %T cannot be handed over", ln)
}

// peerMayTakeOver accepts a peer running as this process's user or root:
// the listening sockets and the pin lock are not for anyone else.
func peerMayTakeOver(c *net.UnixConn) error {
	raw, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return err
	}
	if credErr != nil {
		return fmt.Errorf("peer credentials: %w", credErr)
	}
	if cred.Uid != 0 && int(cred.Uid) != os.Geteuid() {
		return fmt.Errorf("peer pid %d runs as uid %d, not %d", cred.Pid, cred.Uid, os.Geteuid())
	}
	return nil
}

// serveControl answers hand-over requests until the control listener is
// closed (this process handed over, or stops).
func (p *Proxy) serveControl() {
	for {
		c, err := p.control.AcceptUnix()
		if err != nil {
			return
		}
		go p.handleControl(c)
	}
}

func (p *Proxy) handleControl(c *net.UnixConn) {
	defer func() {
		if c != nil {
			c.Close()
		}
	}()
	refuse := func(format string, args ...any) {
		_ = json.NewEncoder(c).Encode(handoverMsg{Error: fmt.Sprintf(format, args...)})
	}
	if err := peerMayTakeOver(c); err != nil {
		p.log.Warn("hand-over refused", "err", err)
		refuse("%v", err)
		return
	}
	_ = c.SetDeadline(time.Now().Add(handoverWait))
	dec := json.NewDecoder(c)
	var req handoverMsg
	if err := dec.Decode(&req); err != nil || req.Op != "handover" {
		refuse("want a handover request")
		return
	}
	if !p.handingOver.CompareAndSwap(false, true) {
		p.log.Warn("hand-over refused: another one is in progress", "pid", req.PID)
		refuse("pid %d: a hand-over is already in progress", os.Getpid())
		return
	}
	committed := false
	defer func() {
		if !committed {
			p.handingOver.Store(false)
		}
	}()
	p.handoverMu.Lock()
	files := slices.Clone(p.handoverFiles.files)
	names := slices.Clone(p.handoverFiles.names)
	p.handoverMu.Unlock()
	if p.draining() || len(files) == 0 {
		refuse("pid %d is draining, not serving", os.Getpid())
		return
	}
	p.log.Info("handing over to a new process", "pid", req.PID)
	fds := make([]int, len(files))
	for i, f := range files {
		fd, err := rawFD(f)
		if err != nil {
			p.log.Warn("hand-over failed, still serving", "pid", req.PID, "err", err)
			return
		}
		fds[i] = fd
	}
	hello, _ := json.Marshal(handoverMsg{PID: os.Getpid(), Files: names})
	if _, _, err := c.WriteMsgUnix(hello, unix.UnixRights(fds...), nil); err != nil {
		p.log.Warn("hand-over failed, still serving", "pid", req.PID, "err", err)
		return
	}
	var reply handoverMsg
	if err := dec.Decode(&reply); err != nil {
		p.log.Warn("hand-over failed: the new process went away, still serving", "pid", req.PID, "err", err)
		return
	}
	if reply.Op != "ready" {
		p.log.Warn("hand-over aborted by the new process, still serving", "pid", req.PID, "err", reply.Error)
		return
	}
	committed = true
	done, replied := make(chan struct{}), make(chan struct{})
	defer close(replied)
	select {
	case p.handoverReq <- handoverStep{successor: req.PID, done: done, replied: replied}:
		<-done
	case <-time.After(handoverWait):
		// The run loop is gone (stopping): nothing accepts here anyway.
	}
	totals := p.totals()
	if err := json.NewEncoder(c).Encode(handoverMsg{Totals: &totals, Active: p.ownActive()}); err != nil {
		return
	}
	// What this process still counts while it drains (connections it
	// accepted in the instant before it stopped, bytes the splice plane
	// counts at close) goes to the successor when this process ends.
	_ = c.SetDeadline(time.Time{})
	p.handoverMu.Lock()
	p.successor = c
	p.handoverMu.Unlock()
	go p.reportActive(c)
	c = nil // kept open: sendFinalTotals closes it
}

// activeReportPeriod bounds how long a change of this process's live
// connections waits to be reported when no release signalled it.
const activeReportPeriod = 200 * time.Millisecond

// reportActive sends this process's live connections per backend to the
// successor while it drains, at each release, so that if it is killed the
// successor can take them out of the shared counts; without that, a hard
// limit would admit fewer connections until the next fresh start.
func (p *Proxy) reportActive(c *net.UnixConn) {
	t := time.NewTicker(activeReportPeriod)
	defer t.Stop()
	var last map[string]int64
	for {
		select {
		case <-t.C:
		case <-p.balancer.released:
		}
		now := p.ownActive()
		p.handoverMu.Lock()
		if p.successor != c {
			p.handoverMu.Unlock()
			return // the final message went out
		}
		if !maps.Equal(now, last) {
			_ = c.SetWriteDeadline(time.Now().Add(time.Second))
			if err := json.NewEncoder(c).Encode(handoverMsg{Op: "active", Active: now}); err != nil {
				p.handoverMu.Unlock()
				return
			}
			last = now
		}
		p.handoverMu.Unlock()
	}
}

// ownActive is this process's live connections per backend (not the
// shared count).
func (p *Proxy) ownActive() map[string]int64 {
	active := map[string]int64{}
	for _, c := range p.balancer.Counters() {
		if c.Active > 0 {
			active[c.ID] = c.Active
		}
	}
	return active
}

// sendFinalTotals gives the successor this process's counters as they are
// at its end; it adds what changed since the hand-over.
func (p *Proxy) sendFinalTotals() {
	p.handoverMu.Lock()
	c := p.successor
	p.successor = nil
	p.handoverMu.Unlock()
	if c == nil {
		return
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	totals := p.totals()
	_ = json.NewEncoder(c).Encode(handoverMsg{Op: "final", Totals: &totals})
}

// rawFD is f's descriptor number. Not f.Fd(): that puts the descriptor in
// blocking mode, and O_NONBLOCK belongs to the open file description, which
// every process holding the socket shares. A listening socket turned
// blocking makes an event loop's accept4 wait for the next client, here
// and in the successor, while the other process takes them all.
func rawFD(f *os.File) (int, error) {
	raw, err := f.SyscallConn()
	if err != nil {
		return -1, fmt.Errorf("descriptor of %s: %w", f.Name(), err)
	}
	var fd int
	if err := raw.Control(func(s uintptr) { fd = int(s) }); err != nil {
		return -1, fmt.Errorf("descriptor of %s: %w", f.Name(), err)
	}
	return fd, nil
}

// handoverStep asks the run loop to stop accepting for a successor.
type handoverStep struct {
	successor int
	done      chan struct{} // closed by the run loop once accepts stopped
	replied   chan struct{} // closed by the handler once the successor has its answer
}

// totals reads the counters a successor continues from.
func (p *Proxy) totals() handoverTotals {
	t := handoverTotals{Backends: map[string]backendTotals{}, Rejected: p.balancer.RejectedCounts(), Reloads: p.reloads.snapshot().results}
	for _, c := range p.balancer.Counters() {
		t.Backends[c.ID] = backendTotals{Total: c.Total, ConnectErrs: c.ConnectErrs, BytesIn: c.BytesIn, BytesOut: c.BytesOut,
			Retries: c.Retries, ChecksOK: c.ChecksOK, ChecksFailed: c.ChecksFailed}
	}
	return t
}

// continueTotals adds a predecessor's counters to this process's.
func (p *Proxy) continueTotals(t *handoverTotals) {
	if t == nil {
		return
	}
	p.balancer.addTotals(t)
	p.reloads.mu.Lock()
	for result, n := range t.Reloads {
		if p.reloads.results == nil {
			p.reloads.results = map[string]uint64{"ok": 0, "error": 0}
		}
		p.reloads.results[result] += n
	}
	p.reloads.mu.Unlock()
}

// sdNotify sends a state line to systemd when it runs the process as a
// Type=notify service (NOTIFY_SOCKET set); otherwise it does nothing. A
// successor names itself with MAINPID= so the unit follows it (the unit
// needs NotifyAccess=all for a message from a process other than the main
// one).
func sdNotify(state string) error {
	sock := os.Getenv("NOTIFY_SOCKET")
	if sock == "" {
		return nil
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		return fmt.Errorf("notify systemd on %s: %w", sock, err)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte(state)); err != nil {
		return fmt.Errorf("notify systemd on %s: %w", sock, err)
	}
	return nil
}
