package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/edgeproxy/edgeproxy/fleet"
	"github.com/edgeproxy/edgeproxy/routing"
	"github.com/spf13/cobra"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// ctlTimeout bounds one ctl command's requests to etcd.
const ctlTimeout = 10 * time.Second

// ctlSession is what every ctl verb needs: the client and the prefix.
type ctlSession struct {
	e                 env
	endpoints, prefix string
}

// explain adds the endpoints to a request that timed out: etcd down or
// unreachable shows as nothing but a deadline.
func (s *ctlSession) explain(err error) error {
	if errors.Is(err, context.DeadlineExceeded) {
		cfg, _, _ := etcdConfigFromEnv(s.e, s.endpoints)
		return fmt.Errorf("%w (no answer within %v from etcd at %s)", err, ctlTimeout, strings.Join(cfg.Endpoints, ","))
	}
	return err
}

func (s *ctlSession) open() (*clientv3.Client, string, context.Context, func(), error) {
	cli, cfg, err := ctlClient(s.e, s.endpoints)
	if err != nil {
		return nil, "", nil, nil, err
	}
	prefix := cfg.Prefix
	if s.prefix != "" {
		prefix = fleet.NormalizePrefix(s.prefix)
	}
	ctx, cancel := context.WithTimeout(context.Background(), ctlTimeout)
	return cli, prefix, ctx, func() { cancel(); cli.Close() }, nil
}

func newCtlCommand(e env) *cobra.Command {
	s := &ctlSession{e: e}
	ctl := &cobra.Command{
		Use:   "ctl",
		Short: "Change the fleet's routing in etcd: backends, pops, regions; import or export a routing.db",
		Long: `ctl writes the rows every POP following etcd (EDGEPROXY_ETCD_ENDPOINTS) applies
within a second. Nouns list, verbs change; every put is validated with the
rules of a routing.db row before anything is written.`,
	}
	pf := ctl.PersistentFlags()
	pf.StringVar(&s.endpoints, "endpoints", "", "etcd endpoints, comma-separated (EDGEPROXY_ETCD_ENDPOINTS)")
	pf.StringVar(&s.prefix, "prefix", "", "key prefix (EDGEPROXY_ETCD_PREFIX, default "+fleet.DefaultPrefix+")")
	ctl.AddCommand(newCtlBackendCommand(s), newCtlPopCommand(s), newCtlRegionCommand(s), newCtlImportCommand(s), newCtlExportCommand(s))
	return ctl
}

// putRow validates value as a row of table and writes it.
func (s *ctlSession) putRow(cmd *cobra.Command, table, noun, id string, value []byte, check func(context.Context, *clientv3.Client, string) error) error {
	cli, prefix, ctx, done, err := s.open()
	if err != nil {
		return err
	}
	defer done()
	if check != nil {
		if err := check(ctx, cli, prefix); err != nil {
			return err
		}
	}
	rev, err := fleet.Put(ctx, cli, prefix, table, id, value)
	if err != nil {
		return s.explain(err)
	}
	fmt.Fprintf(cmd.OutOrStdout(), "put %s %s at revision %d\n", noun, id, rev)
	return nil
}

func (s *ctlSession) deleteCommand(table, noun, arg string) *cobra.Command {
	return &cobra.Command{
		Use:   "delete " + arg,
		Short: "Delete a " + noun + " from etcd",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cli, prefix, ctx, done, err := s.open()
			if err != nil {
				return err
			}
			defer done()
			rev, existed, err := fleet.Delete(ctx, cli, prefix, table, args[0])
			if err != nil {
				return s.explain(err)
			}
			if !existed {
				fmt.Fprintf(cmd.OutOrStdout(), "%s %s is not in etcd; nothing deleted\n", noun, args[0])
				return nil
			}
			fmt.Fprintf(cmd.OutOrStdout(), "deleted %s %s at revision %d\n", noun, args[0], rev)
			return nil
		},
	}
}

