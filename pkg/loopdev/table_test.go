package loopdev

// The package's own partition-table reader (kernels without partition
// parsers) against util-linux, and AddPartitions on real devices.

import (
	"bytes"
	"encoding/json"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/loopkit/loopkit/pkg/loopdev/internal/ptable"
)

func TestReadPartitionTableMatchesSfdisk(t *testing.T) {
	dir := rootDir(t)
	img, parts := heavyImage(t, dir)
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got, err := ptable.Read(f, 512)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(parts) {
		t.Fatalf("%d entries, sfdisk sees %d", len(got), len(parts))
	}
	for i, p := range parts {
		e := got[i]
		if e.Nr != i+1 || e.Start != p.Start*512 || e.Size != p.Size*512 || e.Type != strings.ToUpper(p.Type) || e.Name != p.Name {
			t.Errorf("entry %+v, sfdisk %+v", e, p)
		}
	}
}

func TestAddPartitionsFromTable(t *testing.T) {
	dir := rootDir(t)
	ctx := testCtx(t, time.Minute)
	mbr := newImage(t, dir, "mbr.img", 32<<20)
	mf, err := os.OpenFile(mbr, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	writeMBR(t, mf, 0, 2048, 8192)
	mf.Close()
	for _, c := range []struct {
		name   string
		img    string
		ss     uint32
		starts []uint64 // bytes
		sizes  []uint64
	}{
		{"gpt-512-five", gptImage(t, dir, "g5.img", 256<<20, 512, fivePartitions), 512,
			[]uint64{2048 * 512, 67584 * 512, 133120 * 512, 198656 * 512, 264192 * 512},
			[]uint64{32 << 20, 32 << 20, 32 << 20, 32 << 20, 32 << 20}},
		{"gpt-4096", gptImage(t, dir, "g4k.img", 32<<20, 4096, []gptPart{{Type: gptTypeLinux, Name: "a", Start: 256, Len: 1024}, {Type: gptTypeHome, Name: "b", Start: 1280, Len: 512}}), SectorSizeAuto,
			[]uint64{256 * 4096, 1280 * 4096}, []uint64{1024 * 4096, 512 * 4096}},
		{"mbr", mbr, 0, []uint64{2048 * 512}, []uint64{8192 * 512}},
	} {
		t.Run(c.name, func(t *testing.T) {
			d := attachT(t, c.img, Options{Partscan: true, SectorSize: c.ss, Lock: LockShared})
			parts, err := d.AddPartitions(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if len(parts) != len(c.starts) {
				t.Fatalf("partitions %v", parts)
			}
			for i, p := range parts {
				if p.Nr != i+1 || p.Start != c.starts[i] || p.Size != c.sizes[i] {
					t.Errorf("partition %+v, want nr %d start %d size %d", p, i+1, c.starts[i], c.sizes[i])
				}
			}
			if again, err := d.AddPartitions(ctx); err != nil || len(again) != len(parts) {
				t.Errorf("second AddPartitions: %v, %v (EBUSY must be fine)", again, err)
			}
			if sp := sysPartitions(d.Nr()); len(sp) != len(c.starts) {
				t.Errorf("sysfs %v", sp)
			}
		})
	}
	t.Run("no-table", func(t *testing.T) {
		d := attachT(t, newImage(t, dir, "none.img", 8<<20), Options{})
		parts, err := d.AddPartitions(ctx)
		if err != nil || len(parts) != 0 {
			t.Errorf("no table: %v, %v", parts, err)
		}
	})
}

func FuzzReadPartitionTable(f *testing.F) {
	dir := f.TempDir()
	for _, ss := range []int{512, 4096} {
		p := newImage(f, dir, "seed.img", 256<<10)
		fh, err := os.OpenFile(p, os.O_RDWR, 0)
		if err != nil {
			f.Fatal(err)
		}
		first := uint64(2 + (128*128+ss-1)/ss)
		writeGPT(f, fh, 0, 256<<10, ss, []gptPart{{Type: gptTypeLinux, Name: "x", Start: first, Len: 4}, {Type: gptTypeESP, Name: "y", Start: first + 4, Len: 4}})
		fh.Close()
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b, uint16(ss))
		os.Remove(p)
	}
	mbr := make([]byte, 1024)
	mbr[446+4], mbr[446+8], mbr[446+12] = 0x83, 1, 1
	mbr[510], mbr[511] = 0x55, 0xAA
	f.Add(mbr, uint16(512))
	f.Add([]byte{}, uint16(512))
	f.Fuzz(func(t *testing.T, b []byte, ssel uint16) {
		ss := uint32(512) << (ssel % 4)
		entries, err := ptable.Read(bytes.NewReader(b), ss)
		if err != nil {
			return
		}
		for _, e := range entries {
			if e.Nr < 1 || e.Nr > ptable.MaxGPTEntries || e.Size == 0 || e.Start+e.Size < e.Start || e.Start%uint64(ss) != 0 {
				js, _ := json.Marshal(e)
				t.Fatalf("implausible entry %s for sector size %d", js, ss)
			}
		}
	})
}
