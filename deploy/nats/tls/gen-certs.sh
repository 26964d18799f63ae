#!/bin/sh
# A private CA and the certificates deploy/nats/tls.conf and leaf.conf name, made with
# the openssl CLI (OpenSSL 1.1+, 3.x or LibreSSL):
#
#   sh deploy/nats/tls/gen-certs.sh                    # into deploy/nats/tls/
#   NATS_TLS_SANS="DNS:hub.example.com,DNS:nats-1,DNS:nats-2,DNS:nats-3" \
#     sh deploy/nats/tls/gen-certs.sh /path/to/dir
#
#   ca.pem, ca-key.pem            the CA (clients need ca.pem only; move ca-key.pem away)
#   server-cert.pem, -key.pem     the hub nodes: clients (4222), leaf nodes (7422), routes
#                                 (6222); valid for every name in NATS_TLS_SANS
#   leaf-cert.pem, leaf-key.pem   a GPU host's leaf server (the hub verifies it on 7422)
#
# An existing ca.pem + ca-key.pem in the directory is reused, so running it again re-issues
# the server and leaf certificates (new names in NATS_TLS_SANS) under the same CA. For a
# fleet beyond a test setup, prefer your own PKI (cert-manager, Vault, ...): what matters
# is a server certificate valid for the names clients dial and a CA file to trust it.
set -eu

out=${1:-$(dirname "$0")}
sans=${NATS_TLS_SANS:-DNS:localhost,IP:127.0.0.1,DNS:nats-1,DNS:nats-2,DNS:nats-3}
days=${NATS_TLS_DAYS:-825}

mkdir -p "$out"
cd "$out"
umask 077 # private keys: owner only
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

cat >"$tmp/ext.cnf" <<EXT
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
# clientAuth too: a node presents the same certificate when it dials a route
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = $sans
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[leaf]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EXT

key() { openssl ecparam -name prime256v1 -genkey -noout -out "$1"; }

if [ ! -f ca.pem ] || [ ! -f ca-key.pem ]; then
  key ca-key.pem
  openssl req -new -key ca-key.pem -subj "/CN=llmfleet NATS CA" -out "$tmp/ca.csr"
  openssl x509 -req -in "$tmp/ca.csr" -signkey ca-key.pem -days 3650 \
    -extfile "$tmp/ext.cnf" -extensions ca -out ca.pem
fi

issue() { # name, common name, extensions section
  key "$1-key.pem"
  openssl req -new -key "$1-key.pem" -subj "/CN=$2" -out "$tmp/$1.csr"
  openssl x509 -req -in "$tmp/$1.csr" -CA ca.pem -CAkey ca-key.pem -set_serial "0x$(openssl rand -hex 16)" \
    -days "$days" -extfile "$tmp/ext.cnf" -extensions "$3" -out "$1-cert.pem"
}
issue server "llmfleet nats" server
issue leaf "llmfleet leaf" leaf
chmod 644 ca.pem server-cert.pem leaf-cert.pem
echo "wrote $(pwd): ca.pem, server-cert.pem, server-key.pem, leaf-cert.pem, leaf-key.pem ($sans)"
