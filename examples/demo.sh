#!/usr/bin/env bash
# The main demo (./dev demo): a fresh development PKI, jobworkerd on 127.0.0.1, and a few
# jobs through jobctl. Everything lives in a temporary directory, removed at the end; running
# jobs are stopped and the server shut down on the way out.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
BIN=$PWD/.venv/bin
DIR=$(mktemp -d /tmp/jobworker-demo.XXXXXX)
SERVER_PID=
cleanup() {
  if [ -n "$SERVER_PID" ]; then
    "$BIN/jobctl" ls --json 2>/dev/null | "$BIN/python" -c \
      'import json,sys; [print(j["id"]) for j in json.load(sys.stdin)]' |
      while read -r id; do "$BIN/jobctl" stop --grace 0s "$id" >/dev/null 2>&1 || true; done
    kill -TERM "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$DIR"
}
trap cleanup EXIT
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

step "jobworker-certs init \$DIR/pki; jobworker-certs client \$DIR/pki alice"
"$BIN/jobworker-certs" init "$DIR/pki"
"$BIN/jobworker-certs" client "$DIR/pki" alice
"$BIN/jobworkerd" --listen 127.0.0.1:0 --state-dir "$DIR/state" \
  --ca "$DIR/pki/ca.pem" --cert "$DIR/pki/server.pem" --key "$DIR/pki/server.key" \
  2>"$DIR/server.log" &
SERVER_PID=$!
for _ in $(seq 100); do grep -q "serving on" "$DIR/server.log" && break; sleep 0.1; done
grep -q "serving on" "$DIR/server.log" || { cat "$DIR/server.log" >&2; exit 1; }
PORT=$(sed -n 's/.*serving on [^ ]*:\([0-9]*\).*/\1/p' "$DIR/server.log" | head -1)
export JOBWORKER_SERVER=127.0.0.1:$PORT JOBWORKER_CA=$DIR/pki/ca.pem
export JOBWORKER_CERT=$DIR/pki/alice.pem JOBWORKER_KEY=$DIR/pki/alice.key
export PATH=$BIN:$PATH
echo "jobworkerd is serving on 127.0.0.1:$PORT (mutual TLS 1.3); you are 'alice'"

step jobctl run -- sh -c 'echo "hello from $(hostname) as $(id -un)"; ls /sys/class/net; exit 3'
jobctl run -- sh -c 'echo "hello from $(hostname) as $(id -un)"; ls /sys/class/net; exit 3' || echo "(exit status $?)"

step 'ID=$(jobctl start -q --memory 64M --cpus 0.5 -- sh -c "for i in 1 2 3; do echo tick \$i; sleep 0.5; done")'
ID=$(jobctl start -q --memory 64M --cpus 0.5 -- sh -c 'for i in 1 2 3; do echo tick $i; sleep 0.5; done')
echo "$ID"

step jobctl ls
jobctl ls

step "jobctl logs -f ${ID:0:8}"
jobctl logs -f "${ID:0:8}"

step 'SLEEPER=$(jobctl start -q sleep 600); jobctl stop --grace 2s $SLEEPER'
SLEEPER=$(jobctl start -q sleep 600)
jobctl stop --grace 2s "$SLEEPER"

step jobctl ls --all
jobctl ls --all

step "jobctl status ${ID:0:8}"
jobctl status "${ID:0:8}"
