package routing

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/maxmind/mmdbwriter/mmdbtype"
)

// benchTable spreads n backends over the four built-in regions and a few
// countries in each, with varied weights and limits and a few unhealthy.
func benchTable(n int) *Table {
	places := []struct{ region, country string }{
		{"sa", "BR"}, {"sa", "AR"}, {"sa", "CL"},
		{"us", "US"}, {"us", "CA"}, {"us", "MX"},
		{"eu", "FR"}, {"eu", "DE"}, {"eu", "GB"}, {"eu", "NL"},
		{"ap", "JP"}, {"ap", "SG"}, {"ap", "AU"},
	}
	bs := make([]Backend, n)
	for i := range bs {
		p := places[i%len(places)]
		bs[i] = Backend{
			ID:        fmt.Sprintf("b-%04d", i),
			App:       "app",
			Region:    p.region,
			Country:   p.country,
			Addr:      netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}),
			Port:      8080,
			Healthy:   i%17 != 5,
			Weight:    1 + i%3,
			SoftLimit: 50 + i%7*10,
			HardLimit: 200,
		}
	}
	t, err := NewTable(bs, nil, nil)
	if err != nil {
		panic(err)
	}
	return t
}

// benchInputs rotate through clients in every tier, one of unknown
// country, and one with an affinity binding. A power-of-two count keeps the
// loop's own cost to a mask.
func benchInputs(t *Table, counts []int) []Input {
	clients := []Client{
		{Country: "BR", Region: "sa"},
		{Country: "FR", Region: "eu"},
		{Country: "JP", Region: "ap"},
		{Country: "US", Region: "us"},
		{Country: "ZA", Region: "us"},
		{Country: "DE", Region: "eu"},
		{},
		{Country: "AR", Region: "sa"},
	}
	active := func(i int) int { return counts[i] }
	ins := make([]Input, len(clients))
	for i, c := range clients {
		ins[i] = Input{Client: c, LocalRegion: "sa", Active: active}
	}
	ins[len(ins)-1].BoundID = t.Backends[len(t.Backends)/2].ID
	return ins
}

func benchmarkPick(b *testing.B, n int) {
	t := benchTable(n)
	counts := make([]int, n)
	for i := range counts {
		counts[i] = (i * 37) % 120
	}
	ins := benchInputs(t, counts)
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if w, _, _ := Pick(&ins[i&7], t); w < 0 {
			b.Fatal("no winner")
		}
		i++
	}
}

func BenchmarkPick10(b *testing.B)   { benchmarkPick(b, 10) }
func BenchmarkPick100(b *testing.B)  { benchmarkPick(b, 100) }
func BenchmarkPick1000(b *testing.B) { benchmarkPick(b, 1000) }

func BenchmarkExplain100(b *testing.B) {
	t := benchTable(100)
	counts := make([]int, 100)
	ins := benchInputs(t, counts)
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		Explain(ins[i&7], t)
		i++
	}
}

func BenchmarkGeoCountry(b *testing.B) {
	g, err := OpenGeo("")
	if err != nil {
		b.Fatal(err)
	}
	addrs := []netip.Addr{
		netip.MustParseAddr("8.8.8.8"),
		netip.MustParseAddr("200.147.67.142"),
		netip.MustParseAddr("81.2.69.142"),
		netip.MustParseAddr("2001:4860:4860::8888"),
		netip.MustParseAddr("::ffff:1.1.1.1"),
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		g.Country(addrs[i%len(addrs)])
		i++
	}
}

// BenchmarkGeoCountryMaxMind reads a small GeoLite2-Country-shaped file
// through geoip2, for comparison with the embedded ip-location-db format.
func BenchmarkGeoCountryMaxMind(b *testing.B) {
	g, err := OpenGeo(writeFile(b, mmdb(b, "GeoLite2-Country", testRecords(func(c string) mmdbtype.Map { return maxmindRecord(c, c) }))))
	if err != nil {
		b.Fatal(err)
	}
	addrs := []netip.Addr{netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("2001:db8::1")}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		g.Country(addrs[i&1])
		i++
	}
}
