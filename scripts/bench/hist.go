package main

import "math/bits"

// histogram records latencies in nanoseconds in log-linear buckets (as HDR
// histograms do): values below 128 exactly, above that 64 buckets per power
// of two, so any quantile is within 1/64 (1.6 %) of the true value. It is
// not safe for concurrent use: each receiver owns one and they are merged
// once the receivers have stopped, so the hot path is an increment without
// any shared cache line.
type histogram struct {
	counts [histBuckets]uint64
	n      uint64
	max    int64
}

const (
	histSubBits = 6
	histSub     = 1 << histSubBits // buckets per power of two
	// Up to 2^40 ns (18 minutes); larger values land in the last bucket.
	histBuckets = histSub * (40 - histSubBits + 1)
)

func histIndex(v int64) int {
	if v < 2*histSub {
		return int(max(v, 0))
	}
	e := bits.Len64(uint64(v)) - histSubBits - 1 // v>>e is in [64, 128)
	i := histSub*(e+1) + int(v>>e) - histSub
	return min(i, histBuckets-1)
}

// histValue returns the middle of bucket i.
func histValue(i int) int64 {
	if i < 2*histSub {
		return int64(i)
	}
	e := i/histSub - 1
	m := int64(i%histSub + histSub)
	return m<<e + (int64(1)<<e)/2
}

func (h *histogram) record(v int64) {
	h.counts[histIndex(v)]++
	h.n++
	if v > h.max {
		h.max = v
	}
}

func (h *histogram) merge(o *histogram) {
	for i, c := range o.counts {
		h.counts[i] += c
	}
	h.n += o.n
	h.max = max(h.max, o.max)
}

// quantile returns the value at quantile q (0 to 1); the exact maximum for 1.
func (h *histogram) quantile(q float64) int64 {
	if h.n == 0 {
		return 0
	}
	if q >= 1 {
		return h.max
	}
	rank := uint64(q*float64(h.n-1)) + 1 // 1-based rank of the sample
	var seen uint64
	for i, c := range h.counts {
		seen += c
		if seen >= rank {
			return min(histValue(i), h.max)
		}
	}
	return h.max
}
