//go:build !linux

package userspace

import (
	"fmt"

	"github.com/edgeproxy/edgeproxy/loader"
)

func openSockmapPlane(env planeEnv, pinPath string) (Dataplane, func() error, error) {
	return nil, nil, fmt.Errorf("%w: requires Linux", loader.ErrNotSupported)
}
