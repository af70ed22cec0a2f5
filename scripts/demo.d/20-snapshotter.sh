# shellcheck shell=bash disable=SC2154 # BIN, WORK and the helpers come from scripts/demo.sh
# Section: loop-snapshotter under a private containerd. loop-snapshotter
# and a containerd 1.6 with it as the proxy plugin "loop" run under
# $WORK/ctd (own root, state, sockets, runc root; never the system
# containerd). A four-layer image built here from the host's static busybox
# is imported (unpacked through the snapshotter into erofs layers, layered
# mode), a container runs on an overlay of those layers whose writable upper
# is its own loop-backed ext4 image with a size limit, and writing past the
# limit fails with ENOSPC. Everything is removed again and the snapshotter's state is
# shown empty. Sourced by scripts/demo.sh.

CTD=$WORK/ctd
CTD_SOCK=$CTD/run/containerd.sock
SNAP_SOCK=$CTD/run/loop-snapshotter.sock
SNAP_ROOT=$CTD/root/io.containerd.snapshotter.v1.loop
SNAP_CFG=$CTD/etc/loop-snapshotter.toml
CTD_NS=loopkit-demo
IMAGE_REF=loopkit.demo/busybox-layers:v1
LIMIT=$((128 << 20))
mkdir -p "$CTD"/{etc,run,logs,image,runc}
chmod 0700 "$CTD" "$CTD/etc"

ctr_() { ctr --address "$CTD_SOCK" --namespace "$CTD_NS" "$@"; }
snap_status() { "$BIN/loop-snapshotter" status --config "$SNAP_CFG" --address "$SNAP_SOCK" "$@"; }

step "Starting loop-snapshotter (root $SNAP_ROOT)"
# Layered mode (the default for a new root, spelled out here): layers
# become erofs images; a container's writable upper gets its size by label,
# else default_size.
cat >"$SNAP_CFG" <<EOF
mode = "layered"
default_size = "64MiB"
max_size = "1GiB"
EOF
chmod 0600 "$SNAP_CFG"
start_bg "$CTD/logs/loop-snapshotter.log" \
	"$BIN/loop-snapshotter" --config "$SNAP_CFG" --root "$SNAP_ROOT" --address "$SNAP_SOCK"
SNAP_PID=$!
DEMO_PIDS+=("$SNAP_PID")
cleanup_push "stop_pid $SNAP_PID loop-snapshotter; show_log_on_failure loop-snapshotter '$CTD/logs/loop-snapshotter.log'"
undo_snap=$_last_cleanup
wait_socket "$SNAP_SOCK" "$SNAP_PID" loop-snapshotter
ok "serving $SNAP_SOCK (pid $SNAP_PID)"

step "Starting a private containerd $(containerd --version | awk '{print $3}') with proxy plugin \"loop\""
cat >"$CTD/etc/containerd.toml" <<EOF
version = 2
root = "$CTD/root"
state = "$CTD/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.internal.v1.tracing",
  "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "$CTD_SOCK"
[ttrpc]
  address = "$CTD_SOCK.ttrpc"

[proxy_plugins]
  [proxy_plugins.loop]
    type = "snapshot"
    address = "$SNAP_SOCK"

[plugins."io.containerd.internal.v1.opt"]
  path = "$CTD/opt"
EOF
sed -n '/proxy_plugins/,/address/s/^/   /p' "$CTD/etc/containerd.toml"
start_bg "$CTD/logs/containerd.log" containerd --config "$CTD/etc/containerd.toml"
CTD_PID=$!
DEMO_PIDS+=("$CTD_PID")
cleanup_push "stop_pid $CTD_PID containerd; show_log_on_failure containerd '$CTD/logs/containerd.log'"
undo_ctd=$_last_cleanup
wait_socket "$CTD_SOCK" "$CTD_PID" containerd
run ctr_ plugins ls | awk 'NR == 1 || $2 == "loop"' | sed 's/^/   /'
ok "containerd serving $CTD_SOCK (pid $CTD_PID)"
note "below, ctr_ is: ctr --address $CTD_SOCK --namespace $CTD_NS"

# demo_layer DIR TAR: a reproducible uncompressed layer tar of DIR's contents.
demo_layer() {
	(cd "$1" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
		tar --no-recursion --owner=0 --group=0 --numeric-owner --mtime=@1700000000 -cf "$2" -T -)
}

