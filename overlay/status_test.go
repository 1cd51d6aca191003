package overlay

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

func TestWriteKeyFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "wg.key")
	key, err := WriteKeyFile(path, false)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("mode %v, want 0600", fi.Mode().Perm())
	}
	data, _ := os.ReadFile(path)
	if string(data) != key.String()+"\n" {
		t.Errorf("file holds %q, want the key and a newline", data)
	}
	got, loose, err := ReadKeyFile(path)
	if err != nil || got != key || loose {
		t.Fatalf("ReadKeyFile: %v, loose %v, err %v", got == key, loose, err)
	}

	if _, err := WriteKeyFile(path, false); !errors.Is(err, ErrKeyFileExists) {
		t.Fatalf("second write without force: %v, want ErrKeyFileExists", err)
	}
	if again, _ := os.ReadFile(path); !bytes.Equal(again, data) {
		t.Fatal("a refused write changed the file")
	}

	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, loose, _ := ReadKeyFile(path); !loose {
		t.Error("a 0644 key file is not reported as loose")
	}
	key2, err := WriteKeyFile(path, true)
	if err != nil {
		t.Fatal(err)
	}
	fi, _ = os.Stat(path)
	if got, _, _ := ReadKeyFile(path); got != key2 || key2 == key || fi.Mode().Perm() != 0o600 {
		t.Fatalf("forced write: key replaced %v, mode %v", got == key2 && key2 != key, fi.Mode().Perm())
	}
	if entries, _ := os.ReadDir(filepath.Dir(path)); len(entries) != 1 {
		t.Errorf("temp files left behind: %v", entries)
	}
}

