package overlay

import (
	"math"

	"github.com/prometheus/client_golang/prometheus"
)

var (
	descHandshakeAge = prometheus.NewDesc("edgeproxy_wg_peer_handshake_age_seconds",
		"Seconds since the peer's latest WireGuard handshake; +Inf if it never completed one.", []string{"peer"}, nil)
	descPeerBytes = prometheus.NewDesc("edgeproxy_wg_peer_bytes_total",
		"Bytes of WireGuard traffic with the peer, rx received from it, tx sent to it.", []string{"peer", "direction"}, nil)
)

// collector reads the device at scrape time, so the figures are the
// device's own and nothing has to be kept in step with it.
type collector struct {
	status func() ([]PeerStatus, error)
	warn   func(err error)
	errors prometheus.Counter
}

// NewCollector exports the mesh's peers: edgeproxy_wg_peer_handshake_age_seconds{peer}
// and edgeproxy_wg_peer_bytes_total{peer,direction} (direction rx or tx),
// peer being the pop id (the public key for a peer no pops row names), and
// edgeproxy_wg_collector_errors_total, the scrapes that could not read the
// device.
func NewCollector(m *Mesh) prometheus.Collector {
	return newCollector(m.Status, func(err error) {
		m.log.Warn("wireguard metrics: read device", "interface", m.settings.Interface, "err", err)
	})
}

func newCollector(status func() ([]PeerStatus, error), warn func(error)) *collector {
	return &collector{status: status, warn: warn, errors: prometheus.NewCounter(prometheus.CounterOpts{
		Name: "edgeproxy_wg_collector_errors_total",
		Help: "Scrapes that could not read the WireGuard device.",
	})}
}

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descHandshakeAge
	ch <- descPeerBytes
	c.errors.Describe(ch)
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	peers, err := c.status()
	if err != nil {
		c.warn(err)
		c.errors.Inc()
	}
	for _, p := range peers {
		age := math.Inf(1)
		if !p.HandshakeNever() {
			age = p.HandshakeAge.Seconds()
		}
		ch <- prometheus.MustNewConstMetric(descHandshakeAge, prometheus.GaugeValue, age, p.Name())
		ch <- prometheus.MustNewConstMetric(descPeerBytes, prometheus.CounterValue, float64(p.RxBytes), p.Name(), "rx")
		ch <- prometheus.MustNewConstMetric(descPeerBytes, prometheus.CounterValue, float64(p.TxBytes), p.Name(), "tx")
	}
	c.errors.Collect(ch)
}
