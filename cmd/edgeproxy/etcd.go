package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/edgeproxy/edgeproxy/fleet"
	"github.com/edgeproxy/edgeproxy/routing"
	"github.com/edgeproxy/edgeproxy/userspace"
	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// etcdConfigFromEnv reads the EDGEPROXY_ETCD_* settings; on is false when
// EDGEPROXY_ETCD_ENDPOINTS is empty (the POP follows no etcd, as before).
// endpoints, when not empty, wins over the variable (ctl's --endpoints).
func etcdConfigFromEnv(e env, endpoints string) (cfg fleet.Config, on bool, err error) {
	if endpoints == "" {
		endpoints = e.str("EDGEPROXY_ETCD_ENDPOINTS", "")
	}
	for ep := range strings.SplitSeq(endpoints, ",") {
		if ep = strings.TrimSpace(ep); ep != "" {
			cfg.Endpoints = append(cfg.Endpoints, ep)
		}
	}
	if len(cfg.Endpoints) == 0 {
		return cfg, false, nil
	}
	for _, ep := range cfg.Endpoints {
		if strings.Contains(ep, "://") && !strings.HasPrefix(ep, "http://") && !strings.HasPrefix(ep, "https://") {
			return cfg, false, fmt.Errorf("EDGEPROXY_ETCD_ENDPOINTS: %q: want host:port, http://host:port or https://host:port", ep)
		}
	}
	cfg.Prefix = fleet.NormalizePrefix(e.str("EDGEPROXY_ETCD_PREFIX", fleet.DefaultPrefix))
	cfg.CA = e.str("EDGEPROXY_ETCD_CA", "")
	cfg.Cert = e.str("EDGEPROXY_ETCD_CERT", "")
	cfg.Key = e.str("EDGEPROXY_ETCD_KEY", "")
	cfg.Username = e.str("EDGEPROXY_ETCD_USERNAME", "")
	cfg.Password = e.str("EDGEPROXY_ETCD_PASSWORD", "")
	if cfg.Password != "" && cfg.Username == "" {
		return cfg, false, errors.New("EDGEPROXY_ETCD_PASSWORD is set without EDGEPROXY_ETCD_USERNAME")
	}
	return cfg, true, nil
}

// initialSyncTimeout bounds the full load before the proxy starts: past
// it the POP serves its local table and keeps trying in the background.
const initialSyncTimeout = 5 * time.Second

// fleetRun is the etcd follower as `edgeproxy run` drives it. Every field
// is safe to use when it is off: Follow and Close do nothing.
type fleetRun struct {
	// Status is for /status; nil when off.
	Status func() userspace.EtcdStatus
	// Collector exports the follower's metrics; nil when off.
	Collector prometheus.Collector
	// Follow starts following etcd; apply is called after each write to
	// routing.db so the proxy applies it at once.
	Follow func(apply func())
	// Close stops following and closes the client.
	Close func()
}

// startFleet connects to etcd when EDGEPROXY_ETCD_ENDPOINTS is set and
// writes a full load into dbPath before the proxy opens it, so a new POP
// starts on the fleet's table. When etcd does not answer in time the POP
// starts on its local table (an empty one if it has none) and the
// follower keeps trying.
func startFleet(e env, dbPath string, log *slog.Logger) (fleetRun, error) {
	off := fleetRun{Follow: func(func()) {}, Close: func() {}}
	cfg, on, err := etcdConfigFromEnv(e, "")
	if err != nil || !on {
		return off, err
	}
	cli, err := fleet.Connect(cfg)
	if err != nil {
		return off, err
	}
	f := fleet.NewFollower(cli, cfg.Prefix, dbPath, log)
	ctx, cancel := context.WithTimeout(context.Background(), initialSyncTimeout)
	err = f.Sync(ctx)
	cancel()
	if err != nil {
		log.Warn("etcd full load at start failed; serving the local routing db until etcd answers",
			"endpoints", strings.Join(cfg.Endpoints, ","), "db", dbPath, "err", err)
		if _, statErr := os.Stat(dbPath); errors.Is(statErr, os.ErrNotExist) {
			// No table at all yet: an empty one lets the proxy start
			// and refuse clients (table_empty) until the first load.
			if err := routing.ApplyChanges(dbPath, nil); err != nil {
				cli.Close()
				return off, fmt.Errorf("create empty routing db for the etcd follower: %w", err)
			}
		}
	}
	runCtx, stop := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	return fleetRun{
		Status: func() userspace.EtcdStatus {
			s := f.Status()
			return userspace.EtcdStatus{Endpoints: cfg.Endpoints, Prefix: cfg.Prefix, Connected: s.Connected,
				Revision: s.Revision, LastSync: s.LastSync, LastError: s.LastError}
		},
		Collector: f.Collector(),
		Follow: func(apply func()) {
			f.OnApplied = apply
			wg.Go(func() { f.Run(runCtx) })
		},
		Close: sync.OnceFunc(func() {
			stop()
			wg.Wait()
			cli.Close()
		}),
	}, nil
}

// ctlClient opens the etcd client of a ctl command.
func ctlClient(e env, endpoints string) (*clientv3.Client, fleet.Config, error) {
	cfg, on, err := etcdConfigFromEnv(e, endpoints)
	if err != nil {
		return nil, cfg, err
	}
	if !on {
		return nil, cfg, errors.New("no etcd: set EDGEPROXY_ETCD_ENDPOINTS or pass --endpoints")
	}
	cli, err := fleet.Connect(cfg)
	return cli, cfg, err
}
