package main

import (
	"flag"
	"fmt"
	"html"
	"io"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

func reportMain(args []string) error {
	fs := flag.NewFlagSet("report", flag.ContinueOnError)
	dir := fs.String("out", "docs", "directory holding bench-results.json; benchmarks.md and bench-chart.svg are written there")
	if err := fs.Parse(args); err != nil {
		return err
	}
	r, err := loadResults(filepath.Join(*dir, "bench-results.json"))
	if err != nil {
		return err
	}
	if err := writeReports(*dir, r); err != nil {
		return err
	}
	printTable(os.Stdout, r)
	return nil
}

// writeReports writes benchmarks.md and bench-chart.svg from r alone.
func writeReports(dir string, r *Results) error {
	if err := os.WriteFile(filepath.Join(dir, "benchmarks.md"), []byte(markdown(r)), 0o644); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "bench-chart.svg"), []byte(chartSVG(r)), 0o644)
}

func fmtNum(v float64, digits int) string {
	s := strconv.FormatFloat(v, 'f', digits, 64)
	if digits == 0 && math.Abs(v) >= 1000 {
		// thousands separator for large whole numbers
		neg := strings.HasPrefix(s, "-")
		s = strings.TrimPrefix(s, "-")
		var b strings.Builder
		for i, ch := range s {
			if i > 0 && (len(s)-i)%3 == 0 {
				b.WriteByte(',')
			}
			b.WriteRune(ch)
		}
		s = b.String()
		if neg {
			s = "-" + s
		}
	}
	return s
}

func (r *Results) cell(c, k string) string {
	v, ok := r.med(c, k)
	if !ok {
		return "—"
	}
	return fmtNum(v, r.metric(k).Digits)
}

// ratio is a/b formatted, or "—".
func (r *Results) ratio(a, b, k string) (float64, string) {
	va, ok1 := r.med(a, k)
	vb, ok2 := r.med(b, k)
	if !ok1 || !ok2 || vb == 0 {
		return math.NaN(), "—"
	}
	x := va / vb
	return x, fmtRatio(x)
}

func fmtRatio(x float64) string {
	if math.IsNaN(x) {
		return "—"
	}
	if x >= 10 {
		return fmt.Sprintf("%.1f×", x)
	}
	return fmt.Sprintf("%.2f×", x)
}

func (r *Results) spread(c, k string) string {
	v := r.Raw[c][k]
	if len(v) == 0 {
		return "—"
	}
	lo, hi := v[0], v[0]
	for _, x := range v {
		lo, hi = math.Min(lo, x), math.Max(hi, x)
	}
	d := r.metric(k).Digits
	out := fmtNum(lo, d) + " – " + fmtNum(hi, d)
	if len(v) == 1 {
		out = fmtNum(lo, d)
	}
	if len(v) < r.Config.Rounds && perRound(k) {
		out += fmt.Sprintf(" (%d of %d rounds)", len(v), r.Config.Rounds)
	}
	return out
}

// perRound says whether a metric is measured once per round (the strace
// phase runs once, after the rounds).
func perRound(k string) bool { return k != mSyscalls && k != mSyscallsX }

func (r *Results) label(m Metric) string {
	l := m.Label
	c := r.Config
	switch m.Key {
	case mRSS, mHeld, mSlab, mKernel, mMemTotal:
		if c.IdleConns > 0 {
			l = fmt.Sprintf("%s (%s held)", l, fmtNum(float64(c.IdleConns), 0))
		}
	case mConns, mConnsCPU, mConnsBusy:
		if c.ConnWorkers > 0 {
			l = fmt.Sprintf("%s, %d concurrent", l, c.ConnWorkers)
		}
	case mRR, mRRCPU:
		if c.RRConns > 0 {
			l = fmt.Sprintf("%s, %d connections", l, c.RRConns)
		}
	case mSyscalls, mSyscallsX:
		if c.SyscallConns > 0 {
			l = fmt.Sprintf("%s (%s connections)", l, fmtNum(float64(c.SyscallConns), 0))
		}
	}
	return fmt.Sprintf("%s, %s", l, m.Unit)
}

