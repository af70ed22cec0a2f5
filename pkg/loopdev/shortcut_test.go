package loopdev

// R12: the block-device shortcut: when it applies and when not.

import (
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

type shortcutCase struct {
	name     string
	opts     Options
	shortcut bool
	wantSS   uint32 // sector size of the result
}

// runShortcutCases attaches backing (a block device) with each case and
// checks shortcut-or-new, the sector size, and that a shortcut wrapper is a
// fresh reopen that Detach never clears.
func runShortcutCases(t *testing.T, backing *Device, cases []shortcutCase) {
	t.Helper()
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before := backing.Record()
			d, err := Attach(testCtx(t, time.Minute), backing.Path(), c.opts)
			if err != nil {
				t.Fatal(err)
			}
			cleanupDevice(t, d)
			if got := !d.Created(); got != c.shortcut {
				t.Fatalf("shortcut=%v (path %s), want %v", got, d.Path(), c.shortcut)
			}
			if got := blkSSZ(t, d.File()); got != c.wantSS || d.SectorSize() != c.wantSS {
				t.Errorf("sector size %d (SectorSize() %d), want %d", got, d.SectorSize(), c.wantSS)
			}
			if !c.shortcut {
				if d.Path() == backing.Path() {
					t.Errorf("new device has the backing's path")
				}
				return
			}
			if d.Path() != backing.Path() || d.Devnum() != backing.Devnum() || d.Nr() != backing.Nr() {
				t.Errorf("wrapper %s/%s/nr %d, backing %s/%s/nr %d", d.Path(), d.Devnum(), d.Nr(), backing.Path(), backing.Devnum(), backing.Nr())
			}
			if d.File().Fd() == backing.File().Fd() {
				t.Error("wrapper shares the backing handle's fd")
			}
			fl, err := unix.FcntlInt(d.File().Fd(), unix.F_GETFL, 0)
			if err != nil {
				t.Fatal(err)
			}
			wantAcc := unix.O_RDWR
			if c.opts.Access == AccessReadOnly {
				wantAcc = unix.O_RDONLY
			}
			if fl&unix.O_DIRECT != 0 || fl&unix.O_ACCMODE != wantAcc {
				t.Errorf("wrapper fd flags %#o: want access %#o and no O_DIRECT", fl, wantAcc)
			}
			if d.Owned() {
				t.Error("shortcut wrapper claims ownership")
			}
			if err := detachWait(d); err != nil {
				t.Errorf("Detach of a wrapper (= Close): %v", err)
			}
			if err := Verify(before); err != nil {
				t.Errorf("the backing device was touched by the wrapper's Detach: %v", err)
			}
		})
	}
}

