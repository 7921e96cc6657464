// Package ssrf decides which network addresses a server may send requests to
// on behalf of untrusted users, so that a webhook callback URL cannot make the
// server reach into its own network (server-side request forgery).
//
// A [Policy] refuses every address that is not public unicast: loopback,
// private (RFC 1918, unique local fc00::/7), link-local (169.254.0.0/16 with
// the cloud metadata address 169.254.169.254, fe80::/10), shared CGNAT space
// (100.64.0.0/10), multicast, unspecified, broadcast and the reserved,
// benchmarking and documentation ranges, unless an explicit allowlist permits
// it. IPv6 is judged by allowlist too: only global unicast (2000::/3, less its
// special-purpose blocks) passes, and the IPv6 forms that embed an IPv4
// address (IPv4-mapped ::ffff:a.b.c.d, IPv4-compatible ::a.b.c.d, NAT64
// 64:ff9b::/96) are judged by the IPv4 address they carry, or refused.
//
// Host names are judged in every spelling an operating system might accept:
// [ParseIPv4] reads numbers the way inet_aton(3) and the WHATWG URL standard
// do (2130706433, 0x7f000001, 0177.0.0.1, 127.1), so anything that some
// resolver could treat as an IP address is judged as that address, and a name
// whose last label is numeric but is no valid address is refused.
//
// Checking a URL when it is registered is not enough: a name can resolve to a
// public address then and to a private one later (DNS rebinding). Install
// [Policy.Control] as the net.Dialer's Control function of the HTTP client
// that sends the requests, so every connection is checked on the address it
// actually dials.
package ssrf

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"syscall"
)

// Errors. Returned errors wrap one of these; test with errors.Is.
var (
	// ErrForbidden reports an address (or a name resolving to one) that the
	// policy does not allow.
	ErrForbidden = errors.New("ssrf: address not allowed")
	// ErrInvalidHost reports a host that is neither a valid IP address nor
	// a valid DNS name, including names that look numeric but are no valid
	// address.
	ErrInvalidHost = errors.New("ssrf: invalid host")
	// ErrResolve reports a name that could not be resolved, or resolved to
	// no address.
	ErrResolve = errors.New("ssrf: host does not resolve")
)

// Resolver looks up the addresses of a name; *net.Resolver implements it.
type Resolver interface {
	LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error)
}

// Policy is the rule for outbound addresses. The zero value allows public
// unicast addresses only.
type Policy struct {
	// Allowed lists networks that are allowed even though they are not
	// public, for example 127.0.0.0/8 in tests or 10.20.0.0/16 for a
	// trusted internal service. An IPv4 prefix also covers the IPv4-mapped
	// IPv6 form of its addresses.
	Allowed []netip.Prefix
}

// AddrError is the error for a refused address; it wraps ErrForbidden.
type AddrError struct {
	Addr   netip.Addr
	Reason string // e.g. "a loopback address"
}

func (e *AddrError) Error() string {
	return fmt.Sprintf("ssrf: %s is %s", e.Addr, e.Reason)
}

func (e *AddrError) Unwrap() error { return ErrForbidden }

type special struct {
	prefix netip.Prefix
	reason string
}

func sp(p, reason string) special { return special{netip.MustParsePrefix(p), reason} }

// forbidden4 lists the IPv4 ranges that are not public unicast (IANA IPv4
// Special-Purpose Address Registry and more).
var forbidden4 = []special{
	sp("0.0.0.0/8", `in "this network" (0.0.0.0/8)`),
	sp("10.0.0.0/8", "a private address (RFC 1918)"),
	sp("100.64.0.0/10", "a shared CGNAT address (RFC 6598)"),
	sp("127.0.0.0/8", "a loopback address"),
	sp("169.254.0.0/16", "a link-local address (cloud metadata services live here)"),
	sp("172.16.0.0/12", "a private address (RFC 1918)"),
	sp("192.0.0.0/24", "an IETF protocol assignment address (192.0.0.0/24)"),
	sp("192.0.2.0/24", "a documentation address (TEST-NET-1)"),
	sp("192.88.99.0/24", "a 6to4 relay anycast address (deprecated)"),
	sp("192.168.0.0/16", "a private address (RFC 1918)"),
	sp("198.18.0.0/15", "a benchmarking address (RFC 2544)"),
	sp("198.51.100.0/24", "a documentation address (TEST-NET-2)"),
	sp("203.0.113.0/24", "a documentation address (TEST-NET-3)"),
	sp("224.0.0.0/4", "a multicast address"),
	sp("255.255.255.255/32", "the broadcast address"),
	sp("240.0.0.0/4", "a reserved address (240.0.0.0/4)"),
}