func printTable(w io.Writer, r *Results) {
	fmt.Fprintf(w, "\nmedians of %d interleaved round(s), %s s per timed workload\n", r.Config.Rounds, fmtNum(r.Config.Secs, 1))
	width := 0
	for _, m := range r.Metrics {
		if n := len([]rune(r.label(m))); n > width {
			width = n
		}
	}
	fmt.Fprintf(w, "%-*s", width+2, "figure")
	for _, c := range r.Contenders {
		fmt.Fprintf(w, "%20s", nameOf(c))
	}
	fmt.Fprintln(w)
	for _, m := range r.Metrics {
		l := r.label(m)
		fmt.Fprintf(w, "%s%s", l, strings.Repeat(" ", width+2-len([]rune(l))))
		for _, c := range r.Contenders {
			fmt.Fprintf(w, "%20s", r.cell(c, m.Key))
		}
		fmt.Fprintln(w)
	}
	if len(r.Problems) > 0 {
		fmt.Fprintf(w, "\n%d problem(s) observed; see docs/benchmarks.md or bench-results.json\n", len(r.Problems))
	}
	fmt.Fprintln(w)
	for _, t := range r.targets() {
		fmt.Fprintf(w, "target %-58s %-7s %s\n", t.goal, t.status, t.ratios)
	}
}

type target struct {
	goal, measured, ratios, status string
}

func (r *Results) targets() []target {
	var out []target
	status := func(ok bool, have bool) string {
		if !have {
			return "no data"
		}
		if ok {
			return "met"
		}
		return "missed"
	}
	s := cSockmap
	have := func(xs ...float64) bool {
		for _, x := range xs {
			if math.IsNaN(x) {
				return false
			}
		}
		return true
	}
	{
		xh, rh := r.ratio(s, cHAProxy, mRTT50)
		xd, rd := r.ratio(s, cDirect, mRTT50)
		out = append(out, target{
			goal:     "round trip p50 at most 0.6× HAProxy's and 1.6× direct",
			measured: r.cell(s, mRTT50) + " vs " + r.cell(cHAProxy, mRTT50) + " (HAProxy), " + r.cell(cDirect, mRTT50) + " (direct) µs",
			ratios:   rh + " HAProxy, " + rd + " direct",
			status:   status(xh <= 0.6 && xd <= 1.6, have(xh, xd)),
		})
	}
	{
		xh, rh := r.ratio(s, cHAProxy, mBulk1)
		xs, rsp := r.ratio(s, cSplice, mBulk1)
		out = append(out, target{
			goal:     "bulk, one stream: at least 1.3× HAProxy and above the splice plane",
			measured: r.cell(s, mBulk1) + " vs " + r.cell(cHAProxy, mBulk1) + " (HAProxy), " + r.cell(cSplice, mBulk1) + " (splice) Gbit/s",
			ratios:   rh + " HAProxy, " + rsp + " splice",
			status:   status(xh >= 1.3 && xs > 1, have(xh, xs)),
		})
	}
	{
		x, rh := r.ratio(s, cHAProxy, mBulk4)
		out = append(out, target{
			goal:     "bulk, four streams: at least 1.2× HAProxy",
			measured: r.cell(s, mBulk4) + " vs " + r.cell(cHAProxy, mBulk4) + " Gbit/s",
			ratios:   rh + " HAProxy",
			status:   status(x >= 1.2, have(x)),
		})
	}
	for _, k := range []string{mCPUGB1, mCPUGB} {
		n := "one stream"
		if k == mCPUGB {
			n = "four streams"
		}
		x, rh := r.ratio(s, cHAProxy, k)
		out = append(out, target{
			goal:     "machine CPU per GB, " + n + ": at most 0.75× HAProxy's",
			measured: r.cell(s, k) + " vs " + r.cell(cHAProxy, k) + " CPU s/GB",
			ratios:   rh + " HAProxy",
			status:   status(x <= 0.75, have(x)),
		})
	}
	{
		x, rh := r.ratio(s, cHAProxy, mConns)
		out = append(out, target{
			goal:     fmt.Sprintf("new connections/s (%d concurrent): at least 1.0× HAProxy's", r.Config.ConnWorkers),
			measured: r.cell(s, mConns) + " vs " + r.cell(cHAProxy, mConns) + " conn/s",
			ratios:   rh + " HAProxy",
			status:   status(x >= 1, have(x)),
		})
	}
	{
		x, rh := r.ratio(s, cHAProxy, mMemTotal)
		out = append(out, target{
			goal:     "RSS + kernel memory per idle connection: at most HAProxy's",
			measured: r.cell(s, mMemTotal) + " vs " + r.cell(cHAProxy, mMemTotal) + " KiB",
			ratios:   rh + " HAProxy",
			status:   status(x <= 1, have(x)),
		})
	}
	{
		xr, rr := r.ratio(s, cHAProxy, mRR)
		xc, rc := r.ratio(s, cHAProxy, mRRCPU)
		out = append(out, target{
			goal:     fmt.Sprintf("%d keep-alive connections, %s B request/response: at least 1.0× HAProxy's requests/s, at most its CPU per request", r.Config.RRConns, fmtNum(float64(r.Config.RRSize), 0)),
			measured: r.cell(s, mRR) + " vs " + r.cell(cHAProxy, mRR) + " req/s; " + r.cell(s, mRRCPU) + " vs " + r.cell(cHAProxy, mRRCPU) + " CPU µs/req",
			ratios:   rr + " HAProxy req/s, " + rc + " HAProxy CPU",
			status:   status(xr >= 1 && xc <= 1, have(xr, xc)),
		})
	}
	{
		v, ok := r.med(s, mSyscallsX)
		x := math.NaN()
		if ok {
			x = v
		}
		out = append(out, target{
			goal:     "system calls per connection outside the Go runtime: half of the 35 the issue measured (at most 17.5)",
			measured: r.cell(s, mSyscallsX) + " (all calls: " + r.cell(s, mSyscalls) + "; HAProxy " + r.cell(cHAProxy, mSyscalls) + ")",
			ratios:   "—",
			status:   status(x <= 17.5, ok),
		})
	}
	return out
}

