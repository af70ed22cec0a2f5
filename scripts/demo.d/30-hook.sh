# shellcheck shell=bash disable=SC2154 # BIN, WORK and the helpers come from scripts/demo.sh
# Section: oci-loop-hook under runc. A read-only erofs data image is listed
# in a root-owned hook configuration (the policy); a runc bundle asks for it
# by annotation, its createRuntime hook attaches and mounts it read-only at
# /data inside the container, and its poststop hook unmounts and detaches.
# Sourced by scripts/demo.sh.

HOOK=$WORK/hook
HOOK_CFG=$HOOK/etc/config.toml
HOOK_LOG=$HOOK/hook.log
BUNDLE=$HOOK/bundle
HOOK_ID=loopkit-demo-hook
mkdir -p "$HOOK"/{etc,src,images,runc,state}
chmod 0755 "$HOOK" "$HOOK/etc" "$HOOK/images"

step "Making a read-only erofs data image"
echo 'hello from a read-only erofs image' >"$HOOK/src/hello.txt"
seq 1 1000 >"$HOOK/src/numbers.txt"
run mkfs.erofs --quiet "$HOOK/images/dataset1.erofs" "$HOOK/src"
chmod 0644 "$HOOK/images/dataset1.erofs"
run blkid -p "$HOOK/images/dataset1.erofs" | sed 's/^/   /'
ok "$(du -h "$HOOK/images/dataset1.erofs" | cut -f1) image with hello.txt and numbers.txt"

step "Writing the hook's policy: a root-owned config that allows only this image"
cat >"$HOOK_CFG" <<EOF
version = 1
state_dir = "$HOOK/state"
log = "file:$HOOK_LOG"
timeout_seconds = 20
dest_allowed_prefixes = ["/data"]

[images.dataset1]
path = "$HOOK/images/dataset1.erofs"
fstype = "erofs"
EOF
chmod 0644 "$HOOK_CFG"
sed 's/^/   /' "$HOOK_CFG"
run "$BIN/oci-loop-hook" --config "$HOOK_CFG" check-config | sed 's/^/   /'
ok "configuration accepted"

step "Making a runc bundle (busybox rootfs) whose hooks run oci-loop-hook"
mkdir -p "$BUNDLE/rootfs"/{bin,proc,sys,dev,data,tmp,etc}
cp "$(command -v busybox)" "$BUNDLE/rootfs/bin/busybox"
for a in sh cat grep head wc touch; do ln -s busybox "$BUNDLE/rootfs/bin/$a"; done
run runc spec --bundle "$BUNDLE"
hook_entry() {
	jq -n --arg p "$BIN/oci-loop-hook" --arg c "$HOOK_CFG" --arg verb "$1" \
		'[{path: $p, args: ["oci-loop-hook", "--config", $c, $verb], env: ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], timeout: 30}]'
}
jq --argjson setup "$(hook_entry setup)" --argjson teardown "$(hook_entry teardown)" '
	.process.terminal = false
	| .process.args = ["/bin/sh", "-c", "grep \" /data \" /proc/self/mountinfo; cat /data/hello.txt; wc -l /data/numbers.txt; touch /data/new 2>&1; true"]
	| .annotations = {"org.ociloop.image": "dataset1", "org.ociloop.dest": "/data"}
	| .hooks = {createRuntime: $setup, poststop: $teardown}' \
	"$BUNDLE/config.json" >"$BUNDLE/config.json.new"
mv "$BUNDLE/config.json.new" "$BUNDLE/config.json"
jq '{annotations, hooks: (.hooks | map_values(map(.args)))}' "$BUNDLE/config.json" | sed 's/^/   /'
ok "bundle $BUNDLE"

step "runc run: the createRuntime hook mounts the image at /data, poststop removes it"
cleanup_push "runc --root '$HOOK/runc' delete --force $HOOK_ID; show_log_on_failure oci-loop-hook '$HOOK_LOG'"
undo_runc=$_last_cleanup
out=$(run runc --root "$HOOK/runc" run --bundle "$BUNDLE" "$HOOK_ID" </dev/null)
indent <<<"$out"
[[ "$out" == *"hello from a read-only erofs image"* ]] || fail "the container did not read the file from the image"
[[ "$out" == *" /data ro,"*" erofs /dev/loop"* ]] || fail "no read-only erofs loop mount at /data"
[[ "$out" == *"Read-only file system"* ]] || fail "writing to /data did not fail with EROFS"
cleanup_pop "$undo_runc"
ok "the container read hello.txt from the erofs image, mounted read-only at /data"
note "what the hook did (its log):"
sed -E 's/^time="?[^" ]*"? //; s/^/     /' "$HOOK_LOG" | grep -v 'level=debug' | cut -c1-160

step "Checking the hook cleaned up after the container"
runc --root "$HOOK/runc" list -q | grep -qx "$HOOK_ID" && fail "container $HOOK_ID still exists"
[ -z "$(ls -A "$HOOK/state")" ] || fail "hook state left (records or lock files): $(ls -A "$HOOK/state")"
[ "$(jq length <<<"$("$BIN/loopctl" list --json --under "$HOOK")")" = 0 ] || fail "a loop device still backs a file in $HOOK"
ok "no container, nothing in the state directory, no loop device backed by the image"
