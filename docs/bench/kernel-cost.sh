#!/bin/bash
# Kernel-side cost per request (docs/bench/kernel-cost.md).
# Usage: docs/bench/kernel-cost.sh target/release/meshless WORKLOAD N
#   WORKLOAD: http | http-big | h2 | h2-big | grpc (N calls at 500/s)
# Runs the agent scoped to a private cgroup (so only this traffic counts),
# drives N requests over loopback from inside that cgroup, and prints the
# kernel's records and bytes per request from the agent's final statistics.
# Needs root, nginx, oha, and target/release/grpc-load for `grpc`.
set -u
BIN=$1; WL=$2; N=$3
CG=/sys/fs/cgroup/unified/kcost-measure
D=/tmp/kcost-measure; rm -rf $D; mkdir -p $D/www
mkdir -p $CG
head -c 65536 /dev/urandom | base64 -w 76 | head -c 65536 > $D/www/big.txt
cat > $D/nginx.conf <<NG
worker_processes 1;
daemon off;
pid $D/nginx.pid;
error_log $D/error.log;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $D;
  proxy_temp_path $D; fastcgi_temp_path $D; uwsgi_temp_path $D; scgi_temp_path $D;
  server {
    listen 127.0.0.1:18931;
    keepalive_requests 1000000;
    location / { return 200 "hello from the app\n"; }
    location /big { alias $D/www/big.txt; sendfile off; }
  }
  server {
    listen 127.0.0.1:18934 http2;
    location / { return 200 "hello from the app\n"; }
    location /big { alias $D/www/big.txt; sendfile off; }
  }
}
NG
incg() { sh -c "echo \$\$ > $CG/cgroup.procs; exec \"\$@\"" sh "$@"; }
incg nginx -c $D/nginx.conf -e $D/error.log > $D/nginx.out 2>&1 &
NGINX=$!
if [ "$WL" = grpc ]; then
  incg $(dirname $BIN)/grpc-load --threads 1 serve --addr 127.0.0.1:18932 > $D/grpcs.out 2>&1 &
  GS=$!
fi
sleep 0.5
$BIN --cgroup kcost-measure --traces-exporter none --metrics-exporter none --ui off --stats-interval-secs 0 --metrics-addr 127.0.0.1:18933 > $D/agent.out 2>&1 &
AG=$!
for i in $(seq 600); do grep -q "meshless ready" $D/agent.out && break; sleep 0.5; done
case $WL in
  http) incg oha -n $N -c 1 --no-tui --output-format json http://127.0.0.1:18931/ > $D/load.json ;;
  http-big) incg oha -n $N -c 1 --no-tui --output-format json http://127.0.0.1:18931/big > $D/load.json ;;
  h2) incg oha -n $N -c 1 --http2 --no-tui --output-format json http://127.0.0.1:18934/ > $D/load.json ;;
  h2-big) incg oha -n $N -c 1 --http2 --no-tui --output-format json http://127.0.0.1:18934/big > $D/load.json ;;
  grpc) incg $(dirname $BIN)/grpc-load load --target 127.0.0.1:18932 --rate 500 --duration $((N/500)) --connections 1 > $D/load.json ;;
esac
sleep 3
kill -INT $AG; wait $AG
kill $NGINX ${GS:-} 2>/dev/null; wait 2>/dev/null
python3 - "$D" "$N" "$WL" <<'PY'
import json,re,sys
d,n,wl=sys.argv[1],int(sys.argv[2]),sys.argv[3]
v=json.load(open(d+"/load.json"))
ok=sum(v["statusCodeDistribution"].values())
line=[l for l in open(d+"/agent.out") if "final statistics" in l][-1]
c=dict(re.findall(r"(\w+)=(\d+)",line))
c={k:int(x) for k,x in c.items()}
ev=c.get("kernel_events_sent",0); by=c.get("kernel_event_bytes",0)
print(f"{wl}: requests={ok} events={ev} bytes={by} events/req={ev/ok:.3f} bytes/req={by/ok:.1f} payload/req={(by-176*ev)/ok:.1f} cont={c.get('kernel_continuation_events')} trunc={c.get('kernel_truncated')} gaps={c.get('event_sequence_gaps')} spans={c.get('spans_created', c.get('spans_total','?'))}")
PY