// listCommand prints one table of what etcd holds; keys whose values are
// not valid rows go to stderr with the reason.
func (s *ctlSession) listCommand(noun string, print func(w io.Writer, snap fleet.Snapshot, asJSON bool) error) *cobra.Command {
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List the " + noun + "s etcd holds",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cli, prefix, ctx, done, err := s.open()
			if err != nil {
				return err
			}
			defer done()
			snap, err := fleet.Load(ctx, cli, prefix)
			if err != nil {
				return s.explain(err)
			}
			for _, sk := range snap.Skipped {
				fmt.Fprintf(cmd.ErrOrStderr(), "skipped %s: %s\n", sk.Key, sk.Reason)
			}
			return print(cmd.OutOrStdout(), snap, asJSON)
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the rows as JSON for scripts")
	return cmd
}

func printJSONRows(w io.Writer, rows [][]byte) error {
	raw := make([]json.RawMessage, len(rows))
	for i, r := range rows {
		raw[i] = r
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(raw)
}

func newCtlBackendCommand(s *ctlSession) *cobra.Command {
	c := &cobra.Command{Use: "backend", Short: "Backends of the fleet (the backends table)"}
	var (
		app, region, country, addr         string
		port, weight, softLimit, hardLimit int
		healthy                            bool
	)
	put := &cobra.Command{
		Use:   "put ID --wg-ip ADDR --port PORT [flags]",
		Short: "Add or replace a backend (the whole row: flags not given take their defaults)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			row := map[string]any{"id": args[0], "app": app, "region": region, "country": country, "wg_ip": addr,
				"port": port, "healthy": healthy, "weight": weight, "soft_limit": softLimit, "hard_limit": hardLimit}
			b, err := routing.ParseBackendJSON(args[0], mustJSON(row))
			if err != nil {
				return fmt.Errorf("backend %s: %w", args[0], err)
			}
			return s.putRow(cmd, routing.TableBackends, "backend", args[0], routing.MarshalBackend(b), nil)
		},
	}
	f := put.Flags()
	f.StringVar(&addr, "wg-ip", "", "the backend's address (column wg_ip), IPv4 or IPv6")
	decimalIntVar(f, &port, "port", 0, "the backend's TCP port")
	f.StringVar(&app, "app", "", "application name")
	f.StringVar(&region, "region", "", "the backend's region (sa, us, eu, ap, ...)")
	f.StringVar(&country, "country", "", "the backend's country code (BR, US, ...)")
	f.BoolVar(&healthy, "healthy", true, "may take traffic; --healthy=false holds it admin_down")
	decimalIntVar(f, &weight, "weight", 1, "weight (0 counts as 1)")
	decimalIntVar(f, &softLimit, "soft-limit", 0, "connections at which its score doubles (0 counts as 1)")
	decimalIntVar(f, &hardLimit, "hard-limit", 0, "most connections; 0: no limit")
	markRequired(put, "wg-ip", "port")

	list := s.listCommand("backend", func(w io.Writer, snap fleet.Snapshot, asJSON bool) error {
		bs := snap.Rows.Backends
		if asJSON {
			rows := make([][]byte, len(bs))
			for i, b := range bs {
				rows[i] = routing.MarshalBackend(b)
			}
			return printJSONRows(w, rows)
		}
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "BACKEND\tAPP\tREGION\tCOUNTRY\tADDRESS\tHEALTHY\tWEIGHT\tSOFT\tHARD")
		for _, b := range bs {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%v\t%d\t%d\t%d\n", b.ID, b.App, b.Region, b.Country, b.AddrPort(), b.Healthy, b.Weight, b.SoftLimit, b.HardLimit)
		}
		return tw.Flush()
	})
	c.AddCommand(put, s.deleteCommand(routing.TableBackends, "backend", "ID"), list)
	return c
}

