package main

import (
	"slices"
	"strings"
	"testing"
)

func TestEtcdSettingsFromEnv(t *testing.T) {
	vars := map[string]string{}
	e := env{func(k string) (string, bool) { v, ok := vars[k]; return v, ok }}
	if _, on, err := etcdConfigFromEnv(e, ""); on || err != nil {
		t.Fatalf("no endpoints: on %v, err %v; want off", on, err)
	}
	vars["EDGEPROXY_ETCD_ENDPOINTS"] = " https://10.0.0.1:2379, 10.0.0.2:2379 ,"
	vars["EDGEPROXY_ETCD_PREFIX"] = "/fleet"
	cfg, on, err := etcdConfigFromEnv(e, "")
	if !on || err != nil || !slices.Equal(cfg.Endpoints, []string{"https://10.0.0.1:2379", "10.0.0.2:2379"}) || cfg.Prefix != "/fleet/" {
		t.Fatalf("got %+v on %v err %v", cfg, on, err)
	}
	if cfg, _, _ := etcdConfigFromEnv(e, "127.0.0.1:2379"); !slices.Equal(cfg.Endpoints, []string{"127.0.0.1:2379"}) {
		t.Fatalf("--endpoints does not win over the variable: %v", cfg.Endpoints)
	}
	vars["EDGEPROXY_ETCD_ENDPOINTS"] = "unix:///run/etcd.sock"
	if _, _, err := etcdConfigFromEnv(e, ""); err == nil || !strings.Contains(err.Error(), "EDGEPROXY_ETCD_ENDPOINTS") {
		t.Fatalf("unix endpoint: %v, want an error naming the variable", err)
	}
	vars["EDGEPROXY_ETCD_ENDPOINTS"] = "127.0.0.1:2379"
	vars["EDGEPROXY_ETCD_PASSWORD"] = "secret"
	if _, _, err := etcdConfigFromEnv(e, ""); err == nil || !strings.Contains(err.Error(), "EDGEPROXY_ETCD_USERNAME") {
		t.Fatalf("password without user: %v", err)
	}
}

func TestCtlHelpAndRefusals(t *testing.T) {
	for _, sub := range [][]string{{"ctl"}, {"ctl", "backend", "put"}, {"ctl", "backend", "delete"}, {"ctl", "backend", "list"},
		{"ctl", "pop", "put"}, {"ctl", "pop", "delete"}, {"ctl", "pop", "list"}, {"ctl", "region", "put"},
		{"ctl", "region", "delete"}, {"ctl", "region", "list"}, {"ctl", "import"}, {"ctl", "export"}} {
		if _, _, code := run(t, nil, append(sub, "--help")...); code != 0 {
			t.Errorf("%v --help: exit %d", sub, code)
		}
	}
	// No etcd configured: one line that says what to set.
	_, stderr, code := run(t, nil, "ctl", "backend", "list")
	if code == 0 || !strings.Contains(stderr, "EDGEPROXY_ETCD_ENDPOINTS") || strings.Count(strings.TrimSpace(stderr), "\n") > 0 {
		t.Fatalf("ctl without etcd: exit %d, stderr %q", code, stderr)
	}
	// A row that breaks routing.db's rules is refused before any
	// connection: this endpoint has nobody listening.
	noEtcd := []string{"EDGEPROXY_ETCD_ENDPOINTS=127.0.0.1:1"}
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"backend", "put", "b", "--wg-ip", "10.0.0.1", "--port", "70000"}, "column port"},
		{[]string{"backend", "put", "b", "--wg-ip", "0.0.0.0", "--port", "80"}, "unspecified"},
		{[]string{"backend", "put", "b", "--wg-ip", "10.0.0.1", "--port", "80", "--soft-limit", "9", "--hard-limit", "3"}, "hard_limit"},
		{[]string{"pop", "put", "p", "--public-key", "nope", "--wg-ip", "10.50.1.1", "--allowed-ips", "10.50.1.1/32"}, "wg_public_key"},
		{[]string{"region", "put", "BR", " "}, "column region"},
	} {
		_, stderr, code := run(t, noEtcd, append([]string{"ctl"}, c.args...)...)
		if code == 0 || !strings.Contains(stderr, c.want) || strings.Contains(stderr, "127.0.0.1:1") {
			t.Errorf("ctl %v: exit %d, stderr %q; want a refusal naming %q before any connection", c.args, code, stderr, c.want)
		}
	}
}
