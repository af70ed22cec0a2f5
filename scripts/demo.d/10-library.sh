# shellcheck shell=bash disable=SC2154 # BIN, WORK and the helpers come from scripts/demo.sh
# Section: pkg/loopdev through loopctl. An image file with a GPT of two
# partitions is attached, formatted, mounted, written, detached, then
# attached again read-only to show the data survived and the new attachment
# has a new diskseq. Sourced by scripts/demo.sh.

IMG=$WORK/disk.img
MNT=$WORK/mnt
mkdir -p "$MNT"

step "Creating a 128 MiB sparse image file with a GPT of two partitions"
run truncate -s 128M "$IMG"
run sfdisk --quiet "$IMG" <<'GPT'
label: gpt
size=64MiB, type=linux, name=data
type=linux, name=spare
GPT
run sfdisk --dump "$IMG" | sed -n '/^\//s/^/   /p'

step "Attaching it with loopctl (pkg/loopdev: locked allocation, LOOP_CONFIGURE, partitions via BLKPG)"
attach_json=$(run "$BIN/loopctl" attach --json --partscan --tag loopkit-demo "$IMG")
DEV=$(jq -r .path <<<"$attach_json")
SEQ=$(jq -r .diskseq <<<"$attach_json")
# Undo by diskseq: if the number was reused meanwhile, it is not touched.
cleanup_push "'$BIN/loopctl' detach --wait --diskseq $SEQ $DEV"
undo_attach=$_last_cleanup
ok "attached $DEV, devnum $(jq -r .devnum <<<"$attach_json"), diskseq $SEQ, direct I/O $(jq -r .direct_io <<<"$attach_json")"
note "the diskseq is the kernel's never-reused number for this attachment: tools use it to tell"
note "this binding from a later one that gets the same /dev/loopN"

step "Showing the device and its partitions"
run "$BIN/loopctl" info "$DEV" | sed 's/^/   /'
[ "$(jq '.partitions | length' <<<"$attach_json")" = 2 ] || fail "expected 2 partitions: $attach_json"
PART=$(jq -r '.partitions[0].path' <<<"$attach_json")
[ -b "$PART" ] || fail "$PART is not a block device"
ok "partition devices exist: $(jq -r '[.partitions[].path] | join(" ")' <<<"$attach_json")"

step "Formatting the first partition (ext4) and mounting it"
run mkfs.ext4 -q -L demo-data "$PART"
run mount "$PART" "$MNT"
cleanup_push "umount '$MNT'"
undo_mount=$_last_cleanup
run sh -c "echo 'hello from loopkit' > '$MNT/hello.txt'"
run df -h "$MNT" | sed 's/^/   /'
run lsblk -o NAME,MAJ:MIN,SIZE,RO,TYPE,MOUNTPOINTS "$DEV" | sed 's/^/   /'
run blkid "$PART" | sed 's/^/   /'
ok "wrote $MNT/hello.txt"

step "Unmounting and detaching (fsync, lock, delete partitions, LOOP_CLR_FD)"
run umount "$MNT"
cleanup_pop "$undo_mount"
run "$BIN/loopctl" detach --wait --diskseq "$SEQ" "$DEV"
cleanup_pop "$undo_attach"
[ "$(jq length <<<"$("$BIN/loopctl" list --json --under "$WORK")")" = 0 ] || fail "$DEV still bound"
ok "$DEV detached"

step "Attaching the image again, read-only, and reading the file back"
attach_json=$(run "$BIN/loopctl" attach --json --read-only --partscan --tag loopkit-demo "$IMG")
DEV2=$(jq -r .path <<<"$attach_json")
SEQ2=$(jq -r .diskseq <<<"$attach_json")
cleanup_push "'$BIN/loopctl' detach --wait --diskseq $SEQ2 $DEV2"
undo_attach=$_last_cleanup
PART=$(jq -r '.partitions[0].path' <<<"$attach_json")
run mount -o ro "$PART" "$MNT"
cleanup_push "umount '$MNT'"
undo_mount=$_last_cleanup
got=$(run cat "$MNT/hello.txt")
[ "$got" = "hello from loopkit" ] || fail "read back '$got'"
ok "read back: $got"
[ "$SEQ2" != "$SEQ" ] || fail "diskseq $SEQ2 reused"
ok "new attachment $DEV2 has diskseq $SEQ2 (was $SEQ): a guarded detach of the old one cannot hit it"
if "$BIN/loopctl" detach --diskseq "$SEQ" "$DEV2" 2>/dev/null; then
	fail "a detach with the old diskseq $SEQ touched $DEV2"
fi
ok "loopctl detach --diskseq $SEQ $DEV2 refused (stale identity)"
run umount "$MNT"
cleanup_pop "$undo_mount"
run "$BIN/loopctl" detach --wait --diskseq "$SEQ2" "$DEV2"
cleanup_pop "$undo_attach"
ok "$DEV2 detached"
