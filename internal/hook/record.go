package hook

import (
	"bytes"
	"encoding/json"
	"fmt"
	"regexp"
	"time"

	"github.com/loopkit/loopkit/pkg/loopdev"
)

// MaxRecordSize caps a state record read from disk.
const MaxRecordSize = 1 << 20

// Mount phases in a record.
const (
	PhaseAttached = "attached"
	PhaseMounted  = "mounted"
)

// Record is the per-container state file: what setup attached and mounted,
// with the identity (devnum, diskseq, backing) that teardown checks before
// it touches a device, so a number reused by someone else is left alone.
type Record struct {
	ToolVersion   string        `json:"tool_version"`
	ID            string        `json:"id"`
	Bundle        string        `json:"bundle"`
	InitPid       int           `json:"init_pid"`
	InitStartTime uint64        `json:"init_start_time"`
	MntNSInode    uint64        `json:"mnt_ns_inode"`
	Created       time.Time     `json:"created"`
	Mounts        []MountRecord `json:"mounts"`
}

// MountRecord identifies one loop binding and where it was mounted.
type MountRecord struct {
	Name      string         `json:"name"`
	ImagePath string         `json:"image_path"` // the file attached, resolved without symlinks
	ImageDev  uint64         `json:"image_dev"`
	ImageIno  uint64         `json:"image_ino"`
	ImageSize int64          `json:"image_size"`
	FSType    string         `json:"fstype"`
	Mode      string         `json:"mode"`
	Dest      string         `json:"dest"`
	Device    string         `json:"device"`
	Devnum    loopdev.Devnum `json:"devnum"`
	DiskSeq   uint64         `json:"diskseq"`
	Phase     string         `json:"phase"`
}

// LoopRecord is the identity pkg/loopdev's guarded detach works from.
func (m MountRecord) LoopRecord() loopdev.Record {
	return loopdev.Record{
		Path:    m.Device,
		Devnum:  m.Devnum,
		DiskSeq: m.DiskSeq,
		Backing: loopdev.BackingID{Dev: m.ImageDev, Ino: m.ImageIno},
	}
}

var loopDevice = regexp.MustCompile(`^/dev/loop[0-9]{1,7}$`)

// ParseRecord decodes a state record strictly (no unknown fields, no
// duplicate keys, no trailing data) and validates the fields teardown acts on.
func ParseRecord(data []byte) (*Record, error) {
	if len(data) > MaxRecordSize {
		return nil, fmt.Errorf("record larger than %d bytes", MaxRecordSize)
	}
	if err := checkJSON(data); err != nil {
		return nil, err
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var r Record
	if err := dec.Decode(&r); err != nil {
		return nil, describeJSONError(err)
	}
	if err := validateID(r.ID); err != nil {
		return nil, err
	}
	if r.InitPid < 0 {
		return nil, fmt.Errorf("negative init_pid")
	}
	for i, m := range r.Mounts {
		if !loopDevice.MatchString(m.Device) {
			return nil, fmt.Errorf("mounts[%d]: invalid device %q", i, truncate(m.Device, 32))
		}
		if m.Devnum == 0 {
			return nil, fmt.Errorf("mounts[%d]: devnum is 0", i)
		}
		// Setup always records the image's dev/ino; a zero identity would
		// make the guarded detach match whatever now sits on the device.
		if m.ImageDev == 0 && m.ImageIno == 0 {
			return nil, fmt.Errorf("mounts[%d]: image_dev and image_ino are 0 (no backing identity)", i)
		}
		if m.Phase != PhaseAttached && m.Phase != PhaseMounted {
			return nil, fmt.Errorf("mounts[%d]: invalid phase %q", i, truncate(m.Phase, 32))
		}
	}
	return &r, nil
}
