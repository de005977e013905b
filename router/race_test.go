//go:build race

package router

// raceEnabled: the race detector makes sync.Pool drop items at random, so
// allocation bounds are looser under it.
const raceEnabled = true
