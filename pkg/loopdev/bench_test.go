package loopdev

import (
	"context"
	"testing"

	"github.com/loopkit/loopkit/pkg/loopdev/internal/testutil"
)

// BenchmarkAttachDetach measures one attach+detach cycle of a 64 MiB sparse
// file, on LOOP_CONFIGURE and on the legacy path, with direct I/O on and off.
// The legacy variant flips the process-wide flag and restores it.
func BenchmarkAttachDetach(b *testing.B) {
	testutil.RequireRoot(b)
	dir := b.TempDir()
	img := newImage(b, dir, "bench.img", 64<<20)
	ctx := context.Background()
	for _, legacy := range []bool{false, true} {
		for _, dio := range []bool{true, false} {
			name := map[bool]string{false: "configure", true: "legacy"}[legacy] + "/dio=" + map[bool]string{true: "on", false: "off"}[dio]
			b.Run(name, func(b *testing.B) {
				was := configureBroken.Load()
				if legacy {
					configureBroken.Store(true)
				}
				defer configureBroken.Store(was)
				d := dio
				for i := 0; i < b.N; i++ {
					dev, err := Attach(ctx, img, Options{DirectIO: &d})
					if err != nil {
						b.Fatal(err)
					}
					if err := detachWait(dev); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}
