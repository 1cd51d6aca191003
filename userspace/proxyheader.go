package userspace

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync/atomic"
	"time"

	"github.com/pires/go-proxyproto"
)

// The PROXY protocol (haproxy.org/download/2.9/doc/proxy-protocol.txt) in
// both directions: a trusted upstream (an anycast or L4 load balancer) tells
// edgeproxy who the client is, and edgeproxy tells a backend. go-proxyproto
// parses and formats the headers; this file only frames them, so the event
// loops can wait for a header without blocking: they peek at the socket,
// ask scanProxyHeader whether the header is complete, and consume exactly
// its bytes once it is, leaving what the client sent after it in the socket
// for the data plane.

// maxProxyHeaderLen bounds what a header may occupy. A v1 header is at most
// 107 bytes by the spec; a v2 header is 16 bytes plus its addresses and
// TLVs, and the load balancers that send it (HAProxy, AWS NLB, Envoy) stay
// well under 1 KiB with their TLVs. go-proxyproto's own v2 bound is 4 KiB;
// a longer header is refused as oversized rather than buffered.
const maxProxyHeaderLen = 16 + 4096

// maxV1HeaderLen is the spec's worst case for a v1 line, CRLF included.
const maxV1HeaderLen = 107

// errHeaderIncomplete says the bytes so far are a prefix of a header that
// may still be valid: wait for more (or for the header timeout).
var errHeaderIncomplete = errors.New("PROXY header incomplete")

// headerRefusal is why a connection's PROXY header was refused. Its cause is
// a short word for logs and the refused-header metric.
type headerRefusal struct {
	cause  string // one of headerRefusalCauses
	detail string
}

func (r *headerRefusal) Error() string {
	if r.detail == "" {
		return "PROXY header " + r.cause
	}
	return "PROXY header " + r.cause + ": " + r.detail
}

func refuseHeader(cause, format string, args ...any) error {
	return &headerRefusal{cause: cause, detail: fmt.Sprintf(format, args...)}
}

// headerRefusalCause is the cause word of err, or "" when err is not a
// refusal.
func headerRefusalCause(err error) string {
	var r *headerRefusal
	if errors.As(err, &r) {
		return r.cause
	}
	return ""
}

// scanProxyHeader looks at the first bytes a trusted upstream sent. It
// returns the parsed header and its length once the header is complete,
// errHeaderIncomplete while the bytes are a prefix of one, and a
// headerRefusal when they cannot become a valid header.
func scanProxyHeader(b []byte) (*proxyproto.Header, int, error) {
	n, err := proxyHeaderLen(b)
	if err != nil {
		return nil, 0, err
	}
	h, err := proxyproto.Read(bufio.NewReaderSize(bytes.NewReader(b[:n]), max(n, 16)))
	if err != nil {
		return nil, 0, refuseHeader("malformed", "%v", strings.TrimPrefix(err.Error(), "proxyproto: "))
	}
	if h.Command == proxyproto.PROXY {
		switch h.TransportProtocol {
		case proxyproto.TCPv4, proxyproto.TCPv6:
		default:
			// A UDP or unix-socket client cannot have reached a TCP
			// listener; a header that says so is from a misconfigured
			// upstream.
			return nil, 0, refuseHeader("unsupported", "transport %#x is not TCP", byte(h.TransportProtocol))
		}
	}
	return h, n, nil
}

// proxyHeaderLen frames the header at the start of b: its full length when
// b holds all of it, errHeaderIncomplete when b is a prefix of one.
func proxyHeaderLen(b []byte) (int, error) {
	sigV2 := proxyproto.SIGV2
	sigV1 := []byte("PROXY ")
	switch {
	case len(b) == 0:
		return 0, errHeaderIncomplete
	case bytes.HasPrefix(b, sigV2) || bytes.HasPrefix(sigV2, b):
		if len(b) < 16 {
			return 0, errHeaderIncomplete
		}
		n := 16 + int(binary.BigEndian.Uint16(b[14:16]))
		if n > maxProxyHeaderLen {
			return 0, refuseHeader("oversized", "v2 header of %d bytes, at most %d accepted", n, maxProxyHeaderLen)
		}
		if len(b) < n {
			return 0, errHeaderIncomplete
		}
		return n, nil
	case bytes.HasPrefix(b, sigV1) || bytes.HasPrefix(sigV1, b):
		if i := bytes.Index(b, []byte("\r\n")); i >= 0 && i+2 <= maxV1HeaderLen {
			return i + 2, nil
		}
		if len(b) >= maxV1HeaderLen || bytes.IndexByte(b, '\n') >= 0 {
			return 0, refuseHeader("malformed", "v1 header not ended by CRLF within %d bytes", maxV1HeaderLen)
		}
		return 0, errHeaderIncomplete
	}
	return 0, refuseHeader("missing", "connection does not start with a PROXY v1 or v2 signature")
}

