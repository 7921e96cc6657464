package webhooks

import (
	"database/sql"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"gopkg.in/yaml.v3"
)

// The OpenAPI conformance test: openapi.yaml describes exactly the routes of
// the handler, and every response the handler gives in a scenario that
// exercises every route, on its success and error paths, matches the
// description (documented status code, content type, required headers,
// required properties, no undocumented properties, JSON types).

// openAPISpec is a loaded openapi.yaml.
type openAPISpec struct {
	t   testing.TB
	doc map[string]any
}

func loadSpec(t testing.TB) *openAPISpec {
	t.Helper()
	b, err := os.ReadFile("openapi.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var doc map[string]any
	if err := yaml.Unmarshal(b, &doc); err != nil {
		t.Fatalf("openapi.yaml: %v", err)
	}
	if v, _ := doc["openapi"].(string); !strings.HasPrefix(v, "3.1.") {
		t.Fatalf("openapi.yaml declares OpenAPI %q, want 3.1.x", v)
	}
	return &openAPISpec{t: t, doc: doc}
}

func specMap(v any) map[string]any { m, _ := v.(map[string]any); return m }

// resolve follows $ref (local references only) until a node without one.
func (s *openAPISpec) resolve(node map[string]any) map[string]any {
	s.t.Helper()
	for i := 0; node != nil; i++ {
		ref, ok := node["$ref"].(string)
		if !ok {
			return node
		}
		if i > 20 {
			s.t.Fatalf("$ref loop at %s", ref)
		}
		node = s.pointer(ref)
	}
	return node
}

func (s *openAPISpec) pointer(ref string) map[string]any {
	s.t.Helper()
	path, ok := strings.CutPrefix(ref, "#/")
	if !ok {
		s.t.Fatalf("non-local $ref %q", ref)
	}
	var node any = s.doc
	for _, part := range strings.Split(path, "/") {
		part = strings.ReplaceAll(strings.ReplaceAll(part, "~1", "/"), "~0", "~")
		node = specMap(node)[part]
	}
	m := specMap(node)
	if m == nil {
		s.t.Fatalf("$ref %q resolves to nothing", ref)
	}
	return m
}

// operation returns the operation of a path template and method, or nil.
func (s *openAPISpec) operation(template, method string) map[string]any {
	return specMap(specMap(specMap(s.doc["paths"])[template])[strings.ToLower(method)])
}

// checkValue reports how v fails schema: wrong JSON type or enum value,
// missing required property, undocumented property, malformed date-time.
func (s *openAPISpec) checkValue(where string, schema map[string]any, v any) []string {
	schema = s.resolve(schema)
	if schema == nil {
		return nil
	}
	var errs []string
	for _, sub := range specSlice(schema["allOf"]) {
		errs = append(errs, s.checkValue(where, specMap(sub), v)...)
	}
	if types := schemaTypes(schema["type"]); len(types) > 0 && !types[jsonKindOf(v)] &&
		!(jsonKindOf(v) == "integer" && types["number"]) {
		return append(errs, fmt.Sprintf("%s: %s, want %v", where, jsonKindOf(v), schema["type"]))
	}
	if enum := specSlice(schema["enum"]); enum != nil {
		found := false
		for _, e := range enum {
			found = found || fmt.Sprint(e) == fmt.Sprint(v)
		}
		if !found {
			errs = append(errs, fmt.Sprintf("%s: %v is not one of %v", where, v, enum))
		}
	}
	switch v := v.(type) {
	case map[string]any:
		props := specMap(schema["properties"])
		for _, r := range specSlice(schema["required"]) {
			if _, ok := v[r.(string)]; !ok {
				errs = append(errs, fmt.Sprintf("%s: required property %q missing", where, r))
			}
		}
		for k, pv := range v {
			if ps := specMap(props[k]); ps != nil {
				errs = append(errs, s.checkValue(where+"."+k, ps, pv)...)
			} else if ap, isSchema := schema["additionalProperties"].(map[string]any); isSchema {
				errs = append(errs, s.checkValue(where+"."+k, ap, pv)...)
			} else if schema["additionalProperties"] == false {
				errs = append(errs, fmt.Sprintf("%s: undocumented property %q", where, k))
			}
		}
	case []any:
		if items := specMap(schema["items"]); items != nil {
			for i, e := range v {
				errs = append(errs, s.checkValue(fmt.Sprintf("%s[%d]", where, i), items, e)...)
			}
		}
	case string:
		if schema["format"] == "date-time" {
			if _, err := time.Parse(time.RFC3339Nano, v); err != nil {
				errs = append(errs, fmt.Sprintf("%s: %q is not a date-time", where, v))
			}
		}
	}
	return errs
}

func specSlice(v any) []any { s, _ := v.([]any); return s }

func schemaTypes(t any) map[string]bool {
	out := map[string]bool{}
	switch t := t.(type) {
	case string:
		out[t] = true
	case []any:
		for _, e := range t {
			out[fmt.Sprint(e)] = true
		}
	}
	return out
}

func jsonKindOf(v any) string {
	switch v := v.(type) {
	case nil:
		return "null"
	case bool:
		return "boolean"
	case float64:
		if v == float64(int64(v)) {
			return "integer"
		}
		return "number"
	case string:
		return "string"
	case []any:
		return "array"
	case map[string]any:
		return "object"
	}
	return fmt.Sprintf("%T", v)
}

// checkResponse checks one response against the description of its status
// in responses, and returns what is wrong.
func (s *openAPISpec) checkResponse(ex apiExchange, resp map[string]any) []string {
	resp = s.resolve(resp)
	var errs []string
	for name, h := range specMap(resp["headers"]) {
		if specMap(s.resolve(specMap(h)))["required"] == true && ex.Header.Get(name) == "" {
			errs = append(errs, "required header "+name+" missing")
		}
	}
	content := specMap(resp["content"])
	if len(content) == 0 {
		if len(ex.Body) != 0 {
			errs = append(errs, fmt.Sprintf("a body (%q) where none is documented", ex.Body))
		}
		return errs
	}
	ct, _, _ := strings.Cut(ex.Header.Get("Content-Type"), ";")
	media := specMap(content[strings.TrimSpace(ct)])
	if media == nil {
		return append(errs, fmt.Sprintf("Content-Type %q is not documented", ct))
	}
	if ex.Method == http.MethodHead {
		return errs
	}
	var v any
	if err := json.Unmarshal(ex.Body, &v); err != nil {
		return append(errs, fmt.Sprintf("body %q is not JSON: %v", ex.Body, err))
	}
	return append(errs, s.checkValue("body", specMap(media["schema"]), v)...)
}

// conformance records exchanges and checks each against the spec.
type conformance struct {
	s       *openAPISpec
	mu      sync.Mutex
	covered map[string]map[string]bool // "METHOD template" -> status -> seen
	count   int
}

func (c *conformance) record(ex apiExchange) {
	c.s.t.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	c.count++
	status := strconv.Itoa(ex.Status)
	method := ex.Method
	if method == http.MethodHead {
		method = http.MethodGet
	}
	op := c.s.operation(ex.Template, method)
	var resp map[string]any
	switch {
	case op != nil:
		resp = specMap(specMap(op["responses"])[status])
		if resp == nil {
			c.s.t.Errorf("%s %s answered %s, which openapi.yaml does not document for it: %s", ex.Method, ex.Template, status, ex.Body)
			return
		}
		key := method + " " + ex.Template
		if c.covered[key] == nil {
			c.covered[key] = map[string]bool{}
		}
		c.covered[key][status] = true
	case ex.Status == http.StatusMethodNotAllowed:
		resp = c.s.pointer("#/components/responses/MethodNotAllowed")
	case ex.Status == http.StatusNotFound:
		resp = c.s.pointer("#/components/responses/NotFound")
	case ex.Status == http.StatusUnauthorized:
		resp = c.s.pointer("#/components/responses/Unauthorized")
	default:
		c.s.t.Errorf("%s %s (no such operation) answered %d", ex.Method, ex.Template, ex.Status)
		return
	}
	for _, e := range c.s.checkResponse(ex, resp) {
		c.s.t.Errorf("%s %s → %d: %s", ex.Method, ex.Template, ex.Status, e)
	}
}

// TestOpenAPIDescribesExactlyTheRoutes compares the spec's operations with
// the handler's routes, and checks that every $ref resolves.
func TestOpenAPIDescribesExactlyTheRoutes(t *testing.T) {
	s := loadSpec(t)
	var inSpec, inHandler []string
	for path, item := range specMap(s.doc["paths"]) {
		for method := range specMap(item) {
			if method != "parameters" {
				inSpec = append(inSpec, strings.ToUpper(method)+" "+path)
			}
		}
	}
	for _, r := range handlerRoutes {
		inHandler = append(inHandler, r.method+" "+r.pattern)
	}
	sort.Strings(inSpec)
	sort.Strings(inHandler)
	if strings.Join(inSpec, "\n") != strings.Join(inHandler, "\n") {
		t.Fatalf("openapi.yaml operations:\n%s\n\nhandler routes:\n%s", strings.Join(inSpec, "\n"), strings.Join(inHandler, "\n"))
	}
	var walk func(any)
	walk = func(n any) {
		switch n := n.(type) {
		case map[string]any:
			if ref, ok := n["$ref"].(string); ok {
				s.pointer(ref)
			}
			for _, v := range n {
				walk(v)
			}
		case []any:
			for _, v := range n {
				walk(v)
			}
		}
	}
	walk(s.doc)
	for name, hook := range specMap(s.doc["webhooks"]) {
		if specMap(hook)["post"] == nil {
			t.Errorf("webhook %s has no post operation", name)
		}
	}
	// Every problem type the handler can answer is listed in the spec.
	desc := specMap(s.doc["info"])["description"].(string)
	for typ := range problemTitles {
		if !strings.Contains(desc, "`"+strings.TrimPrefix(typ, problemTypeBase)+"`") {
			t.Errorf("problem type %s is not listed in openapi.yaml", typ)
		}
	}
}

// TestOpenAPIResponsesConform drives every operation through its success and
// error paths and checks each response against openapi.yaml; then it checks
// a real delivery against the spec's webhook.
func TestOpenAPIResponsesConform(t *testing.T) {
	forEachBackend(t, func(t *testing.T, openTestDB func(testing.TB) *sql.DB) {
		s := loadSpec(t)
		c := &conformance{s: s, covered: map[string]map[string]bool{}}
		db := openTestDB(t)
		api := newTestAPIOn(t, db, HandlerConfig{AllowHTTP: true, AllowedNetworks: loopbackNetworks, MaxSubscriptionsPerTenant: 3,
			EventTypes: []EventTypeInfo{{Name: "order.shipped", Description: "An order left."}}})
		api.record = c.record
		// broken answers 500 everywhere: its Authenticate names an unusable
		// tenant.
		broken := newTestAPIOn(t, db, HandlerConfig{Authenticate: func(*http.Request) (string, error) { return "\x07", nil }})
		broken.record = c.record

		rc := newReceiver(t, nil)
		created := api.do(acmeJSONReq("POST", tmplSubs, "", `{"eventTypes":["order.*"],"callbackUrl":"`+rc.URL()+`","description":"d","metadata":{"k":"v"},"headers":{"x-token":"t"},"rateLimit":5}`))
		id := created.json(t)["subscriptionId"].(string)
		rc.setSecrets(created.json(t)["secret"].(string))
		api.do(acmeJSONReq("POST", tmplSubs, "", `{"eventType":"order.shipped","callbackUrl":"https://public.example/"}`))
		spare := api.do(acmeJSONReq("POST", tmplSubs, "", `{"eventTypes":["*"],"callbackUrl":"https://public.example/","enabled":false}`)).json(t)["subscriptionId"].(string)
		api.do(acmeJSONReq("POST", tmplSubs, "", `{"eventTypes":["*"],"callbackUrl":"https://public.example/"}`)) // 409: the fourth

		// A delivered test event, so that there are attempts to list and a
		// delivery to retry; the request it made is checked against the
		// webhook's description.
		dlv := api.do(apiReq{method: "POST", path: "/webhook-subscriptions/" + id + "/test", template: tmplTest, token: "tok-acme"}).json(t)["deliveryId"].(string)
		_, stop := startDispatcher(t, db, Config{HTTPClient: ssrfLoopbackClient()})
		got := rc.wait(1)[0]
		stop()
		pending := api.do(apiReq{method: "POST", path: "/webhook-subscriptions/" + spare + "/test", template: tmplTest, token: "tok-acme"}).json(t)["deliveryId"].(string)

		big := `{"description":"` + strings.Repeat("x", HandlerMaxBodyBytes) + `"}`
		ops := []struct {
			method, template, path string
			okBody                 string   // body of the successful request, if any
			errors                 []apiReq // requests for specific error statuses
		}{
			{"GET", tmplSubs, "/webhook-subscriptions?limit=1", "", []apiReq{
				{path: "/webhook-subscriptions?limit=%zz"}, {path: "/webhook-subscriptions?limit=0"}}},
			{"GET", tmplSub, "/webhook-subscriptions/" + id, "", []apiReq{{path: "/webhook-subscriptions/sub_missing"}}},
			{"PATCH", tmplSub, "/webhook-subscriptions/" + id, `{"description":"changed"}`, []apiReq{
				{path: "/webhook-subscriptions/sub_missing", body: `{"enabled":true}`}}},
			{"GET", tmplDeliveries, "/webhook-subscriptions/" + id + "/deliveries?limit=1", "", []apiReq{
				{path: "/webhook-subscriptions/" + id + "/deliveries?status=lost"}, {path: "/webhook-subscriptions/" + id + "/deliveries?%zz"},
				{path: "/webhook-subscriptions/sub_missing/deliveries"}}},
			{"POST", tmplRetry, "/webhook-subscriptions/" + id + "/deliveries/" + dlv + "/retry", "", []apiReq{
				{path: "/webhook-subscriptions/" + spare + "/deliveries/" + pending + "/retry"},
				{path: "/webhook-subscriptions/" + id + "/deliveries/dlv_missing/retry"}}},
			{"POST", tmplTest, "/webhook-subscriptions/" + id + "/test", "", []apiReq{{path: "/webhook-subscriptions/sub_missing/test"}}},
			{"POST", tmplReplay, "/webhook-subscriptions/" + id + "/replay", `{"since":"2020-01-01T00:00:00Z","scope":"all"}`, []apiReq{
				{path: "/webhook-subscriptions/sub_missing/replay", body: `{"since":"2020-01-01T00:00:00Z"}`},
				{body: `{"scope":"some"}`}}},
			{"POST", tmplRotate, "/webhook-subscriptions/" + id + "/rotate-secret", "", []apiReq{{path: "/webhook-subscriptions/sub_missing/rotate-secret"}}},
			{"GET", tmplEventTypes, "/event-types", "", nil},
			{"DELETE", tmplSub, "/webhook-subscriptions/" + spare, "", []apiReq{{path: "/webhook-subscriptions/" + spare}}},
			{"POST", tmplSubs, "/webhook-subscriptions", "", []apiReq{
				{body: `{"eventTypes":["order.*"],"callbackUrl":"https://127.0.0.1.nip.io.invalid/"}`},
				{body: `{"eventTypes":["order.*"],"callbackUrl":"https://[::1]/"}`}}},
		}
		for _, op := range ops {
			ctype := ""
			if op.okBody != "" {
				ctype = "application/json"
			}
			api.do(apiReq{method: op.method, path: op.path, template: op.template, token: "tok-acme", ctype: ctype, body: op.okBody})
			if op.method == "GET" {
				api.do(apiReq{method: "HEAD", path: op.path, template: op.template, token: "tok-acme"})
			}
			for _, e := range op.errors {
				if e.path == "" {
					e.path = op.path
				}
				e.method, e.template, e.token = op.method, op.template, "tok-acme"
				if e.body != "" {
					e.ctype = "application/json"
				}
				api.do(e)
			}
			// Errors every operation shares.
			api.do(apiReq{method: op.method, path: op.path, template: op.template})
			broken.do(apiReq{method: op.method, path: op.path, template: op.template, token: "tok-acme"})
			if op.method != "GET" {
				for _, e := range []apiReq{
					{ctype: "application/json", body: `{`},
					{ctype: "application/json", body: `{"unknown":1}`},
					{ctype: "text/plain", body: `{}`},
					{ctype: "application/json", body: big},
				} {
					e.method, e.path, e.template, e.token = op.method, op.path, op.template, "tok-acme"
					api.do(e)
				}
			}
			// A method the path does not have.
			api.do(apiReq{method: "PUT", path: op.path, template: op.template, token: "tok-acme"})
		}
		api.do(apiReq{method: "GET", path: "/nowhere", template: "/nowhere", token: "tok-acme"})

		// Every documented status of every operation was seen, except 503
		// (a canceled request, whose answer nobody reads).
		for path, item := range specMap(s.doc["paths"]) {
			for method, op := range specMap(item) {
				if method == "parameters" {
					continue
				}
				key := strings.ToUpper(method) + " " + path
				for status := range specMap(specMap(op)["responses"]) {
					if status != "503" && !c.covered[key][status] {
						t.Errorf("%s: documented status %s was never exercised", key, status)
					}
				}
			}
		}
		if c.count < 80 {
			t.Fatalf("only %d exchanges checked", c.count)
		}

		// The delivered webhook: required headers and payload.
		hook := specMap(specMap(specMap(s.doc["webhooks"])["webhookEvent"])["post"])
		for _, p := range specSlice(hook["parameters"]) {
			p := s.resolve(specMap(p))
			if p["in"] == "header" && p["required"] == true && got.Header.Get(p["name"].(string)) == "" {
				t.Errorf("the delivery lacks the required header %s", p["name"])
			}
		}
		if ct := got.Header.Get("Content-Type"); specMap(specMap(s.resolve(specMap(hook["requestBody"])))["content"])[ct] == nil {
			t.Errorf("the delivery's Content-Type %q is not documented", ct)
		}
		var payload any
		if err := json.Unmarshal(got.Body, &payload); err != nil {
			t.Fatal(err)
		}
		schema := specMap(specMap(specMap(s.resolve(specMap(hook["requestBody"])))["content"])["application/json"])["schema"]
		for _, e := range s.checkValue("payload", specMap(schema), payload) {
			t.Errorf("delivered payload %s: %s", got.Body, e)
		}
	})
}
