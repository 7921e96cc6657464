package ssrf

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"strings"
	"testing"
)

// mapResolver resolves names from a fixed table, without DNS.
type mapResolver map[string][]string

func (m mapResolver) LookupNetIP(_ context.Context, network, host string) ([]netip.Addr, error) {
	if network != "ip" {
		return nil, errors.New("unexpected network " + network)
	}
	addrs, ok := m[host]
	if !ok {
		return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
	}
	var out []netip.Addr
	for _, a := range addrs {
		out = append(out, netip.MustParseAddr(a))
	}
	return out, nil
}

var testResolver = mapResolver{
	"public.example":      {"93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"},
	"rebind.example":      {"93.184.216.34", "10.0.0.1"},
	"metadata.example":    {"169.254.169.254"},
	"mapped.example":      {"::ffff:127.0.0.1"},
	"nat64.example":       {"64:ff9b::c0a8:101"},
	"empty.example":       {},
	"loopback6.example":   {"::1"},
	"under_score.example": {"1.1.1.1"},
}

func TestSSRFParseIPv4(t *testing.T) {
	cases := []struct {
		in   string
		want string // "" means not an IPv4 address
	}{
		{"127.0.0.1", "127.0.0.1"},
		{"127.1", "127.0.0.1"},
		{"127.0.1", "127.0.0.1"},
		{"2130706433", "127.0.0.1"},
		{"0x7f000001", "127.0.0.1"},
		{"0X7F000001", "127.0.0.1"},
		{"0x7f.0.0.1", "127.0.0.1"},
		{"0x7f.1", "127.0.0.1"},
		{"0177.0.0.1", "127.0.0.1"},
		{"017700000001", "127.0.0.1"},
		{"0177.1", "127.0.0.1"},
		{"127.0.0.1.", "127.0.0.1"},
		{"0", "0.0.0.0"},
		{"0x", "0.0.0.0"},
		{"00", "0.0.0.0"},
		{"012.0.0.1", "10.0.0.1"},
		{"167772161", "10.0.0.1"},
		{"0xa9fea9fe", "169.254.169.254"},
		{"2852039166", "169.254.169.254"},
		{"169.254.43518", "169.254.169.254"},
		{"169.16689662", "169.254.169.254"},
		{"1.1", "1.0.0.1"},
		{"4294967295", "255.255.255.255"},
		{"0xffffffff", "255.255.255.255"},
		{"037777777777", "255.255.255.255"},
		{"1.2.65535", "1.2.255.255"},
		{"1.16777215", "1.255.255.255"},
		{"4294967296", ""},
		{"0x100000000", ""},
		{"1.2.65536", ""},
		{"1.16777216", ""},
		{"256.0.0.1", ""},
		{"1.2.3.256", ""},
		{"1.2.3.4.5", ""},
		{"08", ""},
		{"0x1g", ""},
		{"1..2", ""},
		{".1.2.3", ""},
		{"", ""},
		{".", ""},
		{"-1", ""},
		{"+1", ""},
		{"1.2.3.4..", ""},
		{"example.com", ""},
		{"99999999999999999999999", ""},
	}
	for _, c := range cases {
		a, ok := ParseIPv4(c.in)
		got := ""
		if ok {
			got = a.String()
		}
		if got != c.want {
			t.Errorf("ParseIPv4(%q) = %q, want %q", c.in, got, c.want)
		}
	}
}

func TestSSRFCheckHostRefusesEverySpelling(t *testing.T) {
	var p Policy
	forbidden := []string{
		// loopback
		"127.0.0.1", "127.1", "127.0.1", "2130706433", "0x7f000001", "0x7f.0.0.1", "0x7F.1",
		"0177.0.0.1", "017700000001", "127.0.0.1.", "127.255.255.254",
		"localhost", "LOCALHOST", "localhost.", "api.localhost", "A.LocalHost.",
		"[::1]", "::1", "[0:0:0:0:0:0:0:1]", "[::ffff:127.0.0.1]", "[::FFFF:7f00:1]", "[0:0:0:0:0:ffff:7f00:0001]",
		"[::127.0.0.1]", "[::7f00:1]", "[64:ff9b::127.0.0.1]", "[64:ff9b::7f00:1]",
		// private
		"10.0.0.1", "012.0.0.1", "0xa.0.0.1", "167772161", "10.255.255.255",
		"172.16.0.1", "172.31.255.255", "0xac.0x10.0.1", "192.168.1.1", "0xc0a80101", "3232235777",
		"[::ffff:10.0.0.1]", "[::ffff:192.168.0.1]", "[64:ff9b::192.168.1.1]", "[64:ff9b::a00:1]",
		"[fc00::1]", "[fd12:3456:789a::1]",
		// link-local and metadata
		"169.254.169.254", "0xa9fea9fe", "2852039166", "0251.0376.0251.0376", "169.254.43518",
		"[::ffff:169.254.169.254]", "[fe80::1]", "[febf::1]",
		// CGNAT
		"100.64.0.1", "100.127.255.255",
		// multicast, broadcast, unspecified, reserved
		"224.0.0.1", "239.255.255.250", "[ff02::1]", "[ff05::2]", "255.255.255.255", "4294967295",
		"0.0.0.0", "0", "0x0", "0.0.0.0.", "[::]", "0.1.2.3",
		"240.0.0.1", "250.1.2.3",
		"192.0.0.1", "192.0.0.170", "198.18.0.1", "198.19.255.255", "192.88.99.1",
		"192.0.2.1", "198.51.100.1", "203.0.113.1",
		"[2001:db8::1]", "[3fff::1]", "[2002:7f00:1::1]", "[2001::1]", "[2001:2::1]",
		"[fec0::1]", "[100::1]", "[::ffff:0:7f00:1]", "[64:ff9b:1::1]",
		// names resolving to forbidden addresses
		"rebind.example", "metadata.example", "mapped.example", "nat64.example", "loopback6.example",
	}
	for _, h := range forbidden {
		err := p.CheckHost(context.Background(), testResolver, h)
		if !errors.Is(err, ErrForbidden) {
			t.Errorf("CheckHost(%q) = %v, want ErrForbidden", h, err)
		}
	}
}

