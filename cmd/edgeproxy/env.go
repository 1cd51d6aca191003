package main

import (
	"fmt"
	"strconv"
	"time"
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

func (e env) seconds(name string, def int) (time.Duration, error) {
	v := e.str(name, "")
	if v == "" {
		return time.Duration(def) * time.Second, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("%s=%q: want a whole number of seconds >= 0", name, v)
	}
	return time.Duration(n) * time.Second, nil
}

func (e env) millis(name string, def int) (time.Duration, error) {
	v := e.str(name, "")
	if v == "" {
		return time.Duration(def) * time.Millisecond, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("%s=%q: want a whole number of milliseconds > 0", name, v)
	}
	return time.Duration(n) * time.Millisecond, nil
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
