package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/edgeproxy/edgeproxy/loader"
	"github.com/edgeproxy/edgeproxy/userspace"
	"github.com/edgeproxy/edgeproxy/userspace/wgmesh"
	"github.com/spf13/cobra"
)

func newRunCommand(e env) *cobra.Command {
	var cfg userspace.Config
	var reloadSecs, ttlSecs, gcSecs, connectMS, drainSecs int
	var debug bool
	cmd := &cobra.Command{
		Use:   "run",
		Short: "Serve: accept clients, route them, splice them to backends",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var err error
			flags := cmd.Flags()
			// A flag wins over its variable; an unset flag takes the
			// variable, else the contract's default.
			durations := []struct {
				flag, name string
				def        int
				val        *int
				millis     bool
			}{
				{"db-reload-secs", "EDGEPROXY_DB_RELOAD_SECS", 5, &reloadSecs, false},
				{"binding-ttl-secs", "EDGEPROXY_BINDING_TTL_SECS", 600, &ttlSecs, false},
				{"binding-gc-interval-secs", "EDGEPROXY_BINDING_GC_INTERVAL_SECS", 60, &gcSecs, false},
				{"connect-timeout-ms", "EDGEPROXY_CONNECT_TIMEOUT_MS", 2000, &connectMS, true},
				{"drain-secs", "EDGEPROXY_DRAIN_SECS", 30, &drainSecs, false},
			}
			for _, d := range durations {
				if flags.Changed(d.flag) {
					if *d.val < 0 || (d.millis && *d.val == 0) {
						return fmt.Errorf("--%s=%d: out of range", d.flag, *d.val)
					}
					continue
				}
				if d.millis {
					v, err := e.millis(d.name, d.def)
					if err != nil {
						return err
					}
					*d.val = int(v.Milliseconds())
				} else {
					v, err := e.seconds(d.name, d.def)
					if err != nil {
						return err
					}
					*d.val = int(v.Seconds())
				}
			}
			strs := []struct {
				flag, name, def string
				val             *string
			}{
				{"listen", "EDGEPROXY_LISTEN_ADDR", "0.0.0.0:8080", &cfg.ListenAddr},
				{"db", "EDGEPROXY_DB_PATH", "routing.db", &cfg.DBPath},
				{"region", "EDGEPROXY_REGION", "sa", &cfg.Region},
				{"geoip", "EDGEPROXY_GEOIP_PATH", "", &cfg.GeoIPPath},
				{"dataplane", "EDGEPROXY_DATAPLANE", "auto", &cfg.Dataplane},
				{"admin", "EDGEPROXY_ADMIN_ADDR", "127.0.0.1:9090", &cfg.AdminAddr},
				{"bpf-pin-path", "EDGEPROXY_BPF_PIN_PATH", loader.DefaultPinPath, &cfg.PinPath},
			}
			for _, s := range strs {
				if !flags.Changed(s.flag) {
					*s.val = e.str(s.name, s.def)
				}
			}
			if !flags.Changed("debug") {
				debug = e.str("DEBUG", "") != ""
			}
			cfg.DBReload = secs(reloadSecs)
			cfg.BindingTTL = secs(ttlSecs)
			cfg.BindingGC = secs(gcSecs)
			cfg.ConnectTimeout = millis(connectMS)
			cfg.Drain = secs(drainSecs)

			level := slog.LevelInfo
			if debug {
				level = slog.LevelDebug
			}
			log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
			userspace.RaiseFileLimit(log)
			// The overlay comes up before the proxy so backends behind it
			// answer from the first connection, and goes down last.
			wgs, wgOn, err := wgSettingsFromEnv(e)
			if err != nil {
				return err
			}
			if wgOn {
				mesh, err := wgmesh.Open(wgs, log)
				if err != nil {
					return err
				}
				defer mesh.Close()
				if err := mesh.Sync(cfg.DBPath); err != nil {
					log.Warn("wireguard reconcile incomplete", "interface", wgs.Interface, "err", err)
				}
				ctx, stop := context.WithCancel(context.Background())
				defer stop()
				// Watch re-reads the pops table on its own: the routing
				// store only reports changes to backends.
				go mesh.Watch(ctx, cfg.DBPath, min(cfg.DBReload, time.Second))
				cfg.Collectors = append(cfg.Collectors, wgmesh.NewCollector(mesh))
			}
			proxy, err := userspace.New(cfg, log)
			if err != nil {
				return err
			}
			signals := make(chan os.Signal, 4)
			signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
			defer signal.Stop(signals)
			return proxy.Run(signals)
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.ListenAddr, "listen", "", "TCP listen address (EDGEPROXY_LISTEN_ADDR, default 0.0.0.0:8080)")
	f.StringVar(&cfg.DBPath, "db", "", "SQLite routing database (EDGEPROXY_DB_PATH, default routing.db)")
	f.StringVar(&cfg.Region, "region", "", "this POP's region (EDGEPROXY_REGION, default sa)")
	f.StringVar(&cfg.GeoIPPath, "geoip", "", "geo database .mmdb; empty: embedded (EDGEPROXY_GEOIP_PATH)")
	f.StringVar(&cfg.Dataplane, "dataplane", "", "auto, sockmap or splice (EDGEPROXY_DATAPLANE, default auto)")
	f.StringVar(&cfg.AdminAddr, "admin", "", "admin HTTP address; empty disables (EDGEPROXY_ADMIN_ADDR, default 127.0.0.1:9090)")
	f.StringVar(&cfg.PinPath, "bpf-pin-path", "", "where BPF maps are pinned (EDGEPROXY_BPF_PIN_PATH, default "+loader.DefaultPinPath+")")
	f.IntVar(&reloadSecs, "db-reload-secs", 0, "longest time before a changed database is applied (EDGEPROXY_DB_RELOAD_SECS, default 5)")
	f.IntVar(&ttlSecs, "binding-ttl-secs", 0, "affinity lifetime since last use (EDGEPROXY_BINDING_TTL_SECS, default 600)")
	f.IntVar(&gcSecs, "binding-gc-interval-secs", 0, "affinity expiry sweep (EDGEPROXY_BINDING_GC_INTERVAL_SECS, default 60)")
	f.IntVar(&connectMS, "connect-timeout-ms", 0, "backend dial timeout (EDGEPROXY_CONNECT_TIMEOUT_MS, default 2000)")
	f.IntVar(&drainSecs, "drain-secs", 0, "on SIGTERM, how long established connections may finish (EDGEPROXY_DRAIN_SECS, default 30)")
	f.BoolVar(&debug, "debug", false, "debug logging (DEBUG)")
	return cmd
}
