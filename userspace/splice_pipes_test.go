package userspace

import "testing"

// The derived connection cap fits the open-file limit with every pipe the
// plane may open in use, and is short of what would fit by less than the
// minimum pipes' worth (the formula reserves them also where a quarter of
// the connections is more).
func TestSpliceConnsForFilesFitsWithEveryPipeOpen(t *testing.T) {
	need := func(conns uint64) uint64 {
		return 2*conns + 2*uint64(splicePipesFor(int64(conns)))
	}
	for _, files := range []uint64{0, 10, 2 * minSplicePipes, 100, 1000, 19_900, 1 << 20} {
		conns := spliceConnsForFiles(files)
		if conns > 0 && need(conns) > files {
			t.Errorf("%d files: %d connections need %d descriptors with every pipe open", files, conns, need(conns))
		}
		if files >= 1000 && need(conns+minSplicePipes) <= files {
			t.Errorf("%d files: %d connections leave room for %d more", files, conns, minSplicePipes)
		}
	}
	if got := spliceConnsForFiles(19_900); got < 7_900 {
		t.Errorf("19,900 files hold %d splice connections, want about 7,900 (2.5 descriptors each)", got)
	}
}

// The pool lends pipes up to the budget, keeps a few empty ones for the
// next burst and closes the rest, and the budget counts what is open.
func TestPipePoolLendsWithinBudget(t *testing.T) {
	budget := &pipeBudget{limit: idlePipesPerLoop + 2}
	pool := pipePool{budget: budget}
	t.Cleanup(pool.closeAll)
	var lent []*splicePipe
	for range budget.limit {
		p, err := pool.get()
		if err != nil || p == nil {
			t.Fatalf("pipe %d of a budget of %d: %v, %v", len(lent)+1, budget.limit, p, err)
		}
		if p.size < 64<<10 {
			t.Fatalf("pipe of %d bytes, want at least the default 64 KiB", p.size)
		}
		lent = append(lent, p)
	}
	if p, err := pool.get(); p != nil || err != nil {
		t.Fatalf("a pipe beyond the budget of %d: %v, %v; want none and no error (the direction copies)", budget.limit, p, err)
	}
	for _, p := range lent {
		pool.put(p)
	}
	if got := budget.open.Load(); got != idlePipesPerLoop || len(pool.idle) != idlePipesPerLoop {
		t.Fatalf("after all came back: %d open, %d idle; want %d kept, the rest closed", got, len(pool.idle), idlePipesPerLoop)
	}
	again, _ := pool.get()
	if again == nil || budget.open.Load() != idlePipesPerLoop {
		t.Fatalf("an idle pipe was not reused: %v, %d open", again, budget.open.Load())
	}
	pool.discard(again)
	if got := budget.open.Load(); got != idlePipesPerLoop-1 {
		t.Fatalf("after a discard %d open, want %d", got, idlePipesPerLoop-1)
	}
}
