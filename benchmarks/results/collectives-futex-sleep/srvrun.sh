# usage: srvrun.sh label envprefix nshard [extra]
label=$1; envp=$2; n=$3; shift 3
(env $envp mixserve launch --model /tmp/an/trained --num-shard $n --dtype bfloat16 --port 8090 "$@" > /tmp/srv-$label.log 2>&1 &)
sleep 2; for i in $(seq 1 120); do curl -s localhost:8090/health >/dev/null && break; sleep 1; done
pids=$(pgrep -f "mixserve launch" | head -1),$(pgrep -f "mixserve.cli shard" | paste -sd,)
echo "== $label"; python /tmp/c1.py $pids 30
pkill -f "mixserve launch"; sleep 3
