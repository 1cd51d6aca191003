// Package fleet keeps a fleet of POPs on one routing table held in etcd.
//
// etcd holds one JSON row per key under a prefix: PREFIX/backends/<id>,
// PREFIX/pops/<id> and PREFIX/regions/<country>, with the columns of
// routing.db's tables (routing.MarshalBackend and its siblings). Each POP
// runs a Follower that writes what etcd holds into its local routing.db,
// which stays what the data plane reads: a POP cut off from etcd routes on
// its last known table. The `edgeproxy ctl` verbs write the keys through
// Put, Delete and Import, after the same validation the follower applies.
package fleet

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/edgeproxy/edgeproxy/routing"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
)

// DefaultPrefix is EDGEPROXY_ETCD_PREFIX's default.
const DefaultPrefix = "/edgeproxy/"

// Config is how to reach the etcd cluster.
type Config struct {
	Endpoints []string // EDGEPROXY_ETCD_ENDPOINTS, e.g. https://10.0.0.1:2379
	Prefix    string   // EDGEPROXY_ETCD_PREFIX; empty: DefaultPrefix
	// TLS client settings, PEM files: CA verifies the servers; Cert and
	// Key authenticate this client. Any of them, or an https endpoint,
	// turns TLS on.
	CA, Cert, Key string
	// Username and Password, when set, log in to etcd's auth.
	Username, Password string
	// DialTimeout bounds the first connection; 0: 5 s.
	DialTimeout time.Duration
}

// Connect opens a client for cfg. It does not wait for the cluster: a
// client of a cluster that is down is still returned, and reconnects.
func Connect(cfg Config) (*clientv3.Client, error) {
	if len(cfg.Endpoints) == 0 {
		return nil, errors.New("etcd: no endpoints (EDGEPROXY_ETCD_ENDPOINTS)")
	}
	tlsConfig, err := cfg.tlsConfig()
	if err != nil {
		return nil, err
	}
	dial := cfg.DialTimeout
	if dial <= 0 {
		dial = 5 * time.Second
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   cfg.Endpoints,
		DialTimeout: dial,
		TLS:         tlsConfig,
		Username:    cfg.Username,
		Password:    cfg.Password,
		// A member that comes back is found within a second rather than
		// after gRPC's default backoff, which grows to two minutes.
		DialOptions: []grpc.DialOption{grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: time.Second},
			MinConnectTimeout: time.Second,
		})},
		// The follower logs what matters through slog; the client's own
		// retry chatter would be JSON lines on stderr.
		Logger:               zap.NewNop(),
		DialKeepAliveTime:    10 * time.Second,
		DialKeepAliveTimeout: 3 * time.Second,
	})
	if err != nil {
		return nil, fmt.Errorf("etcd client for %s: %w", strings.Join(cfg.Endpoints, ","), err)
	}
	return cli, nil
}

