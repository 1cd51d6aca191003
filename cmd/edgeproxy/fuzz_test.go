package main

import (
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/edgeproxy/edgeproxy/userspace"
	"github.com/spf13/pflag"
)

// runSetting is one of `edgeproxy run`'s settings as the fuzz targets see
// it: its variable, its flag, and where its resolved value lands.
type runSetting struct {
	name, flag string
	// number reads the resolved value back in the setting's own unit;
	// nil for a text setting.
	number func(userspace.Config) int
	// text reads a text setting back; nil for a number.
	text func(userspace.Config) string
	def  string
}

func durationIn(unit time.Duration, get func(userspace.Config) time.Duration) func(userspace.Config) int {
	return func(c userspace.Config) int {
		d := get(c)
		if d%unit != 0 {
			return -1 << 62 // never a whole number of units: the caller's comparison fails
		}
		return int(d / unit)
	}
}

// runSettings lists every setting `edgeproxy run` resolves from a flag or
// a variable. TestRunSettingsCoverEveryFlag keeps it complete.
func runSettings() []runSetting {
	text := func(name, flag, def string, get func(userspace.Config) string) runSetting {
		return runSetting{name: name, flag: flag, text: get, def: def}
	}
	secsOf := func(name, flag string, def int, get func(userspace.Config) time.Duration) runSetting {
		return runSetting{name: name, flag: flag, number: durationIn(time.Second, get), def: strconv.Itoa(def)}
	}
	msOf := func(name, flag string, def int, get func(userspace.Config) time.Duration) runSetting {
		return runSetting{name: name, flag: flag, number: durationIn(time.Millisecond, get), def: strconv.Itoa(def)}
	}
	count := func(name, flag string, def int, get func(userspace.Config) int) runSetting {
		return runSetting{name: name, flag: flag, number: get, def: strconv.Itoa(def)}
	}
	return []runSetting{
		text("EDGEPROXY_LISTEN_ADDR", "listen", "0.0.0.0:8080", func(c userspace.Config) string { return c.ListenAddr }),
		text("EDGEPROXY_DB_PATH", "db", "routing.db", func(c userspace.Config) string { return c.DBPath }),
		text("EDGEPROXY_REGION", "region", "sa", func(c userspace.Config) string { return c.Region }),
		text("EDGEPROXY_GEOIP_PATH", "geoip", "", func(c userspace.Config) string { return c.GeoIPPath }),
		text("EDGEPROXY_DATAPLANE", "dataplane", "auto", func(c userspace.Config) string { return c.Dataplane }),
		text("EDGEPROXY_ADMIN_ADDR", "admin", "127.0.0.1:9090", func(c userspace.Config) string { return c.AdminAddr }),
		text("EDGEPROXY_BPF_PIN_PATH", "bpf-pin-path", "/sys/fs/bpf/edgeproxy", func(c userspace.Config) string { return c.PinPath }),
		secsOf("EDGEPROXY_DB_RELOAD_SECS", "db-reload-secs", 5, func(c userspace.Config) time.Duration { return c.DBReload }),
		secsOf("EDGEPROXY_BINDING_TTL_SECS", "binding-ttl-secs", 600, func(c userspace.Config) time.Duration { return c.BindingTTL }),
		secsOf("EDGEPROXY_BINDING_GC_INTERVAL_SECS", "binding-gc-interval-secs", 60, func(c userspace.Config) time.Duration { return c.BindingGC }),
		msOf("EDGEPROXY_CONNECT_TIMEOUT_MS", "connect-timeout-ms", 2000, func(c userspace.Config) time.Duration { return c.ConnectTimeout }),
		secsOf("EDGEPROXY_DRAIN_SECS", "drain-secs", 30, func(c userspace.Config) time.Duration { return c.Drain }),
		secsOf("EDGEPROXY_HEALTH_INTERVAL_SECS", "health-interval-secs", 5, func(c userspace.Config) time.Duration { return c.Health.Interval }),
		msOf("EDGEPROXY_HEALTH_TIMEOUT_MS", "health-timeout-ms", 1000, func(c userspace.Config) time.Duration { return c.Health.Timeout }),
		count("EDGEPROXY_HEALTH_FALL", "health-fall", 3, func(c userspace.Config) int { return c.Health.Fall }),
		count("EDGEPROXY_HEALTH_RISE", "health-rise", 2, func(c userspace.Config) int { return c.Health.Rise }),
		count("EDGEPROXY_CONNECT_RETRIES", "connect-retries", 2, func(c userspace.Config) int { return c.ConnectRetries }),
		count("EDGEPROXY_CLIENT_MAX_CONNS", "client-max-conns", 1024, func(c userspace.Config) int { return c.ClientMaxConns }),
		count("EDGEPROXY_CLIENT_RATE", "client-rate", 0, func(c userspace.Config) int {
			if c.ClientRate != float64(int(c.ClientRate)) {
				return -1 << 62
			}
			return int(c.ClientRate)
		}),
		count("EDGEPROXY_MAX_CONNS", "max-conns", 0, func(c userspace.Config) int { return c.MaxConns }),
		secsOf("EDGEPROXY_KEEPALIVE_SECS", "keepalive-secs", 60, func(c userspace.Config) time.Duration { return c.Keepalive }),
		secsOf("EDGEPROXY_IDLE_TIMEOUT_SECS", "idle-timeout-secs", 0, func(c userspace.Config) time.Duration { return c.IdleTimeout }),
		count("EDGEPROXY_MAX_BUFFERED_MB", "max-buffered-mb", 64, func(c userspace.Config) int { return c.MaxBufferedMB }),
		secsOf("EDGEPROXY_STALL_TIMEOUT_SECS", "stall-timeout-secs", 300, func(c userspace.Config) time.Duration { return c.StallTimeout }),
		count("EDGEPROXY_WORKERS", "workers", 0, func(c userspace.Config) int { return c.Workers }),
	}
}

