package snapservice

import (
	"errors"
	"fmt"
	"os"
	"testing"

	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestClassify: errno errors get the class containerd's conversion maps to
// the right code, keep their text (the path included), and classes already
// set win.
func TestClassify(t *testing.T) {
	pe := &os.PathError{Op: "read", Path: "/root/snapshots/3/image", Err: unix.EIO}
	for _, tc := range []struct {
		err  error
		want codes.Code
	}{
		{fmt.Errorf("clone: %w", unix.ENOSPC), codes.ResourceExhausted},
		{fmt.Errorf("clone: %w", unix.EDQUOT), codes.ResourceExhausted},
		{fmt.Errorf("usage: %w", pe), codes.DataLoss},
		{fmt.Errorf("commit: %w: %w", unix.EIO, errdefs.ErrFailedPrecondition), codes.FailedPrecondition},
		{errors.New("plain"), codes.Unknown},
	} {
		got := Classify(tc.err)
		st := status.Convert(errgrpc.ToGRPC(got))
		if st.Code() != tc.want || st.Message() != tc.err.Error() {
			t.Errorf("%v: code %s %q, want %s with the same text", tc.err, st.Code(), st.Message(), tc.want)
		}
	}
	if Classify(nil) != nil {
		t.Error("Classify(nil) != nil")
	}
}
