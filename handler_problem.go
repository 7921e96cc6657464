package webhooks

import (
	"encoding/json"
	"fmt"
	"net/http"
	"sort"
	"strconv"
)

// Problem types of the handler's RFC 9457 answers. They are stable: clients
// may switch on them.
const (
	problemTypeBase              = "https://github.com/outboxhook/webhooks/problems/"
	problemTypeMalformed         = problemTypeBase + "malformed-request"
	problemTypeValidation        = problemTypeBase + "validation"
	problemTypeUnauthorized      = problemTypeBase + "unauthorized"
	problemTypeNotFound          = problemTypeBase + "not-found"
	problemTypeMethodNotAllowed  = problemTypeBase + "method-not-allowed"
	problemTypeUnsupportedMedia  = problemTypeBase + "unsupported-media-type"
	problemTypeTooLarge          = problemTypeBase + "payload-too-large"
	problemTypeSubscriptionLimit = problemTypeBase + "subscription-limit"
	problemTypeNotRetryable      = problemTypeBase + "delivery-not-retryable"
	problemTypeUnavailable       = problemTypeBase + "unavailable"
	problemTypeInternal          = problemTypeBase + "internal"
)

var problemTitles = map[string]string{
	problemTypeMalformed:         "Malformed request",
	problemTypeValidation:        "Validation failed",
	problemTypeUnauthorized:      "Not authenticated",
	problemTypeNotFound:          "Not found",
	problemTypeMethodNotAllowed:  "Method not allowed",
	problemTypeUnsupportedMedia:  "Unsupported media type",
	problemTypeTooLarge:          "Request body too large",
	problemTypeSubscriptionLimit: "Too many subscriptions",
	problemTypeNotRetryable:      "Delivery cannot be retried",
	problemTypeUnavailable:       "Service unavailable",
	problemTypeInternal:          "Internal error",
}

// problem is an RFC 9457 problem document.
type problem struct {
	Type   string      `json:"type"`
	Title  string      `json:"title"`
	Status int         `json:"status"`
	Detail string      `json:"detail"`
	Errors fieldErrors `json:"errors,omitempty"`
}

// fieldError is one invalid field of a validation problem. Field names a
// body field (e.g. "callbackUrl", "eventTypes[2]") or a query parameter.
type fieldError struct {
	Field  string `json:"field"`
	Detail string `json:"detail"`
}

type fieldErrors []fieldError

func (e *fieldErrors) add(field, detail string) {
	*e = append(*e, fieldError{Field: field, Detail: detail})
}

// maxFieldErrors bounds the errors listed in one answer.
const maxFieldErrors = 20

func problemValidation(errs fieldErrors) *problem {
	errs = append(fieldErrors(nil), errs...)
	sort.SliceStable(errs, func(i, j int) bool { return errs[i].Field < errs[j].Field })
	if len(errs) > maxFieldErrors {
		more := len(errs) - maxFieldErrors + 1
		errs = append(errs[:maxFieldErrors-1], fieldError{Field: "", Detail: fmt.Sprintf("and %d more errors", more)})
	}
	detail := "the request has an invalid field"
	if len(errs) == 1 {
		if errs[0].Field != "" {
			detail = errs[0].Field + " " + errs[0].Detail
		} else {
			detail = errs[0].Detail
		}
	} else if len(errs) > 1 {
		detail = fmt.Sprintf("the request has %d invalid fields", len(errs))
	}
	return &problem{Type: problemTypeValidation, Status: http.StatusUnprocessableEntity, Detail: detail, Errors: errs}
}

func problemBadRequest(detail string) *problem {
	return &problem{Type: problemTypeMalformed, Status: http.StatusBadRequest, Detail: detail}
}

func problemNotFound(detail string) *problem {
	return &problem{Type: problemTypeNotFound, Status: http.StatusNotFound, Detail: detail}
}

func problemUnsupportedMediaType(want string) *problem {
	return &problem{Type: problemTypeUnsupportedMedia, Status: http.StatusUnsupportedMediaType,
		Detail: "the request body must be sent with Content-Type " + want}
}

func problemTooLarge() *problem {
	return &problem{Type: problemTypeTooLarge, Status: http.StatusRequestEntityTooLarge,
		Detail: fmt.Sprintf("the request body exceeds %d bytes", HandlerMaxBodyBytes)}
}

func problemInternal() *problem {
	return &problem{Type: problemTypeInternal, Status: http.StatusInternalServerError,
		Detail: "the server could not complete the request"}
}

// writeProblem sends p as application/problem+json.
func (h *handler) writeProblem(w http.ResponseWriter, _ *http.Request, p *problem) {
	if p.Title == "" {
		p.Title = problemTitles[p.Type]
	}
	b, err := json.Marshal(p)
	if err != nil { // cannot happen: strings and ints only
		b = []byte(`{"type":"` + problemTypeInternal + `","title":"Internal error","status":500,"detail":""}`)
	}
	w.Header().Set("Content-Type", "application/problem+json")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)+1))
	w.WriteHeader(p.Status)
	_, _ = w.Write(append(b, '\n'))
}

// writeJSON sends v as application/json.
func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)+1))
	w.WriteHeader(status)
	_, _ = w.Write(append(b, '\n'))
}
