#!/bin/bash
# Usage: docs/bench/cpu.sh target/release/meshless [RATE [SECONDS]] [-- extra agent args...]   (root)
#   PERF=1 also records a call-graph profile (perf.data in the work dir) and prints its top symbols.
#   RANDOM_PATHS=1 gives every request a path of its own; CONNS=N sets the connections (16).
# Agent CPU per traced request: nginx + oha -q RATE in a test-made cgroup
# (both ends traced, 16 keep-alive connections), the agent scoped to that
# cgroup, exporting every span over OTLP/gRPC to a blackhole rotel on
# 127.0.0.1 (as in `cargo xtask bench`, but with no other process counted).
set -u
BIN=$1; shift
RATE=5000; SECS=20
[ $# -gt 0 ] && [ "$1" != "--" ] && { RATE=$1; shift; }
[ $# -gt 0 ] && [ "$1" != "--" ] && { SECS=$1; shift; }
[ "${1:-}" = "--" ] && shift
D=/tmp/meshless-cpu-bench; mkdir -p $D/nginx; PORT=18491; MPORT=$((35000 + $$ % 5000)); OTLP=$((40000 + $$ % 5000))
CG=/sys/fs/cgroup/unified/meshless-cpu-$$
mkdir -p $CG
ROTEL=$(python3 -c "import rotel,os;print(os.path.join(os.path.dirname(rotel.__file__),'rotel-agent'))")
cat > $D/nginx.conf <<CONF
worker_processes 1; daemon off; pid $D/nginx.pid; error_log $D/nginx/error.log;
events { worker_connections 1024; }
http { access_log off; client_body_temp_path $D/nginx; proxy_temp_path $D/nginx; fastcgi_temp_path $D/nginx; uwsgi_temp_path $D/nginx; scgi_temp_path $D/nginx;
  server { listen 127.0.0.1:$PORT; location / { return 200 "ok\n"; } } }
CONF
NO_COLOR=1 "$ROTEL" start --otlp-grpc-endpoint 127.0.0.1:$OTLP --otlp-http-endpoint 127.0.0.1:$((OTLP + 1)) \
  --exporter blackhole --debug-log traces --debug-log-verbosity basic > $D/rotel.log 2>&1 & ROTEL_PID=$!
sh -c "echo \$\$ > $CG/cgroup.procs; exec nginx -c $D/nginx.conf" & NGINX=$!
"$BIN" --otlp-endpoint http://127.0.0.1:$OTLP --metrics-exporter none --ui off --metrics-addr 127.0.0.1:$MPORT \
  --stats-interval-secs 0 --cgroup $CG "$@" 2> $D/agent.log > /dev/null & AGENT=$!
for i in $(seq 400); do grep -q "meshless ready" $D/agent.log && break; kill -0 $AGENT 2>/dev/null || { cat $D/agent.log; kill $NGINX $ROTEL_PID; exit 1; }; sleep 0.05; done
sleep 1
# RANDOM_PATHS=1: every request has a path of its own (no two request heads alike).
URL="http://127.0.0.1:$PORT/"
[ -n "${RANDOM_PATHS:-}" ] && URL="--rand-regex-url 'http://127.0.0.1:$PORT/[a-z]{16}'"
sh -c "echo \$\$ > $CG/cgroup.procs; exec oha --no-tui --output-format json -z $((SECS + 4))s -c ${CONNS:-16} -q $RATE --latency-correction $URL" > $D/oha.json & OHA=$!
sleep 2
ticks() { awk '{print $14 + $15}' /proc/$AGENT/stat; }
user_ticks() { awk '{print $14}' /proc/$AGENT/stat; }
switches() { cat /proc/$AGENT/task/*/status | awk '/ctxt_switches/{s+=$2} END{print s}'; }
# Nanoseconds on a CPU, summed over the agent's threads (exact, where ticks are 10 ms).
run_ns() { cat /proc/$AGENT/task/*/schedstat | awk '{s+=$1} END{printf "%.0f", s}'; }
T0=$(ticks); U0=$(user_ticks); S0=$(switches); N0=$(run_ns)
per_thread() { for t in /proc/$AGENT/task/*; do echo "${t##*/} $(cat $t/comm | tr ' ' _) $(awk '/^voluntary_ctxt_switches/{print $2}' $t/status) $(awk '{print $14 + $15}' $t/stat)"; done | sort; }
P0=$(per_thread)
if [ -n "${PERF:-}" ]; then
  perf record -F ${PERF_HZ:-499} --call-graph dwarf,32768 -p $AGENT -o $D/perf.data -- sleep $SECS 2> /dev/null > /dev/null
else
  sleep $SECS
fi
T1=$(ticks); U1=$(user_ticks); S1=$(switches); N1=$(run_ns)
P1=$(per_thread)
wait $OHA
HZ=$(getconf CLK_TCK)
python3 - "$D/oha.json" "$T0" "$T1" "$HZ" "$SECS" "$S0" "$S1" "$U0" "$U1" "$N0" "$N1" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); t0, t1, hz, secs, s0, s1, u0, u1, n0, n1 = map(int, sys.argv[2:])
rps = d['summary']['requestsPerSec']
cpu_s = (t1 - t0) / hz
exact_s = (n1 - n0) / 1e9
print(f"oha {rps:.0f} req/s (success {d['summary']['successRate']:.3f}); agent CPU {cpu_s:.2f} s in {secs} s "
      f"= {100 * cpu_s / secs:.1f} % of a core = {cpu_s * 1e6 / (rps * secs):.1f} µs/request "
      f"(exact runtime: {exact_s * 1e6 / (rps * secs):.2f} µs/request); "
      f"(user {100 * (u1 - u0) / max(t1 - t0, 1):.0f} %); context switches {s1 - s0} ({(s1 - s0) / secs:.0f}/s)")
PY
curl -s 127.0.0.1:$MPORT/metrics | grep -E "^meshless_(spans_exported|dropped|kernel_events_lost|events_read)[a-z_]*" | head -8
kill $AGENT; wait $AGENT 2>/dev/null
kill $NGINX $ROTEL_PID; wait $NGINX $ROTEL_PID 2>/dev/null
echo "rotel received $(grep -o 'spans=[0-9]*' $D/rotel.log | cut -d= -f2 | paste -sd+ | bc) spans"
rmdir $CG 2>/dev/null
# Per thread (name: wakeups/s, CPU ticks) over the measured window.
join <(echo "$P0") <(echo "$P1") \
  | awk -v secs=$SECS '{printf "  thread %-16s %6.0f wakeups/s %5d ticks\n", $2, ($6 - $3) / secs, $7 - $4}'
if [ -n "${PERF:-}" ]; then
  perf report -i $D/perf.data --no-children --sort sym --stdio 2> /dev/null | grep -v "^#" | grep "%" | head -40
fi
