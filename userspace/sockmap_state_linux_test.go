//go:build linux

package userspace

import (
	"errors"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// Every legal step of a direction, named after what happens on the wire.
var legalDirectionSteps = []struct {
	name string
	from directionState
	on   directionEvent
	to   directionState
}{
	{"the backend answered: userspace copies until pairing", dirWaiting, evConnected, dirUnpaired},
	{"sockets enter the sockhash unarmed", dirUnpaired, evPaired, dirCatchingUp},
	{"a half-closed socket is refused and userspace copies", dirUnpaired, evPairedForCopy, dirCopying},
	{"the source's FIN ends a direction never paired", dirUnpaired, evEOF, dirDraining},
	{"userspace caught up with the verdict and arms", dirCatchingUp, evArmed, dirArmed},
	{"a slow receiver pauses an armed direction", dirArmed, evPaused, dirPaused},
	{"the source's FIN ends an armed direction", dirArmed, evEOF, dirDraining},
	{"redirected bytes drained: userspace forwards again", dirPaused, evResumed, dirCatchingUp},
	{"nothing arrived since the pause: arm again at once", dirPaused, evArmed, dirArmed},
	{"the source's FIN ends a copied direction", dirCopying, evEOF, dirDraining},
	{"the FIN is passed on once every byte reached the peer", dirDraining, evFINSent, dirClosed},
}

func TestDirectionLegalTransitions(t *testing.T) {
	if len(legalDirectionSteps) != len(directionTransitions) {
		t.Fatalf("the test lists %d legal steps, the table has %d: keep them in step", len(legalDirectionSteps), len(directionTransitions))
	}
	for _, tc := range legalDirectionSteps {
		t.Run(tc.name, func(t *testing.T) {
			d := direction{state: tc.from}
			if err := d.transition(tc.on); err != nil {
				t.Fatalf("%s on %s: %v", tc.from, tc.on, err)
			}
			if d.state != tc.to {
				t.Fatalf("%s on %s: got %s, want %s", tc.from, tc.on, d.state, tc.to)
			}
		})
	}
}

// Every pair of state and event the table does not list is refused, with
// the state left as it was and both named in the error.
func TestDirectionIllegalTransitionsAreRefused(t *testing.T) {
	refused := 0
	for from := dirWaiting; from <= dirClosed; from++ {
		for on := evConnected; on <= evFINSent; on++ {
			if _, legal := directionTransitions[directionStep{from, on}]; legal {
				continue
			}
			d := direction{state: from}
			err := d.transition(on)
			if !errors.Is(err, errIllegalTransition) {
				t.Errorf("%s on %s: got %v, want errIllegalTransition", from, on, err)
				continue
			}
			if d.state != from {
				t.Errorf("%s on %s: refused but the state moved to %s", from, on, d.state)
			}
			if !strings.Contains(err.Error(), from.String()) || !strings.Contains(err.Error(), on.String()) {
				t.Errorf("error %q does not name %s and %s", err, from, on)
			}
			refused++
		}
	}
	// 8 states x 8 events, 11 legal.
	if refused != 8*8-11 {
		t.Fatalf("refused %d steps, want %d", refused, 8*8-11)
	}
}

// A whole connection's life, both directions, through the one writer.
func TestDirectionLifeSplicedThenPausedThenClosed(t *testing.T) {
	var d direction
	for _, ev := range []directionEvent{evConnected, evPaired, evArmed, evPaused, evResumed, evArmed, evPaused, evArmed, evEOF, evFINSent} {
		if err := d.transition(ev); err != nil {
			t.Fatalf("at %s: %v", ev, err)
		}
	}
	if d.state != dirClosed || !d.ended() {
		t.Fatalf("got %s (ended %v), want closed", d.state, d.ended())
	}
	// Nothing moves a closed direction.
	if err := d.transition(evArmed); err == nil {
		t.Fatal("a closed direction was armed")
	}
}

func TestDirectionNamesAreDistinct(t *testing.T) {
	seen := map[string]bool{}
	for s := dirWaiting; s <= dirClosed; s++ {
		name := s.String()
		if seen[name] || strings.HasPrefix(name, "directionState(") {
			t.Errorf("state %d: name %q missing or repeated", s, name)
		}
		seen[name] = true
	}
	if got := directionState(99).String(); got != "directionState(99)" {
		t.Errorf("unknown state prints %q", got)
	}
	for e := evConnected; e <= evFINSent; e++ {
		if strings.HasPrefix(e.String(), "directionEvent(") {
			t.Errorf("event %d has no name", e)
		}
	}
}

func TestConnPhaseSteps(t *testing.T) {
	legal := []struct {
		name     string
		from, to connPhase
	}{
		{"the backend answered: userspace copies", connDialling, connUnpaired},
		{"every dial failed or the client was reset", connDialling, connClosed},
		{"a connection old or busy enough was paired", connUnpaired, connSpliced},
		{"pairing found a socket half-closed", connUnpaired, connCopying},
		{"a connection ended before it was paired", connUnpaired, connClosed},
		{"a spliced connection ends", connSpliced, connClosed},
		{"a copied connection ends", connCopying, connClosed},
	}
	for _, tc := range legal {
		t.Run(tc.name, func(t *testing.T) {
			c := smConn{phase: tc.from}
			if err := c.enter(tc.to); err != nil || c.phase != tc.to {
				t.Fatalf("%s to %s: phase %s, err %v", tc.from, tc.to, c.phase, err)
			}
		})
	}
	illegal := 0
	for from := connDialling; from <= connClosed; from++ {
		for to := connDialling; to <= connClosed; to++ {
			isLegal := false
			for _, l := range legal {
				isLegal = isLegal || (l.from == from && l.to == to)
			}
			if isLegal {
				continue
			}
			c := smConn{phase: from}
			if err := c.enter(to); !errors.Is(err, errIllegalPhase) || c.phase != from {
				t.Errorf("%s to %s: got phase %s, err %v; want refused", from, to, c.phase, err)
			}
			illegal++
		}
	}
	if illegal != 5*5-len(legal) {
		t.Fatalf("checked %d illegal changes, want %d", illegal, 5*5-len(legal))
	}
}

func TestABusyArmedDirectionGoesQuiet(t *testing.T) {
	var p sockmapPlane // no epoll: register is not reached while ep.events is 0
	ep := &endpoint{direction: direction{state: dirArmed}}
	for i := 1; i < quietAfterTicks; i++ {
		p.quietWhenBusy(ep)
		if ep.readEvents() != epollIn {
			t.Fatalf("after %d busy ticks: registered for %#x, want EPOLLIN still", i, ep.readEvents())
		}
	}
	p.quietWhenBusy(ep)
	if got := ep.readEvents(); got != epollArmed || got&unix.EPOLLRDHUP == 0 {
		t.Fatalf("after %d busy ticks: registered for %#x, want %#x (RDHUP, no EPOLLIN)", quietAfterTicks, got, epollArmed)
	}
	if !p.step(ep, evPaused) || ep.readEvents() != epollIn {
		t.Errorf("paused: registered for %#x, want EPOLLIN back: userspace reads the passed bytes", ep.readEvents())
	}
	catchingUp := &endpoint{direction: direction{state: dirCatchingUp}}
	for range 2 * quietAfterTicks {
		p.quietWhenBusy(catchingUp)
	}
	if catchingUp.readEvents() != epollIn {
		t.Errorf("a catching-up direction went quiet: it must read its passed bytes")
	}
}

// A short connection copies and closes without ever being paired; a long
// one is paired mid-stream and then spliced.
func TestDirectionLifeCopiedThenPairedLate(t *testing.T) {
	var short direction
	for _, ev := range []directionEvent{evConnected, evEOF, evFINSent} {
		if err := short.transition(ev); err != nil {
			t.Fatalf("short connection at %s: %v", ev, err)
		}
	}
	var long direction
	for _, ev := range []directionEvent{evConnected, evPaired, evArmed, evEOF, evFINSent} {
		if err := long.transition(ev); err != nil {
			t.Fatalf("long connection at %s: %v", ev, err)
		}
	}
	// A direction being dialled has nothing to pair yet.
	waiting := direction{state: dirWaiting}
	if err := waiting.transition(evPaired); !errors.Is(err, errIllegalTransition) {
		t.Fatalf("paired while dialling: %v, want refused", err)
	}
}

// A direction that filled a read streams until a window's reads average
// under streamReadBytes; a window without reads keeps it streaming, and
// one that never filled a read is paired whatever it moved.
func TestStreamingDecidesPairing(t *testing.T) {
	windowOf := func(reads, each int) pairingWindow {
		var w pairingWindow
		for range reads {
			w.add(each)
		}
		return w
	}
	cases := []struct {
		name      string
		streaming bool
		window    pairingWindow
		want      bool
	}{
		{"never filled a read", false, windowOf(40, 60<<10), false},
		{"stream reading big", true, windowOf(10, readChunk), true},
		{"stream, quiet window (a slow receiver)", true, pairingWindow{}, true},
		{"stream turned to messages", true, windowOf(50, 2048), false},
		{"stream at the threshold", true, windowOf(4, streamReadBytes), true},
		{"stream just under it", true, windowOf(4, streamReadBytes-1), false},
	}
	for _, tc := range cases {
		d := direction{streaming: tc.streaming, window: tc.window}
		if got := d.streamingNow(); got != tc.want {
			t.Errorf("%s: streaming %v, want %v", tc.name, got, tc.want)
		}
		if d.window != (pairingWindow{}) {
			t.Errorf("%s: the window was not restarted: %+v", tc.name, d.window)
		}
		if d.streaming != tc.want {
			t.Errorf("%s: flag left at %v, want %v", tc.name, d.streaming, tc.want)
		}
	}
	var c smConn
	c.client.streaming, c.client.window = true, windowOf(3, readChunk)
	c.backend.window = windowOf(3, 100)
	if !c.judgeWindow() {
		t.Errorf("a connection streaming one way was not judged a stream")
	}
	if c.backend.window != (pairingWindow{}) {
		t.Errorf("judgeWindow judged one direction only: the backend's window is %+v", c.backend.window)
	}
	// Nothing read since: still a stream.
	if !c.judgeWindow() {
		t.Errorf("a quiet window ended a stream")
	}
}
