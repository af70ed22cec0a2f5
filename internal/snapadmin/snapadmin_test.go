package snapadmin

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
)

// notLoop is a snapshots.Snapshotter with none of the daemon's extras.
type notLoop struct {
	snapshots.Snapshotter
	closed bool
}

func (n *notLoop) Close() error { n.closed = true; return nil }

func TestFromRefusesOtherSnapshotters(t *testing.T) {
	n := &notLoop{}
	_, err := From(n, nil)
	if err == nil || !strings.Contains(err.Error(), "has no status, purge or metrics") {
		t.Fatalf("From(other snapshotter) = %v, want a refusal", err)
	}
	if !n.closed {
		t.Error("From left the refused snapshotter open")
	}
	boom := errors.New("boom")
	if _, err := From(nil, boom); err != boom {
		t.Errorf("From(nil, err) = %v, want err unchanged", err)
	}
}

func TestFaultHookRoundTrip(t *testing.T) {
	ctx := context.Background()
	if FaultHook(ctx) != nil {
		t.Fatal("a plain context carries a fault hook")
	}
	var got []string
	FaultHook(WithFaultHook(ctx, func(s string) { got = append(got, s) }))("commit-done")
	if len(got) != 1 || got[0] != "commit-done" {
		t.Fatalf("hook saw %q, want [commit-done]", got)
	}
}
