#!/bin/bash
# Usage: docs/bench/memory.sh target/release/meshless [extra agent args...]  (root; SMAPS=1 lists the largest mappings)
# Peak and steady RSS of the agent, idle and under oha -q 10000 (nginx and oha in a test-made cgroup).
set -u
BIN=$1; shift
D=/tmp/meshless-memory-bench; mkdir -p $D; PORT=18481; MPORT=$((30000 + $$ % 5000))
CG=/sys/fs/cgroup/unified/meshless-rss-$$
mkdir -p $CG $D/nginx
cat > $D/nginx.conf <<CONF
worker_processes 1; daemon off; pid $D/nginx.pid; error_log $D/nginx/error.log;
events { worker_connections 1024; }
http { access_log off; client_body_temp_path $D/nginx; proxy_temp_path $D/nginx; fastcgi_temp_path $D/nginx; uwsgi_temp_path $D/nginx; scgi_temp_path $D/nginx;
  server { listen 127.0.0.1:$PORT; location / { return 200 "ok\n"; } } }
CONF
sh -c "echo \$\$ > $CG/cgroup.procs; exec nginx -c $D/nginx.conf" & NGINX=$!
"$BIN" --traces-exporter none --metrics-exporter none --ui off --metrics-addr 127.0.0.1:$MPORT \
  --stats-interval-secs 0 --cgroup $CG "$@" 2> $D/agent.log > /dev/null & AGENT=$!
T0=$(date +%s.%N)
for i in $(seq 400); do grep -q "meshless ready" $D/agent.log && break; kill -0 $AGENT 2>/dev/null || { cat $D/agent.log; exit 1; }; sleep 0.05; done
T1=$(date +%s.%N)
snap() { # label
  awk -v l="$1" '/^(VmHWM|VmRSS|RssAnon|RssFile|RssShmem):/{v[$1]=$2/1024} END{printf "%-22s HWM %6.1f  RSS %6.1f  anon %6.1f  file %6.1f  shmem %6.1f MiB\n", l, v["VmHWM:"], v["VmRSS:"], v["RssAnon:"], v["RssFile:"], v["RssShmem:"]}' /proc/$AGENT/status
}
echo "ready after $(echo "$T1 - $T0" | bc) s"
snap ready
sleep 5; snap "idle 5s"
sh -c "echo \$\$ > $CG/cgroup.procs; exec oha --no-tui --output-format json -z 20s -c 16 -q 10000 --latency-correction http://127.0.0.1:$PORT/" > $D/oha.json & OHA=$!
HW=0; for i in $(seq 5); do sleep 2; v=$(curl -s 127.0.0.1:$MPORT/metrics | awk '/^meshless_kernel_ringbuf_used_bytes /{print int($2)}'); [ "${v:-0}" -gt $HW ] && HW=$v; done
snap "10k req/s, 10s"; echo "ring buffer high water over 2 s windows (max of 5): $HW bytes"
wait $OHA; snap "10k req/s, end (20s)"
python3 -c "import json;d=json.load(open('$D/oha.json'));print('oha rps %.0f success %.3f' % (d['summary']['requestsPerSec'], d['summary']['successRate']))"
sleep 5; snap "idle after load 5s"
if [ -n "${SMAPS:-}" ]; then
  awk '/^[0-9a-f]+-[0-9a-f]+ /{name=$6; if(name=="")name="[anon]"; range=$1} /^Rss:/{ if($2>512) printf "%8d kB %s %s\n",$2,range,name}' /proc/$AGENT/smaps | sort -rn | head -15
fi
kill $AGENT; wait $AGENT 2>/dev/null
kill $NGINX; wait $NGINX 2>/dev/null
rmdir $CG 2>/dev/null
grep -iE "error|warn" $D/agent.log | head -5
