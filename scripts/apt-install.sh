#!/bin/bash
# apt-install.sh PACKAGE...: install the packages that are not installed yet,
# without letting their maintainer scripts start services (containerd, udev):
# loopkit's tests and demo start private daemons themselves and must not find
# system ones running. Does nothing (and needs no network) when every package
# is already installed.
set -euo pipefail

missing=()
for p in "$@"; do
	if ! dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
		missing+=("$p")
	fi
done
if [ ${#missing[@]} -eq 0 ]; then
	exit 0
fi

echo "apt-install: installing ${missing[*]}" >&2
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
	# invoke-rc.d and deb-systemd-invoke skip service starts when
	# policy-rc.d exits 101 ("action forbidden").
	printf '#!/bin/sh\nexit 101\n' >"$policy"
	chmod 0755 "$policy"
	trap 'rm -f "$policy"' EXIT
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
