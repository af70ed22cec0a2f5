package loopdev

// A minimal GPT and MBR writer for fixtures: sfdisk 2.38 cannot write GPTs
// for 4096-byte sectors into a regular file, and nested tables need to be
// written at an offset.

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"hash/crc32"
	"os"
	"strings"
	"testing"
	"unicode/utf16"
)

const (
	gptTypeLinux    = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
	gptTypeESP      = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
	gptTypeXBOOTLDR = "BC13C2FF-59E6-4262-A352-B275FD6F7172"
	gptTypeSwap     = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F"
	gptTypeRootX64  = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
	gptTypeHome     = "933AC7E1-2EB4-4F13-B844-0E14E2AEF915"
)

type gptPart struct {
	Type       string
	Name       string
	Start, Len uint64 // in sectors of the table's sector size
}

// guidBytes encodes a textual GUID in GPT's mixed-endian layout.
func guidBytes(s string) []byte {
	h, err := hex.DecodeString(strings.ReplaceAll(s, "-", ""))
	if err != nil || len(h) != 16 {
		panic("bad guid " + s)
	}
	out := make([]byte, 16)
	out[0], out[1], out[2], out[3] = h[3], h[2], h[1], h[0]
	out[4], out[5] = h[5], h[4]
	out[6], out[7] = h[7], h[6]
	copy(out[8:], h[8:])
	return out
}

func randGUID() []byte {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	b[7] = b[7]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return b
}

// writeGPT writes a protective MBR, primary and backup GPT for a disk of
// diskBytes bytes starting at byte base of f, with sector size ss.
func writeGPT(t testing.TB, f *os.File, base int64, diskBytes int64, ss int, parts []gptPart) {
	t.Helper()
	last := uint64(diskBytes/int64(ss)) - 1
	entSectors := uint64((128*128 + ss - 1) / ss)
	ents := make([]byte, 128*128)
	for i, p := range parts {
		e := ents[i*128:]
		copy(e[0:], guidBytes(p.Type))
		copy(e[16:], randGUID())
		binary.LittleEndian.PutUint64(e[32:], p.Start)
		binary.LittleEndian.PutUint64(e[40:], p.Start+p.Len-1)
		for j, r := range utf16.Encode([]rune(p.Name)) {
			if j >= 36 {
				break
			}
			binary.LittleEndian.PutUint16(e[56+2*j:], r)
		}
	}
	entCRC := crc32.ChecksumIEEE(ents)
	disk := randGUID()
	header := func(cur, backup, entLBA uint64) []byte {
		h := make([]byte, ss)
		copy(h, "EFI PART")
		binary.LittleEndian.PutUint32(h[8:], 0x00010000)
		binary.LittleEndian.PutUint32(h[12:], 92)
		binary.LittleEndian.PutUint64(h[24:], cur)
		binary.LittleEndian.PutUint64(h[32:], backup)
		binary.LittleEndian.PutUint64(h[40:], 2+entSectors)
		binary.LittleEndian.PutUint64(h[48:], last-1-entSectors)
		copy(h[56:], disk)
		binary.LittleEndian.PutUint64(h[72:], entLBA)
		binary.LittleEndian.PutUint32(h[80:], 128)
		binary.LittleEndian.PutUint32(h[84:], 128)
		binary.LittleEndian.PutUint32(h[88:], entCRC)
		binary.LittleEndian.PutUint32(h[16:], crc32.ChecksumIEEE(h[:92]))
		return h
	}
	mbr := make([]byte, 512)
	mbr[446+4] = 0xEE
	binary.LittleEndian.PutUint32(mbr[446+8:], 1)
	binary.LittleEndian.PutUint32(mbr[446+12:], uint32(min(last, 0xFFFFFFFF)))
	mbr[510], mbr[511] = 0x55, 0xAA
	at := func(lba uint64) int64 { return base + int64(lba)*int64(ss) }
	for _, w := range []struct {
		b   []byte
		off int64
	}{
		{mbr, base},
		{header(1, last, 2), at(1)},
		{ents, at(2)},
		{ents, at(last - entSectors)},
		{header(last, 1, last-entSectors), at(last)},
	} {
		if _, err := f.WriteAt(w.b, w.off); err != nil {
			t.Fatal(err)
		}
	}
}

// writeMBR writes a DOS table with one Linux partition at byte base of f.
func writeMBR(t testing.TB, f *os.File, base int64, start, length uint32) {
	t.Helper()
	mbr := make([]byte, 512)
	binary.LittleEndian.PutUint32(mbr[440:], 0x12345678)
	e := mbr[446:]
	e[4] = 0x83
	binary.LittleEndian.PutUint32(e[8:], start)
	binary.LittleEndian.PutUint32(e[12:], length)
	mbr[510], mbr[511] = 0x55, 0xAA
	if _, err := f.WriteAt(mbr, base); err != nil {
		t.Fatal(err)
	}
}

// gptImage creates a file of size bytes with a GPT for sector size ss.
func gptImage(t testing.TB, dir, name string, size int64, ss int, parts []gptPart) string {
	t.Helper()
	p := newImage(t, dir, name, size)
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	writeGPT(t, f, 0, size, ss, parts)
	return p
}

// TestGPTFixture checks the writer against util-linux's reader, so that a
// fixture bug cannot pose as a library bug.
func TestGPTFixture(t *testing.T) {
	dir := t.TempDir()
	p := gptImage(t, dir, "g.img", 64<<20, 512, []gptPart{
		{Type: gptTypeLinux, Name: "one", Start: 2048, Len: 4096},
		{Type: gptTypeESP, Name: "two", Start: 8192, Len: 4096},
	})
	out, err := execOutput("sfdisk", "-d", p)
	if err != nil {
		t.Skipf("sfdisk: %v", err)
	}
	for _, want := range []string{"label: gpt", "start=        2048, size=        4096", "start=        8192, size=        4096", gptTypeESP} {
		if !strings.Contains(out, want) {
			t.Errorf("sfdisk -d lacks %q:\n%s", want, out)
		}
	}
}