func TestSSRFCheckHostAllowsPublic(t *testing.T) {
	var p Policy
	for _, h := range []string{
		"8.8.8.8", "1.1.1.1", "0x08080808", "134744072", "1.1", "8.8.8.8.",
		"100.63.255.255", "100.128.0.0", "172.15.255.255", "172.32.0.1", "192.169.0.1", "169.253.0.1",
		"11.0.0.1", "198.17.255.255", "198.20.0.1", "223.255.255.255", "192.0.1.1",
		"[2606:4700:4700::1111]", "[64:ff9b::808:808]", "[::ffff:8.8.8.8]", "[2001:200::1]",
		"public.example", "PUBLIC.EXAMPLE.", "under_score.example",
	} {
		if err := p.CheckHost(context.Background(), testResolver, h); err != nil {
			t.Errorf("CheckHost(%q) = %v, want nil", h, err)
		}
	}
}

func TestSSRFCheckHostInvalid(t *testing.T) {
	var p Policy
	for _, h := range []string{
		"", "1.2.3.4.5", "256.0.0.1", "127.0.0.08", "09", "4294967296", "example.123", "example.0x1f",
		"a..b", ".example.com", "-a.example", "a-.example", "exa mple.com", "ex\x00ample.com", "éxample.com",
		"[1.2.3.4]", "[::1%25eth0]", "[fe80::1%eth0]", "fe80::1%eth0", "[::1", "::ffff:0177.0.0.1",
		"a/b", "a@b", strings.Repeat("a", 64) + ".example", strings.Repeat("a.", 127) + "aa",
	} {
		err := p.CheckHost(context.Background(), testResolver, h)
		if !errors.Is(err, ErrInvalidHost) {
			t.Errorf("CheckHost(%q) = %v, want ErrInvalidHost", h, err)
		}
	}
}

func TestSSRFNameErrorHidesTheAddress(t *testing.T) {
	err := Policy{}.CheckHost(context.Background(), testResolver, "rebind.example")
	var ne *NameError
	if !errors.As(err, &ne) || !errors.Is(err, ErrForbidden) || ne.Host != "rebind.example" || ne.Addr.Addr != netip.MustParseAddr("10.0.0.1") {
		t.Fatalf("error %#v", err)
	}
	if strings.Contains(err.Error(), "10.0.0.1") || !strings.Contains(err.Error(), "rebind.example") {
		t.Fatalf("message %q", err.Error())
	}
}

func TestSSRFCheckHostResolveErrors(t *testing.T) {
	var p Policy
	for _, h := range []string{"nxdomain.example", "empty.example"} {
		if err := p.CheckHost(context.Background(), testResolver, h); !errors.Is(err, ErrResolve) {
			t.Errorf("CheckHost(%q) = %v, want ErrResolve", h, err)
		}
	}
}

func TestSSRFCheckHostAllowlist(t *testing.T) {
	p := Policy{Allowed: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("10.1.0.0/16")}}
	for _, h := range []string{"127.0.0.1", "127.1", "2130706433", "[::ffff:127.0.0.1]", "10.1.2.3", "mapped.example"} {
		if err := p.CheckHost(context.Background(), testResolver, h); err != nil {
			t.Errorf("allowlisted CheckHost(%q) = %v", h, err)
		}
	}
	// Outside the allowlist, everything else still holds: ::1 is not in
	// 127.0.0.0/8, so "localhost" (127.0.0.1 and ::1) stays refused.
	for _, h := range []string{"10.0.0.1", "[::1]", "localhost", "169.254.169.254", "rebind.example"} {
		if err := p.CheckHost(context.Background(), testResolver, h); !errors.Is(err, ErrForbidden) {
			t.Errorf("allowlisted CheckHost(%q) = %v, want ErrForbidden", h, err)
		}
	}
	p.Allowed = append(p.Allowed, netip.MustParsePrefix("::1/128"))
	if err := p.CheckHost(context.Background(), testResolver, "localhost"); err != nil {
		t.Errorf("localhost with 127.0.0.0/8 and ::1 allowed: %v", err)
	}
}

