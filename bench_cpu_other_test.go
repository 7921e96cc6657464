//go:build !unix

package webhooks

import (
	"testing"
	"time"
)

// benchCPU is not measured here: CPU figures read 0.
func benchCPU(testing.TB) time.Duration { return 0 }
