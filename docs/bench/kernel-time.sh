#!/bin/bash
# Time spent in the agent's kernel programs per HTTP/1 request, as the
# kernel itself measures it (kernel.bpf_stats_enabled: run_cnt and
# run_time_ns of every loaded program). That time is charged to the traced
# applications' syscalls, not to the agent's process.
# Usage: docs/bench/kernel-time.sh BIN [SECONDS [RATE]]   (root; needs bpftool: apt install bpftool)
#   RATE: oha -q RATE (fixed rate); default: as fast as possible (closed loop).
# nginx and `oha -c 16` in a test-made cgroup, both ends traced, the agent
# scoped to that cgroup and exporting over OTLP/gRPC to a blackhole rotel.
# Prints req/s, then each program's runs per request, ns per run and ns per
# request, and the total per request.
set -u
BIN=$1; SECS=${2:-8}; RATE=${3:-}
command -v bpftool > /dev/null || { echo "needs bpftool (apt install bpftool)"; exit 1; }
D=/tmp/meshless-kernel-time; rm -rf $D; mkdir -p $D/nginx
PORT=18592; MPORT=$((35000 + $$ % 5000)); OTLP=$((40000 + $$ % 5000))
CG=/sys/fs/cgroup/unified/meshless-ktime-$$; mkdir -p $CG
ROTEL=$(python3 -c "import rotel,os;print(os.path.join(os.path.dirname(rotel.__file__),'rotel-agent'))")
cat > $D/nginx.conf <<CONF
worker_processes 1; daemon off; pid $D/nginx.pid; error_log $D/nginx/error.log;
events { worker_connections 1024; }
http { access_log off; client_body_temp_path $D/nginx; proxy_temp_path $D/nginx; fastcgi_temp_path $D/nginx; uwsgi_temp_path $D/nginx; scgi_temp_path $D/nginx;
  server { listen 127.0.0.1:$PORT; keepalive_requests 1000000; location / { return 200 "ok\n"; } } }
CONF
NO_COLOR=1 "$ROTEL" start --otlp-grpc-endpoint 127.0.0.1:$OTLP --otlp-http-endpoint 127.0.0.1:$((OTLP + 1)) \
  --exporter blackhole > $D/rotel.log 2>&1 & ROTEL_PID=$!
sh -c "echo \$\$ > $CG/cgroup.procs; exec nginx -c $D/nginx.conf" & NGINX=$!
"$BIN" --otlp-endpoint http://127.0.0.1:$OTLP --metrics-exporter none --ui off --metrics-addr 127.0.0.1:$MPORT \
  --stats-interval-secs 0 --cgroup $CG 2> $D/agent.log > /dev/null & AGENT=$!
for i in $(seq 400); do grep -q "meshless ready" $D/agent.log && break; kill -0 $AGENT 2>/dev/null || { cat $D/agent.log; exit 1; }; sleep 0.05; done
sleep 1
WAS=$(sysctl -n kernel.bpf_stats_enabled)
sysctl -q kernel.bpf_stats_enabled=1
bpftool prog show --json > $D/before.json
Q=""; [ -n "$RATE" ] && Q="-q $RATE"
sh -c "echo \$\$ > $CG/cgroup.procs; exec oha --no-tui --output-format json -z ${SECS}s -c 16 $Q http://127.0.0.1:$PORT/" > $D/oha.json
bpftool prog show --json > $D/after.json
sysctl -q kernel.bpf_stats_enabled=$WAS
kill $AGENT; wait $AGENT 2>/dev/null
kill $NGINX $ROTEL_PID; wait $NGINX $ROTEL_PID 2>/dev/null
rmdir $CG 2>/dev/null
python3 - $D <<'PY'
import json, sys
d = sys.argv[1]
oha = json.load(open(f"{d}/oha.json"))["summary"]
reqs = oha["requestsPerSec"] * oha["total"]
before = {p["id"]: p for p in json.load(open(f"{d}/before.json"))}
rows = []
for p in json.load(open(f"{d}/after.json")):
    b = before.get(p["id"], {})
    runs = p.get("run_cnt", 0) - b.get("run_cnt", 0)
    ns = p.get("run_time_ns", 0) - b.get("run_time_ns", 0)
    if runs:
        rows.append((ns, runs, p.get("name", "?")))
print(f"{oha['requestsPerSec']:.0f} req/s, {reqs:.0f} requests (success {oha['successRate']:.3f})")
print(f"{'program':28} {'runs/req':>8} {'ns/run':>7} {'ns/req':>7}")
for ns, runs, name in sorted(rows, reverse=True):
    if ns / reqs >= 1:
        print(f"{name:28} {runs / reqs:8.2f} {ns / runs:7.0f} {ns / reqs:7.0f}")
print(f"{'total':28} {'':8} {'':7} {sum(r[0] for r in rows) / reqs:7.0f}")
PY