func TestReadKeyFileErrorsDoNotLeakTheFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "wg.key")
	secret := "c2VjcmV0LWJ1dC1ub3QtYS1rZXk="
	if err := os.WriteFile(path, []byte(secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, _, err := ReadKeyFile(path)
	if err == nil || strings.Contains(err.Error(), secret) || !strings.Contains(err.Error(), path) {
		t.Fatalf("err %v: want an error naming the path, not the content", err)
	}
}

func sampleDevice(now time.Time) *wgtypes.Device {
	return &wgtypes.Device{
		Name: "wg-edge", Type: wgtypes.Userspace, PublicKey: testKey(9), ListenPort: 51820,
		Peers: []wgtypes.Peer{
			{PublicKey: testKey(3), AllowedIPs: ipn("10.50.3.1/32")},
			{PublicKey: testKey(2), Endpoint: udp("192.0.2.2:51820"), LastHandshakeTime: now.Add(-42 * time.Second),
				ReceiveBytes: 1000, TransmitBytes: 2000, AllowedIPs: ipn("10.60.2.0/24", "10.50.2.1/32")},
			{PublicKey: testKey(1), Endpoint: udp("192.0.2.1:51820"), LastHandshakeTime: now.Add(time.Second)},
		},
	}
}

func TestStatusOf(t *testing.T) {
	now := time.Unix(1700000000, 0)
	ids := map[wgtypes.Key]string{testKey(2): "pop-b", testKey(3): "pop-c"}
	st := StatusOf(sampleDevice(now), ids, now)
	if st.Kind != "userspace" || st.Interface != "wg-edge" || st.ListenPort != 51820 {
		t.Fatalf("status header %+v", st)
	}
	var names []string
	for _, p := range st.Peers {
		names = append(names, p.Name())
	}
	// Unnamed peers go by key; "AQEB..." sorts before "pop-...".
	if want := []string{testKey(1).String(), "pop-b", "pop-c"}; strings.Join(names, " ") != strings.Join(want, " ") {
		t.Fatalf("peers %v, want %v", names, want)
	}
	if st.Peers[0].HandshakeAge != 0 {
		t.Errorf("a handshake in the future is %v old, want 0", st.Peers[0].HandshakeAge)
	}
	b := st.Peers[1]
	if b.HandshakeAge != 42*time.Second || b.Endpoint != "192.0.2.2:51820" || strings.Join(b.AllowedIPs, ",") != "10.50.2.1/32,10.60.2.0/24" {
		t.Errorf("pop-b %+v", b)
	}
	if !st.Peers[2].HandshakeNever() {
		t.Error("pop-c never shook hands")
	}

	var buf bytes.Buffer
	if err := WriteTable(&buf, st); err != nil {
		t.Fatal(err)
	}
	out := buf.String()
	for _, w := range []string{
		"interface wg-edge (userspace), public key " + testKey(9).String() + ", listening on UDP 51820\n",
		"PEER", "pop-b", "42s ago", "1000", "2000", "never", "(not in pops)", "(none)",
	} {
		if !strings.Contains(out, w) {
			t.Errorf("table lacks %q:\n%s", w, out)
		}
	}

	js, err := json.Marshal(st)
	if err != nil {
		t.Fatal(err)
	}
	var back struct {
		Peers []map[string]any `json:"peers"`
	}
	if err := json.Unmarshal(js, &back); err != nil {
		t.Fatal(err)
	}
	if back.Peers[1]["handshake_age_seconds"] != 42.0 || back.Peers[1]["id"] != "pop-b" || back.Peers[1]["rx_bytes"] != 1000.0 {
		t.Errorf("pop-b as JSON: %v", back.Peers[1])
	}
	if v, ok := back.Peers[2]["handshake_age_seconds"]; !ok || v != nil {
		t.Errorf("never-handshaken peer: handshake_age_seconds = %v (present %v), want null", v, ok)
	}
	if _, ok := back.Peers[2]["latest_handshake"]; ok {
		t.Errorf("never-handshaken peer has a latest_handshake: %s", js)
	}
}

func TestCollector(t *testing.T) {
	now := time.Unix(1700000000, 0)
	st := StatusOf(sampleDevice(now), map[wgtypes.Key]string{testKey(2): "pop-b", testKey(3): "pop-c"}, now)
	var fail error
	var warned []error
	c := newCollector(func() ([]PeerStatus, error) { return st.Peers, fail }, func(err error) { warned = append(warned, err) })
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(c)
	want := `
# HELP edgeproxy_wg_collector_errors_total Scrapes that could not read the WireGuard device.
# TYPE edgeproxy_wg_collector_errors_total counter
edgeproxy_wg_collector_errors_total 0
# HELP edgeproxy_wg_peer_bytes_total Bytes of WireGuard traffic with the peer, rx received from it, tx sent to it.
# TYPE edgeproxy_wg_peer_bytes_total counter
edgeproxy_wg_peer_bytes_total{direction="rx",peer="AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="} 0
edgeproxy_wg_peer_bytes_total{direction="rx",peer="pop-b"} 1000
edgeproxy_wg_peer_bytes_total{direction="rx",peer="pop-c"} 0
edgeproxy_wg_peer_bytes_total{direction="tx",peer="AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="} 0
edgeproxy_wg_peer_bytes_total{direction="tx",peer="pop-b"} 2000
edgeproxy_wg_peer_bytes_total{direction="tx",peer="pop-c"} 0
# HELP edgeproxy_wg_peer_handshake_age_seconds Seconds since the peer's latest WireGuard handshake; +Inf if it never completed one.
# TYPE edgeproxy_wg_peer_handshake_age_seconds gauge
edgeproxy_wg_peer_handshake_age_seconds{peer="AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="} 0
edgeproxy_wg_peer_handshake_age_seconds{peer="pop-b"} 42
edgeproxy_wg_peer_handshake_age_seconds{peer="pop-c"} +Inf
`
	if got := scrape(t, reg); got != strings.TrimPrefix(want, "\n") {
		t.Fatalf("scrape:\n%s\nwant:\n%s", got, want)
	}
	fail = errors.New("device gone")
	st.Peers = nil
	got := scrape(t, reg)
	if !strings.Contains(got, "edgeproxy_wg_collector_errors_total 1\n") || strings.Contains(got, "peer=") || len(warned) != 1 {
		t.Fatalf("after a failing scrape (warnings %v):\n%s", warned, got)
	}
}

// scrape gathers reg as Prometheus text, families sorted by name.
func scrape(t *testing.T, reg *prometheus.Registry) string {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sb strings.Builder
	for _, mf := range mfs {
		if _, err := expfmt.MetricFamilyToText(&sb, mf); err != nil {
			t.Fatal(err)
		}
	}
	return sb.String()
}
