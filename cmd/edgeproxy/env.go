package main

import (
	"errors"
	"fmt"
	"strconv"

	"github.com/spf13/pflag"
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

// decimalInt is an int flag read in base 10 only. pflag's IntVar parses
// with base 0, so --health-interval-secs=010 meant 8 seconds and 0x10
// meant 16; a variable has always been read in base 10 (strconv.Atoi),
// and a flag now reads the same number as its variable.
type decimalInt struct{ p *int }

func (d decimalInt) String() string {
	if d.p == nil {
		return "0"
	}
	return strconv.Itoa(*d.p)
}

func (d decimalInt) Set(s string) error {
	n, err := strconv.Atoi(s)
	if err != nil {
		if errors.Is(err, strconv.ErrRange) {
			return errors.New("value out of range")
		}
		return errors.New("want a whole number in base 10")
	}
	*d.p = n
	return nil
}

// Type is what --help shows, as for pflag's own int flags.
func (decimalInt) Type() string { return "int" }

// decimalIntVar is pflag's IntVar with decimalInt's parsing.
func decimalIntVar(f *pflag.FlagSet, p *int, name string, value int, usage string) {
	*p = value
	f.Var(decimalInt{p}, name, usage)
}
