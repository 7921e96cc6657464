package webhooks_test

import (
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"time"

	"github.com/outboxhook/webhooks"
)

// ExampleSign signs the official Standard Webhooks test vector.
func ExampleSign() {
	sig, err := webhooks.Sign(
		"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
		"msg_p5jXN8AQM9LWM0D4loKWxJek",
		time.Unix(1614265330, 0),
		[]byte(`{"test": 2432232314}`),
	)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(sig)
	// Output: v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=
}

// ExampleVerifier_Middleware guards a receiver's handler: only webhooks
// signed with the secret reach it, with their body still readable.
func ExampleVerifier_Middleware() {
	const secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
	v, err := webhooks.NewVerifier(secret)
	if err != nil {
		log.Fatal(err)
	}
	// Pin the clock so the example is deterministic; leave Now nil in real use.
	sent := time.Unix(1614265330, 0)
	v.Now = func() time.Time { return sent.Add(3 * time.Second) }

	handler := v.Middleware(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		fmt.Fprintf(w, "received %s", body)
	}))
	srv := httptest.NewServer(handler)
	defer srv.Close()

	send := func(body, signature string) {
		req, err := http.NewRequest(http.MethodPost, srv.URL, strings.NewReader(body))
		if err != nil {
			log.Fatal(err)
		}
		req.Header.Set(webhooks.HeaderWebhookID, "msg_p5jXN8AQM9LWM0D4loKWxJek")
		req.Header.Set(webhooks.HeaderWebhookTimestamp, strconv.FormatInt(sent.Unix(), 10))
		req.Header.Set(webhooks.HeaderWebhookSignature, signature)
		resp, err := srv.Client().Do(req)
		if err != nil {
			log.Fatal(err)
		}
		defer resp.Body.Close()
		reply, _ := io.ReadAll(resp.Body)
		fmt.Printf("%d %s\n", resp.StatusCode, strings.TrimSpace(string(reply)))
	}

	body := `{"test": 2432232314}`
	sig, err := webhooks.Sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", sent, []byte(body))
	if err != nil {
		log.Fatal(err)
	}
	send(body, sig)
	send(`{"test": 1}`, sig) // tampered body
	// Output:
	// 200 received {"test": 2432232314}
	// 401 invalid webhook signature
}
