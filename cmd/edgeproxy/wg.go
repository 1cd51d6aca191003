package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"strconv"
	"sync"

	"github.com/edgeproxy/edgeproxy/overlay"
	"github.com/edgeproxy/edgeproxy/routing"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/cobra"
)

// defaultWGInterface is EDGEPROXY_WG_INTERFACE's default.
const defaultWGInterface = "wg-edge"

// hostname is the default POP id; a seam for tests.
var hostname = os.Hostname

// wgSettingsFromEnv reads the overlay's settings for `edgeproxy run`. on is
// false when the overlay is off: EDGEPROXY_WG_INTERFACE set to empty, or no
// EDGEPROXY_WG_PRIVATE_KEY_FILE while the interface is left at its default
// (so a POP that never heard of the overlay runs as before). Naming an
// interface without a key, or a key without an address, is an error.
func wgSettingsFromEnv(e env) (s overlay.Settings, on bool, err error) {
	s.Interface = e.str("EDGEPROXY_WG_INTERFACE", defaultWGInterface)
	if s.Interface == "" {
		return s, false, nil
	}
	s.PrivateKeyFile = e.str("EDGEPROXY_WG_PRIVATE_KEY_FILE", "")
	if s.PrivateKeyFile == "" {
		if v, ok := e.lookup("EDGEPROXY_WG_INTERFACE"); ok && v != "" {
			return s, false, fmt.Errorf("EDGEPROXY_WG_INTERFACE=%s but no EDGEPROXY_WG_PRIVATE_KEY_FILE: create one with `edgeproxy wg keygen --out FILE`, or set EDGEPROXY_WG_INTERFACE= to turn the overlay off", v)
		}
		return s, false, nil
	}
	port := e.str("EDGEPROXY_WG_LISTEN_PORT", "51820")
	n, err := strconv.Atoi(port)
	if err != nil || n < 0 || n > 65535 {
		return s, false, fmt.Errorf("EDGEPROXY_WG_LISTEN_PORT=%q: want a UDP port 0-65535", port)
	}
	s.ListenPort = n
	addr := e.str("EDGEPROXY_WG_ADDRESS", "")
	if addr == "" {
		return s, false, errors.New("EDGEPROXY_WG_ADDRESS is not set: give this POP's overlay address with the overlay's prefix, e.g. 10.50.1.1/16")
	}
	if s.Address, err = netip.ParsePrefix(addr); err != nil {
		return s, false, fmt.Errorf("EDGEPROXY_WG_ADDRESS=%q: want an address with prefix length, e.g. 10.50.1.1/16", addr)
	}
	s.PopID = e.str("EDGEPROXY_POP_ID", "")
	if s.PopID == "" {
		if s.PopID, err = hostname(); err != nil || s.PopID == "" {
			return s, false, fmt.Errorf("EDGEPROXY_POP_ID is not set and the host name is unknown (%v): set it to this POP's id in the pops table", err)
		}
	}
	if err := s.Validate(); err != nil {
		// Every other field was checked above: what Validate can
		// still refuse is the interface name.
		return s, false, fmt.Errorf("EDGEPROXY_WG_INTERFACE=%q: %w", s.Interface, err)
	}
	return s, true, nil
}

// overlayRun is the WireGuard mesh as `edgeproxy run` drives it. Every field
// is safe to use when the overlay is off (On false): the funcs do nothing.
type overlayRun struct {
	// On reports that the overlay runs.
	On bool
	// LoadOptions are the overlay's part of the routing store's options:
	// this POP's id and the host's addresses (Mesh.LoadOptions), so a pops
	// row capturing one of them is skipped. Merge IsSelf into them and give
	// them to routing.OpenStoreWith. Zero when off.
	LoadOptions routing.LoadOptions
	// OnTable applies a table's pops to the mesh. Call it after every table
	// the routing store publishes (calling it on unchanged reloads too
	// repairs peers and routes removed by hand). A failure is logged once
	// per distinct error, never returned: the proxy serves on.
	OnTable func(*routing.Table)
	// Collector exports the peers' metrics; nil when off.
	Collector prometheus.Collector
	// Close takes the interface down; call it after the proxy stopped.
	Close func()
}

