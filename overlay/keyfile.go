package overlay

import (
	"encoding/base64"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// ErrKeyFileExists is returned by WriteKeyFile when the file exists and
// force is false: a private key is an identity, and overwriting one by
// mistake cuts the POP off from every peer that knows its public key.
var ErrKeyFileExists = errors.New("key file exists")

// WriteKeyFile writes a new private key to path, base64 and a newline, mode
// 0600, and returns the key. Without force an existing file is refused
// (ErrKeyFileExists) and left as it is. With force the file is replaced by
// rename, so a reader sees the old key or the new one, never half of one.
func WriteKeyFile(path string, force bool) (wgtypes.Key, error) {
	key, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		return wgtypes.Key{}, fmt.Errorf("generate private key: %w", err)
	}
	data := []byte(key.String() + "\n")
	if !force {
		// O_EXCL makes "does it exist" and "create it" one step.
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if errors.Is(err, fs.ErrExist) {
			return wgtypes.Key{}, fmt.Errorf("write private key %s: %w (use --force to replace it)", path, ErrKeyFileExists)
		}
		if err != nil {
			return wgtypes.Key{}, fmt.Errorf("write private key: %w", err)
		}
		if _, err := f.Write(data); err != nil {
			f.Close()
			os.Remove(path)
			return wgtypes.Key{}, fmt.Errorf("write private key %s: %w", path, err)
		}
		if err := f.Close(); err != nil {
			os.Remove(path)
			return wgtypes.Key{}, fmt.Errorf("write private key %s: %w", path, err)
		}
		return key, nil
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return wgtypes.Key{}, fmt.Errorf("write private key %s: %w", path, err)
	}
	defer os.Remove(tmp.Name()) // no-op once renamed
	// CreateTemp makes 0600 files; Chmod says so explicitly, whatever the
	// umask.
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return wgtypes.Key{}, fmt.Errorf("write private key %s: %w", path, err)
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return wgtypes.Key{}, fmt.Errorf("write private key %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return wgtypes.Key{}, fmt.Errorf("write private key %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return wgtypes.Key{}, fmt.Errorf("write private key %s: %w", path, err)
	}
	return key, nil
}

// ReadKeyFile reads a private key file as WriteKeyFile or `wg genkey`
// writes it. loose reports that group or others may read the file, which
// the caller should warn about.
func ReadKeyFile(path string) (key wgtypes.Key, loose bool, err error) {
	fi, err := os.Stat(path)
	if err != nil {
		return wgtypes.Key{}, false, fmt.Errorf("read private key: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return wgtypes.Key{}, false, fmt.Errorf("read private key %s: not a regular file", path)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return wgtypes.Key{}, false, fmt.Errorf("read private key: %w", err)
	}
	// The file's content is a secret: the error must not quote it.
	key, err = parseKey(strings.TrimSpace(string(b)))
	if err != nil {
		return wgtypes.Key{}, false, fmt.Errorf("read private key %s: %w", path, err)
	}
	return key, fi.Mode().Perm()&0o077 != 0, nil
}

// parseKey accepts what `wg genkey` and `edgeproxy wg keygen` write:
// standard base64 of 32 bytes. Its errors never quote the input, which is
// a secret here.
func parseKey(s string) (wgtypes.Key, error) {
	b, err := base64.StdEncoding.DecodeString(strings.TrimSpace(s))
	if err != nil {
		return wgtypes.Key{}, errors.New("not base64")
	}
	if len(b) != wgtypes.KeyLen {
		return wgtypes.Key{}, fmt.Errorf("decodes to %d bytes, want %d", len(b), wgtypes.KeyLen)
	}
	return wgtypes.Key(b), nil
}