// carriesProxySignature reports whether b holds a whole PROXY v1 or v2
// signature at its start. An untrusted peer's first bytes are refused only
// then: a shorter prefix ("\r\n", "PRO") is also the start of ordinary
// payload, and if a header follows it, it is forwarded as payload, never
// interpreted.
func carriesProxySignature(b []byte) bool {
	return bytes.HasPrefix(b, proxyproto.SIGV2) || bytes.HasPrefix(b, []byte("PROXY "))
}

// startsLikeProxyHeader reports whether b begins with a PROXY v1 or v2
// signature (or, being shorter, could): a peer that is not trusted to send
// one is refused when its first bytes look like this.
func startsLikeProxyHeader(b []byte) bool {
	_, err := proxyHeaderLen(b)
	return len(b) > 0 && headerRefusalCause(err) != "missing"
}

// headerClient is the client a header names: its source address for a
// PROXY command, normalised like a socket's peer (IPv4-mapped IPv6
// unmapped). ok is false for a v2 LOCAL command (or v1 UNKNOWN): the spec
// says the upstream opened the connection itself, for example as a health
// check, and the connection's own addresses apply.
func headerClient(h *proxyproto.Header) (client netip.AddrPort, ok bool) {
	if h.Command != proxyproto.PROXY {
		return netip.AddrPort{}, false
	}
	src, _, isTCP := h.TCPAddrs()
	if !isTCP {
		return netip.AddrPort{}, false
	}
	ap := src.AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), ap.IsValid()
}

// formatProxyHeader is the header edgeproxy sends a backend ahead of the
// client's bytes: version 1 or 2, naming the client and the address the
// client connected to. Mixed families are written as IPv6, the IPv4 side
// IPv4-mapped, which both versions allow.
func formatProxyHeader(version int, client, dst netip.AddrPort) ([]byte, error) {
	if version != 1 && version != 2 {
		return nil, fmt.Errorf("PROXY protocol version %d: want 1 or 2", version)
	}
	c, d := client.Addr().Unmap(), dst.Addr().Unmap()
	if c.Is4() != d.Is4() {
		c, d = as16(c), as16(d)
	}
	h := proxyproto.HeaderProxyFromAddrs(byte(version),
		net.TCPAddrFromAddrPort(netip.AddrPortFrom(c.WithZone(""), client.Port())),
		net.TCPAddrFromAddrPort(netip.AddrPortFrom(d.WithZone(""), dst.Port())))
	b, err := h.Format()
	if err != nil {
		return nil, fmt.Errorf("format PROXY v%d header for %s -> %s: %w", version, client, dst, err)
	}
	return b, nil
}

func as16(a netip.Addr) netip.Addr { return netip.AddrFrom16(a.As16()) }

// trustedUpstreams are the networks whose connections must start with a
// PROXY header (EDGEPROXY_PROXY_PROTOCOL_FROM).
type trustedUpstreams []netip.Prefix

// ParseTrustedUpstreams reads EDGEPROXY_PROXY_PROTOCOL_FROM: a comma list
// of CIDRs (a bare address counts as one host). Empty means none.
func ParseTrustedUpstreams(s string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		if !strings.Contains(f, "/") {
			a, err := netip.ParseAddr(f)
			if err != nil {
				return nil, fmt.Errorf("%q: want a CIDR such as 10.0.0.0/8 or an address", f)
			}
			a = a.Unmap()
			out = append(out, netip.PrefixFrom(a, a.BitLen()))
			continue
		}
		p, err := netip.ParsePrefix(f)
		if err != nil {
			return nil, fmt.Errorf("%q: want a CIDR such as 10.0.0.0/8: %v", f, err)
		}
		if p.Addr().Is4In6() {
			if p.Bits() < 96 {
				return nil, fmt.Errorf("%q: an IPv4-mapped prefix needs at least 96 bits", f)
			}
			p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
		}
		out = append(out, p.Masked())
	}
	return out, nil
}

