//go:build unix

package webhooks

import (
	"syscall"
	"testing"
	"time"
)

// benchCPU returns the CPU time (user and system, all threads) the process
// has used.
func benchCPU(b testing.TB) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
