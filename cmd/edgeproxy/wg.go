package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strconv"

	"github.com/edgeproxy/edgeproxy/userspace/wgmesh"
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
func wgSettingsFromEnv(e env) (s wgmesh.Settings, on bool, err error) {
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
		return s, false, err
	}
	return s, true, nil
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
			key, err := wgmesh.WriteKeyFile(out, force)
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
			var pops []wgmesh.Pop
			if _, err := os.Stat(dbPath); err == nil || explicit {
				var err error
				if pops, _, err = wgmesh.LoadPops(dbPath); err != nil {
					return err
				}
			}
			st, err := wgmesh.ReadStatus(iface, pops)
			if err != nil {
				return err
			}
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(st)
			}
			return wgmesh.WriteTable(cmd.OutOrStdout(), st)
		},
	}
	f := cmd.Flags()
	f.StringVar(&iface, "interface", "", "WireGuard interface (EDGEPROXY_WG_INTERFACE, default "+defaultWGInterface+")")
	f.StringVar(&dbPath, "db", "", "routing database whose pops table names the peers (EDGEPROXY_DB_PATH, default routing.db)")
	f.BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}
