#!/usr/bin/env bash
# gen-certs.sh writes a self-signed certificate and its key for local HTTPS:
# certs/cert.pem and certs/key.pem, valid for localhost, 127.0.0.1 and ::1.
#
#   scripts/gen-certs.sh [-f] [DIR]     # DIR defaults to certs/ in the repository
#   go run . -tls-cert certs/cert.pem -tls-key certs/key.pem
#   curl --cacert certs/cert.pem https://localhost:8741/healthz
#
# -f overwrites an existing pair. DAYS (default 365) sets the validity.
# Needs openssl 1.1.1 or newer. For development only: nothing trusts the
# certificate unless told to.
set -euo pipefail

force=
if [[ "${1:-}" == -f ]]; then
	force=1
	shift
fi
out=${1:-"$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/certs"}
days=${DAYS:-365}

if ! command -v openssl >/dev/null; then
	echo "gen-certs.sh: openssl not found; install it (Debian/Ubuntu: apt-get install openssl)" >&2
	exit 1
fi
cert=$out/cert.pem
key=$out/key.pem
if [[ -z "$force" && ( -e "$cert" || -e "$key" ) ]]; then
	echo "gen-certs.sh: $cert or $key exists; -f overwrites" >&2
	exit 1
fi

mkdir -p "$out"
umask 077 # the key is readable by its owner only
# CA:FALSE: Firefox refuses a CA certificate used as a server's own.
# openssl's progress dots go nowhere; its errors are shown.
if ! msg=$(openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
	-days "$days" -subj "/CN=localhost" \
	-addext "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1" \
	-addext "basicConstraints=critical,CA:FALSE" \
	-addext "keyUsage=critical,digitalSignature" \
	-addext "extendedKeyUsage=serverAuth" \
	-keyout "$key" -out "$cert" 2>&1); then
	echo "$msg" >&2
	echo "gen-certs.sh: openssl failed (it needs to be 1.1.1 or newer)" >&2
	exit 1
fi
chmod 644 "$cert"

echo "wrote $cert and $key (valid $days days for localhost, 127.0.0.1, ::1)"
echo "serve:  go run . -tls-cert $cert -tls-key $key"
echo "check:  curl --cacert $cert https://localhost:8741/healthz"