// globalUnicast6 is the only IPv6 space that is public unicast; inside it,
// forbidden6 lists special-purpose blocks.
var globalUnicast6 = netip.MustParsePrefix("2000::/3")

var forbidden6 = []special{
	sp("2001:db8::/32", "a documentation address (2001:db8::/32)"),
	sp("2001::/23", "an IETF protocol assignment address (Teredo, benchmarking, ORCHID)"),
	sp("2002::/16", "a 6to4 address (deprecated; it embeds an IPv4 address)"),
	sp("3fff::/20", "a documentation address (3fff::/20)"),
}

var (
	nat64WellKnown = netip.MustParsePrefix("64:ff9b::/96")
	v4Compatible   = netip.MustParsePrefix("::/96")
)

// CheckAddr returns nil when a may be connected to, or an *AddrError
// wrapping ErrForbidden.
func (p Policy) CheckAddr(a netip.Addr) error {
	if !a.IsValid() {
		return &AddrError{Addr: a, Reason: "not a valid address"}
	}
	if a.Zone() != "" {
		return &AddrError{Addr: a, Reason: "an address with an IPv6 zone"}
	}
	// Judge an IPv4-mapped address as the IPv4 address the kernel will
	// actually connect to.
	a = a.Unmap()
	if p.allowed(a) {
		return nil
	}
	if a.Is4() {
		for _, s := range forbidden4 {
			if s.prefix.Contains(a) {
				return &AddrError{Addr: a, Reason: s.reason}
			}
		}
		return nil
	}
	switch {
	case a.IsUnspecified():
		return &AddrError{Addr: a, Reason: "the unspecified address"}
	case a.IsLoopback():
		return &AddrError{Addr: a, Reason: "a loopback address"}
	case a.IsLinkLocalUnicast():
		return &AddrError{Addr: a, Reason: "a link-local address"}
	case a.IsMulticast():
		return &AddrError{Addr: a, Reason: "a multicast address"}
	case a.IsPrivate():
		return &AddrError{Addr: a, Reason: "a unique local (private) address"}
	case nat64WellKnown.Contains(a):
		// NAT64 translates to the embedded IPv4 address: judge that one.
		b := a.As16()
		v4 := netip.AddrFrom4([4]byte{b[12], b[13], b[14], b[15]})
		if err := p.CheckAddr(v4); err != nil {
			reason := "a forbidden address"
			var ae *AddrError
			if errors.As(err, &ae) {
				reason = ae.Reason
			}
			return &AddrError{Addr: a, Reason: "a NAT64 address embedding " + v4.String() + ", " + reason}
		}
		return nil
	case v4Compatible.Contains(a):
		return &AddrError{Addr: a, Reason: "an IPv4-compatible IPv6 address (deprecated; it embeds an IPv4 address)"}
	case !globalUnicast6.Contains(a):
		return &AddrError{Addr: a, Reason: "not a global unicast IPv6 address"}
	}
	for _, s := range forbidden6 {
		if s.prefix.Contains(a) {
			return &AddrError{Addr: a, Reason: s.reason}
		}
	}
	return nil
}

func (p Policy) allowed(a netip.Addr) bool {
	for _, pre := range p.Allowed {
		if pre.Contains(a) {
			return true
		}
	}
	return false
}