func (cfg Config) tlsConfig() (*tls.Config, error) {
	https := false
	for _, e := range cfg.Endpoints {
		https = https || strings.HasPrefix(e, "https://")
	}
	if cfg.CA == "" && cfg.Cert == "" && cfg.Key == "" && !https {
		return nil, nil
	}
	c := &tls.Config{MinVersion: tls.VersionTLS12}
	if cfg.CA != "" {
		pem, err := os.ReadFile(cfg.CA)
		if err != nil {
			return nil, fmt.Errorf("etcd CA (EDGEPROXY_ETCD_CA): %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("etcd CA %s (EDGEPROXY_ETCD_CA): no PEM certificate in it", cfg.CA)
		}
		c.RootCAs = pool
	}
	if (cfg.Cert == "") != (cfg.Key == "") {
		return nil, errors.New("etcd client certificate: EDGEPROXY_ETCD_CERT and EDGEPROXY_ETCD_KEY go together")
	}
	if cfg.Cert != "" {
		pair, err := tls.LoadX509KeyPair(cfg.Cert, cfg.Key)
		if err != nil {
			return nil, fmt.Errorf("etcd client certificate %s, key %s: %w", cfg.Cert, cfg.Key, err)
		}
		c.Certificates = []tls.Certificate{pair}
	}
	return c, nil
}

// NormalizePrefix gives a prefix its trailing slash: "/edgeproxy" and
// "/edgeproxy/" name the same keys, and "/edgeproxy" must not also take
// "/edgeproxy2/...".
func NormalizePrefix(p string) string {
	if p == "" {
		return DefaultPrefix
	}
	if !strings.HasSuffix(p, "/") {
		p += "/"
	}
	return p
}

// Key is the etcd key of one row: PREFIX/<table>/<id>.
func Key(prefix, table, id string) string {
	if table == routing.TableRegions {
		id = strings.ToUpper(strings.TrimSpace(id))
	}
	return NormalizePrefix(prefix) + table + "/" + id
}

// parseKey splits a key under prefix into its table and row id.
func parseKey(prefix, key string) (table, id string, err error) {
	rest, ok := strings.CutPrefix(key, prefix)
	if !ok {
		return "", "", fmt.Errorf("not under prefix %s", prefix)
	}
	table, id, ok = strings.Cut(rest, "/")
	switch {
	case !ok:
		return "", "", errors.New("not a routing key: want backends/<id>, pops/<id> or regions/<country>")
	case table != routing.TableBackends && table != routing.TablePops && table != routing.TableRegions:
		return "", "", fmt.Errorf("unknown table %q: want backends, pops or regions", table)
	}
	return table, id, nil
}

// decode validates one key and value into the change that puts its row:
// the value must be a valid row of the key's table (routing's rules).
func decode(prefix, key string, value []byte) (routing.Change, error) {
	table, id, err := parseKey(prefix, key)
	if err != nil {
		return routing.Change{}, err
	}
	c := routing.Change{Table: table, ID: id}
	switch table {
	case routing.TableBackends:
		b, err := routing.ParseBackendJSON(id, value)
		if err != nil {
			return c, err
		}
		c.Backend = &b
	case routing.TablePops:
		p, err := routing.ParsePopJSON(id, value)
		if err != nil {
			return c, err
		}
		c.Pop = &p
	case routing.TableRegions:
		country, region, err := routing.ParseRegionJSON(id, value)
		if err != nil {
			return c, err
		}
		c.ID, c.Region = country, region
	}
	return c, nil
}

// Skipped is a key whose value is not a valid row, and why.
type Skipped struct {
	Key, Table, Reason string
}

// Snapshot is what etcd holds under the prefix at Revision: the valid
// rows, and the keys skipped.
type Snapshot struct {
	Rows     routing.Rows
	Skipped  []Skipped
	Revision int64
	// invalid holds the table and id of each skipped key under a known
	// table: the follower keeps the local row such a key had.
	invalid map[string]map[string]bool
}

// Load reads every key under prefix in one request, so the rows come
// from one revision.
func Load(ctx context.Context, cli *clientv3.Client, prefix string) (Snapshot, error) {
	prefix = NormalizePrefix(prefix)
	resp, err := cli.Get(ctx, prefix, clientv3.WithPrefix())
	if err != nil {
		return Snapshot{}, fmt.Errorf("etcd get %s: %w", prefix, err)
	}
	s := Snapshot{Revision: resp.Header.Revision, Rows: routing.Rows{Regions: map[string]string{}},
		invalid: map[string]map[string]bool{}}
	for _, kv := range resp.Kvs {
		key := string(kv.Key)
		c, err := decode(prefix, key, kv.Value)
		if err != nil {
			s.Skipped = append(s.Skipped, Skipped{Key: key, Table: tableLabel(c.Table), Reason: err.Error()})
			if c.Table != "" {
				if s.invalid[c.Table] == nil {
					s.invalid[c.Table] = map[string]bool{}
				}
				id := c.ID
				if c.Table == routing.TableRegions {
					id = strings.ToUpper(strings.TrimSpace(id)) // as routing.db's rows are compared
				}
				s.invalid[c.Table][id] = true
			}
			continue
		}
		switch {
		case c.Backend != nil:
			s.Rows.Backends = append(s.Rows.Backends, *c.Backend)
		case c.Pop != nil:
			s.Rows.Pops = append(s.Rows.Pops, *c.Pop)
		default:
			s.Rows.Regions[c.ID] = c.Region
		}
	}
	return s, nil
}

// tableLabel is the metric label of a skipped key's table.
func tableLabel(table string) string {
	if table == "" {
		return "unknown"
	}
	return table
}

// Put writes one row's key after validating value with routing's row
// rules; it returns the revision of the write.
func Put(ctx context.Context, cli *clientv3.Client, prefix, table, id string, value []byte) (int64, error) {
	key := Key(prefix, table, id)
	if _, err := decode(NormalizePrefix(prefix), key, value); err != nil {
		return 0, fmt.Errorf("refused before writing %s: %w", key, err)
	}
	resp, err := cli.Put(ctx, key, string(value))
	if err != nil {
		return 0, fmt.Errorf("etcd put %s: %w", key, err)
	}
	return resp.Header.Revision, nil
}

// Delete removes one row's key; existed is false when there was none.
func Delete(ctx context.Context, cli *clientv3.Client, prefix, table, id string) (rev int64, existed bool, err error) {
	key := Key(prefix, table, id)
	resp, err := cli.Delete(ctx, key)
	if err != nil {
		return 0, false, fmt.Errorf("etcd delete %s: %w", key, err)
	}
	return resp.Header.Revision, resp.Deleted > 0, nil
}

// importBatch stays below etcd's default limit of 128 operations in one
// transaction (--max-txn-ops).
const importBatch = 100

// Import puts every row of rows under prefix, importBatch keys per
// transaction; it returns the number of keys written and the last
// revision. Keys etcd holds that rows lack are left alone.
func Import(ctx context.Context, cli *clientv3.Client, prefix string, rows routing.Rows) (int, int64, error) {
	var ops []clientv3.Op
	for _, b := range rows.Backends {
		ops = append(ops, clientv3.OpPut(Key(prefix, routing.TableBackends, b.ID), string(routing.MarshalBackend(b))))
	}
	for _, p := range rows.Pops {
		ops = append(ops, clientv3.OpPut(Key(prefix, routing.TablePops, p.ID), string(routing.MarshalPop(p))))
	}
	for c, r := range rows.Regions {
		ops = append(ops, clientv3.OpPut(Key(prefix, routing.TableRegions, c), string(routing.MarshalRegion(c, r))))
	}
	var rev int64
	for start := 0; start < len(ops); start += importBatch {
		batch := ops[start:min(start+importBatch, len(ops))]
		resp, err := cli.Txn(ctx).Then(batch...).Commit()
		if err != nil {
			return start, rev, fmt.Errorf("etcd import under %s: keys %d-%d of %d: %w", prefix, start+1, start+len(batch), len(ops), err)
		}
		rev = resp.Header.Revision
	}
	return len(ops), rev, nil
}
