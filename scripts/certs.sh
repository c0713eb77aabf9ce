#!/usr/bin/env bash
# Test TLS material for the local stack, made with openssl (idempotent: only what is missing,
# expiring or inconsistent is (re)made). Files in .local/certs (or $OUTBOX_CERTS_DIR):
#   ca.pem, ca.key          the test CA; clients trust ca.pem
#   server.pem, server.key  CN=localhost, SAN DNS:localhost + IP:127.0.0.1, signed by the CA
#                           (key: PKCS#8, unencrypted, 0600 root; pg.sh copies it for postgres)
#   server-keystore.pem     server.key + server.pem + ca.pem: Kafka's PEM keystore file
#   other-ca.pem            an unrelated CA (signed nothing here): for "wrong CA" tests
# Not in the SANs on purpose: 127.0.0.2 (tests use it to prove host name verification).
# Usage: scripts/certs.sh [ensure|dir]
set -euo pipefail
. "$(dirname "$0")/lib.sh"

DAYS_CA=3650
DAYS_SERVER=825
RENEW_SECONDS=$((30 * 24 * 3600))  # remake anything expiring within 30 days

# ssl ARGS...: openssl, quiet unless it fails.
ssl() { openssl "$@" 2>"$CERTS/.openssl.err" || { cat "$CERTS/.openssl.err" >&2; return 1; }; }

# valid FILE: a readable certificate that does not expire within RENEW_SECONDS.
valid() { [ -s "$1" ] && openssl x509 -noout -checkend "$RENEW_SECONDS" -in "$1" >/dev/null 2>&1; }
# matches CERT KEY: the certificate carries the key's public half.
matches() {
  [ -s "$1" ] && [ -s "$2" ] &&
    [ "$(openssl x509 -noout -pubkey -in "$1" 2>/dev/null)" = "$(openssl pkey -pubout -in "$2" 2>/dev/null)" ]
}

new_ca() {  # new_ca NAME CN: NAME.pem + NAME.key, a self-signed CA
  local tmp=$CERTS/.tmp-$1
  ssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$tmp.key"
  chmod 600 "$tmp.key"
  ssl req -x509 -new -key "$tmp.key" -sha256 -days "$DAYS_CA" -subj "/O=outbox-relay local test/CN=$2" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" -out "$tmp.pem"
  mv "$tmp.key" "$CERTS/$1.key"
  mv "$tmp.pem" "$CERTS/$1.pem"
}

new_server() {
  local tmp=$CERTS/.tmp-server
  ssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$tmp.key"
  chmod 600 "$tmp.key"
  ssl req -new -key "$tmp.key" -subj "/O=outbox-relay local test/CN=localhost" -out "$tmp.csr"
  cat > "$tmp.ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
EXT
  ssl x509 -req -in "$tmp.csr" -CA "$CERTS/ca.pem" -CAkey "$CERTS/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -sha256 -days "$DAYS_SERVER" -extfile "$tmp.ext" -out "$tmp.pem"
  rm -f "$tmp.csr" "$tmp.ext"
  mv "$tmp.key" "$CERTS/server.key"
  mv "$tmp.pem" "$CERTS/server.pem"
}

server_ok() {
  valid "$CERTS/server.pem" && matches "$CERTS/server.pem" "$CERTS/server.key" &&
    openssl verify -CAfile "$CERTS/ca.pem" "$CERTS/server.pem" >/dev/null 2>&1 &&
    openssl x509 -noout -ext subjectAltName -in "$CERTS/server.pem" 2>/dev/null | grep -q 'DNS:localhost, IP Address:127.0.0.1'
}

# Fast path (pg.sh and kafka.sh call this on every start): nothing changed since the last full
# check, and nothing expires soon.
unchanged() {
  local f
  [ -f "$CERTS/.checked" ] || return 1
  for f in ca.pem ca.key server.pem server.key server-keystore.pem other-ca.pem; do
    [ -s "$CERTS/$f" ] && [ ! "$CERTS/$f" -nt "$CERTS/.checked" ] || return 1
  done
  valid "$CERTS/ca.pem" && valid "$CERTS/server.pem" && valid "$CERTS/other-ca.pem"
}

ensure() {
  command -v openssl >/dev/null || apt_install openssl
  lock "$CERTS"
  unchanged && return 0
  chmod 755 "$CERTS"
  local made=()
  if ! valid "$CERTS/ca.pem" || ! matches "$CERTS/ca.pem" "$CERTS/ca.key"; then
    new_ca ca "outbox-relay test CA"
    made+=(ca.pem ca.key)
    rm -f "$CERTS/server.pem"  # signed by the old CA
  fi
  if ! server_ok; then
    new_server
    made+=(server.pem server.key)
  fi
  if ! valid "$CERTS/other-ca.pem"; then
    new_ca other-ca "unrelated CA (negative tests)"
    made+=(other-ca.pem)
  fi
  # Kafka's PEM keystore: private key (PKCS#8) first, then the chain.
  local ks=$CERTS/server-keystore.pem
  if [ ! -s "$ks" ] || [ "$ks" -ot "$CERTS/server.pem" ] || [ "$ks" -ot "$CERTS/server.key" ]; then
    (umask 077; cat "$CERTS/server.key" "$CERTS/server.pem" "$CERTS/ca.pem" > "$ks.tmp")
    mv "$ks.tmp" "$ks"
    made+=(server-keystore.pem)
  fi
  chmod 644 "$CERTS"/*.pem
  chmod 600 "$CERTS"/*.key "$ks"
  touch "$CERTS/.checked"
  if [ ${#made[@]} -gt 0 ]; then note "made ${made[*]} in $CERTS"; fi
}

case "${1:-ensure}" in
  ensure) ensure; echo "certs ready in $CERTS (CA: $CERTS/ca.pem)" ;;
  dir) echo "$CERTS" ;;
  *) echo "usage: $0 [ensure|dir]" >&2; exit 2 ;;
esac