func newCtlPopCommand(s *ctlSession) *cobra.Command {
	c := &cobra.Command{Use: "pop", Short: "POPs and hosts of the WireGuard overlay (the pops table)"}
	var region, publicKey, endpoint, wgIP, allowedIPs string
	put := &cobra.Command{
		Use:   "put ID --public-key KEY --wg-ip ADDR --allowed-ips CIDRS [flags]",
		Short: "Add or replace a POP (the whole row); refused when its key or prefixes clash with another POP's",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			id := args[0]
			row := map[string]any{"id": id, "region": region, "wg_public_key": publicKey, "endpoint": endpoint,
				"wg_ip": wgIP, "allowed_ips": allowedIPs}
			p, err := routing.ParsePopJSON(id, mustJSON(row))
			if err != nil {
				return fmt.Errorf("pop %s: %w", id, err)
			}
			// The loader would skip a POP whose key or prefixes clash
			// with another's: refuse it here instead.
			check := func(ctx context.Context, cli *clientv3.Client, prefix string) error {
				snap, err := fleet.Load(ctx, cli, prefix)
				if err != nil {
					return s.explain(err)
				}
				pops := slices.DeleteFunc(snap.Rows.Pops, func(q routing.Pop) bool { return q.ID == id })
				for _, re := range routing.PopConflicts(append(pops, p)) {
					if re.ID == id || strings.Contains(re.Reason, fmt.Sprintf("%q", id)) {
						return fmt.Errorf("pop %s: %w", id, re)
					}
				}
				return nil
			}
			return s.putRow(cmd, routing.TablePops, "pop", id, routing.MarshalPop(p), check)
		},
	}
	f := put.Flags()
	f.StringVar(&publicKey, "public-key", "", "its WireGuard public key (base64, as `edgeproxy wg keygen` prints)")
	f.StringVar(&wgIP, "wg-ip", "", "its overlay address, e.g. 10.50.2.1")
	f.StringVar(&allowedIPs, "allowed-ips", "", "comma-separated prefixes routed to it, containing --wg-ip")
	f.StringVar(&endpoint, "endpoint", "", "host:port of its WireGuard listener; empty: it dials in")
	f.StringVar(&region, "region", "", "its region")
	markRequired(put, "public-key", "wg-ip", "allowed-ips")

	list := s.listCommand("pop", func(w io.Writer, snap fleet.Snapshot, asJSON bool) error {
		ps := snap.Rows.Pops
		if asJSON {
			rows := make([][]byte, len(ps))
			for i, p := range ps {
				rows[i] = routing.MarshalPop(p)
			}
			return printJSONRows(w, rows)
		}
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "POP\tREGION\tENDPOINT\tWG IP\tALLOWED IPS\tPUBLIC KEY")
		for _, p := range ps {
			var allowed []string
			for _, a := range p.AllowedIPs {
				allowed = append(allowed, a.String())
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", p.ID, p.Region, p.Endpoint, p.WGIP, strings.Join(allowed, ","), p.PublicKey)
		}
		return tw.Flush()
	})
	c.AddCommand(put, s.deleteCommand(routing.TablePops, "pop", "ID"), list)
	return c
}

func newCtlRegionCommand(s *ctlSession) *cobra.Command {
	c := &cobra.Command{Use: "region", Short: "Country to region overrides (the regions table)"}
	put := &cobra.Command{
		Use:   "put COUNTRY REGION",
		Short: "Put a country in a region, over the built-in map",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			value := routing.MarshalRegion(args[0], args[1])
			country, _, err := routing.ParseRegionJSON(args[0], value)
			if err != nil {
				return fmt.Errorf("region %s: %w", args[0], err)
			}
			return s.putRow(cmd, routing.TableRegions, "region", country, value, nil)
		},
	}
	list := s.listCommand("region", func(w io.Writer, snap fleet.Snapshot, asJSON bool) error {
		countries := slices.Sorted(maps.Keys(snap.Rows.Regions))
		if asJSON {
			rows := make([][]byte, len(countries))
			for i, c := range countries {
				rows[i] = routing.MarshalRegion(c, snap.Rows.Regions[c])
			}
			return printJSONRows(w, rows)
		}
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "COUNTRY\tREGION")
		for _, c := range countries {
			fmt.Fprintf(tw, "%s\t%s\n", c, snap.Rows.Regions[c])
		}
		return tw.Flush()
	})
	c.AddCommand(put, s.deleteCommand(routing.TableRegions, "region", "COUNTRY"), list)
	return c
}

