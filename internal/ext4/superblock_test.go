package ext4

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// TestRead decodes a superblock laid out by hand: counts, the 64-bit
// block count, the error state and count, the first error's function.
func TestRead(t *testing.T) {
	buf := make([]byte, Offset+1024)
	sb := buf[Offset:]
	le := binary.LittleEndian
	le.PutUint32(sb[0x0:], 4096)   // inodes
	le.PutUint32(sb[0x4:], 1)      // blocks, low half
	le.PutUint32(sb[0x10:], 4000)  // free inodes
	le.PutUint32(sb[0x18:], 2)     // 4 KiB blocks
	le.PutUint16(sb[0x38:], Magic) // magic
	le.PutUint16(sb[0x3A:], 1)     // clean
	le.PutUint32(sb[0x60:], Incompat64Bit)
	le.PutUint32(sb[0x150:], 2) // blocks, high half
	got, err := Read(bytes.NewReader(buf))
	if err != nil {
		t.Fatal(err)
	}
	if got.BlocksCount != 2<<32|1 || got.UsedInodes() != 96 || got.BlockSize() != 4096 || !got.Clean() || got.HasErrors() || got.NeedsRecovery() {
		t.Errorf("decoded %+v", got)
	}
	le.PutUint16(sb[0x3A:], 3)
	le.PutUint32(sb[0x194:], 7)
	copy(sb[0x1A8:], "ext4_journal_check_start")
	le.PutUint32(sb[0x60:], IncompatRecover)
	got, _ = Read(bytes.NewReader(buf))
	if got.Clean() || !got.HasErrors() || got.ErrorCount != 7 || got.FirstErrorFunc != "ext4_journal_check_start" || !got.NeedsRecovery() {
		t.Errorf("decoded %+v", got)
	}
	if _, err := Read(bytes.NewReader(make([]byte, 100))); !errors.Is(err, ErrNotExt4) {
		t.Errorf("short input: %v, want ErrNotExt4", err)
	}
	if ok, err := HasMagic(bytes.NewReader(make([]byte, 4096))); ok || err != nil {
		t.Errorf("HasMagic of zeros: %v %v", ok, err)
	}
}

// TestReadFileMkfs reads what mke2fs wrote.
func TestReadFileMkfs(t *testing.T) {
	if _, err := exec.LookPath("mkfs.ext4"); err != nil {
		if testing.Short() {
			t.Skip("needs mkfs.ext4")
		}
		t.Fatal("needs mkfs.ext4 (apt-get install e2fsprogs)")
	}
	p := filepath.Join(t.TempDir(), "img")
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, 64<<20); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-b", "4096", "-O", "64bit", p).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v: %s", err, out)
	}
	sb, err := ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if sb.BlocksCount*uint64(sb.BlockSize()) != 64<<20 || !sb.Clean() || sb.HasErrors() || sb.UsedInodes() < 11 {
		t.Errorf("fresh filesystem: %+v", sb)
	}
}