func markdown(r *Results) string {
	var b strings.Builder
	p := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	p("# edgeproxy benchmarks\n\n")
	p("<!-- Generated by `go run ./internal/bench report` from bench-results.json: edit the generator, not this file. -->\n\n")
	p("Produced by:\n\n```sh\n%s\n```\n\n", r.Command)
	p("Medians of %d interleaved round(s) (each round runs every contender through every workload, "+
		"the contender order rotating by one each round), %s s per timed workload.\n\n", r.Config.Rounds, fmtNum(r.Config.Secs, 1))
	m := r.Machine
	p("| machine | |\n| --- | --- |\n")
	p("| date | %s |\n", m.Date)
	p("| kernel | %s |\n", m.Kernel)
	p("| CPU | %s (%d CPUs visible) |\n", m.CPUModel, m.CPUs)
	if m.MemTotal != "" {
		p("| memory | %s |\n", m.MemTotal)
	}
	p("| HAProxy | %s |\n", m.HAProxy)
	p("| edgeproxy | %s |\n", strings.TrimPrefix(m.Edgeproxy, "edgeproxy "))
	if m.Git != "" {
		p("| commit | %s |\n", m.Git)
	}
	p("| Go | %s |\n", m.Go)
	if m.CPUIdle != "" {
		p("| idle states | %s |\n", m.CPUIdle)
	}
	p("\n")

	p("![benchmark chart](bench-chart.svg)\n\n")

	p("## Medians\n\n| figure |")
	for _, c := range r.Contenders {
		p(" %s |", nameOf(c))
	}
	p("\n| --- |")
	for range r.Contenders {
		p(" ---: |")
	}
	p("\n")
	for _, mt := range r.Metrics {
		p("| %s |", r.label(mt))
		for _, c := range r.Contenders {
			p(" %s |", r.cell(c, mt.Key))
		}
		p("\n")
	}
	p("\n")

	p("## Ratios\n\nEach edgeproxy plane's median divided by direct's and by HAProxy's, and HAProxy's by direct's for scale. " +
		"For latency, CPU and memory lower is better; for throughput and connections/s higher is better.\n\n")
	var planes []string
	for _, c := range []string{cSockmap, cSplice} {
		if r.hasContender(c) {
			planes = append(planes, c)
		}
	}
	p("| figure | better |")
	for _, c := range planes {
		p(" %s / direct | %s / HAProxy |", nameOf(c), nameOf(c))
	}
	p(" HAProxy / direct |\n| --- | --- |")
	for range planes {
		p(" ---: | ---: |")
	}
	p(" ---: |\n")
	for _, mt := range r.Metrics {
		any := false
		for _, c := range planes {
			_, okc := r.med(c, mt.Key)
			any = any || okc
		}
		if !any {
			continue // a figure of direct alone (sockperf)
		}
		p("| %s | %s |", mt.Label, mt.Better)
		for _, c := range planes {
			_, rd := r.ratio(c, cDirect, mt.Key)
			_, rh := r.ratio(c, cHAProxy, mt.Key)
			p(" %s | %s |", rd, rh)
		}
		_, hd := r.ratio(cHAProxy, cDirect, mt.Key)
		p(" %s |\n", hd)
	}
	p("\n")

	p("## Targets\n\nFrom the issue, for the sockmap data plane (`EDGEPROXY_DATAPLANE=sockmap`):\n\n")
	p("| target | measured (medians) | ratio | status |\n| --- | --- | --- | --- |\n")
	for _, t := range r.targets() {
		st := t.status
		if st == "met" || st == "missed" {
			st = "**" + st + "**"
		}
		p("| %s | %s | %s | %s |\n", t.goal, t.measured, t.ratios, st)
	}
	p("\n")

	p("## Spread across rounds (min – max)\n\n| figure |")
	for _, c := range r.Contenders {
		p(" %s |", nameOf(c))
	}
	p("\n| --- |")
	for range r.Contenders {
		p(" ---: |")
	}
	p("\n")
	for _, mt := range r.Metrics {
		p("| %s |", r.label(mt))
		for _, c := range r.Contenders {
			p(" %s |", r.spread(c, mt.Key))
		}
		p("\n")
	}
	p("\n")

	r.roundTripCheck(p)
	r.syscallSection(p)

	p("## Problems observed during the run\n\n")
	if len(r.Problems) == 0 {
		p("None: every client run completed without errors, every bulk stream's byte count matched at the backend, and no proxy logged a warning or error or exited.\n\n")
	} else {
		max := 40
		for i, pr := range r.Problems {
			if i == max {
				p("- … %d more in bench-results.json\n", len(r.Problems)-max)
				break
			}
			p("- %s\n", strings.ReplaceAll(pr, "\n", " "))
		}
		p("\n")
	}

	if len(r.Notes) > 0 {
		p("Notes (expected, not faults):\n\n")
		for _, n := range r.Notes {
			p("- %s\n", strings.ReplaceAll(n, "\n", " "))
		}
		p("\n")
	}

	// The routing decision's own Go benchmarks, written by
	// scripts/bench-routing.sh, belong on the same page.
	if routing, err := os.ReadFile(filepath.Join("docs", "bench-routing.md")); err == nil {
		p("%s\n", strings.TrimSpace(string(routing)))
		p("\n")
	}

	c := r.Config
	p("## Method\n\n")
	p("- **Testbed.** %s\n", r.Testbed)
	p("- **Contenders.** *direct*: the client dials the backend itself, routed through the proxy namespace " +
		"(`ip_forward=1`), so it crosses the same two veth hops. *edgeproxy sockmap* and *edgeproxy splice*: " +
		"`bin/edgeproxy run` started with `nsenter --net=…` in the proxy namespace, `EDGEPROXY_DATAPLANE=sockmap` / `splice`, " +
		"one backend row pointing at the backend, admin HTTP off. *HAProxy*: `mode tcp`, `option splice-request` and " +
		"`option splice-response` (splice forced both ways), `nbthread` = CPUs, `maxconn 7000`. " +
		"All proxies run at once, idle except the one under test.\n")
	p("- **Backend.** One Go server in the backend namespace; the first byte of each connection picks echo " +
		"(connection rate, idle), blocking-thread echo (round trip) or discard-and-count (bulk).\n")
	placement := "not pinned (BENCH_PIN=0): the scheduler placed them"
	if c.ClientCPU >= 0 {
		placement = fmt.Sprintf("the client's measuring thread pinned to CPU %d and the backend's echo thread to CPU %d, the same for every contender, "+
			"as if on two hosts (proxies are not pinned)", c.ClientCPU, c.BackendCPU)
	}
	p("- **Round trip.** One connection, 64-byte message, reply read in full before the next; %s warm-up then %s timed "+
		"round trips; client and backend use blocking sockets on locked OS threads with raw system calls (no Go netpoller and no "+
		"runtime syscall bookkeeping in the path), %s. p50 and p99. The direct path is measured again with sockperf "+
		"(`sockperf ping-pong --tcp -m 64 --full-rtt`, 2 s) in the same placement just before and just after (the mean of the two is "+
		"the sockperf figure), and once with both ends on one CPU. "+
		"The second round-trip row repeats the measurement with the client's thread on the backend's CPU: no vCPU wake-up "+
		"between the two ends, so direct is the bare path and a proxy's figure is its own work plus the wake-ups it adds.\n",
		fmtNum(float64(c.PingWarm), 0), fmtNum(float64(c.Pings), 0), placement)
	p("- **Bulk.** Client → backend, 1 and 4 streams, %d-byte writes, %s s warm-up then %s s measured at the sender. "+
		"Afterwards each stream half-closes and the backend replies with the byte count it received, which must equal what was sent.\n",
		c.BulkChunk, fmtNum(c.WarmSecs, 1), fmtNum(c.Secs, 1))
	p("- **Machine CPU per GB.** Busy jiffies of the whole machine (`/proc/stat`: all but idle and iowait) over the measured " +
		"window of each bulk run (1 and 4 streams), divided by the GB (10⁹ bytes) sent in it. Client, backend and proxy all count; " +
		"other load on the machine counts too.\n")
	p("- **New connections/s.** %d concurrent workers, each: connect, 64-byte echo, close with `SO_LINGER` 0 (RST, no TIME_WAIT on the client); "+
		"%s s warm-up then %s s counted. The client and proxy namespaces use `ip_local_port_range` 1024–65535 and `tcp_tw_reuse=1`, "+
		"the same for every contender.\n", c.ConnWorkers, fmtNum(c.WarmSecs, 1), fmtNum(c.Secs, 1))
	p("- **Many small requests.** %d keep-alive connections, each repeating: write a %s-byte request, read the %s-byte reply "+
		"(the backend echoes) in full; %s s warm-up then %s s counted. Requests/s, and machine CPU (as above) per request.\n",
		c.RRConns, fmtNum(float64(c.RRSize), 0), fmtNum(float64(c.RRSize), 0), fmtNum(c.WarmSecs, 1), fmtNum(c.Secs, 1))
	p("- **Memory per idle connection.** Each round the proxy under test is restarted, one connection checks it, its `VmRSS` and the "+
		"machine's live slab objects (`/proc/slabinfo`: active objects × object size over every cache, the TIME_WAIT caches `tw_sock_TCP*` "+
		"left out since earlier sockets expire meanwhile) are read; then %s connections are opened (each checked with one echo) and held, "+
		"and both are read again after 1 s. (after − before) / connections. A spliced socket's state lives in the kernel (socket, inode, "+
		"dentry, file, epoll item, psock, map entry, pipe), not in RSS, hence the slab. Live objects rather than slab pages "+
		"(`/proc/meminfo` `Slab`, kept in the JSON): new sockets first fill the room earlier workloads left in existing pages, so page "+
		"growth depends on what ran before. The slab is the whole machine's: the client's and backend's sockets are in it, so "+
		"direct (the client holding the same connections to the backend, no proxy) is the baseline, and a proxy's kernel memory is its "+
		"slab growth less direct's median. A garbage-collected heap (edgeproxy is Go) can take new connections into memory it already "+
		"holds, so a single round's RSS can read low; the median over rounds is the figure, and the total RSS with the connections held "+
		"is given beside it. The JSON lists, per round, the slab caches that grew.\n", fmtNum(float64(c.IdleConns), 0))
	if c.SyscallConns > 0 {
		p("- **System calls per connection.** After the timed rounds, never during them: `strace -f -c -p PID` attached to each proxy "+
			"(every thread) while %s connections (connect, 64-byte echo, close; 8 workers) go through it, less what the same proxy calls "+
			"idle over the same time (measured just before), divided by the connections. \"Without the Go runtime's own\" leaves out "+
			"futex, nanosleep, sched_yield, signals, mmap/munmap/madvise/mprotect, clone, getpid/gettid, for every contender alike.\n",
			fmtNum(float64(c.SyscallConns), 0))
	}
	p("- **Regenerate** this page and the chart from the JSON alone: `go run ./internal/bench report`.\n")
	return b.String()
}