// TestCheckAddrAgreesWithNetip checks the policy against netip's own
// classification over a sweep of the IPv4 space and its IPv6 forms.
func TestSSRFCheckAddrAgreesWithNetip(t *testing.T) {
	var p Policy
	for hi := 0; hi < 256; hi++ {
		for _, lo := range []byte{0, 1, 64, 127, 128, 169, 254, 255} {
			a := netip.AddrFrom4([4]byte{byte(hi), lo, lo, 1})
			mustRefuse := a.IsLoopback() || a.IsPrivate() || a.IsLinkLocalUnicast() || a.IsMulticast() ||
				a.IsUnspecified() || hi == 0 || hi >= 240
			err4 := p.CheckAddr(a)
			if mustRefuse && err4 == nil {
				t.Errorf("CheckAddr(%s) allowed it", a)
			}
			mapped := netip.AddrFrom16(a.As16())
			if err6 := p.CheckAddr(mapped); (err6 == nil) != (err4 == nil) {
				t.Errorf("CheckAddr(%s) = %v but CheckAddr(%s) = %v", a, err4, mapped, err6)
			}
			b := a.As4()
			compat := netip.AddrFrom16([16]byte{12: b[0], 13: b[1], 14: b[2], 15: b[3]})
			if p.CheckAddr(compat) == nil {
				t.Errorf("IPv4-compatible %s allowed", compat)
			}
		}
	}
}

func TestSSRFAddrErrorMessage(t *testing.T) {
	err := Policy{}.CheckAddr(netip.MustParseAddr("169.254.169.254"))
	var ae *AddrError
	if !errors.As(err, &ae) || !strings.Contains(err.Error(), "169.254.169.254") || !strings.Contains(err.Error(), "link-local") {
		t.Fatalf("error %v", err)
	}
	err = Policy{}.CheckAddr(netip.MustParseAddr("64:ff9b::a00:1"))
	if !strings.Contains(err.Error(), "10.0.0.1") || !strings.Contains(err.Error(), "private") {
		t.Fatalf("NAT64 error %v", err)
	}
}

// TestControlRefusesDialToLoopback dials a real local listener through a
// net.Dialer whose Control is the policy's.
func TestSSRFControlRefusesDialToLoopback(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			c.Close()
		}
		accepted <- err
	}()
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	ctx := context.Background()

	refusing := &net.Dialer{Control: Policy{}.Control}
	for _, addr := range []string{ln.Addr().String(), net.JoinHostPort("localhost", port)} {
		c, err := refusing.DialContext(ctx, "tcp", addr)
		if err == nil {
			c.Close()
			t.Fatalf("dial to %s was allowed", addr)
		}
		if !errors.Is(err, ErrForbidden) {
			t.Fatalf("dial to %s: %v, want ErrForbidden", addr, err)
		}
	}
	select {
	case err := <-accepted:
		t.Fatalf("the listener accepted a connection (%v) although every dial was refused", err)
	default:
	}

	allowing := &net.Dialer{Control: Policy{Allowed: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}}.Control}
	c, err := allowing.DialContext(ctx, "tcp4", ln.Addr().String())
	if err != nil {
		t.Fatalf("allowlisted dial: %v", err)
	}
	c.Close()
	if err := <-accepted; err != nil {
		t.Fatalf("accept: %v", err)
	}
}

func TestSSRFControlRejectsUnparsableAddress(t *testing.T) {
	if err := (Policy{}).Control("tcp", "example.com:443", nil); !errors.Is(err, ErrForbidden) {
		t.Fatalf("Control on a name: %v", err)
	}
	if err := (Policy{}).Control("tcp", "93.184.216.34:443", nil); err != nil {
		t.Fatalf("Control on a public address: %v", err)
	}
	if err := (Policy{}).Control("tcp6", "[::ffff:10.0.0.1]:443", nil); !errors.Is(err, ErrForbidden) {
		t.Fatalf("Control on a mapped private address: %v", err)
	}
}

// FuzzParseIPv4 checks that the parser never panics and that whatever it
// returns round-trips through the canonical dotted form.
func FuzzSSRFParseIPv4(f *testing.F) {
	for _, s := range []string{"127.0.0.1", "127.1", "0x7f000001", "0177.0.0.1", "2130706433", "1.2.3.4.5", "0x", "08", "4294967296", "1.2.65535"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		a, ok := ParseIPv4(s)
		if !ok {
			return
		}
		if !a.Is4() {
			t.Fatalf("ParseIPv4(%q) = %s, not IPv4", s, a)
		}
		b, ok := ParseIPv4(a.String())
		if !ok || b != a {
			t.Fatalf("ParseIPv4(%q) = %s, which reparses as %s %v", s, a, b, ok)
		}
		if netip.MustParseAddr(a.String()) != a {
			t.Fatalf("netip disagrees on %s", a)
		}
		if !endsInNumber(strings.ToLower(strings.TrimSuffix(s, "."))) {
			t.Fatalf("ParseIPv4 accepted %q, which does not end in a number", s)
		}
	})
}
