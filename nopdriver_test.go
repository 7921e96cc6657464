package webhooks

import (
	"context"
	"database/sql/driver"
	"errors"
)

// nopConnector is a database/sql connector of a driver this package does not
// know, to test dialect detection.
type nopConnector struct{}

func (nopConnector) Connect(context.Context) (driver.Conn, error) {
	return nil, errors.New("nop driver: no connections")
}
func (nopConnector) Driver() driver.Driver { return nopDriver{} }

type nopDriver struct{}

func (nopDriver) Open(string) (driver.Conn, error) {
	return nil, errors.New("nop driver: no connections")
}
