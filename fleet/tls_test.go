package fleet

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/edgeproxy/edgeproxy/routing"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
)

// pemPair writes a certificate signed by parent (itself when nil) and its
// key to dir/name.pem and dir/name-key.pem.
type pemPair struct {
	cert     *x509.Certificate
	key      *ecdsa.PrivateKey
	certPath string
	keyPath  string
}

func newCert(t *testing.T, dir, name string, parent *pemPair, server bool) *pemPair {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: name},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
	}
	signer, signerKey := tmpl, key
	if parent == nil {
		tmpl.IsCA, tmpl.BasicConstraintsValid = true, true
		tmpl.KeyUsage |= x509.KeyUsageCertSign
	} else {
		signer, signerKey = parent.cert, parent.key
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
		if server {
			tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
			tmpl.IPAddresses = []net.IP{net.ParseIP("127.0.0.1")}
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, signer, &key.PublicKey, signerKey)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	p := &pemPair{cert: cert, key: key, certPath: filepath.Join(dir, name+".pem"), keyPath: filepath.Join(dir, name+"-key.pem")}
	if err := os.WriteFile(p.certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p.keyPath, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// The TLS settings reach a server that demands client certificates; a
// client without one is refused.
func TestConnectWithTLSClientCertificates(t *testing.T) {
	dir := t.TempDir()
	ca := newCert(t, dir, "ca", nil, false)
	server := newCert(t, dir, "server", ca, true)
	client := newCert(t, dir, "client", ca, false)
	url := runEtcd(t, "https", "--cert-file", server.certPath, "--key-file", server.keyPath,
		"--client-cert-auth", "--trusted-ca-file", ca.certPath)

	cli, err := Connect(Config{Endpoints: []string{url}, CA: ca.certPath, Cert: client.certPath, Key: client.keyPath})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	waitAnswers(t, cli)
	if _, err := Put(ctxFor(t), cli, DefaultPrefix, routing.TableRegions, "BR", routing.MarshalRegion("BR", "eu")); err != nil {
		t.Fatalf("put over TLS: %v", err)
	}

	anon, err := Connect(Config{Endpoints: []string{url}, CA: ca.certPath, DialTimeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer anon.Close()
	ctx, cancel := contextWithTimeout(2 * time.Second)
	defer cancel()
	if _, err := Load(ctx, anon, DefaultPrefix); err == nil {
		t.Fatal("a client without a certificate read etcd that demands one")
	}

	if _, err := Connect(Config{Endpoints: []string{url}, Cert: client.certPath}); err == nil || !strings.Contains(err.Error(), "EDGEPROXY_ETCD_KEY") {
		t.Fatalf("a certificate without its key: %v", err)
	}
	if _, err := Connect(Config{Endpoints: []string{url}, CA: filepath.Join(dir, "missing.pem")}); err == nil || !strings.Contains(err.Error(), "EDGEPROXY_ETCD_CA") {
		t.Fatalf("a missing CA file: %v", err)
	}
}

// Username and password log in to etcd's auth; a wrong password is
// refused.
func TestConnectWithUsernameAndPassword(t *testing.T) {
	url := runEtcd(t, "http")
	root, err := Connect(Config{Endpoints: []string{url}})
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	waitAnswers(t, root)
	ctx := ctxFor(t)
	for _, step := range []func() error{
		func() error { _, err := root.UserAdd(ctx, "root", "rootpw"); return err },
		func() error { _, err := root.UserGrantRole(ctx, "root", "root"); return err },
		func() error { _, err := root.AuthEnable(ctx); return err },
	} {
		if err := step(); err != nil {
			t.Fatalf("enable etcd auth: %v", err)
		}
	}
	cli, err := Connect(Config{Endpoints: []string{url}, Username: "root", Password: "rootpw"})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	if _, err := Load(ctx, cli, DefaultPrefix); err != nil {
		t.Fatalf("read with the right password: %v", err)
	}
	bad, err := Connect(Config{Endpoints: []string{url}, Username: "root", Password: "wrong"})
	if err == nil {
		defer bad.Close()
		_, err = Load(ctx, bad, DefaultPrefix)
	}
	if !errors.Is(err, rpctypes.ErrAuthFailed) && (err == nil || !strings.Contains(err.Error(), "authentication failed")) {
		t.Fatalf("a wrong password: %v, want authentication failed", err)
	}
}
