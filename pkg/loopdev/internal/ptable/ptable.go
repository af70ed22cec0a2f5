// Package ptable reads GPT and MBR partition tables from untrusted disk
// images. Kernels built without partition parsers (CONFIG_EFI_PARTITION
// unset) never create partitions from a scan; pkg/loopdev then creates them
// from this table with BLKPG. The parser is kept apart so that it can be
// fuzzed alone and stays out of the loopdev API.
package ptable

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"strings"
)

// ErrMalformed marks a table that is present but not valid.
var ErrMalformed = errors.New("malformed partition table")

// ErrSectorSize marks a sector size that is not a power of two >= 512.
var ErrSectorSize = errors.New("invalid sector size")

// gptMagic opens a GPT header, one logical sector into the disk.
var gptMagic = []byte("EFI PART")

// GPTSectorSize returns the logical sector size (512..4096) whose GPT
// header head (the first 8 KiB of a disk) carries, 0 without a GPT, and an
// error when headers for two sizes are present (the image is ambiguous).
func GPTSectorSize(head []byte) (uint32, error) {
	var found uint32
	for _, ss := range []uint32{512, 1024, 2048, 4096} {
		if int(ss)+8 <= len(head) && bytes.Equal(head[ss:ss+8], gptMagic) {
			if found != 0 {
				return 0, fmt.Errorf("GPT headers for sector sizes %d and %d: %w", found, ss, ErrMalformed)
			}
			found = ss
		}
	}
	return found, nil
}

// HasTable reports whether head (the first 8 KiB of a disk) holds a GPT
// header for any sector size or a DOS (MBR) table with a used primary entry.
func HasTable(head []byte) bool {
	if ss, err := GPTSectorSize(head); err != nil || ss != 0 {
		return true
	}
	if len(head) >= 512 && head[510] == 0x55 && head[511] == 0xAA {
		for i := 0; i < 4; i++ {
			e := head[446+16*i : 446+16*(i+1)]
			if e[4] != 0 && (e[0] == 0 || e[0] == 0x80) {
				return true
			}
		}
	}
	return false
}

// Entry is one partition found in a GPT or MBR partition table.
type Entry struct {
	Nr    int    // partition number (1-based, as the kernel numbers it)
	Start uint64 // bytes from the start of the disk
	Size  uint64 // bytes
	Type  string // GPT type GUID (upper case) or MBR type as "0x83"
	Name  string // GPT partition name
}

// MaxGPTEntries bounds what an untrusted header may ask us to read.
const MaxGPTEntries = 1024

// Read parses the GPT (preferred) or MBR table of a disk whose logical
// sector size is sectorSize. It returns nil, nil when there is none.
func Read(r io.ReaderAt, sectorSize uint32) ([]Entry, error) {
	if sectorSize < 512 || sectorSize&(sectorSize-1) != 0 {
		return nil, fmt.Errorf("sector size %d: %w", sectorSize, ErrSectorSize)
	}
	hdr := make([]byte, sectorSize)
	if _, err := r.ReadAt(hdr, int64(sectorSize)); err == nil && bytes.Equal(hdr[:8], gptMagic) {
		return parseGPT(r, hdr, sectorSize)
	}
	mbr := make([]byte, 512)
	if _, err := r.ReadAt(mbr, 0); err != nil {
		if err == io.EOF {
			return nil, nil
		}
		return nil, fmt.Errorf("read MBR: %w", err)
	}
	return parseMBR(mbr, sectorSize), nil
}

func parseGPT(r io.ReaderAt, hdr []byte, ss uint32) ([]Entry, error) {
	le := binary.LittleEndian
	hsize := le.Uint32(hdr[12:16])
	if hsize < 92 || hsize > ss {
		return nil, fmt.Errorf("GPT header size %d: %w", hsize, ErrMalformed)
	}
	want := le.Uint32(hdr[16:20])
	h := append([]byte(nil), hdr[:hsize]...)
	copy(h[16:20], []byte{0, 0, 0, 0})
	if crc32.ChecksumIEEE(h) != want {
		return nil, fmt.Errorf("GPT header checksum mismatch: %w", ErrMalformed)
	}
	entLBA := le.Uint64(hdr[72:80])
	n := le.Uint32(hdr[80:84])
	esize := le.Uint32(hdr[84:88])
	if n > MaxGPTEntries || esize < 128 || esize > 4096 || esize%8 != 0 {
		return nil, fmt.Errorf("GPT with %d entries of %d bytes: %w", n, esize, ErrMalformed)
	}
	ents := make([]byte, int(n)*int(esize))
	if _, err := r.ReadAt(ents, int64(entLBA)*int64(ss)); err != nil {
		return nil, fmt.Errorf("read GPT entries: %w", err)
	}
	if crc32.ChecksumIEEE(ents) != le.Uint32(hdr[88:92]) {
		return nil, fmt.Errorf("GPT entries checksum mismatch: %w", ErrMalformed)
	}
	var out []Entry
	for i := 0; i < int(n); i++ {
		e := ents[i*int(esize) : (i+1)*int(esize)]
		if bytes.Equal(e[:16], make([]byte, 16)) {
			continue
		}
		first, last := le.Uint64(e[32:40]), le.Uint64(e[40:48])
		if last < first || last > (1<<63-1)/uint64(ss) {
			return nil, fmt.Errorf("GPT entry %d: bad range %d-%d: %w", i+1, first, last, ErrMalformed)
		}
		out = append(out, Entry{Nr: i + 1, Start: first * uint64(ss), Size: (last - first + 1) * uint64(ss),
			Type: guidString(e[:16]), Name: utf16Name(e[56:128])})
	}
	return out, nil
}

func parseMBR(b []byte, ss uint32) []Entry {
	if b[510] != 0x55 || b[511] != 0xAA {
		return nil
	}
	var out []Entry
	for i := 0; i < 4; i++ {
		e := b[446+16*i : 446+16*(i+1)]
		typ := e[4]
		start, size := binary.LittleEndian.Uint32(e[8:12]), binary.LittleEndian.Uint32(e[12:16])
		// 0xEE is the protective MBR of a GPT; extended partitions are not followed.
		if typ == 0 || typ == 0xEE || typ == 0x05 || typ == 0x0F || typ == 0x85 || size == 0 || (e[0] != 0 && e[0] != 0x80) {
			continue
		}
		out = append(out, Entry{Nr: i + 1, Start: uint64(start) * uint64(ss), Size: uint64(size) * uint64(ss),
			Type: fmt.Sprintf("%#02x", typ)})
	}
	return out
}

func guidString(b []byte) string {
	le := binary.LittleEndian
	return strings.ToUpper(fmt.Sprintf("%08x-%04x-%04x-%x-%x", le.Uint32(b[0:4]), le.Uint16(b[4:6]), le.Uint16(b[6:8]), b[8:10], b[10:16]))
}

func utf16Name(b []byte) string {
	var r []rune
	for i := 0; i+1 < len(b); i += 2 {
		c := binary.LittleEndian.Uint16(b[i:])
		if c == 0 {
			break
		}
		r = append(r, rune(c))
	}
	return string(r)
}
