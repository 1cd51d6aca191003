//go:build linux

package userspace

import (
	"testing"
	"time"
)

func TestBulkSendBufferSpansOneJiffyAtLineRate(t *testing.T) {
	cases := []struct {
		hz   int
		want int
	}{{100, 64 << 20}, {250, 32 << 20}, {300, 16 << 20}, {1000, 8 << 20}}
	for _, tc := range cases {
		if got := bulkSendBuffer(tc.hz); got != tc.want {
			t.Errorf("HZ=%d: send buffer %d MiB, want %d MiB", tc.hz, got>>20, tc.want>>20)
		}
	}
	if hz := kernelHZ(); hz < 100 || hz > 1000 {
		t.Errorf("kernel HZ read as %d", hz)
	}
}

func TestTickGrowthScalesALateWakeUpToOneTick(t *testing.T) {
	const tick = 5 * time.Millisecond
	cases := []struct {
		name     string
		received uint64
		elapsed  time.Duration
		want     uint64
	}{
		{"on time: all of it", 1 << 20, tick, 1 << 20},
		{"early: all of it", 1 << 20, tick / 2, 1 << 20},
		{"four ticks late: a quarter", 4 << 20, 4 * tick, 1 << 20},
		{"first look (no previous check): next to nothing", 1 << 20, time.Since(time.Time{}), 0},
	}
	for _, tc := range cases {
		if got := tickGrowth(tc.received, tc.elapsed, tick); got != tc.want {
			t.Errorf("%s: %d bytes over %s scaled to %d, want %d", tc.name, tc.received, tc.elapsed, got, tc.want)
		}
	}
}

func TestReceiverDrainingOnlyAtBulkRate(t *testing.T) {
	const tick = 5 * time.Millisecond
	start := time.Unix(1000, 0)
	var d direction
	if d.receiverDraining(0, start, tick) {
		t.Fatal("first look: draining, want not yet known (false)")
	}
	if !d.receiverDraining(drainingTickBytes, start.Add(tick), tick) {
		t.Error("a tick's worth of bulk acknowledged in one tick: not draining")
	}
	if d.receiverDraining(drainingTickBytes+1000, start.Add(2*tick), tick) {
		t.Error("1000 bytes acknowledged in one tick (a slow reader): draining")
	}
	if d.receiverDraining(drainingTickBytes+1000, start.Add(3*tick), tick) {
		t.Error("nothing acknowledged (a stopped reader): draining")
	}
	if d.receiverDraining(4*drainingTickBytes, start.Add(13*tick), tick) {
		t.Error("three ticks' worth over ten ticks: draining")
	}
}
