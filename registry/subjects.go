package registry

import "strings"

// A pub/sub registration (docs/protocol.md §13) routes a publish by its
// event to the members whose subscriptions match it. Events are
// dot-separated tokens; a subscription may use "*" for one token and a final
// ">" for one or more, as NATS subjects do.

// MaxEventLen bounds an event name or a subscription, in bytes.
const MaxEventLen = 128

// ValidEvent reports whether s is an event a publish may name: 1–128 bytes
// of dot-separated, non-empty tokens of A-Z a-z 0-9 _ -.
func ValidEvent(s string) bool { return validSubject(s, false) }

// ValidPattern reports whether s is a subscription: an event whose tokens
// may also be "*", and whose last token may be ">".
func ValidPattern(s string) bool { return validSubject(s, true) }

func validSubject(s string, wildcards bool) bool {
	if len(s) == 0 || len(s) > MaxEventLen {
		return false
	}
	last := strings.Count(s, ".")
	i := 0
	for tok := range strings.SplitSeq(s, ".") {
		switch {
		case tok == "":
			return false
		case wildcards && tok == "*":
		case wildcards && tok == ">":
			if i != last {
				return false // ">" only at the end
			}
		default:
			for j := 0; j < len(tok); j++ {
				c := tok[j]
				if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '_' || c == '-') {
					return false
				}
			}
		}
		i++
	}
	return true
}

// subNode is one token of the subscription trie. A trie is immutable once
// published: a change copies the nodes on its path (and, of each, the one
// bucket of children it passes through, and the member list it changes)
// and publishes a new root, so that matching reads it without a lock, as
// fan-out reads the member snapshot.
type subNode struct {
	next children // literal tokens
	star *subNode // "*"
	// here are the members whose subscription ends at this node; rest
	// those whose subscription is this node's path followed by ">".
	here, rest []Member
}

// children are a node's literal branches, spread over buckets by a hash of
// the token so that a change copies one bucket, not every branch: a node
// with 10,000 branches (a token per device, say) costs a copy of about 300
// of them per subscribe, not 10,000.
type children struct {
	b *[childBuckets]map[string]*subNode // nil: none
}

const childBuckets = 32

func bucketOf(tok string) int {
	h := uint32(2166136261) // FNV-1a
	for i := 0; i < len(tok); i++ {
		h = (h ^ uint32(tok[i])) * 16777619
	}
	return int(h % childBuckets)
}

func (c children) get(tok string) *subNode {
	if c.b == nil {
		return nil
	}
	return c.b[bucketOf(tok)][tok]
}

func (c children) empty() bool {
	if c.b == nil {
		return true
	}
	for _, m := range c.b {
		if len(m) > 0 {
			return false
		}
	}
	return true
}

// with returns a copy of c with tok's branch set to n (nil: removed).
func (c children) with(tok string, n *subNode) children {
	var b [childBuckets]map[string]*subNode
	if c.b != nil {
		b = *c.b
	}
	i := bucketOf(tok)
	m := make(map[string]*subNode, len(b[i])+1)
	for k, v := range b[i] {
		m[k] = v
	}
	if n != nil {
		m[tok] = n
	} else {
		delete(m, tok)
	}
	b[i] = m
	return children{&b}
}

var emptyTrie = &subNode{}

// with returns a copy of the trie rooted at n with m subscribed to the
// pattern made of toks; n is not modified.
func (n *subNode) with(toks []string, m Member) *subNode {
	c := n.clone()
	switch {
	case len(toks) == 0:
		c.here = append(c.here[:len(c.here):len(c.here)], m)
	case toks[0] == ">":
		c.rest = append(c.rest[:len(c.rest):len(c.rest)], m)
	case toks[0] == "*":
		c.star = c.star.orEmpty().with(toks[1:], m)
	default:
		c.next = c.next.with(toks[0], c.next.get(toks[0]).orEmpty().with(toks[1:], m))
	}
	return c
}

// without returns a copy of the trie rooted at n with m's subscription to
// the pattern made of toks removed, and nil for a node left empty.
func (n *subNode) without(toks []string, m Member) *subNode {
	if n == nil {
		return nil
	}
	c := n.clone()
	switch {
	case len(toks) == 0:
		c.here = removeMember(c.here, m)
	case toks[0] == ">":
		c.rest = removeMember(c.rest, m)
	case toks[0] == "*":
		c.star = c.star.without(toks[1:], m)
	default:
		if child := n.next.get(toks[0]); child != nil {
			c.next = c.next.with(toks[0], child.without(toks[1:], m))
		}
	}
	if len(c.here) == 0 && len(c.rest) == 0 && c.star == nil && c.next.empty() {
		return nil
	}
	return c
}

func (n *subNode) orEmpty() *subNode {
	if n == nil {
		return emptyTrie
	}
	return n
}

func (n *subNode) clone() *subNode {
	if n == nil {
		return &subNode{}
	}
	c := *n
	return &c
}

// removeMember returns a new slice of ms without m.
func removeMember(ms []Member, m Member) []Member {
	out := make([]Member, 0, len(ms))
	for _, x := range ms {
		if x != m {
			out = append(out, x)
		}
	}
	if len(out) == 0 {
		return nil
	}
	return out
}

// match returns the members with a subscription that matches the literal
// event, each once. When a single list of the trie holds them all (the
// common case: one subscription per member to that event), that list is
// returned as is, unallocated; it must not be modified.
func (n *subNode) match(event string) []Member {
	var lists [][]Member
	var walk func(n *subNode, rest string)
	walk = func(n *subNode, rest string) {
		if n == nil {
			return
		}
		if rest == "" {
			if len(n.here) > 0 {
				lists = append(lists, n.here)
			}
			return
		}
		// ">" takes what is left, one token or more.
		if len(n.rest) > 0 {
			lists = append(lists, n.rest)
		}
		tok, more, found := strings.Cut(rest, ".")
		if !found {
			more = ""
		}
		walk(n.next.get(tok), more)
		walk(n.star, more)
	}
	walk(n, event)
	switch len(lists) {
	case 0:
		return nil
	case 1:
		return lists[0]
	}
	total := 0
	for _, l := range lists {
		total += len(l)
	}
	seen := make(map[Member]struct{}, total)
	out := make([]Member, 0, total)
	for _, l := range lists {
		for _, m := range l {
			if _, dup := seen[m]; !dup {
				seen[m] = struct{}{}
				out = append(out, m)
			}
		}
	}
	return out
}
