// Package userspace is the running proxy: listener, connection life cycle,
// the sockmap and splice data planes, and the routing wiring.
package userspace

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"syscall"
	"time"

	"github.com/edgeproxy/edgeproxy/loader"
	"github.com/edgeproxy/edgeproxy/routing"
)

// Config is everything `edgeproxy run` takes from flags and environment.
type Config struct {
	ListenAddr     string
	DBPath         string
	Region         string
	DBReload       time.Duration
	BindingTTL     time.Duration
	BindingGC      time.Duration
	GeoIPPath      string
	Dataplane      string // auto, sockmap or splice
	AdminAddr      string
	PinPath        string
	ConnectTimeout time.Duration
}

// Proxy is a configured, listening edgeproxy.
type Proxy struct {
	cfg      Config
	log      *slog.Logger
	store    *routing.Store
	geo      *routing.GeoSource
	balancer *Balancer
	ln       *net.TCPListener
	plane    Dataplane
	// DataplaneReason says why this data plane runs.
	DataplaneReason string
	closePlane      func() error
}

// New opens the routing database and geo database, picks the data plane and
// binds the listen address. Every failure names its cause.
func New(cfg Config, log *slog.Logger) (*Proxy, error) {
	switch cfg.Dataplane {
	case "auto", "sockmap", "splice":
	default:
		return nil, fmt.Errorf("data plane %q: must be auto, sockmap or splice", cfg.Dataplane)
	}
	store, err := routing.OpenStore(cfg.DBPath)
	if err != nil {
		return nil, fmt.Errorf("open routing database: %w", err)
	}
	geo, err := routing.NewGeoSource(cfg.GeoIPPath)
	if err != nil {
		return nil, fmt.Errorf("open geo database: %w", err)
	}
	p := &Proxy{cfg: cfg, log: log, store: store, geo: geo}
	p.balancer = &Balancer{Store: store, Geo: geo, LocalRegion: cfg.Region, Now: time.Now}

	ln, err := net.Listen("tcp", cfg.ListenAddr)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", cfg.ListenAddr, err)
	}
	p.ln = ln.(*net.TCPListener)

	env := planeEnv{balancer: p.balancer, connectTimeout: cfg.ConnectTimeout, log: log, onClose: p.onClose}
	if err := p.choosePlane(env); err != nil {
		p.ln.Close()
		return nil, err
	}
	return p, nil
}

func (p *Proxy) choosePlane(env planeEnv) error {
	if p.cfg.Dataplane == "splice" {
		p.plane, p.DataplaneReason = newSplicePlane(env), "requested with EDGEPROXY_DATAPLANE=splice"
		return nil
	}
	plane, closeFn, err := openSockmapPlane(env, p.cfg.PinPath)
	if err == nil {
		p.plane, p.closePlane = plane, closeFn
		p.DataplaneReason = "BPF probe passed; maps pinned at " + p.cfg.PinPath
		if p.cfg.Dataplane == "sockmap" {
			p.DataplaneReason = "requested with EDGEPROXY_DATAPLANE=sockmap; maps pinned at " + p.cfg.PinPath
		}
		return nil
	}
	if p.cfg.Dataplane == "sockmap" || errors.Is(err, loader.ErrAlreadyLoaded) {
		return fmt.Errorf("data plane sockmap: %w", err)
	}
	p.plane, p.DataplaneReason = newSplicePlane(env), "sockmap unusable: "+err.Error()
	return nil
}

// Addr is the bound listen address.
func (p *Proxy) Addr() net.Addr { return p.ln.Addr() }

// Plane is the running data plane.
func (p *Proxy) Plane() Dataplane { return p.plane }

// Balancer is the decision and counting front of the proxy.
func (p *Proxy) Balancer() *Balancer { return p.balancer }

// Run serves until ctx ends, then releases the data plane.
func (p *Proxy) Run(ctx context.Context) error {
	p.log.Info("edgeproxy started",
		"listen", p.ln.Addr().String(), "region", p.cfg.Region,
		"dataplane", p.plane.Name(), "reason", p.DataplaneReason,
		"db", p.cfg.DBPath, "geoip", p.geo.Current().Kind(),
		"backends", len(p.store.Current().Backends))
	watchCtx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	go p.store.Watch(watchCtx, 250*time.Millisecond, p.cfg.DBReload, p.onReload)
	go p.refreshGeo(watchCtx)

	err := p.plane.Serve(ctx, p.ln)
	if p.closePlane != nil {
		if cerr := p.closePlane(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("release data plane: %w", cerr))
		}
	}
	return err
}

func (p *Proxy) refreshGeo(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if changed, err := p.geo.Refresh(); err != nil {
				p.log.Warn("geo database reload failed, keeping the previous one", "path", p.cfg.GeoIPPath, "err", err)
			} else if changed {
				p.log.Info("geo database reloaded", "path", p.cfg.GeoIPPath)
			}
		}
	}
}

func (p *Proxy) onReload(r routing.ReloadResult) {
	for _, re := range r.RowErrors {
		p.log.Warn("routing row skipped", "err", re.Error())
	}
	if r.Err != nil {
		p.log.Error("routing reload failed, keeping the last good table", "db", p.cfg.DBPath, "err", r.Err)
		return
	}
	p.log.Info("routing reloaded", "db", p.cfg.DBPath, "version", fmt.Sprintf("%016x", r.Table.Version), "backends", len(r.Table.Backends))
}

func (p *Proxy) onClose(s ConnSummary) {
	p.log.Debug("connection closed", "client", s.Client, "backend", s.Backend,
		"bytes_in", s.BytesIn, "bytes_out", s.BytesOut, "duration", s.Duration, "end", s.End)
}

// RaiseFileLimit lifts the soft open-file limit to the hard one: each
// proxied connection holds two sockets (and two pipes on the splice plane).
func RaiseFileLimit(log *slog.Logger) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		log.Warn("cannot read open-file limit", "err", err)
		return
	}
	if lim.Cur < lim.Max {
		lim.Cur = lim.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			log.Warn("cannot raise open-file limit", "err", err)
		}
	}
	if lim.Cur < 65536 {
		log.Warn("open-file limit is low: each connection holds 2 descriptors (6 on the splice plane)", "limit", lim.Cur)
	}
}
