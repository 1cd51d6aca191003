package routing

import (
	"fmt"
	"net/netip"
	"testing"
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

// benchClients rotate through countries in every tier plus an unknown one.
var benchClients = []Client{
	{Country: "BR", Region: "sa"},
	{Country: "FR", Region: "eu"},
	{Country: "JP", Region: "ap"},
	{Country: "US", Region: "us"},
	{Country: "ZA", Region: "us"},
	{},
}

func benchmarkPick(b *testing.B, n int) {
	t := benchTable(n)
	counts := make([]int, n)
	for i := range counts {
		counts[i] = (i * 37) % 120
	}
	in := Input{LocalRegion: "sa", Active: func(i int) int { return counts[i] }}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		in.Client = benchClients[i%len(benchClients)]
		i++
		if w, _, _ := Pick(in, t); w < 0 {
			b.Fatal("no winner")
		}
	}
}

func BenchmarkPick10(b *testing.B)   { benchmarkPick(b, 10) }
func BenchmarkPick100(b *testing.B)  { benchmarkPick(b, 100) }
func BenchmarkPick1000(b *testing.B) { benchmarkPick(b, 1000) }

func BenchmarkExplain100(b *testing.B) {
	t := benchTable(100)
	counts := make([]int, 100)
	in := Input{LocalRegion: "sa", Active: func(i int) int { return counts[i] }}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		in.Client = benchClients[i%len(benchClients)]
		i++
		Explain(in, t)
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