func TestR12_BlockDeviceShortcut(t *testing.T) {
	dir := rootDir(t)
	auto := SectorSizeAuto

	t.Run("empty-512", func(t *testing.T) {
		// Block backing without a table: every matching request is a shortcut.
		b := attachT(t, newImage(t, dir, "empty.img", 16<<20), Options{})
		runShortcutCases(t, b, []shortcutCase{
			{"size-0", Options{}, true, 512},
			{"auto", Options{SectorSize: auto}, true, 512},
			{"auto-partscan", Options{SectorSize: auto, Partscan: true}, true, 512},
			{"explicit-512", Options{SectorSize: 512}, true, 512},
			{"explicit-512-ro", Options{SectorSize: 512, Access: AccessReadOnly}, true, 512},
			{"explicit-4096", Options{SectorSize: 4096}, false, 4096},
			{"offset", Options{Offset: 1 << 20}, false, 512},
			{"size", Options{Size: 8 << 20}, false, 512},
			{"partscan-no-table", Options{Partscan: true}, true, 512},
			{"partscan-may-populate", Options{Partscan: true, MayPopulate: true}, false, 512},
		})
	})

	t.Run("sector-mismatch", func(t *testing.T) {
		// A 4096-byte loop device carrying a 512-byte GPT.
		img := gptImage(t, dir, "g512.img", 32<<20, 512, []gptPart{{Type: gptTypeLinux, Name: "a", Start: 2048, Len: 8192}})
		b := attachT(t, img, Options{SectorSize: 4096})
		runShortcutCases(t, b, []shortcutCase{
			{"size-0", Options{}, true, 4096},
			{"auto", Options{SectorSize: auto}, false, 512},
			{"explicit-512", Options{SectorSize: 512}, false, 512},
			{"explicit-4096", Options{SectorSize: 4096}, true, 4096},
		})
	})

	t.Run("partscan-required", func(t *testing.T) {
		img := gptImage(t, dir, "table.img", 32<<20, 512, []gptPart{{Type: gptTypeLinux, Name: "a", Start: 2048, Len: 8192}})
		noscan := attachT(t, img, Options{})
		runShortcutCases(t, noscan, []shortcutCase{
			{"without-partscan", Options{}, true, 512},
			{"with-partscan", Options{Partscan: true}, false, 512},
		})
		scan := attachT(t, img, Options{Partscan: true})
		runShortcutCases(t, scan, []shortcutCase{
			{"partscan-already-on", Options{Partscan: true}, true, 512},
			{"partscan-on-may-populate", Options{Partscan: true, MayPopulate: true}, true, 512},
		})
	})

	t.Run("nested", func(t *testing.T) {
		// p1 itself carries a table (GPT in one image, MBR in the other);
		// a partition never has effective partscan: a new loop device.
		for _, kind := range []string{"gpt", "mbr"} {
			t.Run(kind, func(t *testing.T) {
				img := gptImage(t, dir, kind+"-nested.img", 64<<20, 512, []gptPart{{Type: gptTypeLinux, Name: "outer", Start: 2048, Len: 32768}})
				f, err := os.OpenFile(img, os.O_RDWR, 0)
				if err != nil {
					t.Fatal(err)
				}
				if kind == "gpt" {
					writeGPT(t, f, 2048*512, 32768*512, 512, []gptPart{{Type: gptTypeLinux, Name: "inner", Start: 2048, Len: 4096}})
				} else {
					writeMBR(t, f, 2048*512, 2048, 4096)
				}
				f.Close()
				outer := attachT(t, img, Options{Partscan: true})
				if err := outer.AddPartition(1, 2048*512, 32768*512); err != nil {
					t.Fatal(err)
				}
				parts, err := outer.Partitions()
				if err != nil || len(parts) != 1 {
					t.Fatalf("outer partitions %v, %v", parts, err)
				}
				p := parts[0].Path
				d, err := Attach(testCtx(t, time.Minute), p, Options{Partscan: true})
				if err != nil {
					t.Fatal(err)
				}
				cleanupDevice(t, d)
				if !d.Created() || d.Path() == p {
					t.Errorf("nested %s table with partscan: got %s (created=%v), want a new loop device", kind, d.Path(), d.Created())
				}
				w, err := Attach(testCtx(t, time.Minute), p, Options{})
				if err != nil {
					t.Fatal(err)
				}
				cleanupDevice(t, w)
				if w.Created() || w.Path() != p {
					t.Errorf("partition without partscan: got %s (created=%v), want the shortcut", w.Path(), w.Created())
				}
				if w.Nr() != -1 {
					t.Errorf("shortcut of partition %s reports loop number %d; a partition is not itself a loop device (want -1)", p, w.Nr())
				}
				// LOOP_GET_STATUS64 on a partition answers for its parent disk:
				// the wrapper must still never act on the parent.
				if err := w.Unrelinquish(); err == nil {
					w.Relinquish()
					t.Errorf("Unrelinquish on the wrapper of partition %s succeeded: its Detach would clear the parent disk", p)
				}
				if changed, err := w.SetAutoclear(false); changed || sysAttr(outer.Nr(), "loop/autoclear") != "1" {
					_, _ = outer.SetAutoclear(true)
					t.Errorf("SetAutoclear(false) on the wrapper of partition %s changed the parent disk (changed=%v, %v)", p, changed, err)
				}
				o, err := Open(testCtx(t, time.Minute), p, OpenOptions{Access: AccessReadOnly})
				if err != nil {
					t.Fatal(err)
				}
				if o.Nr() != -1 {
					t.Errorf("Open(%s) reports loop number %d, want -1 (foreign)", p, o.Nr())
				}
				o.Close()
				if err := detachWait(w); err != nil {
					t.Error(err)
				}
				if err := detachWait(d); err != nil {
					t.Error(err)
				}
			})
		}
	})
}