// CheckHost judges a URL host (without port or brackets): an IP address in
// any spelling is checked as that address; "localhost" and names below
// ".localhost" are checked as the loopback addresses 127.0.0.1 and ::1; any
// other name is resolved with r (nil means net.DefaultResolver) and every
// address it resolves to must be allowed.
//
// The name's addresses can change after this check; enforce the policy at
// dial time too with Control.
func (p Policy) CheckHost(ctx context.Context, r Resolver, host string) error {
	h, addr, isAddr, err := Normalize(host)
	if err != nil {
		return err
	}
	if isAddr {
		return p.CheckAddr(addr)
	}
	if h == "localhost" || strings.HasSuffix(h, ".localhost") {
		for _, a := range []netip.Addr{netip.AddrFrom4([4]byte{127, 0, 0, 1}), netip.IPv6Loopback()} {
			if err := p.CheckAddr(a); err != nil {
				return fmt.Errorf("%w (%q is a loopback name)", err, h)
			}
		}
		return nil
	}
	if r == nil {
		r = net.DefaultResolver
	}
	addrs, err := r.LookupNetIP(ctx, "ip", h)
	if err != nil {
		var dnsErr *net.DNSError
		if errors.As(err, &dnsErr) && dnsErr.IsNotFound {
			return fmt.Errorf("%w: %q: no such host", ErrResolve, h)
		}
		return fmt.Errorf("%w: %q: lookup failed", ErrResolve, h)
	}
	if len(addrs) == 0 {
		return fmt.Errorf("%w: %q has no address", ErrResolve, h)
	}
	for _, a := range addrs {
		if err := p.CheckAddr(a); err != nil {
			var ae *AddrError
			errors.As(err, &ae)
			return &NameError{Host: h, Addr: ae}
		}
	}
	return nil
}

// NameError is the error for a name that resolves to a refused address; it
// wraps that address's *AddrError (and so ErrForbidden). Its message does
// not show the address, so that answering with it does not reveal what
// internal names resolve to; log Addr instead.
type NameError struct {
	Host string
	Addr *AddrError
}

func (e *NameError) Error() string {
	return fmt.Sprintf("ssrf: %q resolves to a non-public address", e.Host)
}

func (e *NameError) Unwrap() error { return e.Addr }

// Normalize reads a URL host (without port; IPv6 literals with or without
// brackets). It returns the lower-cased name without its trailing dot, and,
// when the host is an IP address in any spelling inet_aton(3), the WHATWG URL
// standard or an IPv6 parser accepts, that address with isAddr set. A host
// that is not a valid name, or whose last label is numeric but that is no
// valid IPv4 address, returns an error wrapping ErrInvalidHost.
func Normalize(host string) (name string, addr netip.Addr, isAddr bool, err error) {
	if host == "" {
		return "", netip.Addr{}, false, fmt.Errorf("%w: empty host", ErrInvalidHost)
	}
	if len(host) > 255 {
		return "", netip.Addr{}, false, fmt.Errorf("%w: host longer than 255 bytes", ErrInvalidHost)
	}
	h := host
	if strings.HasPrefix(h, "[") && strings.HasSuffix(h, "]") {
		h = h[1 : len(h)-1]
		if !strings.Contains(h, ":") {
			return "", netip.Addr{}, false, fmt.Errorf("%w: brackets around a non-IPv6 host", ErrInvalidHost)
		}
	}
	if strings.Contains(h, ":") {
		if strings.Contains(h, "%") {
			return "", netip.Addr{}, false, fmt.Errorf("%w: IPv6 zones are not allowed", ErrInvalidHost)
		}
		a, perr := netip.ParseAddr(h)
		if perr != nil {
			return "", netip.Addr{}, false, fmt.Errorf("%w: malformed IPv6 address", ErrInvalidHost)
		}
		return a.String(), a, true, nil
	}
	for i := 0; i < len(h); i++ {
		if c := h[i]; c < 0x21 || c > 0x7e {
			return "", netip.Addr{}, false, fmt.Errorf("%w: host contains a control, space or non-ASCII character (use the punycode form of international names)", ErrInvalidHost)
		}
	}
	h = strings.ToLower(h)
	// A fully-qualified name may end in one dot; resolvers and WHATWG
	// ignore it ("127.0.0.1." is 127.0.0.1).
	h = strings.TrimSuffix(h, ".")
	if a, ok := ParseIPv4(h); ok {
		return a.String(), a, true, nil
	}
	if endsInNumber(h) {
		return "", netip.Addr{}, false, fmt.Errorf("%w: %q looks like an IPv4 address but is not a valid one", ErrInvalidHost, h)
	}
	if len(h) > 253 {
		return "", netip.Addr{}, false, fmt.Errorf("%w: name longer than 253 bytes", ErrInvalidHost)
	}
	for _, label := range strings.Split(h, ".") {
		if label == "" {
			return "", netip.Addr{}, false, fmt.Errorf("%w: %q has an empty label", ErrInvalidHost, h)
		}
		if len(label) > 63 {
			return "", netip.Addr{}, false, fmt.Errorf("%w: a label of %q is longer than 63 bytes", ErrInvalidHost, h)
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return "", netip.Addr{}, false, fmt.Errorf("%w: %q: character %q not allowed in a host name", ErrInvalidHost, h, rune(c))
			}
		}
		if label[0] == '-' || label[len(label)-1] == '-' {
			return "", netip.Addr{}, false, fmt.Errorf("%w: %q: a label starts or ends with '-'", ErrInvalidHost, h)
		}
	}
	return h, netip.Addr{}, false, nil
}

