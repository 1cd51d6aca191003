package fleet

import (
	"github.com/prometheus/client_golang/prometheus"
)

var (
	descConnected = prometheus.NewDesc("edgeproxy_etcd_connected", "1 while the last request to etcd succeeded, 0 while etcd is unreachable (routing goes on with the local table).", nil, nil)
	descRevision  = prometheus.NewDesc("edgeproxy_etcd_revision", "The last etcd revision written to the local routing.db.", nil, nil)
	descLastSync  = prometheus.NewDesc("edgeproxy_etcd_last_sync_timestamp_seconds", "When that revision was written, in Unix seconds.", nil, nil)
	descSyncs     = prometheus.NewDesc("edgeproxy_etcd_syncs_total", "Writes of etcd's rows to routing.db: full loads and watched changes.", []string{"kind"}, nil)
	descRestarts  = prometheus.NewDesc("edgeproxy_etcd_watch_restarts_total", "etcd watches restarted, by reason: disconnected, compacted (a full load follows), error, write_failed, closed.", []string{"reason"}, nil)
	descSkipped   = prometheus.NewDesc("edgeproxy_etcd_skipped_values_total", "etcd values skipped because they are not a valid row, by table.", []string{"table"}, nil)
)

// Collector exports the follower's state and counters, read at scrape time.
func (f *Follower) Collector() prometheus.Collector { return followerCollector{f} }

type followerCollector struct{ f *Follower }

func (c followerCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descConnected, descRevision, descLastSync, descSyncs, descRestarts, descSkipped} {
		ch <- d
	}
}

func (c followerCollector) Collect(ch chan<- prometheus.Metric) {
	f := c.f
	f.mu.Lock()
	defer f.mu.Unlock()
	connected := 0.0
	if f.connected {
		connected = 1
	}
	ch <- prometheus.MustNewConstMetric(descConnected, prometheus.GaugeValue, connected)
	ch <- prometheus.MustNewConstMetric(descRevision, prometheus.GaugeValue, float64(f.revision))
	last := 0.0
	if !f.lastSync.IsZero() {
		last = float64(f.lastSync.UnixNano()) / 1e9
	}
	ch <- prometheus.MustNewConstMetric(descLastSync, prometheus.GaugeValue, last)
	for kind, n := range f.syncs {
		ch <- prometheus.MustNewConstMetric(descSyncs, prometheus.CounterValue, float64(n), kind)
	}
	for reason, n := range f.restarts {
		ch <- prometheus.MustNewConstMetric(descRestarts, prometheus.CounterValue, float64(n), reason)
	}
	for table, n := range f.skipped {
		ch <- prometheus.MustNewConstMetric(descSkipped, prometheus.CounterValue, float64(n), table)
	}
}
