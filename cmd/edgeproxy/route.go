package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"sort"
	"text/tabwriter"
	"time"

	"github.com/edgeproxy/edgeproxy/routing"
	"github.com/edgeproxy/edgeproxy/userspace"
	"github.com/spf13/cobra"
)

var geoNames = []string{
	routing.GeoSameCountry: "same country",
	routing.GeoSameRegion:  "same region",
	routing.GeoLocalRegion: "this POP's region",
	routing.GeoElsewhere:   "elsewhere",
}

func newRouteCommand(e env) *cobra.Command {
	var dbPath, region, geoPath, admin string
	cmd := &cobra.Command{
		Use:   "route CLIENT_IP",
		Short: "Explain where a client would go, without sending traffic",
		Long: "Explain where a client would go: its country and region, each backend's score or the\n" +
			"reason it is excluded, and the winner. Live connection counts come from a running\n" +
			"proxy's admin API when it answers, else every backend counts as idle.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			flags := cmd.Flags()
			if !flags.Changed("db") {
				dbPath = e.str("EDGEPROXY_DB_PATH", "routing.db")
			}
			if !flags.Changed("region") {
				region = e.str("EDGEPROXY_REGION", "sa")
			}
			if !flags.Changed("geoip") {
				geoPath = e.str("EDGEPROXY_GEOIP_PATH", "")
			}
			if !flags.Changed("admin") {
				admin = e.str("EDGEPROXY_ADMIN_ADDR", "127.0.0.1:9090")
			}
			addr, err := netip.ParseAddr(args[0])
			if err != nil {
				return fmt.Errorf("client address %q: %w", args[0], err)
			}
			addr = addr.Unmap()
			// Rows pointing at the proxy's own listener are skipped as
			// `run` skips them.
			self := userspace.SelfCheck(e.str("EDGEPROXY_LISTEN_ADDR", "0.0.0.0:8080"))
			table, rowErrs, err := routing.LoadTableWith(dbPath, routing.LoadOptions{IsSelf: self})
			if err != nil {
				return err
			}
			geo, err := routing.OpenGeo(geoPath)
			if err != nil {
				return err
			}
			defer geo.Close()
			out := cmd.OutOrStdout()
			client := routing.Client{Addr: addr, Country: geo.Country(addr)}
			if client.Country != "" {
				client.Region = table.RegionOf(client.Country)
			}
			active, source := liveCounts(admin)
			d := routing.Explain(routing.Input{
				Client:      client,
				LocalRegion: region,
				Active:      func(i int) int { return active[table.Backends[i].ID] },
			}, table)
			printDecision(out, d, table, geo.Describe(), source)
			printSkipped(out, rowErrs)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&dbPath, "db", "", "SQLite routing database (EDGEPROXY_DB_PATH, default routing.db)")
	f.StringVar(&region, "region", "", "this POP's region (EDGEPROXY_REGION, default sa)")
	f.StringVar(&geoPath, "geoip", "", "geo database .mmdb; empty: embedded (EDGEPROXY_GEOIP_PATH)")
	f.StringVar(&admin, "admin", "", "running proxy to take live connection counts from (EDGEPROXY_ADMIN_ADDR); empty: none")
	return cmd
}