// trusts reports whether a peer (already unmapped) must send a header.
func (t trustedUpstreams) trusts(peer netip.Addr) bool {
	for _, p := range t {
		if p.Contains(peer) {
			return true
		}
	}
	return false
}

// headerRefusalCauses are the causes a PROXY header is refused for, each
// counted in edgeproxy_proxy_protocol_refused_total{cause}:
//   - missing: a trusted upstream's connection does not start with a signature
//   - malformed: it does, but what follows is not a header
//   - oversized: a v2 header longer than maxProxyHeaderLen
//   - unsupported: a header for a transport that is not TCP
//   - truncated: the upstream closed or reset before the header was whole
//   - timeout: the header was not whole within EDGEPROXY_PROXY_PROTOCOL_TIMEOUT_MS
//   - untrusted: a peer outside EDGEPROXY_PROXY_PROTOCOL_FROM sent one
var headerRefusalCauses = [...]string{"missing", "malformed", "oversized", "unsupported", "truncated", "timeout", "untrusted"}

// headerRefusalCounts counts refused headers by cause, for every loop of
// either plane.
type headerRefusalCounts struct {
	n [len(headerRefusalCauses)]atomic.Uint64
}

func (c *headerRefusalCounts) count(cause string) {
	for i, k := range headerRefusalCauses {
		if k == cause {
			c.n[i].Add(1)
			return
		}
	}
	c.n[1].Add(1) // a cause without its own counter is a malformed header
}

// Counts returns the refusals by cause, every cause present.
func (c *headerRefusalCounts) Counts() map[string]uint64 {
	out := make(map[string]uint64, len(headerRefusalCauses))
	for i, k := range headerRefusalCauses {
		out[k] = c.n[i].Load()
	}
	return out
}

// defaultProxyHeaderTimeout is EDGEPROXY_PROXY_PROTOCOL_TIMEOUT_MS's default.
const defaultProxyHeaderTimeout = 3 * time.Second

// proxyHeaderPolicy is the inbound PROXY protocol setting both planes
// apply at accept.
type proxyHeaderPolicy struct {
	from    trustedUpstreams // peers whose connections must start with a header
	timeout time.Duration    // longest wait for it; 0: the default
	refused *headerRefusalCounts
}

// on reports whether any peer is trusted to send a header.
func (p proxyHeaderPolicy) on() bool { return len(p.from) > 0 }

func (p proxyHeaderPolicy) wait() time.Duration {
	if p.timeout <= 0 {
		return defaultProxyHeaderTimeout
	}
	return p.timeout
}

func (p proxyHeaderPolicy) countRefusal(cause string) {
	if p.refused != nil {
		p.refused.count(cause)
	}
}

// clientOrigin is who a connection serves and where its client was going:
// what admission, routing, affinity and logs use, and what an outbound
// header names.
type clientOrigin struct {
	// client is the accepted socket's peer, or the client a trusted
	// upstream's header named (IPv4-mapped IPv6 unmapped).
	client netip.AddrPort
	// dst is the destination a header named; zero: the accepted socket's
	// own local address.
	dst netip.AddrPort
	// upstream is the trusted peer that sent a header; zero without one.
	upstream netip.AddrPort
	// reserved: the connection already holds its place under the process
	// cap (taken while its header was awaited).
	reserved bool
	// early are client bytes read behind the header (sockmap plane only):
	// they go to the backend after its own header, before any other byte.
	early []byte
}

// originFromHeader is the origin a complete header gives a connection
// accepted from upstream. A LOCAL (or v1 UNKNOWN) header keeps the
// connection's own addresses.
func originFromHeader(h *proxyproto.Header, upstream netip.AddrPort) clientOrigin {
	o := clientOrigin{client: upstream, upstream: upstream, reserved: true}
	if c, ok := headerClient(h); ok {
		o.client = c
		if _, dst, isTCP := h.TCPAddrs(); isTCP {
			ap := dst.AddrPort()
			o.dst = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
		}
	}
	return o
}