// resolveRun resolves `edgeproxy run`'s settings from args and vars the
// way the command does, without starting anything.
func resolveRun(args []string, vars map[string]string) (userspace.Config, bool, error) {
	var given runFlags
	fs := pflag.NewFlagSet("run", pflag.ContinueOnError)
	fs.SetOutput(discard{})
	given.register(fs)
	if err := fs.Parse(args); err != nil {
		return userspace.Config{}, false, err
	}
	e := env{lookup: func(k string) (string, bool) { v, ok := vars[k]; return v, ok }}
	return given.resolveConfig(e, fs)
}

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }

func TestRunSettingsCoverEveryFlag(t *testing.T) {
	listed := map[string]bool{"debug": true}
	for _, s := range runSettings() {
		listed[s.flag] = true
	}
	var given runFlags
	fs := pflag.NewFlagSet("run", pflag.ContinueOnError)
	given.register(fs)
	fs.VisitAll(func(f *pflag.Flag) {
		if !listed[f.Name] {
			t.Errorf("--%s is not in runSettings: add it so FuzzRunSettings drives it", f.Name)
		}
	})
}

// TestRunSettingsDefaults pins the defaults the fuzz target compares
// against, so a wrong list cannot hide a wrong resolution.
func TestRunSettingsDefaults(t *testing.T) {
	cfg, debug, err := resolveRun(nil, nil)
	if err != nil {
		t.Fatalf("defaults: %v", err)
	}
	if debug {
		t.Error("debug on with DEBUG unset")
	}
	for _, s := range runSettings() {
		if s.text != nil {
			if got := s.text(cfg); got != s.def {
				t.Errorf("%s: default %q, want %q", s.name, got, s.def)
			}
			continue
		}
		if got := strconv.Itoa(s.number(cfg)); got != s.def {
			t.Errorf("%s: default %s, want %s", s.name, got, s.def)
		}
	}
}

// TestRunSettingsRefuseNamingTheSetting holds the values the fuzz target
// found or that a reader would try first.
func TestRunSettingsRefuseNamingTheSetting(t *testing.T) {
	cases := []struct {
		name       string
		args       []string
		vars       map[string]string
		wantInErr  string
		wantAccept bool
	}{
		// Before: accepted, then 10^13 s wrapped time.Duration to a
		// negative reload period.
		{"reload seconds past what a duration holds", nil, map[string]string{"EDGEPROXY_DB_RELOAD_SECS": "10000000000000"}, "EDGEPROXY_DB_RELOAD_SECS", false},
		{"drain flag past a day", []string{"--drain-secs=9223372036"}, nil, "--drain-secs", false},
		{"connect timeout of zero", nil, map[string]string{"EDGEPROXY_CONNECT_TIMEOUT_MS": "0"}, "EDGEPROXY_CONNECT_TIMEOUT_MS", false},
		{"negative ttl", nil, map[string]string{"EDGEPROXY_BINDING_TTL_SECS": "-1"}, "EDGEPROXY_BINDING_TTL_SECS", false},
		{"number past int64", nil, map[string]string{"EDGEPROXY_MAX_CONNS": "99999999999999999999"}, "EDGEPROXY_MAX_CONNS", false},
		{"flag number past int64", []string{"--workers=99999999999999999999"}, nil, "--workers", false},
		{"garbage data plane", nil, map[string]string{"EDGEPROXY_DATAPLANE": "kernel"}, "EDGEPROXY_DATAPLANE", false},
		{"data plane flag in capitals", []string{"--dataplane=SPLICE"}, nil, "--dataplane", false},
		{"listen address without port", nil, map[string]string{"EDGEPROXY_LISTEN_ADDR": "0.0.0.0"}, "EDGEPROXY_LISTEN_ADDR", false},
		{"listen port past 65535", nil, map[string]string{"EDGEPROXY_LISTEN_ADDR": ":65536"}, "EDGEPROXY_LISTEN_ADDR", false},
		{"admin address garbage", nil, map[string]string{"EDGEPROXY_ADMIN_ADDR": "admin"}, "EDGEPROXY_ADMIN_ADDR", false},
		{"empty admin disables", nil, map[string]string{"EDGEPROXY_ADMIN_ADDR": ""}, "", true},
		{"empty db flag", []string{"--db="}, nil, "--db", false},
		{"empty variable takes the default", nil, map[string]string{"EDGEPROXY_DB_PATH": "", "EDGEPROXY_HEALTH_FALL": ""}, "", true},
		{"health timeout longer than interval", nil, map[string]string{"EDGEPROXY_HEALTH_TIMEOUT_MS": "6000"}, "EDGEPROXY_HEALTH_TIMEOUT_MS", false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, _, err := resolveRun(c.args, c.vars)
			if c.wantAccept {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), c.wantInErr) {
				t.Fatalf("error %v, want one naming %s", err, c.wantInErr)
			}
		})
	}
}

