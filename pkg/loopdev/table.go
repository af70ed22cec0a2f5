package loopdev

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"io"
	"strings"

	"golang.org/x/sys/unix"
)

// TableEntry is one partition found in a GPT or MBR partition table.
type TableEntry struct {
	Nr    int    // partition number (1-based, as the kernel numbers it)
	Start uint64 // bytes from the start of the disk
	Size  uint64 // bytes
	Type  string // GPT type GUID (upper case) or MBR type as "0x83"
	Name  string // GPT partition name
}

// maxGPTEntries bounds what an untrusted header may ask us to read.
const maxGPTEntries = 1024

// ReadPartitionTable parses the GPT (preferred) or MBR table of a disk whose
// logical sector size is sectorSize. It returns nil, nil when there is none.
// Kernels built without partition parsers (CONFIG_EFI_PARTITION unset) never
// create partitions from a scan; AddPartitions uses this table instead.
func ReadPartitionTable(r io.ReaderAt, sectorSize uint32) ([]TableEntry, error) {
	if sectorSize < 512 || sectorSize&(sectorSize-1) != 0 {
		return nil, fmt.Errorf("sector size %d: %w", sectorSize, ErrInvalidArgument)
	}
	hdr := make([]byte, sectorSize)
	if _, err := r.ReadAt(hdr, int64(sectorSize)); err == nil && bytes.Equal(hdr[:8], []byte("EFI PART")) {
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

func parseGPT(r io.ReaderAt, hdr []byte, ss uint32) ([]TableEntry, error) {
	le := binary.LittleEndian
	hsize := le.Uint32(hdr[12:16])
	if hsize < 92 || hsize > ss {
		return nil, fmt.Errorf("GPT header size %d: %w", hsize, ErrInvalidArgument)
	}
	want := le.Uint32(hdr[16:20])
	h := append([]byte(nil), hdr[:hsize]...)
	copy(h[16:20], []byte{0, 0, 0, 0})
	if crc32.ChecksumIEEE(h) != want {
		return nil, fmt.Errorf("GPT header checksum mismatch: %w", ErrInvalidArgument)
	}
	entLBA := le.Uint64(hdr[72:80])
	n := le.Uint32(hdr[80:84])
	esize := le.Uint32(hdr[84:88])
	if n > maxGPTEntries || esize < 128 || esize > 4096 || esize%8 != 0 {
		return nil, fmt.Errorf("GPT with %d entries of %d bytes: %w", n, esize, ErrInvalidArgument)
	}
	ents := make([]byte, int(n)*int(esize))
	if _, err := r.ReadAt(ents, int64(entLBA)*int64(ss)); err != nil {
		return nil, fmt.Errorf("read GPT entries: %w", err)
	}
	if crc32.ChecksumIEEE(ents) != le.Uint32(hdr[88:92]) {
		return nil, fmt.Errorf("GPT entries checksum mismatch: %w", ErrInvalidArgument)
	}
	var out []TableEntry
	for i := 0; i < int(n); i++ {
		e := ents[i*int(esize) : (i+1)*int(esize)]
		if bytes.Equal(e[:16], make([]byte, 16)) {
			continue
		}
		first, last := le.Uint64(e[32:40]), le.Uint64(e[40:48])
		if last < first || last > (1<<63-1)/uint64(ss) {
			return nil, fmt.Errorf("GPT entry %d: bad range %d-%d: %w", i+1, first, last, ErrInvalidArgument)
		}
		out = append(out, TableEntry{Nr: i + 1, Start: first * uint64(ss), Size: (last - first + 1) * uint64(ss),
			Type: guidString(e[:16]), Name: utf16Name(e[56:128])})
	}
	return out, nil
}

func parseMBR(b []byte, ss uint32) []TableEntry {
	if b[510] != 0x55 || b[511] != 0xAA {
		return nil
	}
	var out []TableEntry
	for i := 0; i < 4; i++ {
		e := b[446+16*i : 446+16*(i+1)]
		typ := e[4]
		start, size := binary.LittleEndian.Uint32(e[8:12]), binary.LittleEndian.Uint32(e[12:16])
		// 0xEE is the protective MBR of a GPT; extended partitions are not followed.
		if typ == 0 || typ == 0xEE || typ == 0x05 || typ == 0x0F || typ == 0x85 || size == 0 || (e[0] != 0 && e[0] != 0x80) {
			continue
		}
		out = append(out, TableEntry{Nr: i + 1, Start: uint64(start) * uint64(ss), Size: uint64(size) * uint64(ss),
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

// AddPartitions parses the device's own partition table and creates every
// partition synchronously with BLKPG_ADD_PARTITION (spec 7.4): no uevent
// wait, and it works on kernels without partition parsers. Partitions the
// kernel's scan already created (EBUSY) are fine. It returns the partitions
// as sysfs shows them afterwards.
func (d *Device) AddPartitions(ctx context.Context) ([]Partition, error) {
	if err := d.checkAlive(); err != nil {
		return nil, err
	}
	r, err := reopen(d.file, openBase|unix.O_RDONLY)
	if err != nil {
		return nil, err
	}
	table, err := ReadPartitionTable(r, d.sectorSize)
	r.Close()
	if err != nil {
		return nil, fmt.Errorf("read partition table of %s: %w", d.path, err)
	}
	for _, e := range table {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if e.Start+e.Size > d.size {
			return nil, fmt.Errorf("partition %d of %s ends past the device: %w", e.Nr, d.path, ErrInvalidArgument)
		}
		if err := d.AddPartition(e.Nr, e.Start, e.Size); err != nil {
			return nil, err
		}
	}
	return d.Partitions()
}
