package webhooks

import (
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"sort"
	"strings"
	"unicode/utf8"
)

// Limits on a subscription's static headers (Subscription.Headers).
const (
	// MaxHeaders is how many static headers a subscription may have.
	MaxHeaders = 20
	// MaxHeaderNameBytes bounds one header name.
	MaxHeaderNameBytes = 256
	// MaxHeadersBytes bounds the static headers together: the sum of the
	// lengths of every name and value.
	MaxHeadersBytes = 8 << 10
)

// reservedHeaders are the headers the library sets on every delivery, or
// that govern the connection (hop-by-hop) or the body's encoding: a
// subscription's static headers cannot set them. Every name starting with
// "webhook-" is reserved as well. Keys are canonical.
var reservedHeaders = map[string]bool{
	"Accept-Encoding":     true,
	"Connection":          true,
	"Content-Encoding":    true,
	"Content-Length":      true,
	"Content-Type":        true,
	"Expect":              true,
	"Host":                true,
	"Keep-Alive":          true,
	"Proxy-Authenticate":  true,
	"Proxy-Authorization": true,
	"Proxy-Connection":    true,
	"Te":                  true,
	"Trailer":             true,
	"Transfer-Encoding":   true,
	"Upgrade":             true,
	"User-Agent":          true,
}

// canonicalHeaders checks static headers and returns them with canonical
// names, or the problems it found (sorted, each naming the header). A nil
// or empty map is valid and returned as nil. The input map is not changed.
func canonicalHeaders(h map[string]string) (map[string]string, []string) {
	if len(h) == 0 {
		return nil, nil
	}
	if len(h) > MaxHeaders {
		return nil, []string{fmt.Sprintf("%d headers; at most %d", len(h), MaxHeaders)}
	}
	names := make([]string, 0, len(h))
	for k := range h {
		names = append(names, k)
	}
	sort.Strings(names)
	var problems []string
	out := make(map[string]string, len(h))
	total := 0
	for _, name := range names {
		value := h[name]
		total += len(name) + len(value)
		q := quoteField(name)
		if d := headerNameProblem(name); d != "" {
			problems = append(problems, "header name "+q+" "+d)
			continue
		}
		canon := http.CanonicalHeaderKey(name)
		if reservedHeaders[canon] || strings.HasPrefix(canon, "Webhook-") {
			problems = append(problems, "header "+q+" is set by the library (or governs the connection) and cannot be overridden")
			continue
		}
		if _, dup := out[canon]; dup {
			problems = append(problems, "header "+q+" is given twice (header names are case-insensitive)")
			continue
		}
		if d := headerValueProblem(value); d != "" {
			problems = append(problems, "the value of header "+q+" "+d)
			continue
		}
		out[canon] = value
	}
	if total > MaxHeadersBytes {
		problems = append(problems, fmt.Sprintf("the headers' names and values add up to %d bytes; at most %d", total, MaxHeadersBytes))
	}
	if len(problems) > 0 {
		return nil, problems
	}
	return out, nil
}

// headerNameProblem says what is wrong with a header name, or "": it must
// be an RFC 9110 token of at most MaxHeaderNameBytes.
func headerNameProblem(name string) string {
	if name == "" || len(name) > MaxHeaderNameBytes {
		return fmt.Sprintf("must be 1 to %d bytes long", MaxHeaderNameBytes)
	}
	for i := 0; i < len(name); i++ {
		if !isTokenChar(name[i]) {
			return "must consist of letters, digits and !#$%&'*+-.^_`|~ only"
		}
	}
	return ""
}

// headerValueProblem says what is wrong with a header value, or "": valid
// UTF-8 without control characters other than tab (no CR, LF or NUL), and
// without leading or trailing white space, which HTTP would strip.
func headerValueProblem(v string) string {
	if !utf8.ValidString(v) {
		return "must be valid UTF-8"
	}
	if hasControl(strings.ReplaceAll(v, "\t", ""), false) {
		return "must not contain control characters (CR, LF and NUL included) other than tab"
	}
	if strings.TrimSpace(v) != v {
		return "must not begin or end with white space"
	}
	return ""
}

// isTokenChar reports the characters of an RFC 9110 token.
func isTokenChar(c byte) bool {
	switch {
	case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		return true
	}
	return strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0
}

// checkRateLimit says what is wrong with a rate limit, or "".
// MinRateLimit is the smallest RateLimit other than 0: one delivery an hour.
const MinRateLimit = 1.0 / 3600

func checkRateLimit(r float64) string {
	if math.IsNaN(r) || math.IsInf(r, 0) || r < 0 {
		return "must be a finite number of deliveries per second, at least 0 (0: no limit)"
	}
	if r > 0 && r < MinRateLimit {
		return fmt.Sprintf("must be 0 (no limit) or at least %g deliveries per second (one an hour)", MinRateLimit)
	}
	return ""
}

// decodeHeaders reads and checks the headers field: an object of strings.
func decodeHeaders(fields map[string]json.RawMessage, errs *fieldErrors) (map[string]string, bool) {
	hs, ok := decodeField[map[string]string](fields, "headers", "an object of strings", errs)
	if !ok {
		return nil, false
	}
	canon, problems := canonicalHeaders(hs)
	for _, d := range problems {
		errs.add("headers", d)
	}
	return canon, len(problems) == 0
}

// decodeRateLimit reads and checks the rateLimit field.
func decodeRateLimit(fields map[string]json.RawMessage, errs *fieldErrors) (float64, bool) {
	rl, ok := decodeField[float64](fields, "rateLimit", "a number", errs)
	if !ok {
		return 0, false
	}
	if d := checkRateLimit(rl); d != "" {
		errs.add("rateLimit", d)
		return 0, false
	}
	return rl, true
}