// liveCounts asks a running proxy for its active connections per backend.
func liveCounts(admin string) (map[string]int, string) {
	counts := map[string]int{}
	if admin == "" {
		return counts, "none asked (every backend counted idle)"
	}
	client := &http.Client{Timeout: time.Second}
	resp, err := client.Get("http://" + admin + "/status")
	if err != nil {
		return counts, fmt.Sprintf("proxy at %s not reachable, every backend counted idle", admin)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var st userspace.Status
	if resp.StatusCode != http.StatusOK || json.Unmarshal(body, &st) != nil {
		return counts, fmt.Sprintf("proxy at %s gave no status, every backend counted idle", admin)
	}
	for _, b := range st.Backends {
		counts[b.ID] = int(b.Active)
	}
	return counts, "live, from the proxy at " + admin
}

func printDecision(w io.Writer, d routing.Decision, t *routing.Table, geoDB, countsFrom string) {
	country, region := d.Client.Country, d.Client.Region
	if country == "" {
		country, region = "unknown", "unknown (local POP rule)"
	}
	fmt.Fprintf(w, "client %s: country %s, region %s (geo database: %s)\n", d.Client.Addr, country, region, geoDB)
	fmt.Fprintf(w, "this POP's region: %s; active connections: %s\n\n", d.LocalRegion, countsFrom)
	cands := append([]routing.Candidate(nil), d.Candidates...)
	sort.SliceStable(cands, func(i, j int) bool {
		a, b := cands[i], cands[j]
		if (a.Excluded == "") != (b.Excluded == "") {
			return a.Excluded == ""
		}
		return a.Score < b.Score
	})
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "BACKEND\tREGION\tCOUNTRY\tADDRESS\tGEO\tACTIVE\tSOFT\tHARD\tWEIGHT\tSCORE\tRESULT")
	for _, c := range cands {
		b := &t.Backends[c.Index]
		score, result := fmt.Sprintf("%.4f", c.Score), ""
		switch {
		case c.Excluded != "":
			score, result = "-", "excluded: "+string(c.Excluded)
		case c.Index == d.Winner:
			result = "winner"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d (%s)\t%d\t%d\t%d\t%d\t%s\t%s\n", b.ID, b.Region, b.Country, b.AddrPort(),
			c.Geo, geoNames[c.Geo], c.Active, b.SoftLimit, b.HardLimit, b.Weight, score, result)
	}
	tw.Flush()
	for _, id := range t.Deleted {
		fmt.Fprintf(w, "%s: deleted\n", id)
	}
	fmt.Fprintln(w)
	if d.Winner < 0 {
		fmt.Fprintf(w, "no backend: the client would be refused (%s)\n", d.Reject)
		return
	}
	b := &t.Backends[d.Winner]
	fmt.Fprintf(w, "winner: %s at %s\n", b.ID, b.AddrPort())
}

// printSkipped lists every row the load skipped, of every table, with the
// reason, so an operator looking for a missing backend (a soft_limit above
// its hard_limit, an id too long for the BPF maps, the proxy's own
// address) finds why here rather than only in the proxy's log.
func printSkipped(w io.Writer, rowErrs []routing.RowError) {
	if len(rowErrs) == 0 {
		return
	}
	fmt.Fprintf(w, "\n%d rows skipped (not routed to, not in the table above):\n", len(rowErrs))
	for _, re := range rowErrs {
		fmt.Fprintf(w, "skipped: %s\n", re.Error())
	}
}

func newGeoCommand(e env) *cobra.Command {
	var geoPath, dbPath string
	cmd := &cobra.Command{
		Use:   "geo IP",
		Short: "Print the country and region of an address",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if !cmd.Flags().Changed("geoip") {
				geoPath = e.str("EDGEPROXY_GEOIP_PATH", "")
			}
			addr, err := netip.ParseAddr(args[0])
			if err != nil {
				return fmt.Errorf("address %q: %w", args[0], err)
			}
			geo, err := routing.OpenGeo(geoPath)
			if err != nil {
				return err
			}
			defer geo.Close()
			regions := routing.BuiltinRegions()
			if dbPath != "" {
				t, _, err := routing.LoadTable(dbPath)
				if err != nil {
					return err
				}
				regions = t.Regions
			}
			country := geo.Country(addr.Unmap())
			if country == "" {
				fmt.Fprintf(cmd.OutOrStdout(), "%s: country unknown, region unknown (the local POP rule applies)\n", addr)
				return nil
			}
			region, ok := regions[country]
			if !ok {
				region = routing.DefaultRegion
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s: country %s, region %s\n", addr, country, region)
			return nil
		},
	}
	cmd.Flags().StringVar(&geoPath, "geoip", "", "geo database .mmdb; empty: embedded (EDGEPROXY_GEOIP_PATH)")
	cmd.Flags().StringVar(&dbPath, "db", "", "routing.db whose regions table overrides the built-in country -> region map")
	return cmd
}