// FuzzRunSettings drives one of `edgeproxy run`'s settings, as a variable
// or as a flag, with any value through the real resolution: it must not
// panic, a refusal must name the setting, and an accepted number must be
// exactly the number given (never clamped or wrapped).
func FuzzRunSettings(f *testing.F) {
	settings := runSettings()
	for i, s := range settings {
		f.Add(uint(i), s.def, false)
		f.Add(uint(i), s.def, true)
		f.Add(uint(i), "", false)
		f.Add(uint(i), "-1", true)
		f.Add(uint(i), "9223372036854775807", false)
	}
	f.Add(uint(0), "[::1]:8080", false)
	f.Add(uint(4), "splice", true)
	f.Add(uint(7), "10000000000000", false)
	f.Add(uint(len(settings)), "yes", true) // DEBUG
	f.Fuzz(func(t *testing.T, which uint, value string, asFlag bool) {
		// DEBUG is the one setting past the list: any non-empty
		// value turns it on, the flag takes a Go boolean.
		if which%uint(len(settings)+1) == uint(len(settings)) {
			var args []string
			var vars map[string]string
			if asFlag {
				args = []string{"--debug=" + value}
			} else {
				vars = map[string]string{"DEBUG": value}
			}
			_, debug, err := resolveRun(args, vars)
			if err != nil {
				if !asFlag || !strings.Contains(err.Error(), "--debug") {
					t.Fatalf("DEBUG=%q flag=%v: error %v does not name the setting", value, asFlag, err)
				}
				return
			}
			want := value != ""
			if asFlag {
				want, _ = strconv.ParseBool(value)
			}
			if debug != want {
				t.Fatalf("DEBUG=%q flag=%v: debug %v, want %v", value, asFlag, debug, want)
			}
			return
		}
		s := settings[which%uint(len(settings)+1)]
		var args []string
		var vars map[string]string
		if asFlag {
			args = []string{"--" + s.flag + "=" + value}
		} else {
			vars = map[string]string{s.name: value}
		}
		cfg, _, err := resolveRun(args, vars)
		if err != nil {
			msg := err.Error()
			if !strings.Contains(msg, s.name) && !strings.Contains(msg, "--"+s.flag) {
				t.Fatalf("%s=%q (flag %v): error %q names neither %s nor --%s", s.name, value, asFlag, msg, s.name, s.flag)
			}
			return
		}
		// Unset or empty, a variable gives the default; a flag given
		// is its value as typed.
		want := value
		if !asFlag && value == "" && s.name != "EDGEPROXY_ADMIN_ADDR" {
			want = s.def
		}
		if s.text != nil {
			if got := s.text(cfg); got != want {
				t.Fatalf("%s=%q (flag %v): resolved to %q", s.name, value, asFlag, got)
			}
			return
		}
		n, perr := strconv.Atoi(want)
		if perr != nil {
			t.Fatalf("%s=%q (flag %v): accepted a value that is not a whole number", s.name, value, asFlag)
		}
		if got := s.number(cfg); got != n {
			t.Fatalf("%s=%q (flag %v): resolved to %d, want exactly %d", s.name, value, asFlag, got, n)
		}
	})
}

