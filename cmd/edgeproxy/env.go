package main

import (
	"fmt"
	"strconv"
)

// env reads the EDGEPROXY_* variables through an injectable lookup.
type env struct {
	lookup func(string) (string, bool)
}

// emptyMeansOff lists the variables whose empty value is a setting of its
// own (it disables the feature) rather than "use the default".
var emptyMeansOff = map[string]bool{"EDGEPROXY_ADMIN_ADDR": true, "EDGEPROXY_WG_INTERFACE": true}

func (e env) str(name, def string) string {
	v, ok := e.lookup(name)
	if !ok || (v == "" && !emptyMeansOff[name]) {
		return def
	}
	return v
}

// intIn reads a whole-number variable that must lie in [lo, hi]; unset or
// empty gives def.
func (e env) intIn(name string, def, lo, hi int) (int, error) {
	v := e.str(name, "")
	if v == "" {
		return def, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < lo || n > hi {
		return 0, fmt.Errorf("%s=%q: want a whole number from %d to %d", name, v, lo, hi)
	}
	return n, nil
}