// ParseIPv4 parses s as inet_aton(3) and the WHATWG URL standard's IPv4
// parser do: one to four dot-separated numbers, each decimal, octal (leading
// 0) or hexadecimal (leading 0x, digits optional); all but the last are one
// byte each and the last fills the remaining bytes, so "127.1" is 127.0.0.1
// and "2130706433" is 127.0.0.1. A single trailing dot is accepted.
func ParseIPv4(s string) (netip.Addr, bool) {
	s = strings.TrimSuffix(s, ".")
	if s == "" {
		return netip.Addr{}, false
	}
	parts := strings.Split(s, ".")
	if len(parts) > 4 {
		return netip.Addr{}, false
	}
	var vals [4]uint64
	for i, p := range parts {
		v, ok := parseIPv4Number(p)
		if !ok {
			return netip.Addr{}, false
		}
		vals[i] = v
	}
	n := len(parts)
	for i := 0; i < n-1; i++ {
		if vals[i] > 255 {
			return netip.Addr{}, false
		}
	}
	last := vals[n-1]
	if last >= uint64(1)<<(8*(5-n)) {
		return netip.Addr{}, false
	}
	var v uint64
	for i := 0; i < n-1; i++ {
		v |= vals[i] << (8 * (3 - i))
	}
	v |= last
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}), true
}

// parseIPv4Number parses one part of an IPv4 address: decimal, octal with a
// leading 0, or hexadecimal with a leading 0x (an empty "0x" is 0). Values
// above 2^32-1 fail.
func parseIPv4Number(p string) (uint64, bool) {
	if p == "" {
		return 0, false
	}
	base := uint64(10)
	switch {
	case len(p) >= 2 && p[0] == '0' && (p[1] == 'x' || p[1] == 'X'):
		base, p = 16, p[2:]
	case len(p) >= 2 && p[0] == '0':
		base, p = 8, p[1:]
	}
	var v uint64
	for i := 0; i < len(p); i++ {
		d, ok := digitValue(p[i])
		if !ok || d >= base {
			return 0, false
		}
		v = v*base + d
		if v > 0xffffffff {
			return 0, false
		}
	}
	return v, true
}

func digitValue(c byte) (uint64, bool) {
	switch {
	case c >= '0' && c <= '9':
		return uint64(c - '0'), true
	case c >= 'a' && c <= 'f':
		return uint64(c-'a') + 10, true
	case c >= 'A' && c <= 'F':
		return uint64(c-'A') + 10, true
	}
	return 0, false
}

// endsInNumber reports whether the last label of a lower-cased host (without
// trailing dot) is all decimal digits or "0x" followed by hex digits: the
// WHATWG test for hosts that must be parsed as IPv4.
func endsInNumber(h string) bool {
	last := h
	if i := strings.LastIndexByte(h, '.'); i >= 0 {
		last = h[i+1:]
	}
	if last == "" {
		return false
	}
	if strings.HasPrefix(last, "0x") {
		for i := 2; i < len(last); i++ {
			if _, ok := digitValue(last[i]); !ok {
				return false
			}
		}
		return true
	}
	for i := 0; i < len(last); i++ {
		if last[i] < '0' || last[i] > '9' {
			return false
		}
	}
	return true
}

// Control checks the address a connection is about to be made to; install
// it as net.Dialer.Control (its signature matches) in the HTTP client that
// sends requests to untrusted URLs. address is the resolved "ip:port" the
// dialer connects to, so a name that now resolves to a forbidden address
// (DNS rebinding) is refused, whatever it resolved to when it was checked.
//
// Beware of proxies: through an HTTP proxy the dialed address is the
// proxy's, which this policy then judges instead of the destination.
func (p Policy) Control(network, address string, _ syscall.RawConn) error {
	ap, err := netip.ParseAddrPort(address)
	if err != nil {
		return fmt.Errorf("%w: %s dial to %q: not an IP address and port", ErrForbidden, network, address)
	}
	if err := p.CheckAddr(ap.Addr()); err != nil {
		return fmt.Errorf("%s dial refused: %w", network, err)
	}
	return nil
}