// roundTripCheck lists, round by round, the harness's direct round trip
// beside sockperf's in the same placement and with both ends on one CPU.
func (r *Results) roundTripCheck(p func(string, ...any)) {
	var rows []Run
	for _, run := range r.Runs {
		if run.Contender == cDirect && run.Workload == "pingpong" {
			rows = append(rows, run)
		}
	}
	if len(rows) == 0 {
		return
	}
	p("## Direct round trip, checked with sockperf\n\n")
	p("The harness's direct figure and sockperf's (the mean of a run just before and one just after), in each round with the same placement. " +
		"On this kind of VM a round trip is set by where its two ends run: with both on one CPU no idle vCPU has to be woken; " +
		"across two CPUs each message wakes the other, halted vCPU (see `idle states` above). The last column shows that cost in every run.\n\n")
	p("| round | harness p50, µs | sockperf p50, µs | harness / sockperf | sockperf p50, both ends on one CPU, µs |\n| ---: | ---: | ---: | ---: | ---: |\n")
	for _, run := range rows {
		h, okh := run.Values[mRTT50]
		sp, oks := run.Values[mSockperf]
		same, oksame := run.Values[mSockSame]
		cell := func(v float64, ok bool) string {
			if !ok {
				return "—"
			}
			return fmtNum(v, 1)
		}
		ratio := "—"
		if okh && oks && sp > 0 {
			ratio = fmtRatio(h / sp)
		}
		p("| %d | %s | %s | %s | %s |\n", run.Round, cell(h, okh), cell(sp, oks), ratio, cell(same, oksame))
	}
	p("\n")
}