func newCtlImportCommand(s *ctlSession) *cobra.Command {
	var path string
	cmd := &cobra.Command{
		Use:   "import --db PATH",
		Short: "Load a single-POP routing.db into etcd (rows marked deleted and invalid rows are left out)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			rows, rowErrs, err := routing.ReadRows(path)
			if err != nil {
				return err
			}
			for _, re := range rowErrs {
				fmt.Fprintf(cmd.ErrOrStderr(), "skipped %s\n", re)
			}
			cli, prefix, ctx, done, err := s.open()
			if err != nil {
				return err
			}
			defer done()
			n, rev, err := fleet.Import(ctx, cli, prefix, rows)
			if err != nil {
				return s.explain(err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "imported %d backends, %d pops, %d regions (%d keys) from %s into etcd under %s at revision %d",
				len(rows.Backends), len(rows.Pops), len(rows.Regions), n, path, prefix, rev)
			if len(rowErrs) > 0 {
				fmt.Fprintf(cmd.OutOrStdout(), "; skipped %d invalid rows", len(rowErrs))
			}
			fmt.Fprintln(cmd.OutOrStdout())
			return nil
		},
	}
	cmd.Flags().StringVar(&path, "db", "", "the routing.db to read")
	markRequired(cmd, "db")
	return cmd
}

func newCtlExportCommand(s *ctlSession) *cobra.Command {
	var path string
	cmd := &cobra.Command{
		Use:   "export --db PATH",
		Short: "Write what etcd holds as a routing.db a plain edgeproxy loads (replaces PATH atomically)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cli, prefix, ctx, done, err := s.open()
			if err != nil {
				return err
			}
			defer done()
			snap, err := fleet.Load(ctx, cli, prefix)
			if err != nil {
				return s.explain(err)
			}
			for _, sk := range snap.Skipped {
				fmt.Fprintf(cmd.ErrOrStderr(), "skipped %s: %s\n", sk.Key, sk.Reason)
			}
			// Built beside PATH and renamed over it, so a proxy reading
			// PATH sees the old file or the whole new one.
			tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".export-*")
			if err != nil {
				return fmt.Errorf("export to %s: %w", path, err)
			}
			tmp.Close()
			defer os.Remove(tmp.Name())
			if _, err := routing.ReplaceRows(tmp.Name(), snap.Rows, nil); err != nil {
				return fmt.Errorf("export to %s: %w", path, err)
			}
			if err := os.Chmod(tmp.Name(), 0o644); err != nil {
				return fmt.Errorf("export to %s: %w", path, err)
			}
			if err := os.Rename(tmp.Name(), path); err != nil {
				return fmt.Errorf("export to %s: %w", path, err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "exported %d backends, %d pops, %d regions from etcd under %s at revision %d to %s\n",
				len(snap.Rows.Backends), len(snap.Rows.Pops), len(snap.Rows.Regions), prefix, snap.Revision, path)
			return nil
		},
	}
	cmd.Flags().StringVar(&path, "db", "", "the routing.db to write")
	markRequired(cmd, "db")
	return cmd
}

func markRequired(cmd *cobra.Command, names ...string) {
	for _, n := range names {
		if err := cmd.MarkFlagRequired(n); err != nil {
			panic(err) // a flag name typed wrong here is a bug
		}
	}
}

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err) // strings, ints and bools always marshal
	}
	return b
}
