#!/bin/sh
# Writes a random bearer token per role (64 hex characters from /dev/urandom) into DIR (default: docker/secrets/,
# which git ignores), the files docker/compose.yaml's `secrets:` mount. A token that exists is kept: run it again
# after adding a role, or delete a file to replace that token. Usage: sh docker/tokens.sh [DIR]
# The directory is private (0700); the files are world-readable (0644) because compose bind-mounts them as they are
# and the services run as uid 10001, not as you.
set -eu
dir=${1:-$(dirname "$0")/secrets}
mkdir -p "$dir"
chmod 700 "$dir"
for role in generation reward reference trainer orchestrator; do
	if [ -s "$dir/$role" ]; then
		echo "$dir/$role: kept"
		continue
	fi
	token=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
	printf '%s\n' "$token" > "$dir/$role.tmp"
	chmod 644 "$dir/$role.tmp"
	mv "$dir/$role.tmp" "$dir/$role"
	echo "$dir/$role: written"
done