// FuzzOverlaySettings drives the overlay's variables: no panic, a refusal
// names a variable, an accepted port and address are the ones given.
func FuzzOverlaySettings(f *testing.F) {
	f.Add("wg-edge", "51820", "10.50.1.1/16", "pop-a")
	f.Add("", "51820", "10.50.1.1/16", "pop-a")
	f.Add("wg0", "65536", "10.50.1.1/16", "pop-a")
	f.Add("wg0", "-1", "10.50.1.1", "")
	f.Add("a/b", "0", "fd00::1/64", "p")
	f.Add("0123456789abcdef", "+80", "10.50.1.1/33", "p")
	f.Fuzz(func(t *testing.T, iface, port, address, pop string) {
		vars := map[string]string{
			"EDGEPROXY_WG_INTERFACE":        iface,
			"EDGEPROXY_WG_PRIVATE_KEY_FILE": "/etc/edgeproxy/wg.key",
			"EDGEPROXY_WG_LISTEN_PORT":      port,
			"EDGEPROXY_WG_ADDRESS":          address,
			"EDGEPROXY_POP_ID":              pop,
		}
		e := env{lookup: func(k string) (string, bool) { v, ok := vars[k]; return v, ok }}
		s, on, err := wgSettingsFromEnv(e)
		if err != nil {
			if !strings.Contains(err.Error(), "EDGEPROXY_") {
				t.Fatalf("error %q names no variable", err)
			}
			return
		}
		if !on {
			if iface != "" {
				t.Fatalf("overlay off with EDGEPROXY_WG_INTERFACE=%q and a key file", iface)
			}
			return
		}
		if port == "" {
			port = "51820"
		}
		if n, perr := strconv.Atoi(port); perr != nil || n != s.ListenPort {
			t.Fatalf("EDGEPROXY_WG_LISTEN_PORT=%q resolved to %d", port, s.ListenPort)
		}
		if p, perr := netip.ParsePrefix(address); perr != nil || p != s.Address {
			t.Fatalf("EDGEPROXY_WG_ADDRESS=%q resolved to %v", address, s.Address)
		}
	})
}

// FuzzEtcdSettings drives the etcd variables: no panic, a refusal names a
// variable, and every accepted endpoint is one given, trimmed, non-empty.
func FuzzEtcdSettings(f *testing.F) {
	f.Add("127.0.0.1:2379", "/edgeproxy/", "", "")
	f.Add("https://a:2379, http://b:2379,,", "", "root", "pw")
	f.Add("unix:///run/etcd.sock", "x", "", "pw")
	f.Add(" , ", "/p", "u", "")
	f.Fuzz(func(t *testing.T, endpoints, prefix, user, password string) {
		vars := map[string]string{
			"EDGEPROXY_ETCD_ENDPOINTS": endpoints,
			"EDGEPROXY_ETCD_PREFIX":    prefix,
			"EDGEPROXY_ETCD_USERNAME":  user,
			"EDGEPROXY_ETCD_PASSWORD":  password,
		}
		e := env{lookup: func(k string) (string, bool) { v, ok := vars[k]; return v, ok }}
		cfg, on, err := etcdConfigFromEnv(e, "")
		if err != nil {
			if !strings.Contains(err.Error(), "EDGEPROXY_ETCD_") {
				t.Fatalf("error %q names no variable", err)
			}
			return
		}
		if !on {
			for ep := range strings.SplitSeq(endpoints, ",") {
				if strings.TrimSpace(ep) != "" {
					t.Fatalf("etcd off with EDGEPROXY_ETCD_ENDPOINTS=%q", endpoints)
				}
			}
			return
		}
		for _, ep := range cfg.Endpoints {
			if ep == "" || ep != strings.TrimSpace(ep) || !strings.Contains(endpoints, ep) {
				t.Fatalf("EDGEPROXY_ETCD_ENDPOINTS=%q gave endpoint %q", endpoints, ep)
			}
		}
		if !strings.HasSuffix(cfg.Prefix, "/") {
			t.Fatalf("EDGEPROXY_ETCD_PREFIX=%q resolved to %q, without its closing /", prefix, cfg.Prefix)
		}
	})
}

// TestIntFlagsAreDecimal: found by FuzzRunSettings. pflag's IntVar reads
// base 0, so --health-interval-secs=00010 gave 8 s while the variable with
// the same text gave 10 s, and 0x10 was accepted as 16.
func TestIntFlagsAreDecimal(t *testing.T) {
	cfg, _, err := resolveRun([]string{"--health-interval-secs=00010"}, nil)
	if err != nil || cfg.Health.Interval != 10*time.Second {
		t.Fatalf("--health-interval-secs=00010: interval %s, err %v; want 10s", cfg.Health.Interval, err)
	}
	if _, _, err := resolveRun([]string{"--drain-secs=0x10"}, nil); err == nil || !strings.Contains(err.Error(), "--drain-secs") {
		t.Fatalf("--drain-secs=0x10: err %v, want a refusal naming the flag", err)
	}
}