# demo_blob FILE MEDIATYPE: store FILE as a blob of the OCI layout and print
# its descriptor.
demo_blob() {
	local d s
	d=$(sha256sum "$1" | cut -d' ' -f1)
	s=$(stat -c %s "$1")
	cp "$1" "$CTD/image/oci/blobs/sha256/$d"
	jq -cn --arg m "$2" --arg d "sha256:$d" --argjson s "$s" '{mediaType: $m, digest: $d, size: $s}'
}

step "Building a four-layer OCI image from busybox-static (no registry, no network)"
L=$CTD/image/layers
mkdir -p "$L"/{1,2,3,4} "$CTD/image/oci/blobs/sha256"
mkdir -p "$L/1"/{bin,tmp,proc,sys,dev,run}
cp "$(command -v busybox)" "$L/1/bin/busybox"
for a in sh ls cat df dd rm echo test head sync sleep grep wc mount; do ln -s busybox "$L/1/bin/$a"; done
mkdir -p "$L/2/etc"
echo 'root:x:0:0:root:/:/bin/sh' >"$L/2/etc/passwd"
echo 'root:x:0:' >"$L/2/etc/group"
echo 'layer 2' >"$L/2/etc/layer2"
mkdir -p "$L/3/data"
head -c $((1 << 20)) /dev/urandom >"$L/3/data/blob"
# An OCI whiteout: layer 4 deletes layer 2's file.
mkdir -p "$L/4/etc"
: >"$L/4/etc/.wh.layer2"
echo 'layer 4' >"$L/4/etc/layer4"
layers=() diff_ids=()
for n in 1 2 3 4; do
	demo_layer "$L/$n" "$CTD/image/layer$n.tar"
	layers+=("$(demo_blob "$CTD/image/layer$n.tar" application/vnd.oci.image.layer.v1.tar)")
	diff_ids+=("$(jq -r .digest <<<"${layers[-1]}")")
done
arch=$(dpkg --print-architecture)
jq -n --arg arch "$arch" --args '{architecture: $arch, os: "linux", created: "2023-11-14T22:13:20Z",
	config: {Env: ["PATH=/bin"], Cmd: ["/bin/sleep", "1000000"]},
	rootfs: {type: "layers", diff_ids: $ARGS.positional}}' "${diff_ids[@]}" >"$CTD/image/config.json"
config=$(demo_blob "$CTD/image/config.json" application/vnd.oci.image.config.v1+json)
printf '%s\n' "${layers[@]}" | jq -s --argjson c "$config" '{schemaVersion: 2,
	mediaType: "application/vnd.oci.image.manifest.v1+json", config: $c, layers: .}' >"$CTD/image/manifest.json"
manifest=$(demo_blob "$CTD/image/manifest.json" application/vnd.oci.image.manifest.v1+json)
jq -n --argjson m "$manifest" --arg ref "$IMAGE_REF" --arg arch "$arch" '{schemaVersion: 2,
	mediaType: "application/vnd.oci.image.index.v1+json",
	manifests: [$m + {platform: {architecture: $arch, os: "linux"},
		annotations: {"io.containerd.image.name": $ref, "org.opencontainers.image.ref.name": $ref}}]}' \
	>"$CTD/image/oci/index.json"
echo '{"imageLayoutVersion":"1.0.0"}' >"$CTD/image/oci/oci-layout"
tar -C "$CTD/image/oci" -cf "$CTD/image/image.tar" oci-layout index.json blobs
for n in 1 2 3 4; do
	note "layer $n: $(tar -tf "$CTD/image/layer$n.tar" | grep -v '/$' | head -4 | tr '\n' ' ')($(du -h "$CTD/image/layer$n.tar" | cut -f1))"
done
ok "$IMAGE_REF: OCI archive of $(du -h "$CTD/image/image.tar" | cut -f1)"

step "Importing it: containerd unpacks each layer, the snapshotter makes each an erofs image"
run ctr_ image import --snapshotter loop "$CTD/image/image.tar" | sed 's/^/   /'
cleanup_push "ctr --address '$CTD_SOCK' --namespace $CTD_NS image rm --sync $IMAGE_REF"
undo_image=$_last_cleanup
run ctr_ snapshots --snapshotter loop ls | sed 's/^/   /'
n=$(ctr_ snapshots --snapshotter loop ls | grep -c ' Committed *$' || true)
[ "$n" = 4 ] || fail "$n committed snapshots, want 4"
run ls -l "$SNAP_ROOT/layers" | sed 's/^/   /'
ok "$n committed snapshots, one per layer, each an erofs image"

step "Running a container on the loop snapshotter with a $((LIMIT >> 20)) MiB size limit"
run ctr_ run -d --null-io --snapshotter loop --runc-root "$CTD/runc" \
	--snapshotter-label "containerd.io/snapshot/max-size=$LIMIT" "$IMAGE_REF" demo
