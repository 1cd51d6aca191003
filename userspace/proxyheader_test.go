package userspace

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net/netip"
	"testing"

	"github.com/pires/go-proxyproto"
)

func mustFormat(t testing.TB, version int, client, dst string) []byte {
	t.Helper()
	b, err := formatProxyHeader(version, netip.MustParseAddrPort(client), netip.MustParseAddrPort(dst))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestProxyHeaderRoundTrip(t *testing.T) {
	cases := []struct {
		version     int
		client, dst string
		want        string // client as edgeproxy sees it
	}{
		{1, "81.2.69.1:40000", "10.0.0.1:8080", "81.2.69.1:40000"},
		{2, "81.2.69.1:40000", "10.0.0.1:8080", "81.2.69.1:40000"},
		{1, "[2a02:cf40::1]:5", "[fd00::1]:8080", "[2a02:cf40::1]:5"},
		{2, "[2a02:cf40::1]:5", "[fd00::1]:8080", "[2a02:cf40::1]:5"},
		// Mixed families go out as IPv6 and come back unmapped.
		{1, "81.2.69.1:1", "[fd00::1]:8080", "81.2.69.1:1"},
		{2, "[::ffff:81.2.69.1]:1", "10.0.0.1:8080", "81.2.69.1:1"},
	}
	for _, tc := range cases {
		hdr := mustFormat(t, tc.version, tc.client, tc.dst)
		payload := append(append([]byte{}, hdr...), "GET / HTTP/1.1\r\n"...)
		h, n, err := scanProxyHeader(payload)
		if err != nil {
			t.Fatalf("v%d %s: %v", tc.version, tc.client, err)
		}
		if n != len(hdr) {
			t.Fatalf("v%d %s: header length %d, want %d", tc.version, tc.client, n, len(hdr))
		}
		got, ok := headerClient(h)
		if !ok || got != netip.MustParseAddrPort(tc.want) {
			t.Fatalf("v%d %s: client %v (ok %v), want %s", tc.version, tc.client, got, ok, tc.want)
		}
		// Every strict prefix is a header still on its way.
		for i := range len(hdr) {
			if _, _, err := scanProxyHeader(hdr[:i]); !errors.Is(err, errHeaderIncomplete) {
				t.Fatalf("v%d: %d of %d bytes: %v, want incomplete", tc.version, i, len(hdr), err)
			}
		}
	}
	if _, err := formatProxyHeader(3, netip.MustParseAddrPort("1.2.3.4:1"), netip.MustParseAddrPort("1.2.3.4:2")); err == nil {
		t.Fatal("version 3 formatted")
	}
}

func v2Local() []byte {
	b := append([]byte{}, proxyproto.SIGV2...)
	return append(b, 0x20, 0x00, 0x00, 0x00)
}

func TestProxyHeaderLocalUsesTheConnection(t *testing.T) {
	for name, hdr := range map[string][]byte{
		"v2 LOCAL":   v2Local(),
		"v1 UNKNOWN": []byte("PROXY UNKNOWN\r\n"),
	} {
		h, n, err := scanProxyHeader(append(hdr, "ping"...))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if n != len(hdr) {
			t.Fatalf("%s: length %d, want %d", name, n, len(hdr))
		}
		if c, ok := headerClient(h); ok {
			t.Fatalf("%s: names client %v; the connection's own address must apply", name, c)
		}
	}
}

func TestProxyHeaderRefusals(t *testing.T) {
	oversized := append([]byte{}, proxyproto.SIGV2...)
	oversized = append(oversized, 0x21, 0x11)
	oversized = binary.BigEndian.AppendUint16(oversized, 5000)
	udp := append([]byte{}, proxyproto.SIGV2...)
	udp = append(udp, 0x21, 0x12, 0, 12)
	udp = append(udp, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2)
	badCmd := append([]byte{}, proxyproto.SIGV2...)
	badCmd = append(badCmd, 0x2f, 0x11, 0, 12)
	badCmd = append(badCmd, make([]byte, 12)...)
	cases := []struct {
		name  string
		b     []byte
		cause string
	}{
		{"no header", []byte("GET / HTTP/1.1\r\n"), "missing"},
		{"tls hello", []byte{0x16, 0x03, 0x01, 0x00}, "missing"},
		{"v1 bad address", []byte("PROXY TCP4 1.2.3 10.0.0.1 1 2\r\n"), "malformed"},
		{"v1 bad port", []byte("PROXY TCP4 1.2.3.4 10.0.0.1 99999 2\r\n"), "malformed"},
		{"v1 LF only", []byte("PROXY TCP4 1.2.3.4 10.0.0.1 1 2\n"), "malformed"},
		{"v1 too long", append([]byte("PROXY TCP4 "), bytes.Repeat([]byte("1"), 120)...), "malformed"},
		{"v2 oversized", oversized, "oversized"},
		{"v2 UDP", udp, "unsupported"},
		{"v2 unknown command", badCmd, "malformed"},
	}
	for _, tc := range cases {
		_, _, err := scanProxyHeader(tc.b)
		if got := headerRefusalCause(err); got != tc.cause {
			t.Errorf("%s: %v (cause %q), want cause %q", tc.name, err, got, tc.cause)
		}
	}
}

func TestStartsLikeProxyHeader(t *testing.T) {
	for b, want := range map[string]bool{
		"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n": true,
		"PRO":                                true,
		string(proxyproto.SIGV2[:5]):         true,
		"":                                   false,
		"GET / HTTP/1.1\r\n":                 false,
		"\r\n\r\nhello":                      false,
	} {
		if got := startsLikeProxyHeader([]byte(b)); got != want {
			t.Errorf("%q: %v, want %v", b, got, want)
		}
	}
}

func TestParseTrustedUpstreams(t *testing.T) {
	got, err := ParseTrustedUpstreams(" 10.0.0.0/8, 192.0.2.7 ,fd00::/8,::ffff:198.51.100.0/120,")
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"10.0.0.0/8", "192.0.2.7/32", "fd00::/8", "198.51.100.0/24"}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for i := range want {
		if got[i].String() != want[i] {
			t.Fatalf("got %v, want %v", got, want)
		}
	}
	trusted := trustedUpstreams(got)
	for addr, want := range map[string]bool{"10.1.2.3": true, "192.0.2.7": true, "192.0.2.8": false, "fd12::1": true, "198.51.100.9": true, "8.8.8.8": false} {
		if trusted.trusts(netip.MustParseAddr(addr)) != want {
			t.Errorf("trusts(%s) = %v, want %v", addr, !want, want)
		}
	}
	for _, bad := range []string{"10.0.0.0/33", "example.com", "10.0.0.0/8,nonsense", "::ffff:1.2.3.4/64"} {
		if _, err := ParseTrustedUpstreams(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
	if got, err := ParseTrustedUpstreams(""); err != nil || len(got) != 0 {
		t.Fatalf("empty: %v %v", got, err)
	}
}

// FuzzScanProxyHeader feeds any first bytes of a trusted upstream's
// connection to the inbound path. It must never panic, never claim more
// bytes than it was given or than the bound allows, keep waiting only while
// a header could still fit, and agree with itself on the header's own
// bytes.
func FuzzScanProxyHeader(f *testing.F) {
	f.Add(mustFormat(f, 1, "81.2.69.1:40000", "10.0.0.1:8080"))
	f.Add(mustFormat(f, 2, "[2a02:cf40::1]:5", "[fd00::1]:8080"))
	f.Add(append(mustFormat(f, 2, "81.2.69.1:1", "10.0.0.1:2"), "payload"...))
	f.Add(v2Local())
	f.Add([]byte("PROXY UNKNOWN\r\n"))
	f.Add([]byte("PROXY TCP6 ::1 ::1 1 2\r\nGET /"))
	f.Add([]byte("GET / HTTP/1.1\r\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		h, n, err := scanProxyHeader(b)
		switch {
		case errors.Is(err, errHeaderIncomplete):
			if len(b) >= maxProxyHeaderLen {
				t.Fatalf("still waiting after %d bytes", len(b))
			}
			if !startsLikeProxyHeader(b) && len(b) > 0 {
				t.Fatal("waiting for a header that cannot start like this")
			}
		case err != nil:
			if headerRefusalCause(err) == "" {
				t.Fatalf("error that is not a refusal: %v", err)
			}
		default:
			if n <= 0 || n > len(b) || n > maxProxyHeaderLen {
				t.Fatalf("header length %d of %d bytes", n, len(b))
			}
			h2, n2, err := scanProxyHeader(b[:n])
			if err != nil || n2 != n || h2.Command != h.Command {
				t.Fatalf("the header alone scans differently: %v %d", err, n2)
			}
			if c, ok := headerClient(h); ok && (!c.IsValid() || c.Addr().Is4In6()) {
				t.Fatalf("client %v not normalised", c)
			}
		}
	})
}

func TestCarriesProxySignatureOnlyWhole(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want bool
	}{
		{"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", true},
		{"PROXY ", true},
		{string(proxyproto.SIGV2) + "\x21", true},
		{"PROX", false},     // a prefix is also ordinary payload
		{"\r\n\r\n", false}, // so is a blank line
		{"GET / HTTP/1.1\r\n", false},
		{"", false},
	} {
		if got := carriesProxySignature([]byte(tc.in)); got != tc.want {
			t.Errorf("carriesProxySignature(%q) = %v, want %v", tc.in, got, tc.want)
		}
	}
}

func TestOriginFromHeader(t *testing.T) {
	upstream := netip.MustParseAddrPort("10.0.0.9:40000")
	h, _, err := scanProxyHeader([]byte("PROXY TCP6 ::ffff:11.91.2.7 ::ffff:192.0.2.80 5000 443\r\n"))
	if err != nil {
		t.Fatal(err)
	}
	o := originFromHeader(h, upstream)
	want := clientOrigin{client: netip.MustParseAddrPort("11.91.2.7:5000"), dst: netip.MustParseAddrPort("192.0.2.80:443"),
		upstream: upstream, reserved: true}
	if o.client != want.client || o.dst != want.dst || o.upstream != want.upstream || !o.reserved {
		t.Fatalf("PROXY: origin %+v, want %+v", o, want)
	}
	local, _, err := scanProxyHeader(mustFormatHeader(t, &proxyproto.Header{Version: 2, Command: proxyproto.LOCAL}))
	if err != nil {
		t.Fatal(err)
	}
	o = originFromHeader(local, upstream)
	if o.client != upstream || o.dst.IsValid() || !o.reserved {
		t.Fatalf("LOCAL: origin %+v, want the upstream's own address and no destination", o)
	}
}

func mustFormatHeader(t *testing.T, h *proxyproto.Header) []byte {
	t.Helper()
	b, err := h.Format()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestHeaderRefusalCounts(t *testing.T) {
	var c headerRefusalCounts
	c.count("timeout")
	c.count("timeout")
	c.count("untrusted")
	got := c.Counts()
	if len(got) != len(headerRefusalCauses) {
		t.Fatalf("counts %v: want every cause present", got)
	}
	if got["timeout"] != 2 || got["untrusted"] != 1 || got["missing"] != 0 {
		t.Fatalf("counts %v", got)
	}
}