// startOverlay reads the overlay's settings (wgSettingsFromEnv), opens the
// interface and applies the pops of routing.db at dbPath once, so backends
// behind the overlay answer from the first connection. Later changes arrive
// through OnTable, from the routing store's one watcher. An error leaves
// nothing behind.
func startOverlay(e env, dbPath string, log *slog.Logger) (overlayRun, error) {
	off := overlayRun{OnTable: func(*routing.Table) {}, Close: func() {}}
	s, on, err := wgSettingsFromEnv(e)
	if err != nil || !on {
		return off, err
	}
	mesh, err := overlay.Open(s, log)
	if err != nil {
		return off, err
	}
	opts := mesh.LoadOptions()
	// Rows this load skips are the store's to report: it reads the same
	// database with the same options right after.
	if t, _, err := routing.LoadTableWith(dbPath, opts); err != nil {
		log.Warn("wireguard overlay has no peers yet: routing database unreadable", "interface", s.Interface, "db", dbPath, "err", err)
	} else if err := mesh.Apply(t); err != nil {
		log.Warn("wireguard reconcile incomplete", "interface", s.Interface, "err", err)
	}
	return overlayRun{
		On:          true,
		LoadOptions: opts,
		OnTable:     applyLogged(mesh.Apply, s.Interface, log),
		Collector:   overlay.NewCollector(mesh),
		Close: func() {
			if err := mesh.Close(); err != nil {
				log.Warn("wireguard overlay close failed", "interface", s.Interface, "err", err)
			}
		},
	}, nil
}

// applyLogged wraps apply for OnTable: calls are serialized (a SIGHUP
// reload and the watcher may publish at once), and an error is logged when
// it differs from the previous call's, so a persistent conflict is one line,
// not one per reload.
func applyLogged(apply func(*routing.Table) error, iface string, log *slog.Logger) func(*routing.Table) {
	var (
		mu   sync.Mutex
		last string
	)
	return func(t *routing.Table) {
		mu.Lock()
		defer mu.Unlock()
		msg := ""
		if err := apply(t); err != nil {
			msg = err.Error()
		}
		if msg != "" && msg != last {
			log.Warn("wireguard reconcile incomplete", "interface", iface, "err", msg)
		}
		last = msg
	}
}

func newWGCommand(e env) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "wg",
		Short: "WireGuard overlay between POPs: make a key, show the peers",
		Args:  cobra.NoArgs,
	}
	cmd.AddCommand(newWGKeygenCommand(), newWGStatusCommand(e))
	return cmd
}

func newWGKeygenCommand() *cobra.Command {
	var out string
	var force bool
	cmd := &cobra.Command{
		Use:   "keygen --out FILE",
		Short: "Write a new WireGuard private key (mode 0600) and print its public key",
		Long: "Write a new WireGuard private key to FILE, base64 and a newline, mode 0600,\n" +
			"and print the public key on stdout, for this POP's wg_public_key in the pops\n" +
			"table. An existing FILE is refused unless --force: replacing a key cuts the\n" +
			"POP off from every peer that has the old public key.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if out == "" {
				return errors.New("--out FILE is required")
			}
			key, err := overlay.WriteKeyFile(out, force)
			if err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), key.PublicKey().String())
			fmt.Fprintf(cmd.ErrOrStderr(), "wrote private key to %s (mode 0600); the public key is on stdout\n", out)
			return nil
		},
	}
	cmd.Flags().StringVar(&out, "out", "", "file to write the private key to")
	cmd.Flags().BoolVar(&force, "force", false, "replace an existing key file")
	return cmd
}

func newWGStatusCommand(e env) *cobra.Command {
	var iface, dbPath string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the overlay's peers: endpoint, latest handshake, bytes each way",
		Long: "Show the WireGuard interface of a running edgeproxy and its peers, named by\n" +
			"the pops table's public keys. A userspace device is read through its socket\n" +
			"/var/run/wireguard/IFACE.sock, a kernel one through netlink (run this in the\n" +
			"proxy's network namespace).",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			flags := cmd.Flags()
			if !flags.Changed("interface") {
				iface = e.str("EDGEPROXY_WG_INTERFACE", defaultWGInterface)
				if iface == "" {
					return errors.New("EDGEPROXY_WG_INTERFACE is empty: the overlay is off; name an interface with --interface")
				}
			}
			// The pops table only names the peers; without one they are
			// shown by public key. A database asked for explicitly must
			// load, the default one may be absent.
			explicit := flags.Changed("db")
			if !explicit {
				_, explicit = e.lookup("EDGEPROXY_DB_PATH")
				dbPath = e.str("EDGEPROXY_DB_PATH", "routing.db")
			}
			var pops []overlay.Pop
			if _, err := os.Stat(dbPath); err == nil || explicit {
				var err error
				if pops, _, err = overlay.LoadPops(dbPath); err != nil {
					return err
				}
			}
			st, err := overlay.ReadStatus(iface, pops)
			if err != nil {
				return err
			}
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(st)
			}
			return overlay.WriteTable(cmd.OutOrStdout(), st)
		},
	}
	f := cmd.Flags()
	f.StringVar(&iface, "interface", "", "WireGuard interface (EDGEPROXY_WG_INTERFACE, default "+defaultWGInterface+")")
	f.StringVar(&dbPath, "db", "", "routing database whose pops table names the peers (EDGEPROXY_DB_PATH, default routing.db)")
	f.BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}