cleanup_push "ctr --address '$CTD_SOCK' --namespace $CTD_NS task kill -s SIGKILL demo; sleep 0.5; ctr --address '$CTD_SOCK' --namespace $CTD_NS task delete -f demo; ctr --address '$CTD_SOCK' --namespace $CTD_NS container rm demo"
undo_container=$_last_cleanup
cexec() { ctr_ task exec --exec-id "x$RANDOM$RANDOM" demo "$@"; }
out=$(run cexec sh -c 'cat /etc/layer4; test -e /etc/layer2 && echo layer2 still there; wc -c < /data/blob')
indent <<<"$out"
[[ "$out" == *"layer 4"* && "$out" != *"still there"* && "$out" == *1048576* ]] || fail "container sees the wrong layers"
ok "the container sees all four layers, layer 4's whiteout hides /etc/layer2"

step "Inside the container: df -h / and the root mount"
out=$(run cexec sh -c 'df -h /; grep " / / " /proc/self/mountinfo | cut -c1-160')
indent <<<"$out"
size=$(cexec df -k / | awk 'NR == 2 { print $2 }')
((size * 1024 <= LIMIT && size * 1024 > LIMIT * 3 / 4)) || fail "df shows ${size} KiB for a $((LIMIT >> 20)) MiB limit"
[[ "$out" == *" - overlay "* ]] || fail "the root is not an overlay"
ok "root is an overlay of the erofs layers, ${size} KiB writable: the size label became the filesystem size"

step "On the host: the layer mounts and the container's upper device (loop-snapshotter status, lsblk)"
run grep -E " $SNAP_ROOT/(l/[0-9]+|u/[0-9]+/m) " /proc/self/mountinfo | awk '{ print "   " $5, $9, $10 }'

run snap_status | sed 's/^/   /'
st=$(snap_status --json)
DEV=$(jq -r '[.snapshots[] | select(.kind == "Active" and .device != "")][0].device' <<<"$st")
[ -b "$DEV" ] || fail "no active snapshot with a device in: $st"
run lsblk -o NAME,MAJ:MIN,SIZE,RO,TYPE,MOUNTPOINTS "$DEV" | sed 's/^/   /'
run "$BIN/loopctl" info "$DEV" | sed 's/^/   /'
ok "$DEV holds the container's writable upper (diskseq $(jq -r --arg d "$DEV" '.snapshots[] | select(.device == $d) | .diskseq' <<<"$st"))"

step "Writing 200 MiB into the $((LIMIT >> 20)) MiB root: the kernel refuses cleanly"
out=$(run cexec sh -c 'dd if=/dev/zero of=/fill bs=1M count=200 2>&1; echo "dd exit status $?"')
indent <<<"$out"
[[ "$out" == *"No space left on device"* && "$out" != *"status 0"* ]] || fail "writing past the limit did not fail with ENOSPC"
out=$(run cexec sh -c 'rm /fill && echo still writable > /after && cat /after && df -h / | tail -1')
indent <<<"$out"
[[ "$out" == *"still writable"* ]] || fail "the root is not usable after ENOSPC"
ok "ENOSPC inside the container, the host and the other snapshots untouched; space is back after rm"

step "Removing the container and the image (containerd's GC removes the snapshots)"
run ctr_ task kill -s SIGKILL demo
for ((i = 0; i < 100; i++)); do
	ctr_ task ls | awk '$1 == "demo" && $3 == "STOPPED" { f = 1 } END { exit !f }' && break
	sleep 0.1
done
run ctr_ task delete demo >/dev/null
run ctr_ container rm demo
cleanup_pop "$undo_container"
run ctr_ image rm --sync "$IMAGE_REF" >/dev/null
cleanup_pop "$undo_image"
left=$(ctr_ snapshots --snapshotter loop ls | tail -n +2)
[ -z "$left" ] || fail "snapshots left: $left"
st=$(snap_status --json)
if [ "$(jq '(.snapshots | length) + (.orphans | length)' <<<"$st")" != 0 ]; then
	fail "loop-snapshotter status not empty: $st"
fi
ok "no snapshot, no orphan: $(jq -c '{snapshots: (.snapshots | length), orphans: (.orphans | length), trash_entries, staging_entries}' <<<"$st")"

step "Stopping containerd and loop-snapshotter (SIGTERM)"
run stop_pid "$CTD_PID" containerd
cleanup_pop "$undo_ctd"
run stop_pid "$SNAP_PID" loop-snapshotter
cleanup_pop "$undo_snap"
ok "both exited cleanly"
