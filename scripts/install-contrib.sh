#!/bin/bash
# install-contrib.sh CONTRIB_DIR [DESTDIR]: install loopkit's contrib files
# (make install). Nothing is enabled, started or edited in place:
#   contrib/systemd/*.{service,socket}  -> /etc/systemd/system/
#   contrib/hooks.d/*.json              -> /usr/share/containers/oci/hooks.d/
#   contrib/config/NAME.toml            -> /etc/NAME/config.toml (only if absent:
#                                          an admin's config is never overwritten)
#   contrib/containerd/...              -> /usr/local/share/loopkit/containerd/
#                                          (snippets to merge into containerd's
#                                          config by hand)
set -euo pipefail

src=${1:?usage: install-contrib.sh CONTRIB_DIR [DESTDIR]}
dest=${2:-}
[ -d "$src" ] || { echo "install-contrib: no $src, nothing to install" >&2; exit 0; }

inst() { # MODE FILE TARGET
	echo "install -m $1 $2 $3"
	install -D -m "$1" "$2" "$3"
}

shopt -s nullglob
for f in "$src"/systemd/*.service "$src"/systemd/*.socket; do
	inst 0644 "$f" "$dest/etc/systemd/system/$(basename "$f")"
done
for f in "$src"/hooks.d/*.json; do
	inst 0644 "$f" "$dest/usr/share/containers/oci/hooks.d/$(basename "$f")"
done
for f in "$src"/config/*.toml; do
	target=$dest/etc/$(basename "$f" .toml)/config.toml
	if [ -e "$target" ]; then
		echo "keep existing $target (sample: $f)"
	else
		inst 0644 "$f" "$target"
	fi
done
if [ -d "$src/containerd" ]; then
	(cd "$src/containerd" && find . -type f) | while read -r f; do
		f=${f#./}
		inst 0644 "$src/containerd/$f" "$dest/usr/local/share/loopkit/containerd/$f"
	done
fi
if [ -z "$dest" ] && [ -d /run/systemd/system ] && [ -n "$(echo "$src"/systemd/*)" ]; then
	echo "systemctl daemon-reload"
	systemctl daemon-reload
fi