// syscallSection lists the strace phase's system calls per connection.
func (r *Results) syscallSection(p func(string, ...any)) {
	if len(r.Syscalls) == 0 {
		return
	}
	p("## System calls per connection\n\n")
	p("From `strace -f -c` attached to each proxy while %s connections (connect, 64-byte echo, close) went through it, "+
		"less its idle calls over the same time; a separate phase after the timed rounds.\n\n", fmtNum(float64(r.Config.SyscallConns), 0))
	p("| contender | all calls | without the Go runtime's own | most frequent (calls per connection) |\n| --- | ---: | ---: | --- |\n")
	for _, c := range r.Contenders {
		per, ok := r.Syscalls[c]
		if !ok {
			continue
		}
		var top []string
		for _, sc := range topSyscalls(per, 10) {
			top = append(top, fmt.Sprintf("%s %s", sc, fmtNum(per[sc], 2)))
		}
		p("| %s | %s | %s | %s |\n", nameOf(c), r.cell(c, mSyscalls), r.cell(c, mSyscallsX), strings.Join(top, ", "))
	}
	p("\n")
}

// chartSVG draws grouped bars: every workload's medians normalised to
// direct (to HAProxy where direct has no figure).
func chartSVG(r *Results) string {
	const (
		W, H                 = 1280, 500
		left, right, top, bm = 60, 20, 96, 130
		capRatio             = 4.0
	)
	colors := map[string]string{
		cDirect:  "#9e9e9e",
		cSockmap: "#1f5fa8",
		cSplice:  "#7fb0de",
		cHAProxy: "#e07b39",
	}
	type group struct {
		m    Metric
		base string
		vals []float64 // ratio per contender, NaN when missing
	}
	var groups []group
	ymax := 1.0
	for _, m := range r.Metrics {
		if !charted(m.Key) {
			continue
		}
		base := cDirect
		if _, ok := r.med(cDirect, m.Key); !ok {
			base = cHAProxy
		}
		g := group{m: m, base: base}
		for _, c := range r.Contenders {
			x, _ := r.ratio(c, base, m.Key)
			g.vals = append(g.vals, x)
			if !math.IsNaN(x) {
				ymax = math.Max(ymax, math.Min(x, capRatio))
			}
		}
		groups = append(groups, g)
	}
	ymax = math.Ceil(ymax*2) / 2
	plotW := float64(W - left - right)
	plotH := float64(H - top - bm)
	y := func(v float64) float64 { return float64(top) + plotH - v/ymax*plotH }

	var b strings.Builder
	p := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	p(`<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="Helvetica, Arial, sans-serif">`+"\n", W, H, W, H)
	p(`<rect width="100%%" height="100%%" fill="#ffffff"/>` + "\n")
	p(`<text x="%d" y="26" font-size="18" font-weight="bold" fill="#222">edgeproxy benchmark: medians relative to direct (=1; to HAProxy where direct has none)</text>`+"\n", left)
	sub := fmt.Sprintf("%s · kernel %s · %d round(s) · %s", r.Machine.Date, r.Machine.Kernel, r.Config.Rounds, r.Machine.CPUModel)
	p(`<text x="%d" y="46" font-size="12" fill="#555">%s</text>`+"\n", left, html.EscapeString(sub))
	// legend
	lx := left
	for _, c := range r.Contenders {
		p(`<rect x="%d" y="60" width="14" height="14" fill="%s"/>`, lx, colors[c])
		p(`<text x="%d" y="72" font-size="13" fill="#222">%s</text>`+"\n", lx+20, html.EscapeString(nameOf(c)))
		lx += 40 + 8*len(nameOf(c))
	}
	// grid
	for v := 0.0; v <= ymax+1e-9; v += 0.5 {
		col, dash := "#e4e4e4", ""
		if v == 1 {
			col, dash = "#444", ` stroke-dasharray="5,3"`
		}
		p(`<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" stroke="%s"%s/>`, left, W-right, y(v), y(v), col, dash)
		p(`<text x="%d" y="%.1f" font-size="11" text-anchor="end" fill="#555">%s×</text>`+"\n", left-6, y(v)+4, strconv.FormatFloat(v, 'f', -1, 64))
	}
	gw := plotW / float64(len(groups))
	nb := float64(len(r.Contenders))
	bw := math.Min(28, (gw-24)/nb)
	for gi, g := range groups {
		x0 := float64(left) + float64(gi)*gw + (gw-bw*nb)/2
		for ci, c := range r.Contenders {
			v := g.vals[ci]
			bx := x0 + float64(ci)*bw
			if math.IsNaN(v) {
				p(`<text x="%.1f" y="%.1f" font-size="10" text-anchor="middle" fill="#999">n/a</text>`+"\n", bx+bw/2, y(0)-4)
				continue
			}
			h := math.Min(v, ymax)
			p(`<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s"><title>%s: %s (%s %s)</title></rect>`,
				bx+1, y(h), bw-2, y(0)-y(h), colors[c], html.EscapeString(nameOf(c)), fmtRatio(v),
				html.EscapeString(r.cell(c, g.m.Key)), html.EscapeString(g.m.Unit))
			if v > ymax {
				// broken bar: draw a white zig-zag near the top
				p(`<path d="M%.1f %.1f l%.1f -4 l%.1f 8 l%.1f -4" stroke="#fff" stroke-width="2" fill="none"/>`,
					bx+1, y(h)+10, (bw-2)/3, (bw-2)/3, (bw-2)/3)
			}
			p(`<text x="%.1f" y="%.1f" font-size="9.5" text-anchor="middle" fill="#222">%s</text>`+"\n", bx+bw/2, y(h)-3, strings.TrimSuffix(fmtRatio(v), "×"))
		}
		cx := float64(left) + float64(gi)*gw + gw/2
		// about 6.5 px per character at 11 px
		lines := wrap(g.m.Label, max(8, int(gw/6.5)))
		notes := []string{g.m.Better + " is better"}
		if g.base != cDirect {
			notes = append(notes, "vs "+nameOf(g.base))
		}
		for li, l := range lines {
			p(`<text x="%.1f" y="%.1f" font-size="11" text-anchor="middle" fill="#222">%s</text>`+"\n", cx, y(0)+15+float64(li)*13, html.EscapeString(l))
		}
		for ni, n := range notes {
			p(`<text x="%.1f" y="%.1f" font-size="10" text-anchor="middle" fill="#777">%s</text>`+"\n", cx, y(0)+15+float64(len(lines)+ni)*13, html.EscapeString(n))
		}
	}
	p(`<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" stroke="#222"/>`+"\n", left, W-right, y(0), y(0))
	p(`<text x="%d" y="%d" font-size="10.5" fill="#777">Bars above %.1f× are cut (zig-zag); the label gives the true ratio. Source: docs/bench-results.json.</text>`+"\n", left, H-8, ymax)
	p("</svg>\n")
	return b.String()
}

func wrap(s string, width int) []string {
	var lines []string
	cur := ""
	for _, w := range strings.Fields(s) {
		if cur != "" && len([]rune(cur))+1+len([]rune(w)) > width {
			lines = append(lines, cur)
			cur = w
			continue
		}
		if cur != "" {
			cur += " "
		}
		cur += w
	}
	if cur != "" {
		lines = append(lines, cur)
	}
	return lines
}
