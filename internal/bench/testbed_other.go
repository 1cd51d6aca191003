//go:build !linux

package main

import "errors"

// setupNetns needs Linux network namespaces; `report` works anywhere.
func (b *bench) setupNetns() error {
	return errors.New("the testbed needs Linux network namespaces")
}
